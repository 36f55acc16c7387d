"""The baselines of the paper's comparison (networks/), registered under the names the configs use, with the
windows each accepts (the multiple and coarsest-map size its builder's check_roi_size call demands). A new
baseline is a builder in networks/ and a line here."""
from networks import monai_nets, nnunet, segmamba, transunet, uxnet, vtunet

from .registry import register_model


def _halvings(key):
    """The window multiple of a network that halves every side once per stage after the first."""
    return lambda arguments: 2 ** (len(arguments[key]) - 1)


# name: (builder, window multiple, voxels the coarsest map needs: 2 where an instance norm normalises it)
BASELINES = {
    "unet": (monai_nets.unet, _halvings("channels"), 2),
    "segresnet": (monai_nets.segresnet, _halvings("blocks_down"), 1),
    "swin_unetr": (monai_nets.swin_unetr, 32, 2),
    "unetr": (monai_nets.unetr, 16, 1),
    "nnunet": (nnunet.nnunet, _halvings("features"), 2),
    "umamba_bot": (nnunet.umamba_bot, _halvings("features"), 2),
    "umamba_enc": (nnunet.umamba_enc, _halvings("features"), 2),
    "umamba_bot_official": (nnunet.umamba_bot_official, _halvings("features"), 2),
    "umamba_enc_official": (nnunet.umamba_enc_official, _halvings("features"), 2),
    "segmamba": (segmamba.SegMamba, uxnet.WINDOW_MULTIPLE, 2),
    "transunet": (transunet.TransUNet, _halvings("features_per_stage"), 2),
    "uxnet": (uxnet.UXNet, uxnet.WINDOW_MULTIPLE, 2),
    # Patch merging halves only the last two axes: the first side needs the patch size alone.
    "vtunet": (vtunet.VTUNet, (vtunet.PATCH_SIZE,) + (vtunet.PATCH_SIZE * 2 ** (vtunet.NUM_LEVELS - 1),) * 2, 1),
}

for _name, (_builder, _multiple, _coarsest) in BASELINES.items():
    register_model(_name, window_multiple=_multiple, coarsest_voxels=_coarsest)(_builder)
