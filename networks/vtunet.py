"""VT-UNet (Peiris et al., MICCAI 2022): a volumetric Swin transformer U-Net whose decoder blocks attend to
their own tokens and, with the same weights, to the keys and values of the matching encoder block.

Sized as the EM-Net paper's comparison runs it: 11,781,036 parameters at roi 128, 1 input, 9 classes.
The layout follows the public reference (github.com/himashi92/VT-UNet), including its quirks, noted
where they occur. Window attention, its masks and window partitioning are MONAI's (as in Swin UNETR).
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import (
    WindowAttention,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)
from torch import nn

PATCH_SIZE = 4
NUM_LEVELS = 4
CROSS_ATTENTION_WEIGHT = 0.3  # decoder blocks mix 0.7 self-attention + 0.3 cross-attention paths


class DualWindowAttention(WindowAttention):
    """MONAI's window attention with relative position bias, which also returns its keys and values and,
    given an encoder block's keys and values, attends over them with the same query, bias, mask and
    output projection (VT-UNet's cross-attention)."""

    def forward(self, x, mask=None, memory=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).permute(2, 0, 1)
        if mask is not None:  # (windows, n, n): one bias per window and head, shared by the batch
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).flatten(0, 1)
        out = self._attend(q, k, v, bias, self.scale)
        cross = None
        if memory is not None:
            memory_k, memory_v = memory
            # The reference scales the (already scaled) query once more for the cross-attention.
            cross = self._attend(q, memory_k, memory_v, bias, self.scale**2)
        return out, cross, (k, v)

    def _attend(self, q, k, v, bias, scale):
        b, heads, n, head_dim = q.shape
        windows = bias.shape[0] // heads
        # Group each batch element's windows with the heads, so the per-window bias broadcasts over the batch.
        fold = (b // windows, windows * heads, n, head_dim)
        out = F.scaled_dot_product_attention(
            q.reshape(fold), k.reshape(fold), v.reshape(fold), attn_mask=bias.unsqueeze(0).to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0, scale=scale,
        )
        out = out.reshape(b, heads, n, head_dim).transpose(1, 2).reshape(b, n, heads * head_dim)
        return self.proj_drop(self.proj(out))


def fourier_position_encoding(grid, channels, device, dtype):
    """Parameter-free sin/cos encoding of the (D, H, W) token positions, as the reference's decoder adds:
    per axis 2*ceil(channels/6) features (sines then cosines), concatenated and cut to `channels`."""
    per_axis = 2 * math.ceil(channels / 6)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, per_axis, 2, device=device, dtype=torch.float32) / per_axis))
    axes = []
    for axis, size in enumerate(grid):
        phase = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq
        shape = [1, 1, 1, per_axis]
        shape[axis] = size
        axes.append(torch.cat([phase.sin(), phase.cos()], dim=-1).reshape(shape).expand(*grid, per_axis))
    return torch.cat(axes, dim=-1)[..., :channels].unsqueeze(0).to(dtype)


