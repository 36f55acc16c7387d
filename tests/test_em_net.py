"""EM-Net: exact parameter counts, reference checkpoint keys, layer maths against float64 references,
forward/backward, deep supervision and window errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from blocks.mamba import BiMamba
from models import build_model
from models.em_net import convert_reference_key, convert_reference_state_dict
from models.layers import EFLLayer, FourierFilter

REPO = Path(__file__).resolve().parents[1]
# Every state_dict key and shape of the reference implementation for its tiny config (EM-Net.md).
REFERENCE_KEYS = Path(__file__).resolve().parent / "data" / "emnet_tiny_reference_keys.tsv"
TINY = dict(in_channels=1, out_channels=4, feature_size=[8, 16, 32, 64], depths=[2, 2, 2, 2],
            fft_nums=[0, 0, 2, 2], hidden_size=64, roi_size=[32, 32, 32])


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# Paper Table 3 with exact counts (C_in 1); also asserts that each shipped config builds that variant.
@pytest.mark.parametrize(
    "config, out_channels, roi, expected",
    [
        ("em_net", 9, 128, 39_409_425), ("em_net", 9, 96, 32_166_801),
        ("em_net_a", 9, 128, 62_085_105), ("em_net_a", 9, 96, 54_881_649),
        ("em_net_b", 9, 128, 60_908_985), ("em_net_b", 9, 96, 53_576_505),
        ("em_net_c", 9, 128, 38_233_305), ("em_net_c", 9, 96, 30_861_657),
        ("em_net", 14, 96, 32_167_046),
    ],
)
def test_parameter_counts_match_paper(config, out_channels, roi, expected):
    model_cfg = yaml.safe_load((REPO / "configs" / "models" / f"{config}.yaml").read_text())["model"]
    name = model_cfg.pop("name")
    model = build_model(name, in_channels=1, out_channels=out_channels, roi_size=[roi] * 3, **model_cfg)
    assert num_params(model) == expected


def reference_keys():
    rows = (line.split("\t") for line in REFERENCE_KEYS.read_text().splitlines())
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape in rows}


def test_every_reference_key_maps_to_a_tensor_of_the_same_shape():
    ours = build_model("em-net", **TINY).state_dict()
    ref = reference_keys()
    mapped = {convert_reference_key(k): shape for k, shape in ref.items()}
    assert len(mapped) == len(ref) == 633
    assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
    for key, shape in mapped.items():
        assert tuple(ours[key].shape) == shape, key


def test_reference_checkpoint_loads_strictly_and_computes_the_same_function():
    torch.manual_seed(0)
    source = build_model("em-net", **TINY).eval()
    ours_to_ref = {convert_reference_key(k): k for k in reference_keys()}
    reference_checkpoint = {
        "state_dict": {"module." + ours_to_ref[k]: v.clone() for k, v in source.state_dict().items()},
        "epoch": 7,
        "best_acc": 0.5,
    }
    target = build_model("em-net", **TINY).eval()
    target.load_state_dict(convert_reference_state_dict(reference_checkpoint), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_convert_rejects_non_tensor_entries():
    with pytest.raises(ValueError, match="'epoch'"):
        convert_reference_state_dict({"encoder1.layer.conv1.conv.weight": torch.zeros(1), "epoch": 3})


def sequential_scan(u, delta, A, B, C, D, z, delta_bias):
    """Float64 Mamba recurrence, one step at a time (softplus on)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * F.silu(z)


def bimamba_reference(m, tokens):
    """BiMamba written out step by step from the paper's definition."""
    x, z = (tokens @ m.in_proj.weight.T).transpose(1, 2).chunk(2, dim=1)

    def direction(d, x, z):
        width = d.conv1d.weight.shape[-1]
        xp = F.pad(x, (width - 1, 0))
        conv = sum(xp[:, :, k : k + x.shape[2]] * d.conv1d.weight[:, 0, k, None] for k in range(width))
        xc = F.silu(conv + d.conv1d.bias[:, None])
        proj = xc.transpose(1, 2) @ d.x_proj.weight.T
        dt, B, C = proj.split([d.dt_rank, d.d_state, d.d_state], -1)
        delta = (dt @ d.dt_proj.weight.T).transpose(1, 2)
        return sequential_scan(xc, delta, -torch.exp(d.A_log), B.transpose(1, 2), C.transpose(1, 2), d.D, z,
                               d.dt_proj.bias)

    y = direction(m.forward_scan, x, z) + direction(m.backward_scan, x.flip(-1), z.flip(-1)).flip(-1)
    return y.transpose(1, 2) @ m.out_proj.weight.T


def test_bimamba_matches_float64_step_by_step_reference():
    torch.manual_seed(1)
    m = BiMamba(8).double()
    tokens = torch.randn(2, 11, 8, dtype=torch.float64)
    torch.testing.assert_close(m(tokens), bimamba_reference(m, tokens), rtol=1e-9, atol=1e-10)


