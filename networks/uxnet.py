"""3D UX-Net (Lee et al., ICLR 2023): a ConvNeXt-like encoder of 7x7x7 depthwise convolutions with a
grouped 1x1x1 MLP, and the UNETR-style decoder that SegMamba reuses. Written from the paper and the
public repository MASILab/3DUX-Net (shapes and block structure); 53,006,265 parameters at roi 128,
1 input and 9 output channels, the paper's 53.01 M."""
import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from torch import nn

from blocks.common import ChannelLayerNorm
from blocks.window import check_roi_size

WINDOW_MULTIPLE = 16  # stem /2 then three /2 downsamplings


def validated_roi(network, roi_size):
    # Instance norms in the decoder (and SegMamba's encoder) need more than one voxel at 1/16.
    return check_roi_size(network, roi_size, WINDOW_MULTIPLE, 2, "an instance norm needs more than one voxel")


def check_four_stages(network, **values):
    for name, value in values.items():
        if len(value) != 4:
            raise ValueError(f"{network} {name} needs 4 values (one per stage), got {list(value)}")


def check_input_window(network, x):
    # Other sizes would leave the decoder's upsampled maps a voxel short of their skips.
    if any(s % WINDOW_MULTIPLE for s in x.shape[2:]):
        raise ValueError(f"{network} needs input sizes divisible by {WINDOW_MULTIPLE}, got {list(x.shape[2:])}")


def channels_last_on_cpu(x):
    """PyTorch's CPU backward of a depthwise 3D convolution on NCDHW tensors runs a slow reference kernel
    (57 s against 2 s for 48 channels at 32^3, same gradients); on channels-last tensors it runs oneDNN's."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" else x


class UXBlock(nn.Module):
    """Depthwise 7x7x7 convolution, LayerNorm, then a 1x1x1 MLP C -> 4C -> C whose two convolutions are
    grouped by channel (groups = C, the paper's depthwise MLP); a layer-scaled residual."""

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelLayerNorm(dim)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.dwconv(channels_last_on_cpu(x))
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
        return x + self.drop_path(self.gamma.view(-1, 1, 1, 1) * y)


class UXNetEncoder(nn.Module):
    """Four stages at 1/2, 1/4, 1/8 and 1/16 of the window; returns each stage's output, LayerNormed
    (the next stage takes the un-normed features)."""

    def __init__(self, in_channels, feature_size, depths, drop_path_rate, layer_scale_init_value):
        super().__init__()
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_channels, feature_size[0], 7, stride=2, padding=3),
                           ChannelLayerNorm(feature_size[0]))]
        )
        for i in range(1, 4):
            self.downsample.append(
                nn.Sequential(ChannelLayerNorm(feature_size[i - 1]),
                              nn.Conv3d(feature_size[i - 1], feature_size[i], 2, stride=2))
            )
        # Stochastic depth grows linearly over all blocks, as in ConvNeXt.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[UXBlock(feature_size[i], rates[starts[i] + j], layer_scale_init_value)
                            for j in range(depths[i])])
            for i in range(4)
        )
        self.out_norms = nn.ModuleList(ChannelLayerNorm(f) for f in feature_size)

    def forward(self, x):
        features = []
        for downsample, stage, norm in zip(self.downsample, self.stages, self.out_norms):
            x = stage(downsample(x))
            features.append(norm(x))
        return features


class UNETRStyleDecoder(nn.Module):
    """The decoder of 3D UX-Net and SegMamba: a residual UNETR block on the image and on each of the four
    encoder features (the deepest widened to `hidden_size`), four UNETR up-blocks, one more residual
    block at full resolution and a 1x1x1 output convolution."""

    def __init__(self, in_channels, out_channels, feature_size, hidden_size, norm_name="instance", res_block=True):
        super().__init__()
        f0, f1, f2, f3 = feature_size

        def basic(cin, cout):
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)

        def up(cin, cout):
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                res_block=res_block)

        self.encoder1 = basic(in_channels, f0)
        self.encoder2 = basic(f0, f1)
        self.encoder3 = basic(f1, f2)
        self.encoder4 = basic(f2, f3)
        self.encoder5 = basic(f3, hidden_size)
        self.decoder5 = up(hidden_size, f3)
        self.decoder4 = up(f3, f2)
        self.decoder3 = up(f2, f1)
        self.decoder2 = up(f1, f0)
        self.decoder1 = basic(f0, f0)
        self.out = UnetOutBlock(3, f0, out_channels)

    def forward(self, image, features):
        """image (B, in, *S); features at S/2, S/4, S/8, S/16 -> logits (B, out, *S)."""
        s1, s2, s3, s4 = features
        dec3 = self.decoder5(self.encoder5(s4), self.encoder4(s3))
        dec2 = self.decoder4(dec3, self.encoder3(s2))
        dec1 = self.decoder3(dec2, self.encoder2(s1))
        dec0 = self.decoder2(dec1, self.encoder1(image))
        return self.out(self.decoder1(dec0))


class UXNet(nn.Module):
    """3D UX-Net for (B, in_channels, *spatial) inputs with every spatial size divisible by 16. Fully
    convolutional: `roi_size` is only checked, the network takes any such window."""

    def __init__(
        self,
        in_channels=1,
        out_channels=9,
        feature_size=(48, 96, 192, 384),
        depths=(2, 2, 2, 2),
        hidden_size=768,
        drop_path_rate=0.0,
        layer_scale_init_value=1e-6,
        norm_name="instance",
        roi_size=(128, 128, 128),
    ):
        super().__init__()
        feature_size, depths = list(feature_size), list(depths)
        check_four_stages("UX-Net", feature_size=feature_size, depths=depths)
        self.roi_size = tuple(validated_roi("UX-Net", roi_size))
        self.encoder = UXNetEncoder(in_channels, feature_size, depths, drop_path_rate, layer_scale_init_value)
        self.decoder = UNETRStyleDecoder(in_channels, out_channels, feature_size, hidden_size, norm_name)

    def forward(self, x):
        check_input_window("UX-Net", x)
        return self.decoder(x, self.encoder(x))