class VTBlock(nn.Module):
    """Swin block on (B, D, H, W, C) tokens. Given an encoder block's keys and values (`memory`) and the
    positional encoding, it is a VT-UNet decoder block: the self- and cross-attention paths each go through
    the residual MLP, are mixed 0.7/0.3, and the MLP of the normalised positional encoding is added."""

    def __init__(self, dim, num_heads, attention_window, window_size, shift_size, mlp_ratio, qkv_bias, drop_path):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        # The bias table is sized for the configured window even where the grid shrinks the window (as in the
        # reference and MONAI's Swin UNETR, which then use the first N x N entries of its index).
        self.attn = DualWindowAttention(dim, num_heads, attention_window, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_mode="swin")

    def forward(self, x, attn_mask, memory=None, position=None):
        shortcut = x
        b, d, h, w, c = x.shape
        x = self.norm1(x)
        pads = [(ws - s % ws) % ws for s, ws in zip((d, h, w), self.window_size)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = (b, d + pads[0], h + pads[1], w + pads[2])
        shifted = any(s > 0 for s in self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=[-s for s in self.shift_size], dims=(1, 2, 3))
        attended, crossed, keys_values = self.attn(
            window_partition(x, self.window_size), attn_mask if shifted else None, memory
        )

        def to_grid(windows):
            y = window_reverse(windows.reshape(-1, *self.window_size, c), self.window_size, padded)
            if shifted:
                y = torch.roll(y, shifts=list(self.shift_size), dims=(1, 2, 3))
            return y[:, :d, :h, :w].contiguous()

        x = shortcut + self.drop_path(to_grid(attended))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if crossed is None:
            return x, keys_values
        x_cross = shortcut + self.drop_path(to_grid(crossed))
        x_cross = x_cross + self.drop_path(self.mlp(self.norm2(x_cross)))
        mixed = (1 - CROSS_ATTENTION_WEIGHT) * x + CROSS_ATTENTION_WEIGHT * x_cross
        return mixed + self.mlp(self.norm2(position)), keys_values


class VTStage(nn.Module):
    """`depth` blocks at one resolution, windows shifted by half on odd blocks; the window shrinks (and
    stops shifting) along an axis the grid does not exceed, as in Video Swin."""

    def __init__(self, dim, depth, num_heads, window_size, grid, mlp_ratio, qkv_bias, drop_paths):
        super().__init__()
        self.grid = tuple(grid)
        self.window_size, shift = get_window_size(grid, window_size, tuple(s // 2 for s in window_size))
        self.padded = tuple(math.ceil(g / ws) * ws for g, ws in zip(grid, self.window_size))
        self.shift_size = shift
        self.blocks = nn.ModuleList(
            VTBlock(dim, num_heads, window_size, self.window_size, (0, 0, 0) if i % 2 == 0 else shift, mlp_ratio,
                    qkv_bias, drop_paths[i])
            for i in range(depth)
        )

    def attention_mask(self, device):
        if not any(self.shift_size):
            return None
        return compute_mask(self.padded, self.window_size, self.shift_size, device)

    def forward(self, x, memories=None):
        """Returns the output and each block's (keys, values); with the encoder's `memories`, cross-attends."""
        mask = self.attention_mask(x.device)
        position = None
        if memories is not None:
            position = fourier_position_encoding(self.grid, x.shape[-1], x.device, x.dtype)
        keys_values = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if memories is None else memories[i], position)
            keys_values.append(kv)
        return x, keys_values


class PatchMerging(nn.Module):
    """2x2 neighbours of the last two axes concatenated (4C), LayerNorm, Linear to 2C; the first axis
    keeps its size (the reference's 2D-style merging)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear C -> 2C, spread over 2x2 of the last two axes (C/2 each), LayerNorm."""

    def __init__(self, dim):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x):
        x = rearrange(self.expand(x), "b d h w (p1 p2 c) -> b d (h p1) (w p2) c", p1=2, p2=2)
        return self.norm(x)


class FinalPatchExpand(nn.Module):
    """Linear C -> 64C spread over 4x4x4 voxels (C each), LayerNorm: back to the input resolution."""

    def __init__(self, dim, scale=PATCH_SIZE):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale**3 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        s = self.scale
        x = rearrange(self.expand(x), "b d h w (p1 p2 p3 c) -> b (d p1) (h p2) (w p3) c", p1=s, p2=s, p3=s)
        return self.norm(x)


class VTUNet(nn.Module):
    """VT-UNet for (B, in_channels, *roi_size) inputs, tied to roi_size as the reference is (its token grids
    are fixed at construction): run sliding-window inference with the model's window.

    Encoder: 4x4x4 patch embedding, four stages of window-attention blocks, patch merging (halving the
    last two axes) between them, LayerNorm. Decoder: patch expanding, concatenation of the matching stage's
    input, Linear 2C -> C, and cross-attending blocks fed with that stage's keys and values.
    """

    def __init__(
        self,
        in_channels=1,
        out_channels=9,
        roi_size=(128, 128, 128),
        embed_dim=72,
        depths=(2, 2, 2, 1),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.2,
    ):
        super().__init__()
        roi_size = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
        depths, num_heads = list(depths), list(num_heads)
        halvings = PATCH_SIZE * 2 ** (NUM_LEVELS - 1)
        if (len(roi_size) != 3 or any(s <= 0 for s in roi_size) or roi_size[0] % PATCH_SIZE
                or roi_size[1] % halvings or roi_size[2] % halvings):
            raise ValueError(f"VT-UNet roi_size must be 3 positive sizes, the first divisible by {PATCH_SIZE} and "
                             f"the last two by {halvings}, got {roi_size}")
        for name, value in (("depths", depths), ("num_heads", num_heads)):
            if len(value) != NUM_LEVELS:
                raise ValueError(f"VT-UNet {name} needs {NUM_LEVELS} values (one per stage), got {value}")
        if any(d < 1 for d in depths):
            raise ValueError(f"VT-UNet depths must be positive, got {depths}")
        dims = [embed_dim * 2**i for i in range(NUM_LEVELS)]
        for dim, heads in zip(dims, num_heads):
            if dim % heads:
                raise ValueError(f"VT-UNet stage width {dim} is not divisible by its num_heads {heads}")
        self.roi_size = tuple(roi_size)
        window = (window_size,) * 3 if isinstance(window_size, int) else tuple(window_size)
        patches = [s // PATCH_SIZE for s in roi_size]
        grids = [(patches[0], patches[1] // 2**i, patches[2] // 2**i) for i in range(NUM_LEVELS)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        rates = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(NUM_LEVELS)]

        def stage(i):
            return VTStage(dims[i], depths[i], num_heads[i], window, grids[i], mlp_ratio, qkv_bias, rates[i])

        self.patch_embed = nn.Conv3d(in_channels, embed_dim, PATCH_SIZE, stride=PATCH_SIZE)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.encoder_stages = nn.ModuleList(stage(i) for i in range(NUM_LEVELS))
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(NUM_LEVELS - 1))
        self.bottleneck_norm = nn.LayerNorm(dims[-1])
        # Decoder levels NUM_LEVELS-2 .. 0: each expands the level below, then refines at its own level.
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1]) for i in range(NUM_LEVELS - 1))
        self.skip_projections = nn.ModuleList(nn.Linear(2 * dims[i], dims[i], bias=False)
                                              for i in range(NUM_LEVELS - 1))
        self.decoder_stages = nn.ModuleList(stage(i) for i in range(NUM_LEVELS - 1))
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.final_expand = FinalPatchExpand(embed_dim)
        self.out = nn.Conv3d(embed_dim, out_channels, 1, bias=False)
        self.apply(_init_weights)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.roi_size:
            raise ValueError(
                f"VT-UNet was built for a window of {list(self.roi_size)} voxels and got an input of "
                f"{list(x.shape[2:])} (run sliding-window inference with roi_size equal to the model's)"
            )
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 4, 1))
        skips, memories = [], []
        for i, stage in enumerate(self.encoder_stages):
            skips.append(x)  # the reference skips each stage's input, not its output
            x, keys_values = stage(x)
            memories.append(keys_values)
            if i < NUM_LEVELS - 1:
                x = self.merges[i](x)
        x = self.bottleneck_norm(x)
        for i in reversed(range(NUM_LEVELS - 1)):
            x = self.skip_projections[i](torch.cat([self.expands[i](x), skips[i]], dim=-1))
            x, _ = self.decoder_stages[i](x, memories[i])
        x = self.final_expand(self.decoder_norm(x))
        return self.out(x.permute(0, 4, 1, 2, 3))


def _init_weights(module):
    """The reference's initialisation: truncated normal (std 0.02) Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
