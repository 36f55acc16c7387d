"""The transformer baselines, VT-UNet and 3D TransUNet: exact parameter counts of the shipped configs,
forward/backward on small windows, window errors, VT-UNet's window attention (shifted-window mask and
cross-attention stay inside a window) and TransUNet's masked attention (a query ignores what its mask
does not cover), checked by perturbing inputs."""
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets.swin_unetr import compute_mask

from models import build_model
from models.complexity import count_flops
from networks.transunet import MaskedAttentionDecoder
from networks.vtunet import VTBlock

REPO = Path(__file__).resolve().parents[1]
TINY_VTUNET = dict(embed_dim=12, num_heads=[1, 2, 2, 4], drop_path_rate=0.0)  # no dropped gradients
TINY_TRANSUNET = dict(features_per_stage=[4, 8, 16, 16, 16, 16], hidden_dim=32, num_heads=4, dim_feedforward=64,
                      num_layers=3)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config, expected", [("vtunet", 11_781_036), ("transunet", 47_311_978)])
def test_shipped_configs_have_the_reference_parameter_counts(config, expected):
    model_cfg = yaml.safe_load((REPO / "configs" / "models" / f"{config}.yaml").read_text())["model"]
    name = model_cfg.pop("name")
    model = build_model(name, in_channels=1, out_channels=9, roi_size=[128, 128, 128], **model_cfg)
    assert num_params(model) == expected


def assert_trains(model, x, out_channels):
    out = model(x)
    assert out.shape == (x.shape[0], out_channels, *x.shape[2:])
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_vtunet_forward_backward_at_window_32():
    torch.manual_seed(0)
    model = build_model("vtunet", in_channels=2, out_channels=3, roi_size=[32, 32, 32], **TINY_VTUNET)
    assert_trains(model, torch.randn(1, 2, 32, 32, 32), 3)


def test_vtunet_rejects_windows_it_cannot_take_and_inputs_of_another_size():
    with pytest.raises(ValueError, match=r"VT-UNet roi_size .* got \[32, 48, 32\]"):
        build_model("vtunet", roi_size=[32, 48, 32], **TINY_VTUNET)
    with pytest.raises(ValueError, match=r"VT-UNet roi_size .* got \[30, 32, 32\]"):
        build_model("vtunet", roi_size=[30, 32, 32], **TINY_VTUNET)
    model = build_model("vtunet", roi_size=[36, 32, 32], **TINY_VTUNET)  # the first axis is never halved
    with pytest.raises(ValueError, match=r"built for a window of \[36, 32, 32\] .* input of \[32, 32, 32\]"):
        model(torch.zeros(1, 1, 32, 32, 32))


