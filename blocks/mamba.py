"""Mamba blocks: one scan direction, the projections around named directions, bidirectional Mamba ("v2":
one in/out projection, a scan of its own for each direction) and forward-only Mamba.

The selective scan and the causal convolution go through their backends (selective_scan.py, causal_conv.py).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import causal_conv1d_silu
from .selective_scan import selective_scan


class ScanDirection(nn.Module):
    """Convolution, input-dependent projections and selective scan for one scan direction."""

    def __init__(self, inner_dim, d_state, d_conv, dt_rank, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.conv1d = nn.Conv1d(inner_dim, inner_dim, d_conv, groups=inner_dim, bias=True)
        self.x_proj = nn.Linear(inner_dim, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner_dim, bias=True)
        # Mamba's initialisation: dt spread log-uniformly so that channels see different time scales.
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(inner_dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner_dim, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(inner_dim))

    def forward(self, x, z):
        """x, z: (B, E, L) -> (B, E, L)."""
        x = causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
        return selective_scan(
            x,
            delta,
            -torch.exp(self.A_log),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
        )


class MambaProjections(nn.Module):
    """Mamba's projections around scans of their own: `in_proj` gives the input x and the gate z (each
    (B, E, L), E = expand * C), one `ScanDirection` per name in `directions` (created in that order), and
    `out_proj` maps their combined output back to C. Subclasses decide how the directions read the sequence."""

    def __init__(self, dim, directions, d_state=16, d_conv=4, expand=2):
        super().__init__()
        inner_dim = expand * dim
        dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner_dim, bias=False)
        for name in directions:
            self.add_module(name, ScanDirection(inner_dim, d_state, d_conv, dt_rank))
        self.out_proj = nn.Linear(inner_dim, dim, bias=False)

    def project(self, tokens):
        """tokens (B, L, C) -> x, z, each (B, E, L)."""
        return self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)

    def output(self, y):
        """y (B, E, L) -> (B, L, C)."""
        return self.out_proj(y.transpose(1, 2))


class BiMamba(MambaProjections):
    """Mamba over a token sequence read forwards and backwards; the two outputs are summed."""

    def __init__(self, dim, d_state=16, d_conv=4, expand=2):
        super().__init__(dim, ("forward_scan", "backward_scan"), d_state, d_conv, expand)

    def forward(self, tokens):
        """tokens: (B, L, C) -> (B, L, C)."""
        x, z = self.project(tokens)
        y_forward = self.forward_scan(x, z)
        y_backward = self.backward_scan(x.flip(-1), z.flip(-1)).flip(-1)
        return self.output(y_forward + y_backward)


class Mamba(MambaProjections):
    """Mamba (Gu and Dao 2023) reading the sequence forwards only, as mamba-ssm's `Mamba`: the same
    projections around a single scan direction."""

    def __init__(self, dim, d_state=16, d_conv=4, expand=2):
        super().__init__(dim, ("forward_scan",), d_state, d_conv, expand)

    def forward(self, tokens):
        """tokens: (B, L, C) -> (B, L, C)."""
        x, z = self.project(tokens)
        return self.output(self.forward_scan(x, z))
