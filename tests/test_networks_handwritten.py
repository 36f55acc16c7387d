"""3D UX-Net and SegMamba (networks/uxnet.py, networks/segmamba.py): exact parameter counts against sums
over the reference code's layer shapes, block maths and SegMamba's three scan directions against float64
references, forward/backward on a small window, and window errors."""
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from models import build_model
from networks.segmamba import GatedSpatialConv, ToMLayer
from networks.uxnet import UXBlock

REPO = Path(__file__).resolve().parents[1]
PAPER = dict(in_channels=1, out_channels=9, roi_size=[128, 128, 128])
TINY = dict(in_channels=1, out_channels=3, feature_size=[8, 16, 32, 64], hidden_size=32, roi_size=[32, 32, 32])


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def build_from_config(config, **kwargs):
    model_cfg = yaml.safe_load((REPO / "configs" / "models" / f"{config}.yaml").read_text())["model"]
    return build_model(model_cfg.pop("name"), **model_cfg, **kwargs)


# Sums over the layer shapes of MASILab/3DUX-Net and ge-xing/SegMamba (weights + biases; instance norms
# there have no affine parameters), written out independently of the modules under test.
def unetr_decoder_count(cin, cout, f, hidden):
    def basic(a, b):  # residual block: two 3^3 convs without bias, a 1x1 projection when widths differ
        return 27 * a * b + 27 * b * b + (a * b if a != b else 0)

    def up(a, b):  # 2^3 transposed conv without bias, then a residual block on [up, skip]
        return 8 * a * b + basic(2 * b, b)

    encoders = basic(cin, f[0]) + basic(f[0], f[1]) + basic(f[1], f[2]) + basic(f[2], f[3]) + basic(f[3], hidden)
    decoders = up(hidden, f[3]) + up(f[3], f[2]) + up(f[2], f[1]) + up(f[1], f[0]) + basic(f[0], f[0])
    return encoders + decoders + f[0] * cout + cout


def downsampling_count(cin, f):
    return (343 * cin * f[0] + f[0]) + sum(8 * f[i - 1] * f[i] + f[i] for i in range(1, 4))


def uxnet_count(cin, cout, f=(48, 96, 192, 384), depths=(2, 2, 2, 2), hidden=768):
    def block(c):  # dwconv 7^3, LayerNorm, grouped 1x1 C->4C and 4C->C, layer scale
        return (343 * c + c) + 2 * c + (4 * c + 4 * c) + (4 * c + c) + c

    layer_norms = 2 * f[0] + sum(2 * c for c in f[:3]) + sum(2 * c for c in f)  # stem, downsamplings, outputs
    stages = sum(d * block(c) for c, d in zip(f, depths))
    return downsampling_count(cin, f) + layer_norms + stages + unetr_decoder_count(cin, cout, f, hidden)


def segmamba_count(cin, cout, f=(48, 96, 192, 384), depths=(2, 2, 2, 2), hidden=768, d_state=16, d_conv=4, expand=2):
    def mamba_v3(c):  # shared in/out projections; conv1d, x_proj, dt_proj, A_log, D for each of 3 directions
        e, r = expand * c, math.ceil(c / 16)
        direction = (d_conv * e + e) + e * (r + 2 * d_state) + (r * e + e) + e * d_state + e
        return c * 2 * e + e * c + 3 * direction

    gsc = sum(2 * (27 * c * c + c) + 2 * (c * c + c) for c in f)
    tom = sum(d * (2 * c + mamba_v3(c)) for c, d in zip(f, depths))
    skip_mlps = sum((c * 2 * c + 2 * c) + (2 * c * c + c) for c in f)
    return downsampling_count(cin, f) + gsc + tom + skip_mlps + unetr_decoder_count(cin, cout, f, hidden)


@pytest.mark.parametrize(
    "config, expected, from_shapes",
    [("uxnet", 53_006_265, uxnet_count(1, 9)), ("segmamba", 67_363_017, segmamba_count(1, 9))],
)
def test_parameter_counts_at_roi_128(config, expected, from_shapes):
    assert from_shapes == expected
    assert num_params(build_from_config(config, **PAPER)) == expected


def test_counts_follow_the_reference_shapes_at_another_width():
    kwargs = dict(in_channels=2, out_channels=4, feature_size=[8, 16, 32, 64], depths=[1, 2, 1, 3], hidden_size=40)
    f, depths = kwargs["feature_size"], kwargs["depths"]
    assert num_params(build_model("uxnet", **kwargs)) == uxnet_count(2, 4, f, depths, 40)
    segmamba = build_model("segmamba", **kwargs, d_state=8, expand=3)
    assert num_params(segmamba) == segmamba_count(2, 4, f, depths, 40, 8, 4, 3)


