"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends.

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t ;  y_t = <C_t, h_t> + D u_t ;  y *= silu(z)

Same semantics as mamba-ssm's `selective_scan_fn` for real A (D, N) and input-dependent B, C (batch, N, L).

Backends: "cuda" (mamba-ssm's kernel, imported lazily), "numba" (CPU kernels, chunk-checkpointed
backward) and "torch" (portable, autograd through a chunked log-depth scan). `set_scan_backend`,
the EMNET_SCAN_BACKEND environment variable and `scan_backend_for` decide which one runs.
"""
import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    import numba as _numba
except ImportError:
    _numba = None

BACKENDS = ("cuda", "numba", "torch")
ENV_VAR = "EMNET_SCAN_BACKEND"
_setting = "auto"

# Steps per chunk of the torch backend: the log-depth scan inside a chunk costs log2(T) passes, the
# Python loop over chunks costs L / T iterations; autograd keeps only each chunk's starting state.
TORCH_CHUNK = 64


@functools.cache
def _mamba_scan_fn():
    """mamba-ssm's CUDA scan, or None; imported on first use so CPU runs never need mamba-ssm."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn


def _backend_available(name):
    if name == "torch":
        return True
    if name == "numba":
        return _numba is not None
    return torch.cuda.is_available() and _mamba_scan_fn() is not None


def available_scan_backends():
    """Backends usable in this process, in order of preference."""
    return [name for name in BACKENDS if _backend_available(name)]


def _validated(name, source):
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r} from {source} "
                         f"(choose auto or one of: {', '.join(available_scan_backends())})")
    if not _backend_available(name):
        raise ValueError(f"scan backend {name!r} from {source} is not available here "
                         f"(available: {', '.join(available_scan_backends())})")
    return name


def set_scan_backend(name):
    """Select the backend for every later call: auto | cuda | numba | torch."""
    global _setting
    _setting = _validated(str(name).lower(), "set_scan_backend")


def get_scan_backend():
    """The current setting ("auto" or a backend name), before the environment variable is applied."""
    return _setting


def scan_backend_for(tensor):
    """The backend "auto" picks for inputs like `tensor`."""
    if tensor.is_cuda:
        usable = tensor.dtype != torch.float64 and _mamba_scan_fn() is not None
        return "cuda" if usable else "torch"
    return "numba" if tensor.device.type == "cpu" and _numba is not None else "torch"


def _resolve_backend(u):
    name = _setting
    if name == "auto":
        name = _validated(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
    if name == "auto":
        return scan_backend_for(u)
    if name == "cuda" and not u.is_cuda:
        raise ValueError(f"scan backend 'cuda' needs CUDA tensors, got {u.device}")
    if name == "cuda" and u.dtype == torch.float64:
        raise ValueError("scan backend 'cuda' does not support float64; use 'torch' or 'auto'")
    if name == "numba" and u.device.type != "cpu":
        raise ValueError(f"scan backend 'numba' needs CPU tensors, got {u.device}")
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

    Runs in float32 (float64 if any input is float64) with autocast disabled inside.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = _resolve_backend(u)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    dtype = torch.float64 if wide else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        args = [None if t is None else t.to(dtype) for t in tensors]
        out = _SCANS[backend](*args, delta_softplus=bool(delta_softplus))
    return out.to(u.dtype)


# ----------------------------------------------------------------------------------------- cuda

def _scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _mamba_scan_fn()(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=False)


# ---------------------------------------------------------------------------------------- torch

def _torch_chunk(h0, u, delta, A, B, C):
    """One chunk: (y (batch, D, T), last state (batch, D, N)) from the state h0 before it."""
    a = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))              # (b, d, T, n)
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)   # (b, d, T, n)
    # Hillis-Steele scan of h_t = a_t h_{t-1} + x_t: log2(T) passes, no exp(-cumsum) overflow.
    step, length = 1, a.shape[2]
    while step < length:
        x = torch.cat([x[:, :, :step], a[:, :, step:] * x[:, :, :-step] + x[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    h = x + a * h0.unsqueeze(2)
    y = torch.einsum("bdtn,bnt->bdt", h, C)
    return y, h[:, :, -1]


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    # Recompute each chunk in backward so only chunk-boundary states are kept for autograd.
    recompute = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C))
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # split, not slicing: its backward concatenates once instead of a full-length zero gradient per chunk.
    for parts in zip(*(t.split(TORCH_CHUNK, dim=-1) for t in (u, delta, B, C))):
        u_c, delta_c, B_c, C_c = parts
        args = (h, u_c, delta_c, A, B_c, C_c)
        y, h = checkpoint(_torch_chunk, *args, use_reentrant=False) if recompute else _torch_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z)
    return y


