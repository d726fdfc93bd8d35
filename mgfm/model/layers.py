"""The transformer parts the video encoder and the pretraining decoder share (timm's ``layers/``, V-JEPA's
``modules``): stochastic depth, attention, MLP, the pre-norm block, weight init, the fixed position tables and
the token gather.

Written for mgfm from the published recipes; no code from the CC BY-NC reference repositories. Tokens are
``(B, n, D)``; a clip's tokens are ordered ``(t, h, w)`` with ``t`` outermost (:mod:`mgfm.model.encoder`).
Position tables are the fixed sinusoid table over the flattened ``(t, h, w)`` token index, exactly the table
``transformers`` builds, so a saved encoder gives the same features there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    scale = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return x * scale


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection, q and v biases (no k bias), SDPA.

    ``qkv_weight`` ``(3D, D)`` (rows: q, k, v), ``q_bias``/``v_bias`` ``(D,)`` are parameters of this module
    itself (not of a child ``Linear``), so ZeRO-3 style parameter gathering sees them in this forward.
    """

    def __init__(self, dim: int, heads: int, qv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.xavier_uniform_(self.qkv_weight)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, n, D)``."""
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv_weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, n, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``(B, n, D)`` -> ``(B, n, hidden)`` -> ``(B, n, D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, with drop path."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, qv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, n, D)``."""
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``x`` ``(B, n, D)`` through ``blocks`` in order -> ``(B, n, D)``; with ``use_checkpoint`` each block's
    activations are recomputed in the backward pass instead of kept (only while gradients are on)."""
    for blk in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def init_weights(module: nn.Module) -> None:
    """The ViT start (for ``nn.Module.apply``): Xavier-uniform ``Linear`` weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """Fixed ``(n_positions, dim)`` sinusoid table: even channels ``sin(pos / 10000^(2i/dim))``, odd ``cos``."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    inv_freq = torch.pow(10000.0, -(2 * (j // 2)).to(torch.float64) / dim)
    angles = pos * inv_freq[None, :]
    return torch.where(j % 2 == 0, torch.sin(angles), torch.cos(angles)).float()


def position_table(grid: tuple[int, int, int], dim: int, trained: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The encoder's fixed ``(t*h*w, dim)`` position table for a token ``grid``.

    Without ``trained`` (or when it equals ``grid``) it is :func:`sinusoid_table` over the flattened token
    index, the table ``transformers`` builds. Used at another clip length or crop size, that 1-D index would
    land on other ``(t, h, w)`` places, so the table of the ``trained`` grid is resampled over ``(t, h, w)``
    instead (trilinear; timm and VideoMAE V2 resize position tables for other resolutions the same way).
    """
    if trained is None or tuple(trained) == tuple(grid):
        return sinusoid_table(math.prod(grid), dim)
    return resample_table(sinusoid_table(math.prod(trained), dim), trained, grid)


def resample_table(table: torch.Tensor, trained: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """A ``(t*h*w, D)`` position table of the ``trained`` token grid resampled over ``(t, h, w)`` (trilinear) to
    ``grid`` -> ``(t'*h'*w', D)``; differentiable, so a learned table trains through it."""
    if tuple(trained) == tuple(grid):
        return table
    volume = table.reshape(1, *trained, table.shape[-1]).permute(0, 4, 1, 2, 3)  # (1, D, t, h, w)
    resized = F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(math.prod(grid), table.shape[-1]).contiguous()


class LearnedPositions(nn.Module):
    """A trained position table ``table`` ``(N, D)`` of the token grid it was trained on (started from the
    sinusoid table); called, it is resampled to the grid in use (:func:`resample_table`). A module of its own so
    that ZeRO-3 gathers it when it is called."""

    def __init__(self, trained: tuple[int, int, int], grid: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.trained, self.grid = tuple(trained), tuple(grid)
        self.table = nn.Parameter(sinusoid_table(math.prod(self.trained), dim))

    def forward(self) -> torch.Tensor:
        """-> ``(t*h*w, D)`` for the grid in use."""
        return resample_table(self.table, self.trained, self.grid)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, D)`` or ``(N, D)``, ``index`` ``(B, n)`` long -> ``(B, n, D)``."""
    if x.dim() == 2:
        return x[index]
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
