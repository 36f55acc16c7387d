"""Session set-up. Without CUDA, Triton kernels run in Triton's CPU interpreter (tests/test_scan_triton.py),
which needs TRITON_INTERPRET=1 before triton is first imported; torch's flop counter imports it while
other test modules are collected, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
