"""Depthwise causal convolution along L followed by SiLU, in Triton: causal-conv1d's
`causal_conv1d_fn(x, weight, bias, activation="silu")` without compiling anything, forward and backward.

x (batch, E, L) with any strides (Mamba hands it over channels-last), weight (E, 1, K) or (E, K), bias
(E,) or None. A program covers BLOCK_E channels x BLOCK_L steps of one batch item and recomputes, in the
backward, the pre-activations it needs instead of saving them. Arithmetic is float32; the output and dx
are in x's dtype, dweight and dbias in their parameters'. dweight and dbias sum over batch and L: each
program writes its own partial and the partials are summed afterwards (no atomics: reproducible).
"""
from __future__ import annotations  # Triton reads the string annotations; no triton needed to import

import torch

from .triton_support import jit, tl, triton, unavailable_reason

# Channels x steps per program. The backward recomputes WIDTH pre-activations from WIDTH loads each: at 4
# warps, a 16 x 32 tile keeps it near 150 registers per thread without spills on sm_90
# (bench/compile_triton_kernels.py); the forward takes twice the tile in each direction.
BLOCK_E, BLOCK_L = 32, 64
BACKWARD_BLOCK_E, BACKWARD_BLOCK_L = 16, 32


@jit
def _pre_activation(x_item, x_rows, stride_l, w_ptr, bias, e, e_mask, s, length, WIDTH: tl.constexpr):
    """bias + sum_k w[e, k] x[e, s - (WIDTH - 1) + k] for the steps s, (BLOCK_E, BLOCK_L) float32."""
    acc = tl.zeros((e.shape[0], s.shape[0]), dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(WIDTH):
        src = s + (k - (WIDTH - 1))
        mask = e_mask[:, None] & ((src >= 0) & (src < length))[None, :]
        xk = tl.load(x_item + x_rows + src[None, :] * stride_l, mask=mask, other=0.0)
        w = tl.load(w_ptr + e * WIDTH + k, mask=e_mask, other=0.0).to(tl.float32)
        acc += w[:, None] * xk.to(tl.float32)
    return acc


@jit
def _silu_grad(dout_item, rows, s, mask, pre):
    """dloss/d(pre-activation) at the steps s from the output gradient there (0 past the end)."""
    dout = tl.load(dout_item + rows + s[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    return dout * sig * (1.0 + pre * (1.0 - sig))


@jit
def _conv_forward_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, dim, length, stride_b, stride_e, stride_l,
                         WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr):
    block_l, block_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = block_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e_mask = e < dim
    # 64-bit offsets only to the batch item (scalar); 32-bit within it keeps the address registers few.
    x_item = x_ptr + b.to(tl.int64) * stride_b
    bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    pre = _pre_activation(x_item, e[:, None] * stride_e, stride_l, w_ptr, bias, e, e_mask, t, length, WIDTH)
    out_item = out_ptr + b.to(tl.int64) * dim * length
    tl.store(out_item + e[:, None] * length + t[None, :], pre * tl.sigmoid(pre),
             mask=e_mask[:, None] & (t < length)[None, :])


@jit
def _conv_backward_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, dim, length,
                          stride_b, stride_e, stride_l,
                          WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx at this program's steps t (x[t] feeds the outputs at t .. t + WIDTH - 1), and its partial
    dweight, dbias from the outputs at t."""
    block_l, block_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = block_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e_mask = e < dim
    x_item, x_rows = x_ptr + b.to(tl.int64) * stride_b, e[:, None] * stride_e
    dout_item, rows = dout_ptr + b.to(tl.int64) * dim * length, e[:, None] * length
    bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    mask = e_mask[:, None] & (t < length)[None, :]
    pre = _pre_activation(x_item, x_rows, stride_l, w_ptr, bias, e, e_mask, t, length, WIDTH)
    grad = _silu_grad(dout_item, rows, t, mask, pre)  # at the steps t themselves
    dx = grad * tl.load(w_ptr + e * WIDTH + (WIDTH - 1), mask=e_mask, other=0.0).to(tl.float32)[:, None]
    for j in range(1, WIDTH):  # the output j steps later reads x[t] through tap WIDTH - 1 - j
        later = t + j
        later_mask = e_mask[:, None] & (later < length)[None, :]
        pre_j = _pre_activation(x_item, x_rows, stride_l, w_ptr, bias, e, e_mask, later, length, WIDTH)
        w = tl.load(w_ptr + e * WIDTH + (WIDTH - 1 - j), mask=e_mask, other=0.0).to(tl.float32)
        dx += w[:, None] * _silu_grad(dout_item, rows, later, later_mask, pre_j)
    tl.store(dx_ptr + b.to(tl.int64) * dim * length + rows + t[None, :], dx, mask=mask)
    partial = ((b * tl.num_programs(0) + block_l) * dim + e).to(tl.int64)
    for k in tl.static_range(WIDTH):
        src = t + (k - (WIDTH - 1))
        src_mask = e_mask[:, None] & ((src >= 0) & (src < length))[None, :]
        xk = tl.load(x_item + x_rows + src[None, :] * stride_l, mask=src_mask, other=0.0)
        tl.store(dw_ptr + partial * WIDTH + k, tl.sum(grad * xk.to(tl.float32), axis=1), mask=e_mask)
    tl.store(dbias_ptr + partial, tl.sum(grad, axis=1), mask=e_mask)


def causal_conv_unavailable_reason(device=None):
    """None when the kernels can run on `device` (None: anywhere in this process), else why not."""
    return unavailable_reason(_conv_forward_kernel, device)


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, dim, length = x.shape
        w = weight.detach().reshape(dim, -1).contiguous()
        b = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is None else bias.detach().contiguous()
        out = torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(length, BLOCK_L), triton.cdiv(dim, BLOCK_E), batch)
        _conv_forward_kernel[grid](x, w, b, out, dim, length, *x.stride(), WIDTH=w.shape[1], BLOCK_E=BLOCK_E,
                                   BLOCK_L=BLOCK_L)
        ctx.save_for_backward(x.detach(), w, b)
        ctx.has_bias, ctx.weight_shape = bias is not None, weight.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        batch, dim, length = x.shape
        grid = (triton.cdiv(length, BACKWARD_BLOCK_L), triton.cdiv(dim, BACKWARD_BLOCK_E), batch)
        dx = torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)
        dw = torch.empty(batch, grid[0], dim, w.shape[1], device=x.device, dtype=torch.float32)
        db = torch.empty(batch, grid[0], dim, device=x.device, dtype=torch.float32)
        _conv_backward_kernel[grid](x, w, b, dout.contiguous(), dx, dw, db, dim, length, *x.stride(),
                                    WIDTH=w.shape[1], BLOCK_E=BACKWARD_BLOCK_E, BLOCK_L=BACKWARD_BLOCK_L)
        dbias = db.sum((0, 1)).to(b.dtype) if ctx.has_bias else None
        return dx, dw.sum((0, 1)).to(w.dtype).view(ctx.weight_shape), dbias


def causal_conv1d_silu_triton(x, weight, bias=None):
    """silu(depthwise causal conv1d(x)) of x (batch, E, L) with weight (E, 1, K) or (E, K); (batch, E, L)."""
    reason = causal_conv_unavailable_reason(x.device)
    if reason is not None:
        raise ValueError(f"causal_conv1d_silu_triton cannot run here: {reason}")
    if x.dim() != 3 or weight.numel() % x.shape[1] or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_silu_triton: x must be (batch, E, L) and weight (E, 1, K), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype == torch.float64:
        raise ValueError("causal_conv1d_silu_triton: x is float64; the kernels compute in float32")
    if max(x.shape[1] * x.shape[2], (x.shape[1] - 1) * x.stride(1) + (x.shape[2] - 1) * x.stride(2)) >= 2**31:
        raise ValueError("causal_conv1d_silu_triton: one batch item spans 2^31 elements or more (32-bit offsets)")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv1d_silu_triton: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    return _CausalConvSiLU.apply(x, weight, bias)
