"""Error metrics with The Well's exact definitions (evaluation, and the metrics logged in training).

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
