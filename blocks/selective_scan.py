"""Selective scan (the S6 recurrence of Mamba): the one entry point and the choice of backend.

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t ;  y_t = <C_t, h_t> + D u_t ;  y *= silu(z)

Same semantics as mamba-ssm's `selective_scan_fn` for real A (D, N) and input-dependent B, C (batch, N, L).
Each backend is a module of its own, scan_<name>.py, with `unavailable()`, `unsupported(u)` and `scan(...)`,
imported when first asked about (numba and Triton take a while to import); a new backend is a new module,
its name in BACKENDS and its place in AUTO.
"""
import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "numba", "torch")
ENV_VAR = "EMNET_SCAN_BACKEND"
# What "auto" picks, by device type, in order: on a GPU mamba-ssm's kernel, else Triton's, else PyTorch.
AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("numba", "torch")}
_setting = "auto"


@functools.cache
def backend_module(name):
    """The module of backend `name` (one of BACKENDS)."""
    return importlib.import_module(f"{__package__}.scan_{name}")


def available_scan_backends():
    """Backends usable in this process, in order of preference."""
    return [name for name in BACKENDS if backend_module(name).unavailable() is None]


def _validated(name, source):
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r} from {source} "
                         f"(choose auto or one of: {', '.join(available_scan_backends())})")
    reason = backend_module(name).unavailable()
    if reason is not None:
        raise ValueError(f"scan backend {name!r} from {source} is not available here: {reason} "
                         f"(available: {', '.join(available_scan_backends())})")
    return name


def set_scan_backend(name):
    """Select the backend for every later call: auto or one of BACKENDS."""
    global _setting
    _setting = _validated(str(name).lower(), "set_scan_backend")


def get_scan_backend():
    """The current setting ("auto" or a backend name), before the environment variable is applied."""
    return _setting


def forced_scan_backend():
    """The backend set by set_scan_backend, else by EMNET_SCAN_BACKEND; None when "auto" chooses."""
    name = _setting
    if name == "auto":
        name = _validated(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
    return None if name == "auto" else name


def scan_backend_for(tensor):
    """The backend "auto" picks for inputs like `tensor`: the first of AUTO's for its device that runs here
    and takes them."""
    for name in AUTO.get(tensor.device.type, ()):
        module = backend_module(name)
        if module.unavailable() is None and module.unsupported(tensor) is None:
            return name
    return "torch"


def _resolve_backend(u):
    name = forced_scan_backend()
    if name is None:
        return scan_backend_for(u)
    reason = backend_module(name).unsupported(u)
    if reason is not None:
        raise ValueError(f"scan backend {name!r} cannot run these inputs: {reason}")
    return name


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D={dim}, N), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported")
    state = A.shape[1]
    expected = {"delta": (delta, (batch, dim, length)), "B": (B, (batch, state, length)),
                "C": (C, (batch, state, length)), "D": (D, (dim,)), "z": (z, (batch, dim, length)),
                "delta_bias": (delta_bias, (dim,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Selective scan of u (batch, D, L); returns y (batch, D, L) in u's dtype.

    Runs in float32 (float64 if any input is float64) with autocast disabled inside; the triton backend
    takes float16/bfloat16 inputs as they are (its kernels accumulate in float32).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = backend_module(_resolve_backend(u))
    if getattr(backend, "KEEPS_INPUT_DTYPE", False):
        return backend.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=bool(delta_softplus))
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    dtype = torch.float64 if wide else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        args = [None if t is None else t.to(dtype) for t in tensors]
        out = backend.scan(*args, delta_softplus=bool(delta_softplus))
    return out.to(u.dtype)
