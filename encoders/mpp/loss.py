"""The MPP training loss: MSE normalised per sample and field, averaged over present fields.

The error metrics it is judged by (The Well's NRMSE/VRMSE) are in `encoders/mpp/metrics.py`; the
loss uses the same ε but its own normalisers (mean(y²), or the biased var(y)).
"""

from __future__ import annotations

import torch

from encoders.mpp.metrics import EPS


def normalized_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, field_mask: torch.Tensor, kind: str = "nmse", eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over (sample, present field) of MSE / mean(y²) ("nmse", the paper's) or MSE / var(y)
    ("vmse"). pred/target (B, C, H, W), field_mask (B, C). Returns (loss, per-field (B, C) values)."""
    err = torch.mean((pred.float() - target.float()) ** 2, dim=(-2, -1))
    if kind == "nmse":
        norm = torch.mean(target.float() ** 2, dim=(-2, -1))
    elif kind == "vmse":
        norm = torch.var(target.float(), dim=(-2, -1), unbiased=False)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    per_field = err / (norm + eps)
    weights = field_mask.to(per_field.dtype)
    loss = (per_field * weights).sum() / weights.sum().clamp(min=1)
    return loss, per_field
