"""Attention-pooling heads: one learned query cross-attends over a tower's tokens.

As in Parker et al.: multi-head cross-attention from a learned query, LayerNorm, then an MLP
(width → 4·width → width) with a residual connection; the output is the modality's embedding
(L2-normalised by the loss and the exporter). The head reads the tower's final tokens, which
carry the positional embeddings and the class/statistics tokens, and `forward(...,
return_weights=True)` returns the real attention probabilities (B, heads, T) — not a batch
element, which is what the reference returned.

The released AstroCLIP heads differ (`input_norm=False`: the tokens enter the attention as they
are; `residual=False` for its image head, whose MLP output replaces its input); both are options.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from foundation.attention import attention, attention_weights, split_heads


class AttentionPoolHead(nn.Module):
    def __init__(
        self,
        in_width: int,
        width: int,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        input_norm: bool = True,
        residual: bool = True,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"embedding width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, width) / math.sqrt(width))
        self.norm_in = nn.LayerNorm(in_width) if input_norm else nn.Identity()
        self.residual = residual
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(in_width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def _qkv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (q,) = split_heads(self.q(self.query), 1, self.heads)
        k, v = split_heads(self.kv(self.norm_in(tokens)), 2, self.heads)
        return q.expand(len(tokens), -1, -1, -1), k, v

    def forward(self, tokens: torch.Tensor, return_weights: bool = False):
        """tokens (B, T, in_width) → embedding (B, width) [, weights (B, heads, T)]."""
        q, k, v = self._qkv(tokens)
        pooled = rearrange(attention(q, k, v), "b h 1 d -> b (h d)")
        x = self.norm(self.dropout(self.proj(pooled)))
        x = x + self.mlp(x) if self.residual else self.mlp(x)
        if return_weights:
            return x, attention_weights(q, k)[:, :, 0]
        return x
