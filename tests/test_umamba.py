"""U-Mamba (networks/nnunet.py): the comparison's U-Mamba Enc with its first-stage kernel, and U-Mamba's own
public networks (umamba_*_official), their counts checked against sums of their layers' shapes."""
import pytest
import torch

import models
from config import model_kwargs, resolve_config
from networks.nnunet import ChannelTokenMambaLayer, MambaLayer

FEATURES = [32, 64, 128, 256, 320, 320]
CLASSES = 9


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_umamba_enc_counts_with_each_first_stage_kernel():
    """The comparison's 59,519,533 is the 1x3x3 first stage; 3x3x3 there gives 166,464 more: the stem
    (1 x 32 x 18 weights) and eight 32-wide convolutions of the first stage and the last decoder stage
    (32 x 32 x 18 each, the decoder's first one taking 64 channels counts twice)."""
    assert models.model_defaults("umamba_enc")["first_stage_kernel"] == (1, 3, 3)
    flat = models.build_model("umamba_enc", first_stage_kernel=[3, 3, 3])
    assert num_params(flat) == 59_685_997 == 59_519_533 + 1 * 32 * 18 + 9 * 32 * 32 * 18


def test_first_stage_kernel_is_in_the_first_stage_and_the_last_decoder_stage():
    model = models.build_model("umamba_enc", roi_size=16, features=[4, 8, 16, 16])
    thin = {name: conv for name, conv in model.named_modules()
            if isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (1, 3, 3)}
    places = ("encoder.stem.", "encoder.stages.0.", "decoder.stages.2.")  # 3 decoder stages, deepest first
    assert len(thin) == 9 and all(name.startswith(places) for name in thin)
    assert all(conv.padding == (0, 1, 1) for conv in thin.values())
    others = {conv.kernel_size for conv in model.modules() if isinstance(conv, torch.nn.Conv3d)} - {(1, 3, 3)}
    assert others == {(3, 3, 3), (1, 1, 1)}


def test_umamba_enc_small_window_with_the_thin_kernel():
    """A window of three different sides keeps its shape through the 1x3x3 first stage; with deep supervision
    so that every head gets a gradient."""
    torch.manual_seed(0)
    roi = (32, 16, 8)
    model = models.build_model("umamba_enc", in_channels=2, out_channels=3, roi_size=roi, features=[4, 8, 16, 16],
                               first_stage_kernel=[1, 3, 3], deep_supervision=True)
    outputs = model.train()(torch.randn(1, 2, *roi))
    assert [o.shape for o in outputs] == [(1, 3, *(s // 2**k for s in roi)) for k in range(3)]
    assert all(torch.isfinite(o).all() for o in outputs)
    sum(o.square().mean() for o in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    stem = model.encoder.stem.convs[0].conv
    assert stem.weight.shape == (4, 2, 1, 3, 3) and stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", [[1, 3], [2, 3, 3], [0, 3, 3], [1, 3, True], [1.0, 3, 3], "133", 3])
def test_first_stage_kernel_is_validated(kernel):
    with pytest.raises(ValueError, match=r"^umamba_enc first_stage_kernel must be 3 positive odd integers, got "):
        models.build_model("umamba_enc", roi_size=16, features=[4, 8, 16, 16], first_stage_kernel=kernel)


# Sums of layer shapes at U-Mamba's code: biased convolutions, affine instance norms, its own first block per
# stage (two 3x3x3 convolutions and a biased 1x1 projection), dynamic-network-architectures' BasicBlockD after.
def conv(cin, cout, voxels=27):
    return cin * cout * voxels + cout


def norm(channels):
    return 2 * channels


def stage(cin, cout, blocks):
    first = conv(cin, cout) + norm(cout) + conv(cout, cout) + norm(cout) + conv(cin, cout, 1)
    return first + (blocks - 1) * 2 * (conv(cout, cout) + norm(cout))


def mamba_layer(d):
    """LayerNorm, then mamba-ssm's Mamba(d): in_proj, causal conv (width 4), x_proj, dt_proj, A_log, D,
    out_proj."""
    e, rank = 2 * d, -(-d // 16)
    return norm(d) + d * 2 * e + (4 * e + e) + e * (rank + 32) + (rank * e + e) + e * 16 + e + e * d


def official_unet(in_channels=1):
    """Blocks per stage 2, 2, 2, 1, 1, 1 in the encoder (and a 2-block stem), 2, 2, 2, 1, 1 in the decoder
    from the bottleneck up, whose stages upsample through a 1x1 convolution and end in a 1x1 head."""
    encoder = stage(in_channels, 32, 2) + sum(stage(cin, cout, blocks) for cin, cout, blocks in zip(
        [32, 32, 64, 128, 256, 320], FEATURES, [2, 2, 2, 1, 1, 1]))
    decoder = sum(conv(below, skip, 1) + stage(2 * skip, skip, blocks) + conv(skip, CLASSES, 1)
                  for below, skip, blocks in zip([320, 320, 256, 128, 64], [320, 256, 128, 64, 32], [2, 2, 2, 1, 1]))
    return encoder + decoder


def from_config(name):
    """The network of configs/models/<name>.yaml at the synapse window (128^3), 1 input, 9 classes."""
    cfg = resolve_config("synapse", name)
    model = models.build_model(name, **model_kwargs(cfg))
    assert len(cfg["trainer"]["deep_supervision_weights"]) == len(model.decoder.seg_layers)
    return model


def test_official_counts_are_their_layer_shapes():
    assert mamba_layer(320) == 675_840
    bot = from_config("umamba_bot_official")
    assert num_params(bot) == 42_126_029 == official_unet() + mamba_layer(320)
    # Every stage has a layer; the bottleneck (4^3 = 64 voxels, 320 channels) reads its channels as the
    # sequence, its 64 voxels as the features.
    enc = from_config("umamba_enc_official")
    patch_layers = sum(mamba_layer(c) for c in FEATURES[:-1])
    assert num_params(enc) == 42_756_557 == official_unet() + patch_layers + mamba_layer(64)
    assert [type(layer) for layer in enc.mamba_layers.values()] == [MambaLayer] * 5 + [ChannelTokenMambaLayer]


def test_official_enc_layers_follow_the_window():
    model = models.build_model("umamba_enc_official", roi_size=[64, 32, 32])
    widths = [layer.norm.normalized_shape[0] for layer in model.mamba_layers.values()]
    assert widths == [32, 64, 128, 128, 16, 2]  # stages 3-5: 8x4x4, 4x2x2, 2x1x1 voxels, no more than channels


def test_channel_token_layer_reads_the_channels_forwards():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 2, 2)
    changed = x.clone()
    changed[:, 4:] += torch.randn(2, 2, 2, 2, 2)  # not a constant: the LayerNorm would remove it
    layer = ChannelTokenMambaLayer(8)
    with torch.no_grad():
        a, b = layer(x), layer(changed)
    assert a.shape == x.shape
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:], b[:, 4:])
