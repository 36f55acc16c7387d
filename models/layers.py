"""EM-Net's own layers: the CSR-Mamba layer and the EFL layer (its Fourier filter included)."""
import torch
from monai.networks.blocks import UnetResBlock
from torch import nn

from blocks.common import ConvMLP, to_grid, to_tokens
from blocks.mamba import BiMamba


class CSRMambaLayer(nn.Module):
    """Channel squeeze-reinforce Mamba: one BiMamba shared by the full-channel ("reinforce") branch and
    a channel-squeezed branch, a layer-scaled residual, then a residual convolution block."""

    def __init__(self, dim, num_tokens, dropout=0.1):
        super().__init__()
        self.num_tokens = num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.mamba = BiMamba(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = ConvMLP(dim, dim // 4)
        self.norm2 = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.res_block = UnetResBlock(3, dim, dim, kernel_size=3, stride=1, norm_name="batch")
        self.res_dropout = nn.Dropout3d(dropout)
        self.res_proj = nn.Conv3d(dim, dim, 1)

    def forward(self, x):
        spatial = x.shape[2:]
        tokens = to_tokens(x) + self.pos_embed
        normed = self.norm(tokens)
        reinforced = self.norm1(self.mamba(normed))
        squeezed = self.norm2(self.mamba(to_tokens(self.mlp(to_grid(normed, spatial)))))
        out = to_grid(tokens + self.gamma * (reinforced + squeezed), spatial)
        return out + self.res_proj(self.res_dropout(self.res_block(out)))


class FourierFilter(nn.Module):
    """Learnable global filter: multiply the 3D real FFT of each channel by a complex weight."""

    def __init__(self, dim, spatial_shape):
        super().__init__()
        h, w, d = spatial_shape
        self.spatial_shape = tuple(spatial_shape)
        self.weight = nn.Parameter(torch.randn(dim, h, w, d // 2 + 1, 2) * 0.02)

    def forward(self, x):
        # FFTs run in at least float32 (half-precision FFTs only take powers of two and lose accuracy), and
        # the result stays in that precision for the LayerNorm after it, as in the reference under AMP.
        dtype = torch.promote_types(x.dtype, torch.float32)
        spectrum = torch.fft.rfftn(x.to(dtype), dim=(2, 3, 4), norm="ortho")
        spectrum = spectrum * torch.view_as_complex(self.weight.to(dtype))
        return torch.fft.irfftn(spectrum, s=self.spatial_shape, dim=(2, 3, 4), norm="ortho")


EFL_LAYOUTS = ("reference", "spatial")


class EFLLayer(nn.Module):
    """Efficient frequency learning: LayerNorm, Fourier filter, LayerNorm, residual 1x1 MLP.

    layout "spatial" is the clean filter the paper's figure draws: the normalised tokens go back to the
    grid, so the layer commutes with circular shifts of the grid. layout "reference" is what the reference
    code computes, and what its checkpoints (and the paper's numbers) need: the normalised tokens, laid
    out (B, N, C), are reinterpreted as (B, C, h, w, d), which interleaves channels and positions before
    the FFT, and the output (residual included) is transposed on its last two axes and reinterpreted as
    (B, C, h, w, d), which on a cubic grid swaps w and d.
    """

    def __init__(self, dim, spatial_shape, layout="reference"):
        super().__init__()
        if layout not in EFL_LAYOUTS:
            raise ValueError(f"EFL layout {layout!r} is not one of {', '.join(EFL_LAYOUTS)}")
        self.layout = layout
        self.norm1 = nn.LayerNorm(dim)
        self.fourier = FourierFilter(dim, spatial_shape)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMLP(dim, dim // 2)

    def forward(self, x):
        shape = x.shape
        spatial = shape[2:]
        normed = self.norm1(to_tokens(x))
        grid = normed.reshape(shape) if self.layout == "reference" else to_grid(normed, spatial)
        out = x + self.mlp(to_grid(self.norm2(to_tokens(self.fourier(grid))), spatial))
        return out.transpose(-1, -2).reshape(shape) if self.layout == "reference" else out
