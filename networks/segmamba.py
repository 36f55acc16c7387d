"""SegMamba (Xing et al., MICCAI 2024): gated spatial convolutions and tri-orientated Mamba (ToM) layers
in a 4-stage encoder, UX-Net's UNETR-style decoder. Written from the paper and the public repository
ge-xing/SegMamba (shapes, block structure, and its Mamba variant "v3"); the Mamba runs on this project's
scan backends, so SegMamba also trains on a CPU.

The paper gives no parameter count (its authors did not compute one, ge-xing/SegMamba issue #19). Built
from the public architecture: 67,363,017 parameters at roi 128, 1 input and 9 output channels, equal to
the sum over the reference's layer shapes worked out independently in tests/test_networks_handwritten.py:
encoder 15,668,688 (GSC blocks 10,969,920, ToM layers 3,121,920, skip MLPs 785,520, stem and
downsamplings 791,328) and the decoder 51,694,329, which UX-Net shares and which its exact count checks.
"""

from monai.networks.blocks import Convolution
from torch import nn

from blocks.common import ConvMLP, to_grid, to_tokens
from blocks.mamba import MambaProjections

from .uxnet import (
    UNETRStyleDecoder,
    check_four_stages,
    check_input_window,
    validated_roi,
)


def to_slice_order(seq, num_slices):
    """(B, E, L) read slice after slice -> (B, E, L) read across the slices: the first token of every
    slice, then the second of every slice, and so on (slices are the L / num_slices runs of L)."""
    batch, channels, length = seq.shape
    runs = seq.reshape(batch, channels, num_slices, length // num_slices)
    return runs.transpose(2, 3).reshape(batch, channels, length)


def from_slice_order(seq, num_slices):
    """The inverse of to_slice_order."""
    batch, channels, length = seq.shape
    runs = seq.reshape(batch, channels, length // num_slices, num_slices)
    return runs.transpose(2, 3).reshape(batch, channels, length)


class TriOrientedMamba(MambaProjections):
    """SegMamba's Mamba: one input and one output projection shared by three scans of their own
    (convolution, x/dt projections, A, D each): forward, backward, and across slices. The three outputs
    are summed in token order before the output projection."""

    def __init__(self, dim, d_state=16, d_conv=4, expand=2):
        super().__init__(dim, ("forward_scan", "backward_scan", "slice_scan"), d_state, d_conv, expand)

    def forward(self, tokens, num_slices):
        """tokens: (B, L, C), L a multiple of num_slices -> (B, L, C)."""
        if tokens.shape[1] % num_slices:
            raise ValueError(f"SegMamba: {tokens.shape[1]} tokens do not split into {num_slices} slices")
        x, z = self.project(tokens)
        y = self.forward_scan(x, z)
        y = y + self.backward_scan(x.flip(-1), z.flip(-1)).flip(-1)
        across = self.slice_scan(to_slice_order(x, num_slices), to_slice_order(z, num_slices))
        y = y + from_slice_order(across, num_slices)
        return self.output(y)


class ToMLayer(nn.Module):
    """LayerNorm, tri-orientated Mamba over the flattened volume, residual. The slices are the planes of
    the first spatial axis; the reference fixes their count at [64, 32, 16, 8] per stage, which is that
    axis at a 128 window, so taking it from the feature map gives the same scan there and a true
    inter-slice scan at other windows."""

    def __init__(self, dim, d_state, d_conv, expand):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = TriOrientedMamba(dim, d_state, d_conv, expand)

    def forward(self, x):
        spatial = x.shape[2:]
        return x + to_grid(self.mamba(self.norm(to_tokens(x)), num_slices=spatial[0]), spatial)


class GatedSpatialConv(nn.Module):
    """GSC: two 3x3x3 conv-norm-ReLU layers gated by (summed with) a 1x1x1 one, a 1x1x1 conv-norm-ReLU
    on the sum, residual. Instance norms without affine parameters, as the reference."""

    def __init__(self, dim):
        super().__init__()

        def conv(kernel_size):
            return Convolution(3, dim, dim, kernel_size=kernel_size, act="relu", norm="instance")

        self.spatial = nn.Sequential(conv(3), conv(3))
        self.gate = conv(1)
        self.fuse = conv(1)

    def forward(self, x):
        return x + self.fuse(self.spatial(x) + self.gate(x))


class SegMambaEncoder(nn.Module):
    """Four stages at 1/2, 1/4, 1/8 and 1/16 of the window, each a GSC block then ToM layers; returns each
    stage's output through an instance norm and a 1x1x1 MLP (C -> 2C -> C)."""

    def __init__(self, in_channels, feature_size, depths, d_state, d_conv, expand):
        super().__init__()
        self.downsample = nn.ModuleList([nn.Conv3d(in_channels, feature_size[0], 7, stride=2, padding=3)])
        for i in range(1, 4):
            self.downsample.append(
                nn.Sequential(nn.InstanceNorm3d(feature_size[i - 1]),
                              nn.Conv3d(feature_size[i - 1], feature_size[i], 2, stride=2))
            )
        self.gscs = nn.ModuleList(GatedSpatialConv(f) for f in feature_size)
        self.stages = nn.ModuleList(
            nn.Sequential(*[ToMLayer(f, d_state, d_conv, expand) for _ in range(depth)])
            for f, depth in zip(feature_size, depths)
        )
        self.out_norms = nn.ModuleList(nn.InstanceNorm3d(f) for f in feature_size)
        self.out_mlps = nn.ModuleList(ConvMLP(f, 2 * f) for f in feature_size)

    def forward(self, x):
        features = []
        parts = zip(self.downsample, self.gscs, self.stages, self.out_norms, self.out_mlps)
        for downsample, gsc, stage, norm, mlp in parts:
            x = stage(gsc(downsample(x)))
            features.append(mlp(norm(x)))
        return features


class SegMamba(nn.Module):
    """SegMamba for (B, in_channels, *spatial) inputs with every spatial size divisible by 16. Nothing is
    tied to the window: `roi_size` is only checked."""

    def __init__(
        self,
        in_channels=1,
        out_channels=9,
        feature_size=(48, 96, 192, 384),
        depths=(2, 2, 2, 2),
        hidden_size=768,
        d_state=16,
        d_conv=4,
        expand=2,
        norm_name="instance",
        roi_size=(128, 128, 128),
    ):
        super().__init__()
        feature_size, depths = list(feature_size), list(depths)
        check_four_stages("SegMamba", feature_size=feature_size, depths=depths)
        self.roi_size = tuple(validated_roi("SegMamba", roi_size))
        self.encoder = SegMambaEncoder(in_channels, feature_size, depths, d_state, d_conv, expand)
        self.decoder = UNETRStyleDecoder(in_channels, out_channels, feature_size, hidden_size, norm_name)

    def forward(self, x):
        check_input_window("SegMamba", x)
        return self.decoder(x, self.encoder(x))
