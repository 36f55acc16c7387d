"""The paper's MONAI baselines: 3D U-Net, SegResNet, Swin UNETR and UNETR, sized as in its comparison
(parameter counts at roi 128, 1 input channel, 9 classes in configs/models/<name>.yaml)."""
from monai.networks.nets import UNETR, SegResNet, SwinUNETR, UNet

from blocks.window import check_roi_size

INSTANCE_NORM = "instance norm in training needs more than one voxel"


def unet(in_channels=1, out_channels=9, roi_size=(128, 128, 128), channels=(16, 32, 64, 128, 256), num_res_units=2):
    """MONAI's residual U-Net: every level halves the size (stride 2), instance norm."""
    stride = 2 ** (len(channels) - 1)
    check_roi_size("unet", roi_size, stride, 2, INSTANCE_NORM)
    return UNet(3, in_channels, out_channels, channels=tuple(channels), strides=(2,) * (len(channels) - 1),
                num_res_units=num_res_units)


def segresnet(in_channels=1, out_channels=9, roi_size=(128, 128, 128), init_filters=16, blocks_down=(1, 2, 2, 4),
              blocks_up=(1, 1, 1), dropout_prob=0.2):
    """MONAI's SegResNet (Myronenko 2018) without the VAE branch; group norm works on any map size."""
    stride = 2 ** (len(blocks_down) - 1)
    check_roi_size("segresnet", roi_size, stride)
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=init_filters,
                     blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), dropout_prob=dropout_prob)


def swin_unetr(in_channels=1, out_channels=9, roi_size=(128, 128, 128), feature_size=48):
    """MONAI's Swin UNETR (v1). It takes any input divisible by 32 (MONAI 1.6 has no img_size argument);
    roi_size is the training and sliding window."""
    check_roi_size("swin_unetr", roi_size, 32, 2, INSTANCE_NORM)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size)


class WindowUNETR(UNETR):
    """MONAI's UNETR for inputs of exactly `roi_size` (its positional embedding is tied to the window).

    MONAI 1.4+ gives every transformer block a cross-attention LayerNorm that UNETR never calls; it is
    removed so that the parameters and state_dict are those of the reference UNETR.
    """

    def __init__(self, roi_size, **kwargs):
        super().__init__(img_size=roi_size, **kwargs)
        self.roi_size = tuple(roi_size)
        for block in self.vit.blocks:
            if hasattr(block, "norm_cross_attn") and not block.with_cross_attention:
                del block.norm_cross_attn

    def forward(self, x_in):
        if tuple(x_in.shape[2:]) != self.roi_size:
            raise ValueError(f"UNETR was built for a window of {list(self.roi_size)} voxels and got an input of "
                             f"{list(x_in.shape[2:])} (run sliding-window inference with the model's roi_size)")
        return super().forward(x_in)


def unetr(in_channels=1, out_channels=9, roi_size=(128, 128, 128), feature_size=16, hidden_size=768, mlp_dim=3072,
          num_heads=12):
    """UNETR (Hatamizadeh et al. 2022): ViT on 16^3 patches (perceptron embedding), residual conv decoder."""
    roi_size = check_roi_size("unetr", roi_size, 16)
    return WindowUNETR(roi_size, in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                       hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, proj_type="perceptron",
                       norm_name="instance", res_block=True)
