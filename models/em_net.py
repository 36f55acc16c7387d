"""EM-Net (MICCAI 2024): a Mamba encoder with channel squeeze-reinforce and frequency layers, and a
decoder with additive skips, sized as in the paper. convert_reference_state_dict maps checkpoints of the
reference code to these module names."""
import re

import torch
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetrBasicBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from blocks.common import ChannelLayerNorm, ConvMLP
from blocks.window import check_roi_size

from .layers import EFL_LAYOUTS, CSRMambaLayer, EFLLayer
from .registry import register_model

WINDOW_MULTIPLE = 32  # stem /4 then three /2 downsamplings
REFERENCE_PREFIX = "mamba_encoder."  # every checkpoint of the reference implementation has such keys


def _stage_layers(dim, spatial_shape, depth, num_fft, efl_layout="reference"):
    """`depth` layers, the first `num_fft` of them EFL layers, the rest CSR-Mamba layers."""
    num_tokens = spatial_shape[0] * spatial_shape[1] * spatial_shape[2]
    return nn.Sequential(
        *[EFLLayer(dim, spatial_shape, efl_layout) if j < num_fft else CSRMambaLayer(dim, num_tokens)
          for j in range(depth)]
    )


class EMNetEncoder(nn.Module):
    """Four stages at 1/4, 1/8, 1/16 and 1/32 of the window; returns one skip feature per stage."""

    def __init__(self, in_channels, feature_size, depths, fft_nums, roi_size, efl_layout="reference"):
        super().__init__()
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_channels, feature_size[0], 4, stride=4), ChannelLayerNorm(feature_size[0]))]
        )
        for i in range(1, 4):
            self.downsample.append(
                nn.Sequential(
                    ChannelLayerNorm(feature_size[i - 1]), nn.Conv3d(feature_size[i - 1], feature_size[i], 2, stride=2)
                )
            )
        self.stages = nn.ModuleList(
            _stage_layers(feature_size[i], [s // 2 ** (i + 2) for s in roi_size], depths[i], fft_nums[i], efl_layout)
            for i in range(4)
        )
        self.skip_norms = nn.ModuleList(ChannelLayerNorm(f) for f in feature_size)
        self.skip_mlps = nn.ModuleList(ConvMLP(f, 4 * f) for f in feature_size)

    def forward(self, x):
        skips = []
        for downsample, stage, norm, mlp in zip(self.downsample, self.stages, self.skip_norms, self.skip_mlps):
            x = stage(downsample(x))
            skips.append(mlp(norm(x)))
        return skips


class UpBlock(nn.Module):
    """Transposed convolution, add the skip, then `block`."""

    def __init__(self, in_channels, out_channels, scale, block):
        super().__init__()
        self.transp_conv = get_conv_layer(
            3, in_channels, out_channels, kernel_size=scale, stride=scale, conv_only=True, is_transposed=True
        )
        self.block = block

    def forward(self, x, skip):
        return self.block(self.transp_conv(x) + skip)


def convert_checkpoint_weights(state_dict):
    """A checkpoint's weights in this implementation's names: the reference's are converted, ours kept."""
    if any(k.removeprefix("module.").startswith(REFERENCE_PREFIX) for k in state_dict):
        return convert_reference_state_dict(state_dict)
    return state_dict


@register_model("em-net", convert_state_dict=convert_checkpoint_weights, window_multiple=WINDOW_MULTIPLE)
class EMNet(nn.Module):
    """EM-Net for (B, in_channels, *roi_size) inputs. The positional embeddings and Fourier weights are
    tied to `roi_size`: inputs of another size are rejected (use sliding-window inference).

    With `deep_supervision`, training mode returns [main, head(dec1 at 1/4), head(dec2 at 1/8)];
    eval mode always returns the main output alone.

    `efl_layout` chooses what the EFL layers compute (models.layers.EFLLayer): "reference", the reference
    code's sequence, which its checkpoints need, or "spatial", the clean spatial filter of the paper's
    figure. Both have the same parameters.
    """

    def __init__(
        self,
        in_channels=1,
        out_channels=9,
        feature_size=(48, 96, 192, 384),
        depths=(3, 3, 3, 3),
        fft_nums=(0, 0, 2, 2),
        hidden_size=384,
        roi_size=(128, 128, 128),
        deep_supervision=False,
        efl_layout="reference",
    ):
        super().__init__()
        feature_size, depths, fft_nums = list(feature_size), list(depths), list(fft_nums)
        roi_size = list(check_roi_size("EM-Net", roi_size, WINDOW_MULTIPLE))
        for name, value in (("feature_size", feature_size), ("depths", depths), ("fft_nums", fft_nums)):
            if len(value) != 4:
                raise ValueError(f"EM-Net {name} needs 4 values (one per stage), got {value}")
        if any(not 0 <= n <= d for n, d in zip(fft_nums, depths)):
            raise ValueError(f"EM-Net fft_nums {fft_nums} must lie between 0 and depths {depths} per stage")
        if efl_layout not in EFL_LAYOUTS:
            raise ValueError(f"EM-Net efl_layout must be one of {', '.join(EFL_LAYOUTS)}, got {efl_layout!r}")
        if hidden_size != feature_size[3]:
            raise ValueError(f"EM-Net hidden_size ({hidden_size}) must equal the last feature_size ({feature_size[3]})")
        self.roi_size = tuple(roi_size)
        self.deep_supervision = deep_supervision
        f0, f1, f2, f3 = feature_size
        grid = [[s // 2**k for s in roi_size] for k in range(6)]

        def decoder_layers(dim, spatial_shape):
            return _stage_layers(dim, spatial_shape, depth=3, num_fft=0)

        self.encoder = EMNetEncoder(in_channels, feature_size, depths, fft_nums, roi_size, efl_layout)
        self.encoder1 = UnetrBasicBlock(3, in_channels, f0, kernel_size=3, stride=1, norm_name="instance",
                                        res_block=True)
        self.decoder4 = UpBlock(f3, f2, 2, decoder_layers(f2, grid[4]))
        self.decoder3 = UpBlock(f2, f1, 2, decoder_layers(f1, grid[3]))
        self.decoder2 = UpBlock(f1, f0, 2, decoder_layers(f0, grid[2]))
        self.decoder1 = UpBlock(f0, f0, 4, UnetBasicBlock(3, f0, f0, kernel_size=3, stride=1, norm_name="instance"))
        self.out = UnetOutBlock(3, f0, out_channels)
        if deep_supervision:
            self.deep_supervision_heads = nn.ModuleList([UnetOutBlock(3, f0, out_channels),
                                                         UnetOutBlock(3, f1, out_channels)])

    def forward(self, x):
        if tuple(x.shape[2:]) != self.roi_size:
            raise ValueError(
                f"EM-Net was built for a window of {list(self.roi_size)} voxels and got an input of "
                f"{list(x.shape[2:])}; its positional embeddings and Fourier weights are tied to the window "
                "(run sliding-window inference with roi_size equal to the model's)"
            )
        s0, s1, s2, s3 = self.encoder(x)
        dec3 = self.decoder4(s3, s2)
        dec2 = self.decoder3(dec3, s1)
        dec1 = self.decoder2(dec2, s0)
        main = self.out(self.decoder1(dec1, self.encoder1(x)))
        if self.deep_supervision and self.training:
            return [main, self.deep_supervision_heads[0](dec1), self.deep_supervision_heads[1](dec2)]
        return main


# Reference-implementation key fragments and ours, applied in order.
_REFERENCE_RENAMES = [
    (r"^mamba_encoder\.downsample_layers\.", "encoder.downsample."),
    (r"^mamba_encoder\.stages\.", "encoder.stages."),
    (r"^mamba_encoder\.norm(\d)\.", r"encoder.skip_norms.\1."),
    (r"^mamba_encoder\.mlps\.", "encoder.skip_mlps."),
    (r"^(decoder\d)\.decoder_block\.0\.", r"\1.block."),
    (r"^out2\.", "deep_supervision_heads.0."),  # deep-supervision head on dec1
    (r"^out3\.", "deep_supervision_heads.1."),  # and on dec2
    (r"\.conv51\.", ".res_block."),
    (r"\.conv8\.1\.", ".res_proj."),
    (r"\.ffp_module\.complex_weight$", ".fourier.weight"),
    (r"\.mamba\.(conv1d|x_proj|dt_proj)_b\.", r".mamba.backward_scan.\1."),
    (r"\.mamba\.(conv1d|x_proj|dt_proj)\.", r".mamba.forward_scan.\1."),
    (r"\.mamba\.A_b_log$", ".mamba.backward_scan.A_log"),
    (r"\.mamba\.D_b$", ".mamba.backward_scan.D"),
    (r"\.mamba\.A_log$", ".mamba.forward_scan.A_log"),
    (r"\.mamba\.D$", ".mamba.forward_scan.D"),
]


def convert_reference_key(key):
    for pattern, replacement in _REFERENCE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_reference_state_dict(state_dict):
    """A state_dict (or a {"state_dict": ...} checkpoint) of the reference EM-Net code, renamed to ours.

    A "module." prefix left by DataParallel/DDP is removed. Load the result with strict=True.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    converted = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"reference state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        new_key = convert_reference_key(key.removeprefix("module."))
        if new_key in converted:
            raise ValueError(f"reference state_dict has {key!r} twice (after removing 'module.')")
        converted[new_key] = value
    return converted
