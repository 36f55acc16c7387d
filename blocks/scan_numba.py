"""The CPU selective-scan backend: compiled numba loops.

Forward: one prange task per (batch, channel) row, the state kept in registers/L1; it stores the state at
every chunk start (batch x D x L/CHUNK x N), never the per-step states. Backward recomputes a chunk's states
from its start, then walks it in reverse. dB, dC and dA are sums over channels: rows are split into GROUPS
fixed groups, each owning its partial sums, which are added afterwards in group order, so the result does
not depend on the number of threads.
"""
import math

import numpy as np
import torch

try:
    import numba as _numba
except ImportError:
    _numba = None

CHUNK = 64
# Partial sums of the backward: a fixed count (not one per thread) keeps the sums' order, and so their last
# digits, independent of the thread count; each group holds batch x L x N values for dB and for dC.
GROUPS = 8
# No reassociation: with it LLVM runs a loop that sums over N as a vectorised or a scalar copy, chosen at run
# time by the arrays' addresses, and the two add in different orders (docs/benchmarks.md, "Reproducible
# sums"). The loops over N are elementwise (still vectorised), the sums over N ordered. No nnan/ninf either:
# inf/nan propagate.
_FASTMATH = {"contract", "nsz", "arcp"}


def unavailable():
    """Why this backend cannot run here, or None."""
    return None if _numba is not None else "numba does not import"


def unsupported(u):
    """Why this backend cannot take tensors like `u`, or None."""
    return None if u.device.type == "cpu" else f"it needs CPU tensors, got {u.device}"


if _numba is not None:
    from llvmlite import ir as _ir
    from numba import prange
    from numba import types as _nbtypes
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

    @_numba.njit(inline="always", fastmath=_FASTMATH)
    def _step_size(raw, softplus):
        return _softplus(raw) if softplus else raw

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
                dt = _step_size(delta[b, d, t] + bias[d], softplus)
                x = dt * u[b, d, t]
                for n in range(nstate):
                    h[n] = _exp(dt * A[d, n]) * h[n] + x * Bt[b, t, n]
                y = Dv[d] * u[b, d, t]
                for n in range(nstate):
                    y += Ct[b, t, n] * h[n]
                if has_z:
                    y *= z[b, d, t] / (1 + math.exp(-z[b, d, t]))
                out[b, d, t] = y

    @_numba.njit(inline="always", fastmath=_FASTMATH)
    def _recompute_chunk(u, delta, A, Bt, Ct, Dv, bias, softplus, b, d, t0, steps, hbuf, abuf, ybuf):
        """The forward over one chunk of row (b, d) again, from its start state in hbuf[0]: the states, decays
        and outputs before the z gate that the backward walks in reverse."""
        for i in range(steps):
            t = t0 + i
            dt = _step_size(delta[b, d, t] + bias[d], softplus)
            x = dt * u[b, d, t]
            for n in range(A.shape[1]):
                a = _exp(dt * A[d, n])
                abuf[i, n] = a
                hbuf[i + 1, n] = a * hbuf[i, n] + x * Bt[b, t, n]
            y = Dv[d] * u[b, d, t]
            for n in range(A.shape[1]):
                y += Ct[b, t, n] * hbuf[i + 1, n]
            ybuf[i] = y

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
            ddt_terms = np.empty(nstate, A.dtype)         # step n's share of dloss / d delta'_t
            du_terms = np.empty(nstate, A.dtype)          # and of dloss / du_t
            for row in range(g * rows // groups, (g + 1) * rows // groups):
                b, d = row // dim, row % dim
                adj[:] = 0
                dA_row[:] = 0
                for c in range(nchunks - 1, -1, -1):
                    t0 = c * chunk
                    steps = min(length, t0 + chunk) - t0
                    hbuf[0, :] = states[b, d, c, :]
                    _recompute_chunk(u, delta, A, Bt, Ct, Dv, bias, softplus, b, d, t0, steps, hbuf, abuf, ybuf)
                    for i in range(steps - 1, -1, -1):
                        t = t0 + i
                        raw = delta[b, d, t] + bias[d]
                        dt = _step_size(raw, softplus)
                        ut = u[b, d, t]
                        dy = dout[b, d, t]
                        if has_z:
                            sig = 1 / (1 + math.exp(-z[b, d, t]))
                            dz[b, d, t] = dy * ybuf[i] * sig * (1 + z[b, d, t] * (1 - sig))
                            dy = dy * z[b, d, t] * sig
                        dD_part[g, d] += dy * ut
                        for n in range(nstate):
                            gn = adj[n] + dy * Ct[b, t, n]
                            dC_part[g, b, t, n] += dy * hbuf[i + 1, n]
                            decay = gn * abuf[i, n] * hbuf[i, n]
                            ddt_terms[n] = decay * A[d, n] + gn * Bt[b, t, n] * ut
                            du_terms[n] = gn * dt * Bt[b, t, n]
                            dA_row[n] += decay * dt
                            dB_part[g, b, t, n] += gn * dt * ut
                            adj[n] = gn * abuf[i, n]
                        dut = dy * Dv[d]
                        ddt = dut * 0
                        for n in range(nstate):
                            ddt += ddt_terms[n]
                            dut += du_terms[n]
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
        nchunks = -(-length // CHUNK) if grad else 0
        states = torch.empty(batch, dim, nchunks, A.shape[1], dtype=u.dtype)
        out = torch.empty_like(u)
        _numba_forward(u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), Dv.numpy(),
                       zz.numpy(), bias.numpy(), delta_softplus, z is not None, CHUNK,
                       out.numpy(), states.numpy())
        if grad:
            ctx.save_for_backward(u, delta, A, Bt, Ct, Dv, zz, bias, states)
            ctx.flags = (delta_softplus, z is not None, CHUNK)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bt, Ct, Dv, zz, bias, states = ctx.saved_tensors
        softplus, has_z, chunk = ctx.flags
        batch, dim, length = u.shape
        groups = max(1, min(GROUPS, batch * dim))
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


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
