"""Selective scan in Triton: mamba-ssm's `selective_scan_fn` for real A and input-dependent B, C on any
NVIDIA GPU, without compiling CUDA code. Forward and backward are one autograd Function.

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t ;  y_t = <C_t, h_t> + D u_t ;  y *= silu(z)

Layout. The sequence is cut into chunks of CHUNK steps. A program holds one chunk of a block of channels
as a (channels, N, CHUNK) float32 tile in registers and scans it along the chunk (tl.associative_scan),
so programs run in parallel over batch, channel blocks and chunks. Chunks are linked through their
boundary states: a first pass gives each chunk's decay product and end state from a zero start, a short
pass over the chunks (a scan of (N,)-vectors) turns these into each chunk's start state, and a second
pass scans every chunk again from its true start state. The backward runs the same three passes for the
adjoint dloss/dh_t, in reverse.

Memory. The forward keeps only the chunk start states, (batch, D, L / CHUNK, N) float32 (N / CHUNK of
u's size at float32); the backward recomputes the states inside each chunk. No (batch, D, L, N) tensor
is ever made.

Precision. u, delta, z, B, C (and the rest) may be float16, bfloat16 or float32, mixed as under autocast:
tiles become float32 on load, states and sums stay float32, and every result is stored in its tensor's
dtype (y in u's, each gradient in its input's), as mamba-ssm returns them.

dB and dC are sums over channels. Atomic adds (mamba-ssm's choice) would make them vary from run to run,
as the order of the additions does. Here each backward program owns a group of channel blocks, adds
their contributions in registers and writes one (N, CHUNK) partial per group; the groups, few because
they are only as many as the GPU needs to stay busy, are summed afterwards, so results are reproducible
bit for bit. dA, dD and ddelta_bias are written per (batch, chunk) and summed the same way.
"""
from __future__ import annotations  # Triton reads the string annotations; no triton needed to import

import torch

from .triton_support import jit, tl, triton, unavailable_reason

CHUNK = 128          # steps per chunk: registers per tile vs the saved states (N / CHUNK of u) and passes
BLOCK_D = 2          # channels per program; a tile is BLOCK_D x N x CHUNK float32 values
BLOCK_ROWS = 4       # (batch, channel) rows per program of the pass linking the chunks
LINK_CHUNKS = 64     # chunks scanned at once by that pass
BACKWARD_PROGRAMS = 1024  # channel groups of the backward are added until about this many programs run
# Warps per program: compiled for sm_90 (bench/compile_triton_kernels.py), these give at most 128 registers
# per thread and no spills; fewer warps push the backward to the 255-register limit. Untuned otherwise.
FORWARD_WARPS, BACKWARD_WARPS, LINK_WARPS = 8, 16, 8


# ------------------------------------------------------------------------------------------- device code

@jit
def _affine(a1, b1, a2, b2):
    """The map h -> a2 (a1 h + b1) + b2: (a1, b1) followed by (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@jit
def _softplus(x):
    # log1p(exp(x)) with log1p as log(w) * e / (w - 1) (exact for small e); above 20 x itself, as torch.
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    tiny = w == 1.0
    return tl.where(x > 20.0, x, tl.where(tiny, e, tl.log(w) * e / tl.where(tiny, 1.0, w - 1.0)))


@jit
def _offsets(b, rows, t, nrows, length):
    """Offsets and mask of the (rows, t) tile of a (batch, nrows, length) tensor."""
    base = (b * nrows + rows).to(tl.int64) * length
    return base[:, None] + t[None, :], (rows < nrows)[:, None] & (t < length)[None, :]


@jit
def _chunk_offsets(b, d, n, chunk, dim, nstate, nchunks):
    """Offsets and mask of the (d, n) entries of a chunk in a (batch, dim, nchunks, nstate) tensor."""
    base = ((b * dim + d).to(tl.int64) * nchunks + chunk) * nstate
    return base[:, None] + n[None, :], (d < dim)[:, None] & (n < nstate)[None, :]


@jit
def _parameters(A_ptr, bias_ptr, D_ptr, d, n, dim, nstate):
    """A (BLOCK_D, BLOCK_N), delta_bias and D (BLOCK_D,) of channels d, float32, 0 past the end."""
    dn_mask = (d < dim)[:, None] & (n < nstate)[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    return A, bias, tl.load(D_ptr + d, mask=d < dim, other=0.0).to(tl.float32)


@jit
def _decay(delta_ptr, bias, A, offs, mask, SOFTPLUS: tl.constexpr):
    """delta + bias, delta' (0 where masked, so that padding steps leave the state alone), exp(delta' A)."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dt = tl.where(mask, dt, 0.0)
    return raw, dt, tl.exp(dt[:, None, :] * A[:, :, None])