# ---------------------------------------------------------------------------------------- numba
# Forward: one prange task per (batch, channel) row, state kept in registers/L1. It stores the state
# at every chunk start (batch x D x L/NUMBA_CHUNK x N), never the per-step states. Backward
# recomputes a chunk's states from its start, then walks it in reverse. dB, dC and dA are sums over
# channels, so rows are split into one group per thread and each group owns its partial sums.

NUMBA_CHUNK = 64
# Reassociation lets LLVM vectorise the sums over N; no nnan/ninf, so inf/nan still propagate.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

if _numba is not None:
    from llvmlite import ir as _ir
    from numba import prange, types as _nbtypes
    from numba.extending import intrinsic, overload

    @intrinsic
    def _pow2(typingctx, k):
        """2**k for an integer-valued float k within the normal exponent range, from its bits."""
        if k not in (_nbtypes.float32, _nbtypes.float64):
            return None
        mantissa, bias, width = (23, 127, 32) if k == _nbtypes.float32 else (52, 1023, 64)

        def codegen(context, builder, sig, args):
            int_type = _ir.IntType(width)
            bits = builder.add(builder.fptosi(args[0], int_type), _ir.Constant(int_type, bias))
            bits = builder.shl(bits, _ir.Constant(int_type, mantissa))
            return builder.bitcast(bits, context.get_value_type(sig.return_type))

        return k(k), codegen

    def _exp(x):
        return math.exp(x)

    @overload(_exp, inline="always")
    def _exp_vectorisable(x):
        # math.exp is a scalar libm call that blocks SIMD (numba has no SVML here); this
        # exp(x) = 2**k * exp(f ln2) with a Taylor polynomial is branch-free and vectorises.
        # Relative error ~1 ulp with a degree-7 polynomial in float32, degree 14 in float64.
        real = np.float32 if x == _nbtypes.float32 else np.float64
        lo, hi = (real(-126), real(127)) if real is np.float32 else (real(-1022), real(1023))
        log2e, half, zero, inf = real(1 / math.log(2)), real(0.5), real(0), real(np.inf)
        # ln 2 split in two (Cody-Waite) so that x - k ln2 is exact for large |x|.
        ln2_hi, ln2_lo = ((real(0.693359375), real(-2.12194440e-4)) if real is np.float32 else
                          (real(6.93147180369123816490e-01), real(1.90821492927058770002e-10)))
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14 = (
            real(1 / math.factorial(i)) for i in range(15))
        wide = real is np.float64

        def impl(x):
            y = x * log2e
            k = np.floor(min(max(y, lo), hi) + half)
            f = (x - k * ln2_hi) - k * ln2_lo
            p = c7
            if wide:  # a compile-time constant: float32 code has no extra terms
                p = ((((((c14 * f + c13) * f + c12) * f + c11) * f + c10) * f + c9) * f + c8) * f + c7
            p = ((((((p * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + c0
            r = p * _pow2(k)
            r = zero if y < lo else r
            r = inf if y > hi else r
            return x if x != x else r

        return impl

    @_numba.njit(inline="always", fastmath=_FASTMATH)
    def _softplus(x):
        # Threshold 20 as in torch.nn.functional.softplus and the mamba-ssm kernel.
        return math.log1p(math.exp(x)) if x <= 20 else x

    @_numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _numba_forward(u, delta, A, Bt, Ct, Dv, z, bias, softplus, has_z, chunk, out, states):
        batch, dim, length = u.shape
        nstate = A.shape[1]
        save = states.shape[2] > 0
        for row in prange(batch * dim):
            b, d = row // dim, row % dim
            h = np.zeros(nstate, A.dtype)
            for t in range(length):
                if save and t % chunk == 0:
                    states[b, d, t // chunk, :] = h
                dt = delta[b, d, t] + bias[d]
                if softplus:
                    dt = _softplus(dt)
                x = dt * u[b, d, t]
                y = Dv[d] * u[b, d, t]
                for n in range(nstate):
                    h[n] = _exp(dt * A[d, n]) * h[n] + x * Bt[b, t, n]
                    y += Ct[b, t, n] * h[n]
                if has_z:
                    y *= z[b, d, t] / (1 + math.exp(-z[b, d, t]))
                out[b, d, t] = y

    @_numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _numba_backward(u, delta, A, Bt, Ct, Dv, z, bias, softplus, has_z, chunk, states, dout,
                        du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part):
        batch, dim, length = u.shape
        nstate = A.shape[1]
        groups = dA_part.shape[0]
        rows = batch * dim
        nchunks = states.shape[2]
        for g in prange(groups):
            hbuf = np.empty((chunk + 1, nstate), A.dtype)  # h_{t-1}, h_t, ... within a chunk
            abuf = np.empty((chunk, nstate), A.dtype)      # exp(delta'_t A)
            ybuf = np.empty(chunk, A.dtype)                # <C_t, h_t> + D u_t, for the z gate
            adj = np.empty(nstate, A.dtype)                # dloss / dh_t
            dA_row = np.empty(nstate, A.dtype)
            for row in range(g * rows // groups, (g + 1) * rows // groups):
                b, d = row // dim, row % dim
                adj[:] = 0
                dA_row[:] = 0
                for c in range(nchunks - 1, -1, -1):
                    t0 = c * chunk
                    steps = min(length, t0 + chunk) - t0
                    hbuf[0, :] = states[b, d, c, :]
                    for i in range(steps):
                        t = t0 + i
                        dt = delta[b, d, t] + bias[d]
                        if softplus:
                            dt = _softplus(dt)
                        x = dt * u[b, d, t]
                        y = Dv[d] * u[b, d, t]
                        for n in range(nstate):
                            a = _exp(dt * A[d, n])
                            abuf[i, n] = a
                            hbuf[i + 1, n] = a * hbuf[i, n] + x * Bt[b, t, n]
                            y += Ct[b, t, n] * hbuf[i + 1, n]
                        ybuf[i] = y
                    for i in range(steps - 1, -1, -1):
                        t = t0 + i
                        raw = delta[b, d, t] + bias[d]
                        dt = _softplus(raw) if softplus else raw
                        ut = u[b, d, t]
                        dy = dout[b, d, t]
                        if has_z:
                            sig = 1 / (1 + math.exp(-z[b, d, t]))
                            dz[b, d, t] = dy * ybuf[i] * sig * (1 + z[b, d, t] * (1 - sig))
                            dy = dy * z[b, d, t] * sig
                        dD_part[g, d] += dy * ut
                        dut = dy * Dv[d]
                        ddt = dut * 0
                        for n in range(nstate):
                            gn = adj[n] + dy * Ct[b, t, n]
                            dC_part[g, b, t, n] += dy * hbuf[i + 1, n]
                            decay = gn * abuf[i, n] * hbuf[i, n]
                            ddt += decay * A[d, n] + gn * Bt[b, t, n] * ut
                            dA_row[n] += decay * dt
                            dB_part[g, b, t, n] += gn * dt * ut
                            dut += gn * dt * Bt[b, t, n]
                            adj[n] = gn * abuf[i, n]
                        if softplus:
                            ddt *= 1 / (1 + math.exp(-raw))
                        ddelta[b, d, t] = ddt
                        du[b, d, t] = dut
                        dbias_part[g, d] += ddt
                dA_part[g, d, :] += dA_row


class _NumbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        u, delta, A = (t.detach().contiguous() for t in (u, delta, A))
        Bt, Ct = (t.detach().transpose(1, 2).contiguous() for t in (B, C))
        Dv = torch.zeros(dim, dtype=u.dtype) if D is None else D.detach().contiguous()
        bias = torch.zeros(dim, dtype=u.dtype) if delta_bias is None else delta_bias.detach().contiguous()
        zz = u if z is None else z.detach().contiguous()
        grad = any(ctx.needs_input_grad)
        nchunks = -(-length // NUMBA_CHUNK) if grad else 0
        states = torch.empty(batch, dim, nchunks, A.shape[1], dtype=u.dtype)
        out = torch.empty_like(u)
        _numba_forward(u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), Dv.numpy(),
                       zz.numpy(), bias.numpy(), delta_softplus, z is not None, NUMBA_CHUNK,
                       out.numpy(), states.numpy())
        if grad:
            ctx.save_for_backward(u, delta, A, Bt, Ct, Dv, zz, bias, states)
            ctx.flags = (delta_softplus, z is not None, NUMBA_CHUNK)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bt, Ct, Dv, zz, bias, states = ctx.saved_tensors
        softplus, has_z, chunk = ctx.flags
        batch, dim, length = u.shape
        groups = max(1, min(_numba.get_num_threads(), batch * dim))
        du, ddelta, dz = (torch.empty_like(u) for _ in range(3))
        parts = [torch.zeros(groups, *shape, dtype=u.dtype) for shape in
                 (A.shape, Bt.shape, Ct.shape, (dim,), (dim,))]
        arrays = [t.numpy() for t in (u, delta, A, Bt, Ct, Dv, zz, bias)]
        _numba_backward(*arrays, softplus, has_z, chunk, states.numpy(),
                        dout.detach().to(u.dtype).contiguous().numpy(), du.numpy(), ddelta.numpy(),
                        dz.numpy(), *(p.numpy() for p in parts))
        dA, dBt, dCt, dD, dbias = (p.sum(0) for p in parts)
        needs = ctx.needs_input_grad
        return (du, ddelta, dA, dBt.transpose(1, 2), dCt.transpose(1, 2), dD if needs[5] else None,
                dz if has_z else None, dbias if needs[7] else None, None)


def _scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


_SCANS = {"cuda": _scan_cuda, "numba": _scan_numba, "torch": _scan_torch}