def test_fourier_filter_matches_numpy_float64():
    torch.manual_seed(2)
    f = FourierFilter(3, (4, 6, 5)).double()
    x = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64)
    w = f.weight.detach().numpy()
    spectrum = np.fft.rfftn(x.numpy(), axes=(2, 3, 4), norm="ortho") * (w[..., 0] + 1j * w[..., 1])
    expected = np.fft.irfftn(spectrum, s=(4, 6, 5), axes=(2, 3, 4), norm="ortho")
    np.testing.assert_allclose(f(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def efl_reference_oracle(layer, x):
    """The reference EFL written from EM-Net.md's operations, in plain tensor ops on the layer's weights."""
    B, C, h, w, d = x.shape
    N = h * w * d
    n1 = F.layer_norm(x.reshape(B, C, N).transpose(1, 2), (C,), layer.norm1.weight, layer.norm1.bias, 1e-5)
    g = n1.reshape(B, C, h, w, d)  # token-major memory read as channel-major: no transpose back
    W = torch.complex(layer.fourier.weight[..., 0], layer.fourier.weight[..., 1])
    f = torch.fft.irfftn(torch.fft.rfftn(g, dim=(2, 3, 4), norm="ortho") * W, s=(h, w, d), dim=(2, 3, 4),
                         norm="ortho")
    n2 = F.layer_norm(f.reshape(B, C, N).transpose(1, 2), (C,), layer.norm2.weight, layer.norm2.bias, 1e-5)
    grid = n2.transpose(1, 2).reshape(B, C, h, w, d)
    m = F.conv3d(F.gelu(F.conv3d(grid, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight,
                 layer.mlp.fc2.bias)
    o = x + m
    return o.transpose(-1, -2).reshape(B, C, h, w, d)


@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 6, 8)])
def test_reference_efl_layout_equals_the_spec_sequence_in_float64(grid):
    torch.manual_seed(3)
    layer = EFLLayer(4, grid, layout="reference").double()
    for norm in (layer.norm1, layer.norm2):  # non-trivial affine LayerNorms
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 4, *grid, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), efl_reference_oracle(layer, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 6, 8)])
def test_spatial_efl_layout_commutes_with_circular_shifts_and_reference_does_not(grid):
    torch.manual_seed(5)
    x = torch.randn(1, 4, *grid, dtype=torch.float64)
    shift = dict(shifts=(1, 2, 3), dims=(2, 3, 4))
    spatial = EFLLayer(4, grid, layout="spatial").double()
    reference = EFLLayer(4, grid, layout="reference").double()
    reference.load_state_dict(spatial.state_dict())  # the same parameters, another function
    with torch.no_grad():
        torch.testing.assert_close(spatial(torch.roll(x, **shift)), torch.roll(spatial(x), **shift),
                                   rtol=0, atol=1e-10)
        gap = (reference(torch.roll(x, **shift)) - torch.roll(reference(x), **shift)).abs().max()
    assert gap > 1e-2


def test_spatial_efl_layout_is_residual_mlp_of_filtered_norm():
    torch.manual_seed(3)
    layer = EFLLayer(4, (3, 5, 2), layout="spatial").double()
    x = torch.randn(1, 4, 3, 5, 2, dtype=torch.float64)

    def ln(t, norm):
        return F.layer_norm(t.movedim(1, -1), (4,), norm.weight, norm.bias, norm.eps).movedim(-1, 1)

    filtered = layer.fourier(ln(x, layer.norm1))
    torch.testing.assert_close(layer(x), x + layer.mlp(ln(filtered, layer.norm2)))


def test_efl_layout_is_a_model_argument_with_equal_parameter_counts():
    ref = build_model("em-net", **TINY)
    spatial = build_model("em-net", **TINY, efl_layout="spatial")
    assert num_params(ref) == num_params(spatial)
    assert [m.layout for m in ref.modules() if isinstance(m, EFLLayer)] == ["reference"] * 4
    assert [m.layout for m in spatial.modules() if isinstance(m, EFLLayer)] == ["spatial"] * 4
    with pytest.raises(ValueError, match="efl_layout must be one of reference, spatial, got 'clean'"):
        build_model("em-net", **TINY, efl_layout="clean")


