"""nnU-Net (Isensee et al. 2021) and U-Mamba (Ma et al. 2024) on dynamic-network-architectures, the
nnU-Net team's own network package, as nnU-Net plans them for an isotropic 128^3 window: 6 stages of
32, 64, 128, 256, 320, 320 channels, 3x3x3 convolutions, strides 1, 2, 2, 2, 2, 2, instance norm,
leaky ReLU, convolution biases.

With `deep_supervision`, training mode returns the decoder's logits at every resolution, full size
first ([1, 1/2, 1/4, 1/8, 1/16]); eval mode returns the full-size logits alone. The segmentation heads
exist either way, so checkpoints load whatever the setting.
"""

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from blocks.common import to_grid, to_tokens
from blocks.mamba import BiMamba, Mamba
from blocks.window import check_roi_size

FEATURES = (32, 64, 128, 256, 320, 320)
BLOCKS_PER_STAGE = 2  # nnU-Net's default plans: two convolutions (residual blocks) per stage, both paths
INSTANCE_NORM = "instance norm in training needs more than one voxel"


def _layers():
    return dict(conv_op=nn.Conv3d, kernel_sizes=3, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _check(network, roi_size, features):
    if len(features) < 2:
        raise ValueError(f"{network} features needs 2 or more stages, got {list(features)}")
    stride = 2 ** (len(features) - 1)
    return check_roi_size(network, roi_size, stride, 2, INSTANCE_NORM)


class MainOutputInEval:
    """The DNA decoders return every resolution whenever built with deep supervision; here they do so only
    in training mode. Mix in before the nn.Module class; needs self.decoder and self.deep_supervision."""

    def train(self, mode=True):
        super().train(mode)
        self.decoder.deep_supervision = self.deep_supervision and mode
        return self


class NNUNet(MainOutputInEval, PlainConvUNet):
    def __init__(self, in_channels, out_channels, features, deep_supervision):
        n = len(features)
        super().__init__(in_channels, n, list(features), strides=[1] + [2] * (n - 1), n_conv_per_stage=BLOCKS_PER_STAGE,
                         num_classes=out_channels, n_conv_per_stage_decoder=BLOCKS_PER_STAGE,
                         deep_supervision=deep_supervision, **_layers())
        self.deep_supervision = deep_supervision
        self.apply(InitWeights_He(1e-2))
        self.train()


def nnunet(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES, deep_supervision=False):
    """nnU-Net's plain convolutional U-Net (dynamic-network-architectures' PlainConvUNet)."""
    _check("nnunet", roi_size, features)
    return NNUNet(in_channels, out_channels, features, deep_supervision)


class MambaLayer(nn.Module):
    """U-Mamba's layer: LayerNorm over the channels, then Mamba over the voxels read as one sequence. Its
    output replaces the feature map (U-Mamba has no residual here). It runs in float32, as U-Mamba's does:
    the projections overflow in half precision."""

    def __init__(self, channels, bidirectional):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = BiMamba(channels) if bidirectional else Mamba(channels)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            tokens = self.mamba(self.norm(to_tokens(x.float())))
        return to_grid(tokens, x.shape[2:])


class UMamba(MainOutputInEval, nn.Module):
    """nnU-Net's residual encoder U-Net (residual blocks in encoder and decoder, transposed convolutions)
    with a Mamba layer after the encoder stages in `mamba_stages`.

    Built from dynamic-network-architectures' ResidualEncoder and UNetResDecoder with 2 blocks per stage:
    the structure whose count is the comparison's (58,473,197 for U-Mamba Bot). U-Mamba's public code
    writes its own blocks, upsamples by interpolation and a 1x1 convolution, and keeps one block in the
    deeper stages (41.45 M convolution parameters instead of 57.74 M)."""

    def __init__(self, in_channels, out_channels, features, mamba_stages, bidirectional, deep_supervision):
        super().__init__()
        n = len(features)
        self.encoder = ResidualEncoder(in_channels, n, list(features), strides=[1] + [2] * (n - 1),
                                       n_blocks_per_stage=BLOCKS_PER_STAGE, return_skips=True, **_layers())
        self.mamba_layers = nn.ModuleDict({str(s): MambaLayer(features[s], bidirectional) for s in mamba_stages})
        self.decoder = UNetResDecoder(self.encoder, out_channels, BLOCKS_PER_STAGE, deep_supervision)
        self.deep_supervision = deep_supervision
        self.apply(InitWeights_He(1e-2))
        self.train()

    def forward(self, x):
        x = self.encoder.stem(x)
        skips = []
        for s, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if str(s) in self.mamba_layers:
                x = self.mamba_layers[str(s)](x)
            skips.append(x)
        return self.decoder(skips)


def umamba_bot(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES, deep_supervision=False):
    """U-Mamba Bot: one bidirectional Mamba layer on the bottleneck."""
    _check("umamba_bot", roi_size, features)
    return UMamba(in_channels, out_channels, features, [len(features) - 1], True, deep_supervision)


def umamba_enc(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES, deep_supervision=False):
    """U-Mamba Enc: a forward Mamba layer after every encoder stage but the bottleneck, 59,010,157
    parameters at the paper's settings. The comparison gives 59,519,533, which no variant reproduces:
    1-3 blocks per encoder stage and 1-2 per decoder stage, U-Mamba's own block layout, forward or
    bidirectional Mamba or Mamba-2, with or without the LayerNorm, on any set of stages, on voxels or (as
    U-Mamba's code does where a map has fewer voxels than channels) on channels."""
    _check("umamba_enc", roi_size, features)
    return UMamba(in_channels, out_channels, features, range(len(features) - 1), False, deep_supervision)
