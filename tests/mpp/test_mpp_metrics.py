"""The Well's metrics: ours against hand computations (numpy, written here) and against values
produced by the_well's own code (tests/golden/mpp/well_metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.mpp import metrics

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "mpp" / "well_metrics.json"
EPS = 1e-7


def _by_hand(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric in float64 numpy over the last two axes, from the written definitions."""
    p, y = pred.astype(np.float64), target.astype(np.float64)
    e = p - y
    n = y.shape[-1] * y.shape[-2]
    mse = (e**2).mean(axis=(-2, -1))
    energy = (y**2).mean(axis=(-2, -1))
    var_y = ((y - y.mean(axis=(-2, -1), keepdims=True)) ** 2).sum(axis=(-2, -1)) / (n - 1)
    var_p = ((p - p.mean(axis=(-2, -1), keepdims=True)) ** 2).sum(axis=(-2, -1)) / (n - 1)
    cov = ((p - p.mean(axis=(-2, -1), keepdims=True)) * (y - y.mean(axis=(-2, -1), keepdims=True))).mean(
        axis=(-2, -1)
    )
    return {
        "mse": mse,
        "rmse": np.sqrt(mse),
        "nmse": mse / (energy + EPS),
        "nrmse": np.sqrt(mse / (energy + EPS)),
        "vmse": mse / (var_y + EPS),
        "vrmse": np.sqrt(mse / (var_y + EPS)),
        "linf": np.abs(e).max(axis=(-2, -1)),
        "pearson_r": cov / (np.sqrt(var_p) * np.sqrt(var_y) + EPS),
    }


def _spectral_by_hand(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: Σ|FFT(e)|² / N² over |k| in [edge_i, edge_i+1), edges log-spaced 2π/max(n)..π√2
    with the first set to 0; and that over the target's own energy in the bin + 1e-7."""
    h, w = target.shape[-2:]
    edges = np.logspace(np.log10(2 * np.pi / max(h, w)), np.log10(np.pi * np.sqrt(2) + 1e-6), 4)
    edges[0] = 0.0
    kx = 2 * np.pi * np.fft.fftfreq(h)[:, None]
    ky = 2 * np.pi * np.fft.fftfreq(w)[None, :]
    k = np.sqrt(kx**2 + ky**2)
    power_e = np.abs(np.fft.fft2(pred.astype(np.float64) - target)) ** 2
    power_y = np.abs(np.fft.fft2(target.astype(np.float64))) ** 2
    err, nerr = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (k >= lo) & (k < hi)
        e = (power_e * inside).sum(axis=(-2, -1)) / (h * w) ** 2
        t = (power_y * inside).sum(axis=(-2, -1)) / (h * w) ** 2
        err.append(e)
        nerr.append(e / (t + 1e-7))
    return np.stack(err, -1), np.stack(nerr, -1)


def _cases() -> tuple[np.ndarray, np.ndarray]:
    """(pred, target) (3, 4, 8, 6): random, constant target with an error, constant target hit
    exactly, all-zero target in one sample."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal((3, 4, 8, 6)).astype(np.float32)
    pred = (target + 0.2 * rng.standard_normal(target.shape)).astype(np.float32)
    target[:, 1] = 2.0
    target[:, 2] = -1.0
    pred[:, 2] = -1.0
    target[0, 3] = 0.0
    return pred, target


@pytest.mark.parametrize("name", ["mse", "rmse", "nmse", "nrmse", "vmse", "vrmse", "linf", "pearson_r"])
def test_each_metric_equals_its_hand_computation(name):
    pred, target = _cases()
    ours = metrics.all_metrics(torch.from_numpy(pred), torch.from_numpy(target))[name].numpy()
    np.testing.assert_allclose(ours, _by_hand(pred, target)[name], rtol=2e-5, atol=1e-7)


def test_a_two_by_two_example_worked_on_paper():
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pred = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert metrics.mse(pred, target).item() == pytest.approx(1.0)
    assert metrics.nmse(pred, target).item() == pytest.approx(1 / 7.5)  # mean(y²) = 30/4
    assert metrics.vmse(pred, target).item() == pytest.approx(0.6)  # unbiased var(1..4) = 5/3
    assert metrics.linf(pred, target).item() == pytest.approx(2.0)
    # biased cov 2, unbiased stds √(14/3), √(5/3)
    assert metrics.pearson_r(pred, target).item() == pytest.approx(2 / np.sqrt(14 / 3 * 5 / 3), rel=1e-6)


def test_constant_target_puts_epsilon_in_charge():
    target = torch.full((1, 1, 4, 4), 3.0)
    off = target + 0.1
    assert metrics.vrmse(off, target).item() == pytest.approx(np.sqrt(0.01 / EPS), rel=1e-4)
    assert metrics.vrmse(target.clone(), target).item() == 0.0
    assert metrics.nrmse(off, target).item() == pytest.approx(np.sqrt(0.01 / (9 + EPS)), rel=1e-5)
    zero = torch.zeros(1, 1, 4, 4)
    assert metrics.nrmse(zero + 0.1, zero).item() == pytest.approx(np.sqrt(0.01 / EPS), rel=1e-4)
    assert metrics.pearson_r(off, target).item() == 0.0  # 0 / (0·0 + ε)
    assert metrics.vrmse(off, target, eps=1e-2).item() == pytest.approx(np.sqrt(0.01 / 1e-2), rel=1e-5)


def test_predicting_the_mean_scores_vrmse_near_one():
    target = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32))
    mean = target.mean(dim=(-2, -1), keepdim=True).expand_as(target)
    n = 16 * 16
    np.testing.assert_allclose(metrics.vrmse(mean, target).numpy(), np.sqrt((n - 1) / n), rtol=1e-4)


def test_spectral_bins_equal_their_hand_computation_and_add_up_to_the_mse():
    pred, target = _cases()
    err, nerr = metrics.binned_spectral_mse(torch.from_numpy(pred), torch.from_numpy(target))
    hand_err, hand_nerr = _spectral_by_hand(pred, target)
    np.testing.assert_allclose(err.numpy(), hand_err, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(nerr.numpy(), hand_nerr, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(err.sum(-1).numpy(), _by_hand(pred, target)["mse"], rtol=1e-4, atol=1e-9)


def test_other_layouts_via_spatial_dims():
    pred, target = (torch.from_numpy(a) for a in _cases())
    last = metrics.vrmse(pred.movedim(1, -1), target.movedim(1, -1), spatial_dims=(-3, -2))
    torch.testing.assert_close(last, metrics.vrmse(pred, target))
    err_last, _ = metrics.binned_spectral_mse(
        pred.movedim(1, -1), target.movedim(1, -1), spatial_dims=(-3, -2)
    )
    torch.testing.assert_close(err_last, metrics.binned_spectral_mse(pred, target)[0])


def test_matches_values_the_wells_own_code_produced():
    golden = json.loads(GOLDEN.read_text())
    pred = torch.tensor(golden["pred"], dtype=torch.float32)
    target = torch.tensor(golden["target"], dtype=torch.float32)
    expected = golden["metrics"]
    ours = metrics.all_metrics(pred, target)
    assert set(ours) == set(metrics.METRIC_NAMES)
    for name, values in ours.items():
        np.testing.assert_allclose(values.numpy(), expected[name], rtol=1e-5, err_msg=name)
    _, nerr = metrics.binned_spectral_mse(pred, target)
    for i, name in enumerate(metrics.SPECTRAL_BINS):
        np.testing.assert_allclose(nerr[..., i].numpy(), expected[f"spectral_nmse_{name}"], rtol=1e-5)