@jit
def _pick(x, index, CHUNK: tl.constexpr):
    """x[:, :, index] of a (rows, N, CHUNK) tile."""
    return tl.sum(tl.where((tl.arange(0, CHUNK) == index)[None, None, :], x, 0.0), axis=2)


@jit
def _forward_kernel(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
                    decay_ptr, end_ptr, start_ptr, dim, nstate, length, nchunks,
                    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, FINAL: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of BLOCK_D channels. FINAL=False: the chunk's decay product and its end state from a
    zero start; FINAL=True: y, from the chunk's start state."""
    chunk, block, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = chunk * CHUNK + tl.arange(0, CHUNK)
    rows, row_mask = _offsets(b, d, t, dim, length)
    cols, col_mask = _offsets(b, n, t, nstate, length)
    states, dn_mask = _chunk_offsets(b, d, n, chunk, dim, nstate, nchunks)
    A, bias, Dv = _parameters(A_ptr, bias_ptr, D_ptr, d, n, dim, nstate)
    u = tl.load(u_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    _, dt, a = _decay(delta_ptr, bias, A, rows, row_mask, SOFTPLUS)
    decay, h = tl.associative_scan((a, (dt * u)[:, None, :] * Bt[None, :, :]), 2, _affine)
    if FINAL:
        h += decay * tl.load(start_ptr + states, mask=dn_mask, other=0.0)[:, :, None]
        Ct = tl.load(C_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + rows, y, mask=row_mask)
    else:
        tl.store(decay_ptr + states, _pick(decay, CHUNK - 1, CHUNK), mask=dn_mask)
        tl.store(end_ptr + states, _pick(h, CHUNK - 1, CHUNK), mask=dn_mask)


@jit
def _link_kernel(decay_ptr, end_ptr, carry_ptr, nrows, nchunks, nstate, REVERSE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """carry[c] = the state entering chunk c, from the left (from the right when REVERSE), where crossing
    chunk c maps a state s to decay[c] * s + end[c]. Buffers are (nrows, nchunks, nstate)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    base = r[:, None, None].to(tl.int64) * nchunks * nstate + n[None, None, :]
    rn_mask = (r < nrows)[:, None, None] & (n < nstate)[None, None, :]
    state = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if REVERSE:
        first = nchunks - 1
    else:
        first = 0
    tl.store(carry_ptr + base + first * nstate, state[:, None, :], mask=rn_mask)
    position = tl.arange(0, BLOCK_C)
    for start in range(0, nchunks, BLOCK_C):
        k = start + position  # place in the order of the pass
        if REVERSE:
            c = nchunks - 1 - k
            following = c - 1
        else:
            c = k
            following = c + 1
        mask = rn_mask & (k < nchunks)[None, :, None]
        offs = base + c[None, :, None] * nstate
        # Past the last chunk: the identity map, so the block's last "after" is the state leaving it.
        decay = tl.load(decay_ptr + offs, mask=mask, other=1.0)
        end = tl.load(end_ptr + offs, mask=mask, other=0.0)
        decay, end = tl.associative_scan((decay, end), 1, _affine)
        after = end + decay * state[:, None, :]
        # The state after chunk k enters chunk k + 1: stored one place on instead of shifted in registers.
        tl.store(carry_ptr + base + following[None, :, None] * nstate, after,
                 mask=mask & (k + 1 < nchunks)[None, :, None])
        state = tl.sum(tl.where((position == BLOCK_C - 1)[None, :, None], after, 0.0), axis=1)


@jit
def _gate(dout, y, z_ptr, dz_ptr, rows, row_mask, HAS_Z: tl.constexpr):
    """dloss/dy before the gate y * silu(z); stores dloss/dz."""
    if HAS_Z:
        z = tl.load(z_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        tl.store(dz_ptr + rows, dout * y * sig * (1.0 + z * (1.0 - sig)), mask=row_mask)
        dout = dout * z * sig
    return dout


@jit
def _adjoint_kernel(delta_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, dout_ptr, decay_ptr, end_ptr,
                    dim, nstate, length, nchunks, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of BLOCK_D channels: g = dloss/dh at its first step from a zero adjoint after its last,
    and the product of the decays g crosses on the way (those of the chunk's steps 2 .. CHUNK + 1)."""
    chunk, block, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = chunk * CHUNK + tl.arange(0, CHUNK)
    rows, row_mask = _offsets(b, d, t, dim, length)
    cols, col_mask = _offsets(b, n, t, nstate, length)
    states, dn_mask = _chunk_offsets(b, d, n, chunk, dim, nstate, nchunks)
    A, bias, _ = _parameters(A_ptr, bias_ptr, bias_ptr, d, n, dim, nstate)
    _, _, a_next = _decay(delta_ptr, bias, A, rows + 1, row_mask & (t + 1 < length)[None, :], SOFTPLUS)
    dy = tl.load(dout_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_Z:  # the gate's factor only: dz needs y, which the final pass has
        z = tl.load(z_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        dy *= z * tl.sigmoid(z)
    Ct = tl.load(C_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    c = dy[:, None, :] * Ct[None, :, :]
    # g_t = c_t + exp(delta'_{t+1} A) g_{t+1}: a scan from the end
    decay, g = tl.associative_scan((a_next, c), 2, _affine, reverse=True)
    tl.store(decay_ptr + states, _pick(decay, 0, CHUNK), mask=dn_mask)
    tl.store(end_ptr + states, _pick(g, 0, CHUNK), mask=dn_mask)


@jit
def _backward_block(u_ptr, delta_ptr, bias_ptr, A_ptr, D_ptr, z_ptr, dout_ptr, start_ptr, adj_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, Bt, Ct, b, block, chunk, n, t,
                    dim, nstate, length, nchunks, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Every gradient of one chunk of BLOCK_D channels; returns their dB and dC terms, (N, CHUNK) each."""
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    rows, row_mask = _offsets(b, d, t, dim, length)
    states, dn_mask = _chunk_offsets(b, d, n, chunk, dim, nstate, nchunks)
    A, bias, Dv = _parameters(A_ptr, bias_ptr, D_ptr, d, n, dim, nstate)
    u = tl.load(u_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    raw, dt, a = _decay(delta_ptr, bias, A, rows, row_mask, SOFTPLUS)
    _, _, a_next = _decay(delta_ptr, bias, A, rows + 1, row_mask & (t + 1 < length)[None, :], SOFTPLUS)
    x = (dt * u)[:, None, :] * Bt[None, :, :]
    decay, h = tl.associative_scan((a, x), 2, _affine)
    h += decay * tl.load(start_ptr + states, mask=dn_mask, other=0.0)[:, :, None]
    y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
    dout = tl.load(dout_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dy = _gate(dout, y, z_ptr, dz_ptr, rows, row_mask, HAS_Z)
    decay, g = tl.associative_scan((a_next, dy[:, None, :] * Ct[None, :, :]), 2, _affine, reverse=True)
    g += decay * tl.load(adj_ptr + states, mask=dn_mask, other=0.0)[:, :, None]  # g_t = dloss/dh_t
    # h - x = exp(delta'_t A) h_{t-1}, the decayed previous state, recovered as mamba-ssm's backward does.
    g_decayed = g * (h - x)
    gB = tl.sum(g * Bt[None, :, :], axis=1)
    ddt = tl.sum(g_decayed * A[:, :, None], axis=1) + gB * u
    if SOFTPLUS:
        ddt *= tl.sigmoid(raw)
    ddt = tl.where(row_mask, ddt, 0.0)
    tl.store(du_ptr + rows, gB * dt + Dv[:, None] * dy, mask=row_mask)
    tl.store(ddelta_ptr + rows, ddt, mask=row_mask)
    partial = ((b * nchunks + chunk) * dim + d).to(tl.int64)
    tl.store(dA_ptr + partial[:, None] * nstate + n[None, :], tl.sum(g_decayed * dt[:, None, :], axis=2),
             mask=dn_mask)
    tl.store(dD_ptr + partial, tl.sum(dy * u, axis=1), mask=d < dim)
    tl.store(dbias_ptr + partial, tl.sum(ddt, axis=1), mask=d < dim)
    return tl.sum(g * (dt * u)[:, None, :], axis=0), tl.sum(h * dy[:, None, :], axis=0)


@jit
def _backward_kernel(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, start_ptr,
                     adj_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     batch, dim, nstate, length, nchunks, blocks_per_group,
                     SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of a group of channel blocks; dB and dC summed over the group, stored as its partial."""
    chunk, group, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.arange(0, BLOCK_N)
    t = chunk * CHUNK + tl.arange(0, CHUNK)
    cols, col_mask = _offsets(b, n, t, nstate, length)
    Bt = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dB = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    dC = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    for i in range(blocks_per_group):
        dB_block, dC_block = _backward_block(
            u_ptr, delta_ptr, bias_ptr, A_ptr, D_ptr, z_ptr, dout_ptr, start_ptr, adj_ptr,
            du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, Bt, Ct, b, group * blocks_per_group + i,
            chunk, n, t, dim, nstate, length, nchunks, SOFTPLUS, HAS_Z, BLOCK_D)
        dB += dB_block
        dC += dC_block
    parts, _ = _offsets(group * batch + b, n, t, nstate, length)
    tl.store(dB_ptr + parts, dB, mask=col_mask)
    tl.store(dC_ptr + parts, dC, mask=col_mask)


# --------------------------------------------------------------------------------------------- host code

def triton_unavailable_reason(device=None):
    """None when the triton backend can run on `device` (None: anywhere in this process), else why not."""
    return unavailable_reason(_forward_kernel, device)


def _link(decay, end, reverse):
    """The state entering each chunk (batch, dim, nchunks, N) from the chunks' decays and end states."""
    batch, dim, nchunks, nstate = decay.shape
    carry = torch.empty_like(decay)
    rows = batch * dim
    _link_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        decay, end, carry, rows, nchunks, nstate, reverse, BLOCK_R=BLOCK_ROWS,
        BLOCK_C=min(LINK_CHUNKS, triton.next_power_of_2(nchunks)), BLOCK_N=triton.next_power_of_2(nstate),
        num_warps=LINK_WARPS)
    return carry


def _forward(u, delta, A, B, C, D, z, bias, softplus):
    """y and the chunk start states; every tensor contiguous, D and bias given."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    nchunks = triton.cdiv(length, CHUNK)
    decay, end = (u.new_empty(batch, dim, nchunks, nstate, dtype=torch.float32) for _ in range(2))
    out = torch.empty_like(u)
    grid = (nchunks, triton.cdiv(dim, BLOCK_D), batch)
    args = (u, delta, bias, A, B, C, D, u if z is None else z, out, decay, end)
    sizes = dict(BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate), CHUNK=CHUNK, num_warps=FORWARD_WARPS)
    # The first pass fills decay and end (start_ptr unused), the second reads the linked start states.
    _forward_kernel[grid](*args, end, dim, nstate, length, nchunks, softplus, z is not None, False, **sizes)
    start = _link(decay, end, reverse=False)
    _forward_kernel[grid](*args, start, dim, nstate, length, nchunks, softplus, z is not None, True, **sizes)
    return out, start


def _adjoint_carries(delta, A, C, z, bias, dout, softplus):
    """dloss/dh at the first step after each chunk, (batch, dim, nchunks, N)."""
    batch, dim, length = delta.shape
    nstate = A.shape[1]
    nchunks = triton.cdiv(length, CHUNK)
    decay, end = (delta.new_empty(batch, dim, nchunks, nstate, dtype=torch.float32) for _ in range(2))
    _adjoint_kernel[(nchunks, triton.cdiv(dim, BLOCK_D), batch)](
        delta, bias, A, C, dout if z is None else z, dout, decay, end, dim, nstate, length, nchunks,
        softplus, z is not None, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate), CHUNK=CHUNK,
        num_warps=FORWARD_WARPS)
    return _link(decay, end, reverse=True)


def _backward(u, delta, A, B, C, D, z, bias, start, dout, softplus):
    """Gradients of u, delta, A, B, C, D, z, bias (float32 for the summed ones)."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    nchunks = triton.cdiv(length, CHUNK)
    adjoint = _adjoint_carries(delta, A, C, z, bias, dout, softplus)
    blocks = triton.cdiv(dim, BLOCK_D)
    groups = min(blocks, triton.cdiv(BACKWARD_PROGRAMS, batch * nchunks))
    per_group = triton.cdiv(blocks, groups)
    groups = triton.cdiv(blocks, per_group)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    f32 = dict(device=u.device, dtype=torch.float32)
    dA = torch.empty(batch, nchunks, dim, nstate, **f32)
    dD, dbias = (torch.empty(batch, nchunks, dim, **f32) for _ in range(2))
    dB, dC = (torch.empty(groups, batch, nstate, length, **f32) for _ in range(2))
    _backward_kernel[(nchunks, groups, batch)](
        u, delta, bias, A, B, C, D, u if z is None else z, dout, start, adjoint,
        du, ddelta, du if z is None else dz, dA, dB, dC, dD, dbias,
        batch, dim, nstate, length, nchunks, per_group, softplus, z is not None,
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate), CHUNK=CHUNK, num_warps=BACKWARD_WARPS)
    return du, ddelta, dA.sum((0, 1)), dB.sum(0), dC.sum(0), dD.sum((0, 1)), dz, dbias.sum((0, 1))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        dim = u.shape[1]
        tensors = [t.detach().contiguous() for t in (u, delta, A, B, C)]
        zeros = torch.zeros(dim, device=u.device, dtype=torch.float32)
        extras = [zeros if t is None else t.detach().contiguous() for t in (D, delta_bias)]
        z = None if z is None else z.detach().contiguous()
        out, start = _forward(*tensors, extras[0], z, extras[1], delta_softplus)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(*tensors, *extras, z, start)
            ctx.softplus = delta_softplus
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, bias, z, start = ctx.saved_tensors
        grads = _backward(u, delta, A, B, C, D, z, bias, start, dout.contiguous(), ctx.softplus)
        inputs = (u, delta, A, B, C, D, z, bias)
        needs = ctx.needs_input_grad
        return (*(None if g is None or not need else g.to(x.dtype) for g, x, need in zip(grads, inputs, needs)),
                None)


def _check(u, delta, A, B, C, D, z, delta_bias):
    """Shapes the kernels index by (they do no bounds checks of their own)."""
    if u.dim() != 3 or A.dim() != 2 or A.is_complex():
        raise ValueError(f"selective_scan_triton: u must be (batch, D, L) and A real (D, N), got {tuple(u.shape)}, "
                         f"{tuple(A.shape)} {A.dtype}")
    batch, dim, length = u.shape
    shapes = {"delta": (delta, (batch, dim, length)), "A": (A, (dim, A.shape[1])),
              "B": (B, (batch, A.shape[1], length)), "C": (C, (batch, A.shape[1], length)), "D": (D, (dim,)),
              "z": (z, (batch, dim, length)), "delta_bias": (delta_bias, (dim,))}
    for name, (tensor, shape) in shapes.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan_triton: {name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor is not None and tensor.dtype == torch.float64:
            raise ValueError(f"selective_scan_triton: {name} is float64; the kernels compute in float32")
        if tensor is not None and tensor.device != u.device:
            raise ValueError(f"selective_scan_triton: {name} is on {tensor.device}, u on {u.device}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's selective_scan_fn (real A, B and C of shape (batch, N, L)); y (batch, D, L) in u's dtype."""
    reason = triton_unavailable_reason(u.device)
    if reason is not None:
        raise ValueError(f"selective_scan_triton cannot run here: {reason}")
    _check(u, delta, A, B, C, D, z, delta_bias)
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


# The interface of a backend module for blocks/selective_scan.py.
KEEPS_INPUT_DTYPE = True  # float16/bfloat16 inputs go in as they are: the kernels accumulate in float32


def unavailable():
    """Why this backend cannot run in this process, or None."""
    return triton_unavailable_reason()


def unsupported(u):
    """Why this backend cannot take tensors like `u`, or None."""
    if u.dtype == torch.float64:
        return "it does not support float64; use 'torch' or 'auto'"
    return triton_unavailable_reason(u.device)


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