@pytest.mark.parametrize("name", ["uxnet", "segmamba"])
def test_forward_backward_small_window(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    x = torch.randn(1, 1, 32, 32, 32)
    out = model(x)
    assert out.shape == (1, 3, 32, 32, 32)
    out.square().mean().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
    # The image reaches the output through the encoder too: the stem's weight gets a gradient.
    stem_weight = next(model.encoder.downsample[0].parameters())
    assert stem_weight.dim() == 5 and stem_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, label", [("uxnet", "UX-Net"), ("segmamba", "SegMamba")])
@pytest.mark.parametrize(
    "roi, shown",
    [([40, 32, 32], "[40, 32, 32]"), ([32, 32], "[32, 32]"), (24, "24"), ([0, 32, 32], "[0, 32, 32]"),
     ([16, 16, 16], "[16, 16, 16]")],  # 16: one voxel at 1/16, where the instance norms need more
)
def test_windows_the_network_cannot_take_are_rejected(name, label, roi, shown):
    with pytest.raises(ValueError, match=re.escape(f"{label} roi_size")) as error:
        build_model(name, **{**TINY, "roi_size": roi})
    assert shown in str(error.value)


@pytest.mark.parametrize("name, label", [("uxnet", "UX-Net"), ("segmamba", "SegMamba")])
def test_inputs_and_stage_lists_the_network_cannot_take_are_rejected(name, label):
    build_model(name, **{**TINY, "roi_size": [32, 16, 48]})
    model = build_model(name, **TINY)
    with pytest.raises(ValueError, match=re.escape(f"{label} needs input sizes divisible by 16, got [32, 24, 32]")):
        model(torch.zeros(1, 1, 32, 24, 32))
    message = f"{label} feature_size needs 4 values (one per stage), got [8, 16, 32]"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(name, **{**TINY, "feature_size": [8, 16, 32]})


def test_ux_block_matches_float64_reference():
    torch.manual_seed(0)
    c = 3
    block = UXBlock(c, layer_scale_init_value=0.5).double()
    x = torch.randn(2, c, 5, 6, 7, dtype=torch.float64)
    y = F.conv3d(x, block.dwconv.weight, block.dwconv.bias, padding=3, groups=c)
    mean = y.mean(1, keepdim=True)
    y = (y - mean) / torch.sqrt(((y - mean) ** 2).mean(1, keepdim=True) + 1e-6)
    y = y * block.norm.weight.view(1, c, 1, 1, 1) + block.norm.bias.view(1, c, 1, 1, 1)
    # Grouped 1x1 convolutions: hidden channel 4i + k sees input channel i; output i sums hidden 4i..4i+3.
    w1, b1 = block.pwconv1.weight.view(c, 4), block.pwconv1.bias.view(c, 4)
    hidden = F.gelu(y[:, :, None] * w1[None, :, :, None, None, None] + b1[None, :, :, None, None, None])
    w2 = block.pwconv2.weight.view(c, 4)
    mlp = (hidden * w2[None, :, :, None, None, None]).sum(2) + block.pwconv2.bias.view(1, c, 1, 1, 1)
    expected = x + block.gamma.view(1, c, 1, 1, 1) * mlp
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_gated_spatial_convolution_matches_float64_reference():
    torch.manual_seed(0)
    gsc = GatedSpatialConv(4).double()
    x = torch.randn(2, 4, 5, 4, 6, dtype=torch.float64)

    def conv_norm_relu(block, inp):
        conv = block.conv
        return F.relu(F.instance_norm(F.conv3d(inp, conv.weight, conv.bias, padding=conv.weight.shape[-1] // 2)))

    spatial = conv_norm_relu(gsc.spatial[1], conv_norm_relu(gsc.spatial[0], x))
    expected = x + conv_norm_relu(gsc.fuse, spatial + conv_norm_relu(gsc.gate, x))
    assert gsc.spatial[0].conv.weight.shape[-1] == 3 and gsc.gate.conv.weight.shape[-1] == 1
    torch.testing.assert_close(gsc(x), expected, rtol=1e-10, atol=1e-12)


def test_tri_orientated_mamba_scans_forward_backward_and_across_slices():
    """Each direction is its own ScanDirection on the token order it names; the orders are built here
    from grid coordinates: row-major, reversed, and along the first spatial axis (the slice axis)."""
    torch.manual_seed(0)
    dim, grid = 8, (3, 4, 5)
    layer = ToMLayer(dim, d_state=4, d_conv=3, expand=2).double()
    mamba = layer.mamba
    for p in layer.parameters():  # move off the initial values so that every direction differs
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, dim, *grid, dtype=torch.float64)

    h, w, d = grid
    row_major = [i * w * d + j * d + k for i, j, k in itertools.product(range(h), range(w), range(d))]
    reversed_order = row_major[::-1]
    across_slices = [i * w * d + j * d + k for j, k, i in itertools.product(range(w), range(d), range(h))]
    # The reference's own description: split the sequence into h chunks, stack them last, flatten.
    assert torch.stack(torch.arange(h * w * d).chunk(h), dim=-1).flatten().tolist() == across_slices

    tokens = x.flatten(2).transpose(1, 2)
    normed = F.layer_norm(tokens, (dim,), layer.norm.weight, layer.norm.bias, 1e-5)
    xz = normed @ mamba.in_proj.weight.T
    x_in, z = xz.transpose(1, 2).chunk(2, dim=1)
    mixed = torch.zeros_like(x_in)
    for scan, order in ((mamba.forward_scan, row_major), (mamba.backward_scan, reversed_order),
                        (mamba.slice_scan, across_slices)):
        index = torch.tensor(order)
        mixed[:, :, index] += scan(x_in[:, :, index], z[:, :, index])
    expected = x + (mixed.transpose(1, 2) @ mamba.out_proj.weight.T).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