def shifted_window_groups(size, window, shift):
    """Per axis, the group of each position under a cyclic shift with masked wrap-around: the windows
    start at `shift`, and the wrapped-around pieces at both ends stay apart."""
    return [(x + window - shift) // window for x in range(size)]


@pytest.mark.parametrize("shift", [0, 3])
def test_vtunet_block_tokens_attend_only_within_their_window(shift):
    size, window, dim = 14, 7, 8
    torch.manual_seed(0)
    block = VTBlock(dim, 2, (window,) * 3, (window,) * 3, (shift,) * 3, 4.0, True, 0.0).double().eval()
    mask = compute_mask((size,) * 3, (window,) * 3, (shift,) * 3, "cpu").double() if shift else None
    groups = torch.tensor(shifted_window_groups(size, window, shift))

    def same_group(p):
        return ((groups[:, None, None] == groups[p[0]]) & (groups[None, :, None] == groups[p[1]])
                & (groups[None, None, :] == groups[p[2]]))

    x = torch.randn(1, size, size, size, dim, dtype=torch.float64)
    base, (keys, values) = block(x, mask)
    for p in [(1, 5, 12), (12, 2, 7), (6, 6, 6)]:
        x2 = x.clone()
        x2[0, p[0], p[1], p[2]] += torch.randn(dim, dtype=torch.float64)  # not constant: LayerNorm would hide it
        out, _ = block(x2, mask)
        changed = (out - base).abs().amax(-1)[0] > 1e-20
        assert torch.equal(changed, same_group(p)), p

    # The decoder's cross-attention over an encoder block's keys and values: perturbing the encoder's input
    # at one token changes the decoder's output only in that token's window.
    encoder_block = VTBlock(dim, 2, (window,) * 3, (window,) * 3, (shift,) * 3, 4.0, True, 0.0).double().eval()
    encoder_in = torch.randn_like(x)
    position = torch.randn_like(x)
    _, memory = encoder_block(encoder_in, mask)
    base, _ = block(x, mask, memory, position)
    p = (1, 5, 12)
    encoder_in[0, p[0], p[1], p[2]] += torch.randn(dim, dtype=torch.float64)
    _, memory2 = encoder_block(encoder_in, mask)
    out, _ = block(x, mask, memory2, position)
    assert torch.equal((out - base).abs().amax(-1)[0] > 1e-20, same_group(p))


def test_transunet_forward_backward_and_deep_supervision():
    torch.manual_seed(0)
    model = build_model("transunet", in_channels=1, out_channels=4, roi_size=[32, 32, 64], deep_supervision=True,
                        **TINY_TRANSUNET)
    x = torch.randn(1, 1, 32, 32, 64)
    outputs = model(x)
    assert len(outputs) == TINY_TRANSUNET["num_layers"] + 1
    assert all(o.shape == (1, 4, 32, 32, 64) for o in outputs)
    sum(o.square().mean() for o in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        final = model(x)
    assert final.shape == (1, 4, 32, 32, 64)
    # Log-probabilities of the class-weighted masks: each at most log(1 + floor).
    assert (final <= 1e-5).all() and torch.isfinite(final).all()


def test_transunet_without_deep_supervision_trains_on_its_single_output():
    torch.manual_seed(0)
    model = build_model("transunet", out_channels=3, roi_size=[64, 32, 32], **TINY_TRANSUNET)
    assert_trains(model, torch.randn(1, 1, 64, 32, 32), 3)


def test_transunet_flops_are_counted_including_every_mask_product():
    model = build_model("transunet", out_channels=4, roi_size=[32, 32, 64], **TINY_TRANSUNET).eval()
    counts = count_flops(model, torch.zeros(1, 1, 32, 32, 64))
    mask_products = (TINY_TRANSUNET["num_layers"] + 1) * 4 * TINY_TRANSUNET["hidden_dim"] * 32 * 32 * 64
    assert counts["params"] == num_params(model) and counts["macs"] > mask_products


def test_transunet_rejects_windows_it_cannot_take():
    with pytest.raises(ValueError, match=r"TransUNet roi_size \[32, 32, 48\] must be positive and divisible by 32"):
        build_model("transunet", roi_size=[32, 32, 48], **TINY_TRANSUNET)
    with pytest.raises(ValueError, match=r"TransUNet roi_size \[32, 32, 32\] leaves 1 voxel .* instance norm"):
        build_model("transunet", roi_size=32, **TINY_TRANSUNET)
    model = build_model("transunet", roi_size=[64, 64, 64], **TINY_TRANSUNET)
    with pytest.raises(ValueError, match=r"TransUNet needs input sizes divisible by 32.* got \[64, 64, 40\]"):
        model(torch.zeros(1, 1, 64, 64, 40))


def test_transunet_query_ignores_positions_outside_its_mask():
    """Query 0's mask logits are set to +1 on the first half of the first axis and -1 on the second, query 1's
    the opposite: in the first cross-attention, changing level-0 features in the second half leaves query 0
    unchanged but not query 1, and changing them in the first half changes query 0."""
    torch.manual_seed(0)
    dim, queries = 32, 4
    decoder = MaskedAttentionDecoder(queries, queries, dim, 4, 64, 1).double().eval()
    full, grid = (32, 32, 32), (4, 4, 4)
    with torch.no_grad():
        embed = decoder.mask_embed(decoder.decoder_norm(decoder.query_feat.weight.double()))

    def features_giving(logits_0, logits_1):
        """Mask features whose mask logits are logits_0 for query 0 and logits_1 for query 1."""
        directions = torch.linalg.pinv(embed[:2])  # (dim, 2): embed[:2] @ directions = identity
        return (directions[:, 0, None, None, None] * logits_0 + directions[:, 1, None, None, None] * logits_1)[None]

    sign = torch.ones(full, dtype=torch.float64)
    sign[16:] = -1.0
    mask_features = features_giving(sign, -sign)
    features = [torch.randn(1, dim, *(s // 2**i for s in grid), dtype=torch.float64) for i in range(3)]

    captured = []
    decoder.cross_attention[0].register_forward_hook(lambda module, args, out: captured.append(out.detach()))

    def first_cross_attention(level0):
        captured.clear()
        with torch.no_grad():
            decoder([level0, *features[1:]], mask_features)
        return captured[0][0]

    base = first_cross_attention(features[0])
    outside = features[0].clone()
    outside[0, :, 3, 1, 2] += 5.0  # second half of the first axis: masked for query 0
    changed = (first_cross_attention(outside) - base).abs().amax(-1)
    assert changed[0] == 0 and changed[1] > 1e-6
    inside = features[0].clone()
    inside[0, :, 0, 1, 2] += 5.0
    assert (first_cross_attention(inside) - base).abs().amax(-1)[0] > 1e-6

    # A query whose mask covers nothing attends everywhere (the reference's rule).
    mask_features = features_giving(-torch.ones(full, dtype=torch.float64), sign)
    base = first_cross_attention(features[0])
    assert (first_cross_attention(outside) - base).abs().amax(-1)[0] > 1e-6
