"""Session set-up and shared fixtures. Without CUDA, Triton kernels run in Triton's CPU interpreter
(tests/test_scan_triton.py), which needs TRITON_INTERPRET=1 before triton is first imported; torch's flop
counter imports it while other test modules are collected, so it is set here, first."""
import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
