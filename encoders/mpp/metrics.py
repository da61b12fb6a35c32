"""Error metrics with The Well's exact definitions (evaluation, and the metrics logged in training).

Every metric reduces over the spatial axes only and keeps the others, so a (B, T, C, H, W) pair
gives one value per sample, step and field; averages over samples, steps, fields and data sets
are taken afterwards (`encoders.mpp.evaluate`), as The Well's validation loop does. Tensors here
are channel-first (..., C, H, W) by default; pass `spatial_dims` for other layouts (The Well's
own tensors are channel-last, (..., H, W, C) → `spatial_dims=(-3, -2)`).

With e = pred − target, ⟨·⟩ the mean over space, s²(y) the unbiased (N−1) spatial variance and
ε = 1e-7, the definitions of `the_well.benchmark.metrics` (version 1.2.0) are:

    MSE   = ⟨e²⟩                          RMSE  = √MSE
    NMSE  = ⟨e²⟩ / (⟨y²⟩ + ε)             NRMSE = √NMSE
    VMSE  = ⟨e²⟩ / (s²(y) + ε)            VRMSE = √VMSE   (predicting the mean scores ≈ 1)
    L∞    = max |e|
    R     = ⟨(x − ⟨x⟩)(y − ⟨y⟩)⟩ / (s(x)·s(y) + ε)

R divides the biased (N) covariance by unbiased (N−1) standard deviations, as The Well does, so
a perfect prediction scores (N−1)/N rather than 1. A constant target has s²(y) = 0: its VRMSE is
√(MSE/ε), large for any error and 0 for an exact prediction. The binned spectral MSE splits the
MSE over three isotropic wavenumber bins (low, mid, high; see `binned_spectral_mse`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

EPS = 1e-7
SPECTRAL_BINS = ("low", "mid", "high")
"""Names of The Well's three default wavenumber bins, lowest first."""

Dims = tuple[int, ...]


def mse(pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1)) -> torch.Tensor:
    return torch.mean((pred - target) ** 2, dim=spatial_dims)


def rmse(pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1)) -> torch.Tensor:
    return torch.sqrt(mse(pred, target, spatial_dims))


def nmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    """MSE over the target's mean square (its energy): the scale-free error MPP reports."""
    norm = torch.mean(target**2, dim=spatial_dims)
    return mse(pred, target, spatial_dims) / (norm + eps)


def nrmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    return torch.sqrt(nmse(pred, target, spatial_dims, eps))


def vmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    """MSE over the target's unbiased spatial variance: insensitive to a field's offset."""
    norm = torch.std(target, dim=spatial_dims) ** 2
    return mse(pred, target, spatial_dims) / (norm + eps)


def vrmse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    return torch.sqrt(vmse(pred, target, spatial_dims, eps))


def linf(pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1)) -> torch.Tensor:
    return torch.amax(torch.abs(pred - target), dim=spatial_dims)


def pearson_r(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1), eps: float = EPS
) -> torch.Tensor:
    """The Well's Pearson R: biased covariance over unbiased standard deviations (plus ε)."""
    x_mean = torch.mean(pred, dim=spatial_dims, keepdim=True)
    y_mean = torch.mean(target, dim=spatial_dims, keepdim=True)
    covariance = torch.mean((pred - x_mean) * (target - y_mean), dim=spatial_dims)
    return covariance / (torch.std(pred, dim=spatial_dims) * torch.std(target, dim=spatial_dims) + eps)


def spectral_bin_edges(spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """The Well's default edges: 4 log-spaced values from 2π/max(n) to π√d (+1e-6), the first
    replaced by 0, giving three bins of angular wavenumber |k| (grid spacing 1)."""
    ndims = len(spatial_shape)
    edges = torch.logspace(
        np.log10(2 * np.pi / max(spatial_shape)),
        np.log10(np.pi * np.sqrt(ndims) + 1e-6),
        len(SPECTRAL_BINS) + 1,
    )
    edges[0] = 0.0
    return edges


def _wavenumber_norms(spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """|k| on the unshifted FFT grid, angular units, grid spacing 1, flattened in C order."""
    axes = [2 * np.pi * torch.fft.fftfreq(n, d=1.0) for n in spatial_shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids)).flatten()


def _energy_per_bin(
    field: torch.Tensor, spatial_dims: Dims, bin_index: torch.Tensor, n_bins: int
) -> torch.Tensor:
    """Σ|F|² over each bin's wavenumbers / N², i.e. the part of ⟨field²⟩ in each bin (Parseval),
    with The Well's counts/(counts + 1e-7) factor. Bins on a new last axis."""
    spectrum = torch.abs(torch.fft.fftn(field, dim=spatial_dims)) ** 2
    moved = torch.movedim(spectrum, spatial_dims, tuple(range(-len(spatial_dims), 0)))
    flat = moved.reshape(*moved.shape[: moved.ndim - len(spatial_dims)], -1)
    size = flat.shape[-1]
    one_hot = torch.nn.functional.one_hot(bin_index, num_classes=n_bins + 1).to(flat.dtype)
    counts = one_hot.sum(0)
    mean_power = (flat @ one_hot) / (counts + 1e-7)
    return (mean_power * counts / size**2)[..., :n_bins]


def binned_spectral_mse(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE per bin, NMSE per bin), bins low/mid/high on a new last axis.

    The error's power spectrum summed over each isotropic wavenumber bin and divided by N²
    (so the three bins add up to the MSE), and the same divided by the target's energy in that
    bin + 1e-7 — The Well's `binned_spectral_mse` with its default bins.
    """
    spatial_dims = tuple(d % pred.ndim for d in spatial_dims)
    shape = tuple(pred.shape[d] for d in spatial_dims)
    edges = spectral_bin_edges(shape)
    bin_index = torch.bucketize(_wavenumber_norms(shape), edges, right=True) - 1
    n_bins = len(SPECTRAL_BINS)
    error = _energy_per_bin(pred - target, spatial_dims, bin_index, n_bins)
    energy = _energy_per_bin(target, spatial_dims, bin_index, n_bins)
    return error, error / (energy + 1e-7)


POINTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "mse": mse,
    "nmse": nmse,
    "rmse": rmse,
    "nrmse": nrmse,
    "vmse": vmse,
    "vrmse": vrmse,
    "linf": linf,
    "pearson_r": pearson_r,
}
METRIC_NAMES = (*POINTWISE, *(f"spectral_mse_{name}" for name in SPECTRAL_BINS))
"""Every metric `all_metrics` returns, in The Well's order, spectral bins last."""


def all_metrics(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Dims = (-2, -1)
) -> dict[str, torch.Tensor]:
    """Each metric in METRIC_NAMES → one value per sample and field (the spectrum computed once)."""
    out = {name: fn(pred, target, spatial_dims) for name, fn in POINTWISE.items()}
    per_bin, _ = binned_spectral_mse(pred, target, spatial_dims)
    for i, name in enumerate(SPECTRAL_BINS):
        out[f"spectral_mse_{name}"] = per_bin[..., i]
    return out
