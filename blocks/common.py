"""Small layers several networks share: token/grid reshapes, a channel LayerNorm and a 1x1x1 MLP."""
import torch.nn.functional as F
from torch import nn


def to_tokens(x):
    """(B, C, h, w, d) -> (B, h*w*d, C)."""
    return x.flatten(2).transpose(1, 2)


def to_grid(tokens, spatial_shape):
    """(B, N, C) -> (B, C, *spatial_shape)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *spatial_shape)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor."""

    def __init__(self, channels, eps=1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ConvMLP(nn.Module):
    """1x1x1 convolution C -> hidden, GELU, 1x1x1 convolution hidden -> C."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.fc2 = nn.Conv3d(hidden, channels, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))
