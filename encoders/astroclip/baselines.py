"""Supervised baselines of the AstroCLIP property table, small enough to train on a CPU.

The paper compares zero-shot regression from frozen embeddings with models trained end to end on
the same labelled split: a ResNet-18 on images, a convolution + attention encoder on spectra
(Serrà et al. 2018, as the reference code's `SpectrumEncoder`) and an MLP on g, r, z photometry.
Here each has the reference's shape at a smaller size: `ResNetLike` keeps ResNet-18's topology
(a stem, four stages of two basic residual blocks, global pooling, one linear layer) at an eighth
of its width; `SpectrumConvAttention` keeps the four conv blocks (instance norm, PReLU, max-pool
between them) whose last block splits into values and softmax attention weights along the
wavelength axis, then an MLP; `PhotometryMLP` is the reference's 3 → 64 → 64 → out MLP, fed with
magnitudes of aperture fluxes measured on the images (our catalogue has no photometry columns).

All targets are regressed jointly, standardised with the training rows' mean and std, with MSE,
Adam and a cosine learning-rate schedule (as the reference's trainer); images get random flips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from foundation.errors import DataError

#: Magnitude zero point of nanomaggies (Legacy Survey) and the floor that keeps log10 finite.
ZERO_POINT = 22.5
FLUX_FLOOR = 1e-3


# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetLike(nn.Module):
    """ResNet-18's layout (4 stages x 2 basic blocks) at `widths`; a 3x3 stem for small cutouts.
    Weights and inputs are channels-last, the layout oneDNN's CPU convolutions are fastest in
    (a training step of the demo's CNN on one thread: 126-133 ms against 158-164 ms with AVX-512,
    139 against 158 ms with AVX2)."""

    def __init__(self, in_channels: int, n_out: int, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        c_in = widths[0]
        for stage, width in enumerate(widths):
            layers += [BasicBlock(c_in, width, 1 if stage == 0 else 2), BasicBlock(width, width, 1)]
            c_in = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, n_out)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x.contiguous(memory_format=torch.channels_last)))


def mlp(n_in: int, n_out: int, hidden: tuple[int, ...], dropout: float = 0.0) -> nn.Sequential:
    """Linear → ReLU (→ dropout) per hidden layer, then a linear output (the reference's MLP)."""
    layers: list[nn.Module] = []
    sizes = [n_in, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-1], n_out))
    return nn.Sequential(*layers)


