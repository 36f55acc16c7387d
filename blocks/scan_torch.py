"""The portable selective-scan backend: PyTorch operations on any device, autograd through a chunked
log-depth scan that keeps only each chunk's starting state (the chunk is recomputed in backward)."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Steps per chunk: the log-depth scan inside a chunk costs log2(CHUNK) passes, the Python loop over
# chunks L / CHUNK iterations.
CHUNK = 64


def unavailable():
    """Why this backend cannot run here (never: it needs nothing beyond PyTorch)."""
    return None


def unsupported(u):
    """Why this backend cannot take tensors like `u` (any device and dtype will do)."""
    return None


def _chunk(h0, u, delta, A, B, C):
    """One chunk: (y (batch, D, T), last state (batch, D, N)) from the state h0 before it."""
    a = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))              # (b, d, T, n)
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)   # (b, d, T, n)
    # Hillis-Steele scan of h_t = a_t h_{t-1} + x_t: log2(T) passes, no exp(-cumsum) overflow.
    step, length = 1, a.shape[2]
    while step < length:
        x = torch.cat([x[:, :, :step], a[:, :, step:] * x[:, :, :-step] + x[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    h = x + a * h0.unsqueeze(2)
    y = torch.einsum("bdtn,bnt->bdt", h, C)
    return y, h[:, :, -1]


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # split, not slicing: its backward concatenates once instead of a full-length zero gradient per chunk.
    for u_c, delta_c, B_c, C_c in zip(*(t.split(CHUNK, dim=-1) for t in (u, delta, B, C))):
        args = (h, u_c, delta_c, A, B_c, C_c)
        y, h = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z)
    return y
