"""The CPU speed-ups of EM-Net's layers (docs/benchmarks.md, "EM-Net on the CPU") compute what the
straightforward code computes: checked in float64 against it, values and every gradient."""
import torch
import torch.nn.functional as F

from blocks.causal_conv import causal_conv1d_silu


def reference_causal_conv1d_silu(x, weight, bias):
    width = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])
    return F.silu(out[..., : x.shape[-1]])


def test_causal_conv1d_equals_the_depthwise_convolution_with_gradients():
    g = torch.Generator().manual_seed(0)
    # x as BiMamba hands it over: a channels-last view of the input projection's (B, L, 2E) output.
    projected = torch.randn(2, 37, 2 * 6, dtype=torch.float64, generator=g)
    for bias_given in (True, False):
        x = projected.transpose(1, 2)[:, :6].detach().requires_grad_()
        weight = torch.randn(6, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
        bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) if bias_given else None
        inputs = [t for t in (x, weight, bias) if t is not None]
        upstream = torch.randn(2, 6, 37, dtype=torch.float64, generator=g)
        ours = causal_conv1d_silu(x, weight, bias)
        expected = reference_causal_conv1d_silu(x, weight, bias)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(ours, inputs, upstream)
        expected_grads = torch.autograd.grad(expected, inputs, upstream)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_causal_conv1d_is_causal():
    x = torch.zeros(1, 3, 10, dtype=torch.float64)
    x[..., 5] = 1.0
    weight = torch.ones(3, 1, 4, dtype=torch.float64)
    out = causal_conv1d_silu(x, weight, torch.zeros(3, dtype=torch.float64))
    assert torch.all(out[..., :5] == 0) and torch.all(out[..., 5:9] > 0) and torch.all(out[..., 9] == 0)
