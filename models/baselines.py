"""The baselines of the paper's comparison (networks/), registered under the names the configs use. A new
baseline is a builder in networks/ and a line here."""
from networks import monai_nets, nnunet, segmamba, transunet, uxnet, vtunet

from .registry import register_model

BASELINES = {
    "unet": monai_nets.unet,
    "segresnet": monai_nets.segresnet,
    "swin_unetr": monai_nets.swin_unetr,
    "unetr": monai_nets.unetr,
    "nnunet": nnunet.nnunet,
    "umamba_bot": nnunet.umamba_bot,
    "umamba_enc": nnunet.umamba_enc,
    "umamba_bot_official": nnunet.umamba_bot_official,
    "umamba_enc_official": nnunet.umamba_enc_official,
    "segmamba": segmamba.SegMamba,
    "transunet": transunet.TransUNet,
    "uxnet": uxnet.UXNet,
    "vtunet": vtunet.VTUNet,
}

for _name, _builder in BASELINES.items():
    register_model(_name)(_builder)
