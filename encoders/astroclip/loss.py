"""Losses: symmetric InfoNCE with negatives from every rank, and masked reconstruction.

Cross-rank negatives: each rank's embeddings are all-gathered (sizes may differ between ranks)
by an autograd function whose backward all-reduces the gradient of the gathered matrix and keeps
this rank's rows. Each rank's loss averages over its *own* rows (against all columns), so the mean
over ranks is the loss of one process on the global batch, and DDP's gradient averaging gives
exactly that loss's gradient (tests compare 2 gloo processes with 1 process).

With gradient accumulation, negatives come from the current micro-batch (of every rank): the
effective contrastive batch is micro-batch × world size, not the accumulated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's (n_r, D) tensor along rows; gradients flow back to their owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.count = sum(counts[:rank]), counts[rank]
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.count], None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_counts(x: torch.Tensor) -> list[int]:
    """Number of rows each rank holds (ranks may hold different numbers)."""
    mine = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


def gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated, offset of this rank's rows); identity on one process."""
    if not distributed():
        return x, 0
    counts = counts if counts is not None else row_counts(x)
    return _GatherRows.apply(x, counts), sum(counts[: dist.get_rank()])


def info_nce(
    image: torch.Tensor, spectrum: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Symmetric CLIP loss of paired (B, D) embeddings (normalised here); logit_scale = 1/τ."""
    image = F.normalize(image.float(), dim=-1)
    spectrum = F.normalize(spectrum.float(), dim=-1)
    if gather and distributed():
        counts = row_counts(image)
        all_image, offset = gather_rows(image, counts)
        all_spectrum, _ = gather_rows(spectrum, counts)
    else:
        all_image, all_spectrum, offset = image, spectrum, 0
    labels = torch.arange(len(image), device=image.device) + offset
    logits_i2s = logit_scale * image @ all_spectrum.T
    logits_s2i = logit_scale * spectrum @ all_image.T
    loss_i2s = F.cross_entropy(logits_i2s, labels)
    loss_s2i = F.cross_entropy(logits_s2i, labels)
    loss = 0.5 * (loss_i2s + loss_s2i)
    with torch.no_grad():
        metrics = {
            "loss_image_to_spectrum": loss_i2s.detach(),
            "loss_spectrum_to_image": loss_s2i.detach(),
            "top1_image_to_spectrum": (logits_i2s.argmax(1) == labels).float().mean(),
            "top1_spectrum_to_image": (logits_s2i.argmax(1) == labels).float().mean(),
            "negatives": float(all_image.shape[0] - 1),
            "temperature": (1.0 / logit_scale).detach().float(),
        }
    return loss, metrics


def masked_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over masked tokens only (and, within them, good pixels).

    prediction, target, weight: (B, T, P); token_mask: (B, T) bool, True = masked (scored).
    """
    w = token_mask[..., None].to(prediction.dtype)
    if weight is not None:
        w = w * weight
    return ((prediction - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)
