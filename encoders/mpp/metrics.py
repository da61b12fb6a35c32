"""Error metrics with The Well's exact definitions, and the MPP training losses.

NRMSE = √(MSE / (mean(y²) + ε)) and VRMSE = √(MSE / (var(y) + ε)), reduced over the spatial
axes only, per sample and field; var uses torch.std's unbiased estimate and ε = 1e-7, exactly as
`the_well.benchmark.metrics` (VRMSE 1 = as good as predicting the mean). Tensors here are
channel-first (..., C, H, W) by default; pass `spatial_dims` for other layouts.
"""

from __future__ import annotations

import torch

EPS = 1e-7


def mse(pred: torch.Tensor, target: torch.Tensor, spatial_dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    return torch.mean((pred - target) ** 2, dim=spatial_dims)


def nrmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: tuple[int, ...] = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    norm = torch.mean(target**2, dim=spatial_dims)
    return torch.sqrt(mse(pred, target, spatial_dims) / (norm + eps))


def vrmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: tuple[int, ...] = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    norm = torch.std(target, dim=spatial_dims) ** 2
    return torch.sqrt(mse(pred, target, spatial_dims) / (norm + eps))


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
