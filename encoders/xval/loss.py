"""Training objectives: masked (MLM) or next-token (causal) prediction, CE + λ·MSE.

MLM: each masking unit (a text token, or a whole number) is masked with probability p; masked
tokens become `[MASK]` *and* their multiplier is reset to 1, so a masked value cannot leak into
the input. CE is taken over masked tokens; the MSE over masked `[NUM]` positions, between the
number head and the normalised value. Causal: CE on the next token, MSE where the next token is
a `[NUM]`. The mask comes with the batch (drawn in the loader worker from the loader's per-batch
seeded generator); a batch without one is masked here from the global torch RNG.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.xval.tokenizer import MASK_ID, NUM_ID

Batch = dict[str, Any]


def draw_mlm_mask(batch: Batch, mask_prob: float) -> torch.Tensor:
    """(B, L) bool: masked tokens; whole numbers are masked together; at least one token."""
    ids, pad, unit = batch["ids"], batch["pad"], batch["unit"]
    coins = torch.rand(ids.shape, device=ids.device).gather(1, unit)
    mask = (coins < mask_prob) & ~pad
    if not bool(mask.any()):  # an empty selection would make the CE NaN
        row, col = (int(i) for i in torch.nonzero(~pad)[0])
        mask[row, unit[row, col]] = True
        mask = mask.gather(1, unit) & ~pad
    return mask


def masked_inputs(batch: Batch, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, multipliers) with masked tokens replaced by [MASK] and multiplier 1."""
    return batch["ids"].masked_fill(mask, MASK_ID), batch["num"].masked_fill(mask, 1.0)


def combine(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    number: torch.Tensor | None,
    target_values: torch.Tensor,
    number_loss_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE over the selected tokens + λ · MSE over those whose target is [NUM]."""
    ce = F.cross_entropy(logits.float(), target_ids)
    metrics = {"ce": float(ce.detach()), "predicted_tokens": float(target_ids.numel())}
    loss = ce
    if number is not None:
        is_num = (target_ids == NUM_ID).to(number.dtype)
        n = is_num.sum()
        mse = ((number.float() - target_values.float()) ** 2 * is_num).sum() / n.clamp(min=1)
        loss = loss + number_loss_weight * mse
        metrics["mse"] = float(mse.detach())
        metrics["predicted_numbers"] = float(n.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def next_token_select(batch: Batch) -> torch.Tensor:
    """(B, L) bool: positions whose next token belongs to the same sample."""
    same = ~batch["pad"]
    if "seg" in batch:
        same = same & (batch["seg"] == batch["seg"].roll(-1, dims=1))
    else:
        same = same & ~batch["pad"].roll(-1, dims=1)
    same[:, -1] = False
    return same


def xval_loss(model: nn.Module, batch: Batch, mode: str, mask_prob: float, number_loss_weight: float):
    """(loss, metrics) for one micro-batch; `model` may be DDP/FSDP-wrapped."""
    kwargs = {"pos": batch["pos"], "pad": batch["pad"], "seg": batch.get("seg")}
    if mode == "mlm":
        mask = batch["mlm_mask"] if "mlm_mask" in batch else draw_mlm_mask(batch, mask_prob)
        ids, num = masked_inputs(batch, mask)
        out = model(ids, num, select=mask, **kwargs)
        target_ids, target_values = batch["ids"][mask], batch["target"][mask]
    else:
        select = next_token_select(batch)
        out = model(batch["ids"], batch["num"], select=select, **kwargs)
        target_ids = batch["ids"].roll(-1, dims=1)[select]
        target_values = batch["target"].roll(-1, dims=1)[select]
    loss, metrics = combine(out["logits"], target_ids, out.get("number"), target_values, number_loss_weight)
    metrics["clipped_values"] = float(batch["n_clipped"])
    metrics["truncated_samples"] = float(batch["n_truncated"])
    return loss, metrics
