"""3D TransUNet (Chen et al., 2023), decoder-only variant: nnU-Net's plain convolutional U-Net (from
`dynamic-network-architectures`) whose decoder features feed a Mask2Former-style masked-attention
transformer decoder with one query per class.

Sized as the EM-Net paper's comparison builds it: 47,311,978 parameters at roi 128, 1 input, 9 classes
(the paper's table says 42.98 M; see the README). Layout from the public reference
(github.com/Beckschen/3D-TransUNet): ten decoder layers of masked cross-attention, self-attention and FFN
(post-norm), cycling over the 1/8, 1/4 and 1/2 resolution features; the masks are the product of the
query embeddings and full-resolution mask features; the segmentation combines them with the class
predictions as the reference's semantic inference does.
"""
import math

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import (
    PlainConvEncoder,
)
from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
    StackedConvBlocks,
)
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from blocks.window import check_roi_size

NUM_LEVELS = 3  # decoder features at 1/8, 1/4 and 1/2 of the window feed the transformer decoder
INSTANCE_NORM = "instance norm needs more than one voxel"
PROBABILITY_FLOOR = 1e-6  # keeps log() of the combined class-mask probabilities finite


def sine_position_encoding(grid, channels, device, temperature=10000.0):
    """DETR/Mask2Former sine encoding of normalised positions (scaled to 2 pi) on a 3D grid: per axis
    2*ceil(channels/6) interleaved sin/cos features, concatenated and cut to `channels`, as (1, N, channels).
    The reference gives each axis channels//3 features (85 at 256, odd, which its sin/cos split cannot
    take); rounding up to even and cutting keeps the 256 channels of the features it is added to."""
    per_axis = 2 * math.ceil(channels / 6)
    freq = temperature ** (2 * (torch.arange(per_axis, device=device) // 2).float() / per_axis)
    axes = []
    for axis, size in enumerate(grid):
        position = torch.arange(1, size + 1, device=device, dtype=torch.float32) / (size + 1e-6) * 2 * math.pi
        phase = position[:, None] / freq
        encoding = torch.stack([phase[:, 0::2].sin(), phase[:, 1::2].cos()], dim=-1).flatten(1)
        shape = [1, 1, 1, per_axis]
        shape[axis] = size
        axes.append(encoding.reshape(shape).expand(*grid, per_axis))
    return torch.cat(axes, dim=-1)[..., :channels].reshape(1, -1, channels)


class AttentionLayer(nn.Module):
    """Post-norm attention: x + Attention(x + query_pos, memory + pos, memory), then LayerNorm. Computed in
    float32 under mixed precision, as the reference's configuration asks (is_mhsa_float32)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, memory, query_pos, pos=None, mask=None):
        key = memory if pos is None else memory + pos
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            out = self.attn((x + query_pos).to(dtype), key.to(dtype), memory.to(dtype), attn_mask=mask,
                            need_weights=False)[0]
        return self.norm(x + out.to(x.dtype))


class FeedForwardLayer(nn.Module):
    """Post-norm FFN: LayerNorm(x + Linear(ReLU(Linear(x))))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder in 3D. Each query attends only to the positions
    its previous mask prediction covers (sigmoid >= 0.5 at that level's resolution; everywhere if it
    covers none). Returns the class logits (B, Q, C+1) and mask logits (B, Q, *full) after the learnable
    queries and after each layer."""

    def __init__(self, num_queries, num_classes, dim, num_heads, dim_feedforward, num_layers):
        super().__init__()
        self.num_heads = num_heads
        self.cross_attention = nn.ModuleList(AttentionLayer(dim, num_heads) for _ in range(num_layers))
        self.self_attention = nn.ModuleList(AttentionLayer(dim, num_heads) for _ in range(num_layers))
        self.ffn = nn.ModuleList(FeedForwardLayer(dim, dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)  # + "no object"
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                        nn.Linear(dim, dim))
        for layer in [*self.cross_attention, *self.self_attention, *self.ffn]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, features, mask_features):
        """features: NUM_LEVELS maps (B, dim, *grid_l); mask_features (B, dim, *full)."""
        grids = [f.shape[2:] for f in features]
        memories = [f.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, f in enumerate(features)]
        positions = [sine_position_encoding(g, f.shape[1], f.device) for g, f in zip(grids, features)]
        batch = mask_features.shape[0]
        # repeat, not expand: a view of a parameter made under no_grad upsets autograd hooks (FlopCounterMode's)
        query_pos = self.query_embed.weight.unsqueeze(0).repeat(batch, 1, 1)
        x = self.query_feat.weight.unsqueeze(0).repeat(batch, 1, 1)
        predictions = [self.predict(x, mask_features)]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.cross_attention, self.self_attention, self.ffn)):
            level = i % NUM_LEVELS
            mask = self.attention_mask(predictions[-1][1], grids[level])
            x = cross(x, memories[level], query_pos, positions[level], mask)
            x = ffn(self_attn(x, x, query_pos, query_pos))
            predictions.append(self.predict(x, mask_features))
        return predictions

    def predict(self, x, mask_features):
        x = self.decoder_norm(x)
        masks = torch.einsum("bqc,bc...->bq...", self.mask_embed(x), mask_features)
        return self.class_embed(x), masks

    def attention_mask(self, mask_logits, grid):
        """(B*heads, Q, N) booleans, True where a query may not attend."""
        small = F.interpolate(mask_logits.detach(), size=tuple(grid), mode="trilinear", align_corners=False)
        blocked = small.flatten(2) < 0  # sigmoid < 0.5
        blocked[blocked.all(dim=-1)] = False
        return blocked.repeat_interleave(self.num_heads, dim=0)


def semantic_logits(class_logits, mask_logits):
    """The reference's semantic inference, sum_q softmax(class)_q,c (no-object dropped) * sigmoid(mask_q),
    returned as log-probabilities: a (B, C, *spatial) logit map whose argmax is the reference's."""
    with torch.autocast(mask_logits.device.type, enabled=False):
        probs = torch.einsum(
            "bqc,bq...->bc...", class_logits.float().softmax(-1)[..., :-1], mask_logits.float().sigmoid()
        )
        return torch.log(probs + PROBABILITY_FLOOR)


class TransUNet(nn.Module):
    """3D TransUNet (decoder-only) for (B, in_channels, *spatial) inputs, spatial sizes divisible by
    2**(stages - 1). With `deep_supervision`, training mode also returns the segmentation after the learnable
    queries and after each decoder layer but the last (latest first: [final, layer 9, ..., queries]; set
    trainer.deep_supervision_weights to num_layers + 1 weights); eval mode returns the final one alone.
    """

    def __init__(
        self,
        in_channels=1,
        out_channels=9,
        roi_size=(128, 128, 128),
        features_per_stage=(32, 64, 128, 256, 320, 320),
        hidden_dim=256,
        num_heads=8,
        dim_feedforward=2048,
        num_layers=10,
        deep_supervision=False,
    ):
        super().__init__()
        features = list(features_per_stage)
        if len(features) < NUM_LEVELS + 2:
            raise ValueError(f"TransUNet features_per_stage needs at least {NUM_LEVELS + 2} stages, got {features}")
        self.window_multiple = 2 ** (len(features) - 1)
        check_roi_size("TransUNet", roi_size, self.window_multiple, 2, INSTANCE_NORM)
        if hidden_dim % num_heads or hidden_dim % 32:
            raise ValueError(f"TransUNet hidden_dim {hidden_dim} must be divisible by num_heads ({num_heads}) and "
                             "by 32 (GroupNorm groups)")
        self.deep_supervision = deep_supervision
        conv = dict(conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
        strides = [1] + [2] * (len(features) - 1)
        self.encoder = PlainConvEncoder(in_channels, len(features), features, nn.Conv3d, 3, strides, 2,
                                        return_skips=True, **conv)
        # nnU-Net's decoder as the reference builds it: bias-free transposed convolutions, no segmentation heads.
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(features[s + 1], features[s], 2, stride=2, bias=False)
            for s in reversed(range(len(features) - 1))
        )
        self.decoder_stages = nn.ModuleList(
            StackedConvBlocks(2, nn.Conv3d, 2 * features[s], features[s], 3, 1, **conv)
            for s in reversed(range(len(features) - 1))
        )
        self.encoder.apply(InitWeights_He(1e-2))
        self.upsamplers.apply(InitWeights_He(1e-2))
        self.decoder_stages.apply(InitWeights_He(1e-2))
        level_channels = features[1:NUM_LEVELS + 1][::-1]  # 1/8, 1/4, 1/2
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)) for c in level_channels
        )
        self.mask_features = nn.Conv3d(features[0], hidden_dim, 1)
        self.transformer_decoder = MaskedAttentionDecoder(out_channels, out_channels, hidden_dim, num_heads,
                                                          dim_feedforward, num_layers)

    def forward(self, x):
        sizes = x.shape[2:]
        if any(s % self.window_multiple for s in sizes) or math.prod(sizes) <= self.window_multiple**3:
            raise ValueError(f"TransUNet needs input sizes divisible by {self.window_multiple}, more than one voxel at "
                             f"1/{self.window_multiple} ({INSTANCE_NORM}), got {list(sizes)}")
        skips = self.encoder(x)
        y = skips[-1]
        decoded = []
        for up, stage, skip in zip(self.upsamplers, self.decoder_stages, reversed(skips[:-1])):
            y = stage(torch.cat([up(y), skip], dim=1))
            decoded.append(y)
        levels = decoded[-NUM_LEVELS - 1:-1]
        features = [project(f) for project, f in zip(self.input_projections, levels)]
        predictions = self.transformer_decoder(features, self.mask_features(decoded[-1]))
        if self.deep_supervision and self.training:
            return [semantic_logits(c, m) for c, m in reversed(predictions)]
        return semantic_logits(*predictions[-1])
