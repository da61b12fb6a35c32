"""One attention entry point for every family: torch SDPA by default, xformers where it runs, and
the one pre-LN transformer block (`SelfAttention`, `TransformerBlock`) the xVal trunk and the
AstroCLIP towers are built from.

Tensors are (batch, heads, length, head_dim). xformers is used only when it imports, the tensors
are on CUDA, and no key-padding mask is needed that it cannot express; everywhere else (CPU
included) the call falls back to `torch.nn.functional.scaled_dot_product_attention`, except for
bf16/fp16 on CPU with a small score matrix, where plain matmul + softmax is the faster kernel.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

Backend = Literal["auto", "sdpa", "xformers"]
_log = logging.getLogger(__name__)
_backend: Backend = "auto"
_warned = False

# On CPU, SDPA's fused kernel is slower than two plain matmuls and a softmax for bf16/fp16 inputs:
# the matmuls run on the CPU's bf16 GEMMs (AMX / AVX-512-BF16) while the fused kernel works in fp32
# blocks (forward + backward, 4 heads x 146 tokens: 39.5 vs 9.6 ms; 6 x 778: 61 vs 41 ms;
# docs/astroclip.md). Plain attention materialises the (B, H, Lq, Lk) scores, so it is used only
# while they stay below this many elements (64 MiB in bf16); fp32 stays on SDPA (no faster there).
EXPLICIT_MAX_SCORES = 1 << 25


def _xformers_ops():
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure (missing, wrong CUDA, wrong torch) means "not here"
        return None
    return xops


def set_backend(backend: Backend) -> None:
    """Choose the attention kernels for this process (the trainer calls it from `train.attention`)."""
    global _backend
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}; use auto, sdpa or xformers")
    _backend = backend


def resolved_backend(device: torch.device | str) -> str:
    """The backend a call on `device` will actually use: 'xformers' or 'sdpa'."""
    global _warned
    if _backend == "sdpa":
        return "sdpa"
    usable = torch.device(device).type == "cuda" and _xformers_ops() is not None
    if not usable and _backend == "xformers" and not _warned:
        _log.warning("xformers attention requested but unavailable on %s; using torch SDPA", device)
        _warned = True
    return "xformers" if usable else "sdpa"


def key_padding_to_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True = padding → (B, 1, 1, L) bool mask, True = may attend (SDPA's convention)."""
    return ~key_padding_mask[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention.

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, Lq, Lk).
    key_padding_mask: (B, Lk) bool, True = padding key (ignored by every query).
    """
    mask = attn_mask
    if key_padding_mask is not None:
        pad = key_padding_to_mask(key_padding_mask)
        if mask is None:
            mask = pad
        elif mask.dtype == torch.bool:
            mask = mask & pad
        else:
            mask = mask.masked_fill(~pad, float("-inf"))
    if is_causal and mask is not None:
        # SDPA refuses is_causal together with a mask: fold the causal structure into the mask.
        causal = _causal_mask(q, k)
        mask = mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if mask is None and resolved_backend(q.device) == "xformers":
        xops = _xformers_ops()
        bias = xops.LowerTriangularMask() if is_causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        )
        return out.transpose(1, 2)
    if _explicit_is_faster(q, k):
        probs = attention_weights(q, k, attn_mask=_causal_mask(q, k) if is_causal else mask)
        return (F.dropout(probs, dropout_p) if dropout_p > 0 else probs) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def _causal_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(Lq, Lk) bool, True = may attend: query i sees keys up to i (aligned at the end, as SDPA)."""
    lq, lk = q.shape[-2], k.shape[-2]
    return torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)


def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return q.shape[:-1].numel() * k.shape[-2] <= EXPLICIT_MAX_SCORES


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The softmax attention probabilities (B, H, Lq, Lk), for inspection and plots, and the
    first half of `attention`'s plain path (bf16 on CPU)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaling q: fewer elements than scores
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_to_mask(key_padding_mask), float("-inf"))
    return scores.softmax(dim=-1)


# ----------------------------------------------------------------------------- the transformer block


def split_heads(projected: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, T, parts·heads·dh) fused projection → `parts` tensors (B, heads, T, dh), e.g. q, k, v.

    Unbinding the (B, T, parts, heads, dh) view gives strided views the fused kernels accept as
    they are, and its backward stacks the gradients straight into the projection's layout; a
    `b t (k h d) -> k b h t d` rearrange (a permute before the split) costs one more full copy of
    that gradient per call."""
    grouped = rearrange(projected, "b t (k h d) -> b t k h d", k=parts, h=heads)
    return tuple(rearrange(u, "b t h d -> b h t d") for u in grouped.unbind(2))


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, dh) attention output → (B, T, heads·dh). SDPA on CPU writes (B, T, heads, dh)
    memory, so there the merge is a view."""
    return rearrange(out, "b h t d -> b t (h d)")


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and an output projection.

    `dropout` drops the projected output (the residual branch), `attn_dropout` the attention
    probabilities (both only in training); `bias=False` makes both projections bias-free."""

    def __init__(
        self, width: int, heads: int, *, bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """(B, T, width) → (B, T, width); the masks and `is_causal` mean what `attention` says."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)
        out = attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.dropout(self.proj(merge_heads(out)))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)); GELU MLP, dropout at the end
    of both branches.

    `bias=False` drops every bias (linear layers and LayerNorms), `eps` is the LayerNorms' epsilon,
    and `layer_scale` (an initial gain, DINOv2: 1e-5) multiplies each branch by a learned
    per-channel gain (`ls1`, `ls2`; DINOv2's LayerScale)."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        bias: bool = True,
        eps: float = 1e-5,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=eps, bias=bias)
        self.attn = SelfAttention(width, heads, bias=bias, dropout=dropout, attn_dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, bias=bias),
            nn.GELU(),
            nn.Linear(hidden, width, bias=bias),
            nn.Dropout(dropout),
        )
        self.layer_scale = layer_scale is not None
        if layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((width,), layer_scale))
            self.ls2 = nn.Parameter(torch.full((width,), layer_scale))

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        a = self.attn(
            self.norm1(x), attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal
        )
        x = x + (self.ls1 * a if self.layer_scale else a)
        m = self.mlp(self.norm2(x))
        return x + (self.ls2 * m if self.layer_scale else m)
