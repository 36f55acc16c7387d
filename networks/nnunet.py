"""nnU-Net (Isensee et al. 2021) and U-Mamba (Ma et al. 2024) on dynamic-network-architectures, the
nnU-Net team's own network package, as nnU-Net plans them for an isotropic 128^3 window: 6 stages of
32, 64, 128, 256, 320, 320 channels, 3x3x3 convolutions (U-Mamba Enc: 1x3x3 in the first stage, as the
comparison's code has it), strides 1, 2, 2, 2, 2, 2, instance norm, leaky ReLU, convolution biases.

`umamba_bot` and `umamba_enc` are the paper's comparison networks: nnU-Net's residual U-Net with Mamba
layers. `umamba_bot_official` and `umamba_enc_official` are U-Mamba's own public networks at the same
plans, written here after its code: its own residual blocks, fewer blocks in half of the stages,
interpolation upsampling.

With `deep_supervision`, training mode returns the decoder's logits at every resolution, full size
first ([1, 1/2, 1/4, 1/8, 1/16]); eval mode returns the full-size logits alone. The segmentation heads
exist either way, so checkpoints load whatever the setting.
"""

import math

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from blocks.common import to_grid, to_tokens
from blocks.mamba import BiMamba, Mamba
from blocks.window import check_roi_size

FEATURES = (32, 64, 128, 256, 320, 320)
BLOCKS_PER_STAGE = 2  # nnU-Net's default plans: two convolutions (residual blocks) per stage, both paths
FIRST_STAGE_KERNEL = (1, 3, 3)  # U-Mamba Enc's first stage in the comparison's code
NORM_KWARGS = {"eps": 1e-5, "affine": True}
INSTANCE_NORM = "instance norm in training needs more than one voxel"


