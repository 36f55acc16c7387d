"""Triton, where installed: the decorator the kernels use, whether they can run on a device, and a
faster scan for Triton's CPU interpreter (tests and smoke runs).

Triton is imported here and nowhere else, guarded, so that the project imports without it. Kernels are
compiled for the GPU, or interpreted on the CPU when TRITON_INTERPRET=1 was set before they were defined.
"""
import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Linux wheel, or not installed: the triton backend reports itself unavailable
    triton = tl = None


def jit(fn):
    """triton.jit where Triton is installed; otherwise `fn` unchanged, which nothing launches."""
    return fn if triton is None else triton.jit(fn)


def is_interpreted(kernel):
    return type(kernel).__name__ == "InterpretedFunction"


def unavailable_reason(kernel, device=None):
    """None when `kernel` can run on `device` (None: on some device of this process), else why not."""
    if triton is None:
        return "triton is not installed (pip install triton, Linux only)"
    if is_interpreted(kernel):
        return None
    if device is not None and torch.device(device).type != "cuda":
        return (f"Triton kernels run on CUDA tensors, got {torch.device(device)} "
                "(set TRITON_INTERPRET=1 before the first import to interpret them on the CPU)")
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before the first import to interpret the kernels on the CPU)"
    return None


def _scan_slices(self, inputs):
    """Triton's interpreter scan, one combine call per position along the axis instead of per element.

    Same order of operations as the stock `generic_scan` (which it replaces): acc_0 = x_0,
    acc_i = combine(acc_{i-1}, x_i); reverse scans are flipped around it by the caller.
    """
    data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in inputs]
    outs = [np.empty_like(d) for d in data]
    acc = None
    for i in range(data[0].shape[0]):
        current = tuple(self.to_tensor(d[i], arg.dtype) for d, arg in zip(data, inputs))
        if acc is None:
            acc = current
        else:
            ret = self.combine_fn.fn(*acc, *current)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for out, value in zip(outs, acc):
            out[i] = np.reshape(value.handle.data, out[i].shape)
    return [self.to_tensor(np.ascontiguousarray(np.moveaxis(out, 0, self.axis)), arg.dtype)
            for out, arg in zip(outs, inputs)]


def speed_up_interpreter():
    """Make the interpreter's associative scans about 100x faster (the stock one calls the combine
    function once per element). Returns False where this Triton has no such interpreter hook."""
    try:
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        return False
    if not hasattr(ScanOps, "generic_scan"):
        return False
    ScanOps.generic_scan = _scan_slices
    return True
