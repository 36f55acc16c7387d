"""Depthwise causal convolution along the sequence followed by SiLU, the convolution inside Mamba."""
import functools

import torch
import torch.nn.functional as F

from .selective_scan import forced_scan_backend


@functools.cache
def _cuda_kernel():
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def causal_conv1d_silu(x, weight, bias):
    """x (B, E, L), weight (E, 1, K), bias (E,) or None -> SiLU(causal depthwise convolution), (B, E, L).

    On a GPU causal-conv1d's kernel, else the Triton kernel; the Triton kernel also wherever the triton scan
    backend is forced (e.g. on the CPU under TRITON_INTERPRET=1); elsewhere PyTorch operations."""
    triton_forced = forced_scan_backend() == "triton"
    if x.is_cuda and not triton_forced:
        kernel = _cuda_kernel()
        if kernel is not None:
            # The kernel wants L contiguous; x arrives channels-last from the input projection.
            return kernel(x.contiguous(), weight.squeeze(1), bias, activation="silu")
    if (x.is_cuda or triton_forced) and x.dtype != torch.float64:
        from . import causal_conv_triton  # imports Triton, where installed: only where it may run

        if causal_conv_triton.causal_conv_unavailable_reason(x.device) is None:
            return causal_conv_triton.causal_conv1d_silu_triton(x, weight, bias)
    return causal_conv1d_silu_torch(x, weight, bias)


def causal_conv1d_silu_torch(x, weight, bias):
    """causal_conv1d_silu in PyTorch operations, for any device and dtype."""
    # One multiply-add per tap on the left-padded input instead of F.conv1d(groups=E), whose CPU backward
    # is slow (docs/benchmarks.md); the same sums, term by term.
    width, length = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (width - 1, 0))
    taps = weight[:, 0, :, None]  # (E, K, 1)
    out = taps[:, 0] * padded[..., :length]
    for k in range(1, width):
        out = torch.addcmul(out, taps[:, k], padded[..., k:k + length])
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out)