def test_reference_checkpoint_with_deep_supervision_loads_strictly_for_training_and_evaluation(tmp_path):
    from engine.network import load_network

    torch.manual_seed(6)
    source = build_model("em-net", **TINY, deep_supervision=True)
    ours_to_ref = {convert_reference_key(k): k for k in reference_keys()}
    ours_to_ref["deep_supervision_heads.0.conv.conv.weight"] = "out2.conv.conv.weight"
    ours_to_ref["deep_supervision_heads.0.conv.conv.bias"] = "out2.conv.conv.bias"
    ours_to_ref["deep_supervision_heads.1.conv.conv.weight"] = "out3.conv.conv.weight"
    ours_to_ref["deep_supervision_heads.1.conv.conv.bias"] = "out3.conv.conv.bias"
    ref_state = {ours_to_ref[k]: v.clone() for k, v in source.state_dict().items()}
    assert {k for k in ref_state if k.startswith(("out2.", "out3."))} == {
        "out2.conv.conv.weight", "out2.conv.conv.bias", "out3.conv.conv.weight", "out3.conv.conv.bias"}

    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected_eval = source.eval()(x)  # before the training-mode forwards update batch-norm statistics
    target = build_model("em-net", **TINY, deep_supervision=True)
    target.load_state_dict(convert_reference_state_dict({"state_dict": ref_state}), strict=True)
    target.train(), source.train()
    torch.manual_seed(7)
    expected = source(x)
    torch.manual_seed(7)
    for ours, theirs in zip(target(x), expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    # Evaluation builds the model without heads and drops them from the converted checkpoint.
    path = tmp_path / "reference.pt"
    torch.save({"state_dict": ref_state, "epoch": 3, "best_acc": 0.5}, path)
    cfg = {"model": {"name": "em-net", **TINY, "deep_supervision": True}, "trainer": {"scan_backend": "auto"}}
    loaded, trained = load_network(cfg, path, torch.device("cpu"))
    assert not hasattr(loaded, "deep_supervision_heads") and trained == {"epoch": 3, "iteration": None}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected_eval, rtol=0, atol=0)


def test_tiny_forward_backward_reaches_every_parameter():
    torch.manual_seed(4)
    model = build_model("em-net", **TINY)
    out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 4, 32, 32, 32)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_deep_supervision_outputs_in_training_and_main_only_in_eval():
    model = build_model("em-net", **{**TINY, "deep_supervision": True})
    outputs = model(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 32, 32, 32), (1, 4, 8, 8, 8), (1, 4, 4, 4, 4)]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_non_cubic_window():
    model = build_model("em-net", **{**TINY, "roi_size": [64, 32, 96]})
    assert model.encoder.stages[0][0].pos_embed.shape == (1, 16 * 8 * 24, 8)
    assert model.encoder.stages[2][0].fourier.weight.shape == (32, 4, 2, 4, 2)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 32, 96)).shape == (1, 4, 64, 32, 96)


def test_input_of_another_size_names_both_sizes():
    model = build_model("em-net", **TINY)
    with pytest.raises(ValueError, match=r"built for a window of \[32, 32, 32\].*input of \[64, 32, 32\]"):
        model(torch.randn(1, 1, 64, 32, 32))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"roi_size": [48, 32, 32]}, r"roi_size \[48, 32, 32\] must be positive and divisible by 32"),
        ({"fft_nums": [0, 0, 3, 0]}, r"fft_nums \[0, 0, 3, 0\]"),
        ({"hidden_size": 32}, r"hidden_size \(32\) must equal the last feature_size \(64\)"),
        ({"depths": [2, 2, 2]}, r"depths needs 4 values"),
    ],
)
def test_invalid_configuration_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        build_model("em-net", **{**TINY, **override})


def test_unknown_argument_suggests_the_closest():
    with pytest.raises(TypeError, match="'feature_sizes'.*'feature_size'"):
        build_model("em-net", feature_sizes=[8, 16, 32, 64])


def test_bfloat16_autocast_forward_is_finite_and_close_to_float32():
    torch.manual_seed(5)
    model = build_model("em-net", **TINY).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_flop_count_adds_both_scan_directions_to_the_dense_count():
    from models.complexity import count_flops

    m = BiMamba(8)  # E = 16, N = 16, dt_rank 1
    batch, length = 2, 10
    counted = count_flops(m, torch.zeros(batch, length, 8))
    per_scan = 9 * batch * 16 * length * 16 + 2 * batch * 16 * length
    dense = 2 * batch * length * (8 * 32 + 2 * (16 * 33 + 1 * 16) + 16 * 8)  # in, 2x (x_proj, dt_proj), out
    dense += 2 * (2 * batch * 16 * (length + 3) * 4)  # 2x depthwise conv, kernel 4, padded both sides then cut
    assert counted["scan_flops"] == 2 * per_scan
    assert counted["flops"] == dense + 2 * per_scan


def test_efl_layout_is_a_config_key_saved_with_the_run(tmp_path):
    import config

    default = config.resolve_config(data_config="synthetic", model_config="em_net", trainer_config="synthetic")
    assert default["model"]["efl_layout"] == "reference"
    cfg = config.resolve_config(data_config="synthetic", model_config="em_net_tiny", trainer_config="synthetic",
                                overrides=["model.efl_layout=spatial"])
    saved = config.load_config(config.save_config(cfg, tmp_path / "config.yaml"))
    assert saved["model"]["efl_layout"] == "spatial"
    model = build_model(saved["model"]["name"], **config.model_kwargs(saved))
    assert {m.layout for m in model.modules() if isinstance(m, EFLLayer)} == {"spatial"}