def _layers(kernel_sizes=3):
    return dict(conv_op=nn.Conv3d, kernel_sizes=kernel_sizes, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs=NORM_KWARGS, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _check(network, roi_size, features):
    if len(features) < 2:
        raise ValueError(f"{network} features needs 2 or more stages, got {list(features)}")
    stride = 2 ** (len(features) - 1)
    return check_roi_size(network, roi_size, stride, 2, INSTANCE_NORM)


def _kernel_sizes(network, first_stage_kernel, n_stages):
    """`first_stage_kernel` for the first stage, 3x3x3 for the others. Odd sizes only: the blocks pad by
    (k - 1) // 2, which keeps the shape for odd k alone."""
    k = first_stage_kernel
    if (not isinstance(k, (list, tuple)) or len(k) != 3
            or any(isinstance(i, bool) or not isinstance(i, int) or i <= 0 or i % 2 == 0 for i in k)):
        raise ValueError(f"{network} first_stage_kernel must be 3 positive odd integers, got {k!r}")
    return [list(k)] + [[3, 3, 3]] * (n_stages - 1)


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


class ChannelTokenMambaLayer(MambaLayer):
    """U-Mamba Enc's layer, in U-Mamba's code, on a map with no more voxels than channels: the channels are
    the sequence and each channel's voxels its features (LayerNorm and forward Mamba of width `voxels`)."""

    def __init__(self, voxels):
        super().__init__(voxels, bidirectional=False)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            tokens = self.mamba(self.norm(x.float().flatten(2)))
        return tokens.reshape(x.shape)


class UMamba(MainOutputInEval, nn.Module):
    """A U-Net with a Mamba layer after the encoder stages in `mamba_layers` ({stage index: layer}). The
    encoder provides `stem` and `stages`; the decoder takes the skips, as dynamic-network-architectures'
    decoders do."""

    def __init__(self, encoder, mamba_layers, decoder, deep_supervision):
        super().__init__()
        self.encoder = encoder
        self.mamba_layers = nn.ModuleDict({str(s): layer for s, layer in mamba_layers.items()})
        self.decoder = decoder
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


def _residual_unet(in_channels, out_channels, features, kernel_sizes, mamba_layers, deep_supervision):
    """The comparison's U-Mamba: nnU-Net's residual encoder U-Net from dynamic-network-architectures'
    ResidualEncoder and UNetResDecoder, 2 blocks per stage on both paths, transposed convolutions."""
    n = len(features)
    encoder = ResidualEncoder(in_channels, n, list(features), strides=[1] + [2] * (n - 1),
                              n_blocks_per_stage=BLOCKS_PER_STAGE, return_skips=True, **_layers(kernel_sizes))
    decoder = UNetResDecoder(encoder, out_channels, BLOCKS_PER_STAGE, deep_supervision)
    return UMamba(encoder, mamba_layers, decoder, deep_supervision)


def umamba_bot(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES, deep_supervision=False):
    """U-Mamba Bot as the comparison builds it: one bidirectional Mamba layer on the bottleneck, 58,473,197
    parameters at roi 128, 1 input, 9 classes (the paper's 58.47 M)."""
    _check("umamba_bot", roi_size, features)
    layers = {len(features) - 1: MambaLayer(features[-1], bidirectional=True)}
    return _residual_unet(in_channels, out_channels, features, 3, layers, deep_supervision)


def umamba_enc(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES,
               first_stage_kernel=FIRST_STAGE_KERNEL, deep_supervision=False):
    """U-Mamba Enc as the comparison builds it: a LayerNorm and a forward Mamba over the voxels after every
    encoder stage, the bottleneck included; 59,519,533 parameters at roi 128, 1 input, 9 classes.

    `first_stage_kernel` is the kernel of the stem, of both residual blocks of the first encoder stage and
    of both blocks of the decoder's full-resolution stage (the decoder takes its skip's kernel): with
    [1, 3, 3] these nine convolutions have 166,464 parameters fewer than with 3x3x3 (59,685,997). All nine
    are needed for the comparison's count: the stem's 576 and 9 x 18,432 from the eight 32-wide ones (the
    decoder's first, from 64 channels, counts twice). Padding (k - 1) // 2 keeps the shape.

    The kernel's axes are the tensor's, (x, y, z) in this project's RAS crops (as in the comparison's
    pipeline): the 1 falls on x, an in-plane axis (x or y in training, whose 90 degree rotations turn the
    axial plane), never on z, the thick-slice axis where nnU-Net's z, y, x plans put it; [3, 3, 1] would
    put it there. It changes no count but does change what the first stage sees (nothing across its 1
    axis); with voxels resampled to 1.5 x 1.5 x 2 mm, near isotropic, neither placement follows from the
    data, and [1, 3, 3] is the comparison's network."""
    _check("umamba_enc", roi_size, features)
    kernels = _kernel_sizes("umamba_enc", first_stage_kernel, len(features))
    layers = {s: MambaLayer(channels, bidirectional=False) for s, channels in enumerate(features)}
    return _residual_unet(in_channels, out_channels, features, kernels, layers, deep_supervision)


class ProjectedResBlock(nn.Module):
    """U-Mamba's first block of a stage (its BasicResBlock): conv-norm-act, conv-norm, plus the input through
    a strided, biased 1x1 convolution without norm (BasicBlockD's skip is unbiased and normed), then act."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, 1)
        self.norm1 = nn.InstanceNorm3d(out_channels, **NORM_KWARGS)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(out_channels, **NORM_KWARGS)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, stride)
        self.act = nn.LeakyReLU(inplace=True)

    def forward(self, x):
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.skip(x))


def _official_stage(in_channels, out_channels, stride, n_blocks):
    """A ProjectedResBlock, then n_blocks - 1 of dynamic-network-architectures' BasicBlockD, as U-Mamba's."""
    layers = _layers()
    extra = [BasicBlockD(nn.Conv3d, out_channels, out_channels, 3, 1, True, layers["norm_op"], NORM_KWARGS,
                         nonlin=layers["nonlin"], nonlin_kwargs=layers["nonlin_kwargs"]) for _ in range(n_blocks - 1)]
    return nn.Sequential(ProjectedResBlock(in_channels, out_channels, stride), *extra)


def _official_blocks(n_stages, count):
    """Blocks per stage in U-Mamba's code: the plans' 2 in the first ceil(n / 2) stages of each path (the
    encoder's from the top, the decoder's from the bottleneck up), 1 in the others."""
    return [BLOCKS_PER_STAGE if s < math.ceil(n_stages / 2) else 1 for s in range(count)]


class OfficialEncoder(nn.Module):
    """U-Mamba's encoder: a stem at the first stage's width, as deep as that stage, then the stages (the
    first at stride 1). UMamba runs them."""

    def __init__(self, in_channels, features):
        super().__init__()
        n = len(features)
        blocks = _official_blocks(n, n)
        self.stem = _official_stage(in_channels, features[0], 1, blocks[0])
        inputs = [features[0], *features[:-1]]
        self.stages = nn.ModuleList(_official_stage(inputs[s], features[s], 1 if s == 0 else 2, blocks[s])
                                    for s in range(n))


class OfficialDecoder(nn.Module):
    """U-Mamba's decoder: nearest-neighbour upsampling and a 1x1 convolution to the skip's width, the skip
    concatenated, residual blocks, and a 1x1 segmentation head per stage. Returns what UNetResDecoder
    returns (full size first with deep supervision)."""

    def __init__(self, features, out_channels, deep_supervision):
        super().__init__()
        skips, below = features[-2::-1], features[:0:-1]  # deepest first
        blocks = _official_blocks(len(features), len(skips))
        self.upsample = nn.ModuleList(nn.Conv3d(b, s, 1) for b, s in zip(below, skips))
        self.stages = nn.ModuleList(_official_stage(2 * s, s, 1, n) for s, n in zip(skips, blocks))
        self.seg_layers = nn.ModuleList(nn.Conv3d(s, out_channels, 1) for s in skips)
        self.deep_supervision = deep_supervision

    def forward(self, skips):
        x, outputs = skips[-1], []
        for s, stage in enumerate(self.stages):
            up = self.upsample[s](F.interpolate(x, scale_factor=2, mode="nearest"))
            x = stage(torch.cat((up, skips[-(s + 2)]), 1))
            if self.deep_supervision or s == len(self.stages) - 1:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


def _official_unet(in_channels, out_channels, features, mamba_layers, deep_supervision):
    decoder = OfficialDecoder(features, out_channels, deep_supervision)
    return UMamba(OfficialEncoder(in_channels, features), mamba_layers, decoder, deep_supervision)


def umamba_bot_official(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES,
                        deep_supervision=False):
    """U-Mamba Bot as U-Mamba's public code builds it (UMambaBot_3d.py) at these plans: its own residual
    U-Net and a forward Mamba layer on the bottleneck."""
    _check("umamba_bot_official", roi_size, features)
    layers = {len(features) - 1: MambaLayer(features[-1], bidirectional=False)}
    return _official_unet(in_channels, out_channels, features, layers, deep_supervision)


def umamba_enc_official(in_channels=1, out_channels=9, roi_size=(128, 128, 128), features=FEATURES,
                        deep_supervision=False):
    """U-Mamba Enc as U-Mamba's public code builds it (UMambaEnc_3d.py) at these plans: the U-Net of
    umamba_bot_official with a forward Mamba layer after every encoder stage. A stage whose map has no
    more voxels than channels reads its channels as the sequence, as U-Mamba's does (at roi 128 the
    bottleneck: 64 voxels, 320 channels), so the network depends on roi_size."""
    sizes = _check("umamba_enc_official", roi_size, features)
    layers = {}
    for s, channels in enumerate(features):
        voxels = math.prod(size // 2**s for size in sizes)
        layers[s] = ChannelTokenMambaLayer(voxels) if voxels <= channels else MambaLayer(channels, False)
    return _official_unet(in_channels, out_channels, features, layers, deep_supervision)
