"""mamba-ssm's CUDA selective-scan kernel, imported on first use so that nothing needs mamba-ssm off a GPU."""
import functools

import torch


@functools.cache
def _kernel():
    try:
        # mamba-ssm after 2.3.2.post1 installs without this extension unless MAMBA_KEEP_CUDA_BUILD=TRUE, and
        # its selective_scan_fn then fails when called: without the kernel, mamba-ssm does not count.
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn


def unavailable():
    """Why this backend cannot run here, or None."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if _kernel() is None:
        return ("mamba-ssm and its selective_scan_cuda extension do not import "
                "(MAMBA_KEEP_CUDA_BUILD=TRUE pip install -r requirements-cuda.txt --no-build-isolation)")
    return None


def unsupported(u):
    """Why this backend cannot take tensors like `u`, or None."""
    if not u.is_cuda:
        return f"it needs CUDA tensors, got {u.device}"
    if u.dtype == torch.float64:
        return "it does not support float64"
    return None


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _kernel()(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                     return_last_state=False)
