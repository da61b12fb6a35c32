"""The xVal transformer: GPT-2-like pre-LN trunk over tokens whose `[NUM]` embedding is scaled
by the number's value.

Trunk input at position i: `embed(token_i) · m_i + pos_i`, where m_i is the (normalised) value
at a `[NUM]` token and 1 elsewhere; the product comes *before* positions are added, so a zero
value leaves exactly the positional vector. The trunk is bias-free (linear layers and
LayerNorms), ends in a LayerNorm, and feeds a token head tied to the input embedding and a
number head (an MLP of width d_model) that regresses values. Attention goes through
`foundation.attention` with a key-padding mask, so outputs at real tokens do not depend on
padding; packed rows (several samples per row) get a block-diagonal mask and restart positions.
The same model runs the text baselines (P10, P1000, B1999, FP15): their number tokens extend the
vocabulary and it has no number head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from encoders.xval.encodings import ENCODINGS, get_encoding
from foundation.attention import TransformerBlock
from foundation.config import MAX_DEPTH, MAX_MLP_RATIO, MAX_TOKENS, MAX_VOCAB, MAX_WIDTH, option


@dataclass
class XValConfig:
    """The `model:` section of an xVal pretraining config."""

    d_model: int = option(768, "Width of the residual stream (the paper: 768).", ge=1, le=MAX_WIDTH)
    n_layers: int = option(6, "Transformer blocks (the paper: 6).", ge=1, le=MAX_DEPTH)
    n_heads: int = option(
        6, "Attention heads; d_model must be divisible by it (the paper: 6 x 128).", ge=1, le=MAX_DEPTH
    )
    mlp_ratio: float = option(4.0, "MLP hidden width as a multiple of d_model.", gt=0, le=MAX_MLP_RATIO)
    max_len: int = option(
        512, "Longest token sequence (learned positions); longer samples are cut.", ge=1, le=MAX_TOKENS
    )
    dropout: float = option(0.0, "Dropout on attention weights and residual branches.", ge=0, lt=1)
    mode: Literal["mlm", "causal"] = option(
        "mlm", "mlm: masked-token prediction (bidirectional); causal: next-token prediction."
    )
    encoding: Literal["xval", "p10", "p1000", "b1999", "fp15"] = option(
        "xval", "How numbers are tokenised: xval ([NUM] scaled by value) or a text baseline."
    )
    mask_prob: float = option(0.2, "MLM: probability that a token (or a whole number) is masked.", gt=0, lt=1)
    number_loss_weight: float = option(1.0, "lambda in loss = CE + lambda * MSE (xval encoding only).", ge=0)
    mask_fields: list[str] = option(
        factory=list,
        doc="MLM: the numbers of these fields are masked in every training sample (as `evaluate` "
        "masks a target field), on top of the random mask_prob masking.",
    )
    pack: bool = option(
        True, "Training batches pack several samples per row of max_len (no padding compute)."
    )
    text_vocab_size: int = option(
        0, "Text vocabulary size; 0 = read from the shard set's tokenizer.", ge=0, le=MAX_VOCAB
    )

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"model.mask_prob must lie in (0, 1), got {self.mask_prob}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.number_loss_weight < 0:
            raise ValueError(f"model.number_loss_weight must be >= 0, got {self.number_loss_weight}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.mask_fields and self.mode != "mlm":
            raise ValueError("model.mask_fields needs model.mode: mlm (causal training masks nothing)")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"model.encoding must be one of {ENCODINGS}, got {self.encoding!r}")


def _block(cfg: XValConfig) -> TransformerBlock:
    """The trunk's pre-LN block: bias-free, dropout on attention weights and residual branches."""
    return TransformerBlock(
        cfg.d_model, cfg.n_heads, cfg.mlp_ratio, dropout=cfg.dropout, attn_dropout=cfg.dropout, bias=False
    )


class XValModel(nn.Module):
    """Token ids + per-token multipliers -> token logits and number predictions."""

    def __init__(self, cfg: XValConfig, text_vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoding = get_encoding(cfg.encoding)
        self.text_vocab_size = text_vocab_size
        self.vocab_size = text_vocab_size + self.encoding.vocab_size
        d = cfg.d_model
        self.tok_emb = nn.Embedding(self.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, bias=False)
        # Heads are not part of the bias-free trunk; the number head regresses a value.
        self.num_head = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) if self.encoding.is_xval else None
        )
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: shrink residual projections with depth
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def causal(self) -> bool:
        return self.cfg.mode == "causal"

    def embed(self, ids: torch.Tensor, num: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk input: token embedding times multiplier, then plus the positional embedding."""
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.tok_emb(ids) * num.unsqueeze(-1).to(self.tok_emb.weight.dtype) + self.pos_emb(pos)

    def forward(
        self,
        ids: torch.Tensor,
        num: torch.Tensor,
        pos: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        seg: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> dict[str, torch.Tensor]:
        """ids, num, pos, pad (True = padding), seg (sample index inside a packed row, -1 for
        padding): (B, L). Heads run on the positions where `select` (B, L) is true, giving
        (N, V) logits and (N,) numbers; without `select`, (B, L, V) and (B, L)."""
        if ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds model.max_len={self.cfg.max_len}")
        x = self.drop(self.embed(ids, num, pos))
        attn_mask, key_padding_mask, causal = None, pad, self.causal
        if seg is not None:
            # Packed rows: attend within the same sample only; padding forms its own block, so no
            # query row is ever fully masked (which would give NaNs).
            attn_mask = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
            key_padding_mask = None
        elif pad is not None and not bool(pad.any()):
            key_padding_mask = None  # nothing to mask: keep the fast unmasked kernel
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=causal)
        h = self.norm(x)
        if select is not None:
            h = h[select]
        out = {"logits": F.linear(h, self.tok_emb.weight)}
        if self.num_head is not None:
            out["number"] = self.num_head(h).squeeze(-1)
        if return_hidden:
            out["hidden"] = h
        return out

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n