class SpectrumConvAttention(nn.Module):
    """Four conv blocks; the last one's channels split into values and softmax weights over
    wavelength, whose weighted sum feeds an MLP (Serrà et al. 2018, as the reference baseline)."""

    def __init__(
        self,
        n_out: int,
        filters: tuple[int, ...] = (8, 16, 16, 32),
        kernels: tuple[int, ...] = (5, 10, 20, 40),
        pools: tuple[int, ...] = (2, 2, 2),
        hidden: tuple[int, ...] = (32, 32),
    ) -> None:
        super().__init__()
        if len(filters) != len(kernels) or len(pools) != len(filters) - 1 or filters[-1] % 2:
            raise ValueError("need one kernel per filter, one pool between blocks, an even last filter")
        blocks: list[nn.Module] = []
        for i, (f, k) in enumerate(zip(filters, kernels, strict=True)):
            blocks += [
                nn.Conv1d(1 if i == 0 else filters[i - 1], f, k, padding=k // 2),
                nn.InstanceNorm1d(f),
                nn.PReLU(f),
            ]
            if i < len(pools):
                blocks.append(nn.MaxPool1d(pools[i], padding=pools[i] // 2))
        self.convs = nn.Sequential(*blocks)
        self.head = mlp(filters[-1] // 2, n_out, hidden)

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        h, a = self.convs(flux.unsqueeze(1)).chunk(2, dim=1)
        return self.head((h * torch.softmax(a, dim=-1)).sum(dim=-1))


def photometry_mlp(n_bands: int, n_out: int) -> nn.Sequential:
    """The reference's photometry baseline: bands → 64 → 64 → targets, ReLU."""
    return mlp(n_bands, n_out, (64, 64))


# ----------------------------------------------------------------------------- inputs


def aperture_fluxes(images: np.ndarray, radius: float | None = None) -> np.ndarray:
    """(N, bands) sums of each band inside a centred circular aperture (default: 3/8 of the side)."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise DataError(f"aperture photometry needs (N, bands, H, W) images, got shape {images.shape}")
    h, w = images.shape[-2:]
    radius = radius if radius is not None else 0.375 * min(h, w)
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius**2
    return images[..., inside].sum(axis=-1)


def magnitudes(fluxes: np.ndarray) -> np.ndarray:
    """AB magnitudes of nanomaggy fluxes, floored so faint or negative sums stay finite."""
    return ZERO_POINT - 2.5 * np.log10(np.maximum(fluxes, FLUX_FLOOR))


def aperture_magnitudes(images: np.ndarray) -> np.ndarray:
    """(N, bands) magnitudes of the default aperture: the photometry baselines' inputs."""
    return magnitudes(aperture_fluxes(images))


def standardise_spectra(flux: np.ndarray) -> np.ndarray:
    """Each spectrum to zero mean and unit std (std floored), so the model sees shapes, not scale."""
    flux = np.asarray(flux, dtype=np.float32)
    mean = flux.mean(axis=1, keepdims=True)
    std = np.maximum(flux.std(axis=1, keepdims=True), 1e-6)
    return (flux - mean) / std


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    flips: bool = False
    """Random horizontal/vertical flips of (N, C, H, W) inputs (the image baseline's augmentation)."""
    cosine: bool = True
    """Cosine learning-rate decay over the run (the reference's supervised trainer; its few-shot
    probe keeps the rate constant)."""


@dataclass
class Fitted:
    """Test predictions (in target units) and what the training cost."""

    predictions: np.ndarray
    seconds: float
    parameters: int


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-2)
    return x


def train_regressor(
    make_model: Callable[[int], nn.Module],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    settings: TrainSettings | None = None,
) -> Fitted:
    """Fit `make_model(n_targets)` to standardised targets with MSE; predict the test rows.

    `y_train` is (N, targets) or (N,); predictions come back in the same shape and units.
    """
    s = settings or TrainSettings()
    y = np.asarray(y_train, dtype=np.float64)
    flat = y.ndim == 1
    y = y[:, None] if flat else y
    if len(x_train) != len(y) or len(y) < 2 or not np.isfinite(y).all():
        raise DataError(f"training needs >= 2 rows of finite targets matching {len(x_train)} inputs")
    mean, std = y.mean(axis=0), y.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    model = make_model(y.shape[1])
    xt = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    yt = torch.as_tensor(((y - mean) / std).astype(np.float32))
    optimiser = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = -(-len(xt) // s.batch_size)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, s.epochs * steps_per_epoch)
        if s.cosine
        else None
    )
    model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), s.batch_size):
            rows = order[i : i + s.batch_size]
            if len(rows) < 2:  # batch norm needs two samples
                continue
            xb = _flip(xt[rows], generator) if s.flips else xt[rows]
            loss = nn.functional.mse_loss(model(xb), yt[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
    exact_batch_norm_statistics(model, xt)
    model.eval()
    with torch.no_grad():
        x_eval = torch.as_tensor(np.asarray(x_test, dtype=np.float32))
        pred = torch.cat([model(x_eval[i : i + 256]) for i in range(0, len(x_eval), 256)]).numpy()
    pred = pred.astype(np.float64) * std + mean
    return Fitted(
        predictions=pred[:, 0] if flat else pred,
        seconds=time.perf_counter() - start,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def exact_batch_norm_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every batch norm's running mean and variance over the training inputs `x` with the
    final weights (the average of their batches' statistics: "precise BN"). Training leaves them as
    an exponential average of the last batches, taken while the weights still moved: on the image
    CNN that noise alone moved the redshift R² from 0.871 to 0.842, and to 0.748 with other CPU
    kernels (same seed); recomputed, 0.871 and 0.855. A model without batch norm is left as it is.
    Not torch's `swa_utils.update_bn`: it puts every layer in training mode, so a dropout before a
    norm would stay on while the statistics are taken."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()  # every other layer as at prediction (dropout off); the norms average batches
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
        norm.train()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])


# ----------------------------------------------------------------------------- the three baselines


#: Epochs of each baseline in the property table (sized for a 2-core CPU; see docs/astroclip.md).
BASELINE_EPOCHS = {"image": 10, "spectrum": 20, "photometry": 100}


def image_baseline(
    images_train: np.ndarray,
    y_train: np.ndarray,
    images_test: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Fitted:
    """ResNet-18-like CNN on per-band standardised images, random flips."""
    if images_train.ndim != 4:
        raise DataError(f"the image baseline needs (N, bands, H, W) images, got {images_train.shape}")
    mean = images_train.mean(axis=(0, 2, 3), keepdims=True)
    std = np.maximum(images_train.std(axis=(0, 2, 3), keepdims=True), 1e-6)
    bands = images_train.shape[1]
    return train_regressor(
        lambda n_out: ResNetLike(bands, n_out),
        (images_train - mean) / std,
        y_train,
        (images_test - mean) / std,
        TrainSettings(epochs=epochs or BASELINE_EPOCHS["image"], seed=seed, flips=True, weight_decay=1e-4),
    )


def spectrum_baseline(
    flux_train: np.ndarray,
    y_train: np.ndarray,
    flux_test: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Fitted:
    """Conv + attention encoder on per-spectrum standardised flux."""
    return train_regressor(
        SpectrumConvAttention,
        standardise_spectra(flux_train),
        y_train,
        standardise_spectra(flux_test),
        TrainSettings(epochs=epochs or BASELINE_EPOCHS["spectrum"], seed=seed),
    )


def photometry_baseline(
    images_train: np.ndarray,
    y_train: np.ndarray,
    images_test: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Fitted:
    """MLP on aperture magnitudes, standardised with the training rows' global mean and std (as
    the reference normalises its MAG_G/R/Z columns)."""
    mags_train, mags_test = aperture_magnitudes(images_train), aperture_magnitudes(images_test)
    mean, std = mags_train.mean(), max(float(mags_train.std()), 1e-6)
    return train_regressor(
        lambda n_out: photometry_mlp(mags_train.shape[1], n_out),
        (mags_train - mean) / std,
        y_train,
        (mags_test - mean) / std,
        TrainSettings(epochs=epochs or BASELINE_EPOCHS["photometry"], seed=seed),
    )


def photometry_knn(
    images_train: np.ndarray,
    y_train: np.ndarray,
    images_test: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Fitted:
    """The reference's zero-shot k-NN read out of the same aperture magnitudes: the photometry MLP's
    information under the embeddings' protocol, so that an embedding row below the MLP can be told
    apart as missing information or as what a k-NN loses against a trained regressor. (`seed` and
    `epochs` keep the baselines' signature; k-NN has neither.)"""
    from encoders.astroclip.evaluate import reference_zero_shot

    start = time.perf_counter()
    y = np.asarray(y_train, dtype=np.float64)
    pred = reference_zero_shot(aperture_magnitudes(images_train), y, aperture_magnitudes(images_test))
    pred = pred[:, 0] if np.ndim(y_train) == 1 else pred
    return Fitted(predictions=pred, seconds=time.perf_counter() - start, parameters=0)
