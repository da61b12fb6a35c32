"""The supervised baselines of the property table: shapes, photometry, and that they learn."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from encoders.astroclip import baselines
from encoders.astroclip.evaluate import r2_score


def test_aperture_fluxes_and_magnitudes_hand_computed():
    images = np.ones((2, 3, 9, 9))
    images[1] *= 2.0
    # Radius 2 around the centre pixel (4, 4): 13 pixels within distance 2.
    assert baselines.aperture_fluxes(images, radius=2.0).tolist() == [[13.0] * 3, [26.0] * 3]
    assert baselines.magnitudes(np.array([1.0, 100.0, -5.0])).tolist() == pytest.approx([22.5, 17.5, 30.0])
    with pytest.raises(Exception, match="bands, H, W"):
        baselines.aperture_fluxes(np.ones((3, 9, 9)))


def test_resnet_like_has_resnet18_topology():
    model = baselines.ResNetLike(3, 5)
    assert sum(isinstance(m, baselines.BasicBlock) for m in model.modules()) == 8
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # channels-last (oneDNN's fast layout), computing what the default layout computes
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.fc(reference.features(x)))


def test_spectrum_model_attends_over_wavelength():
    model = baselines.SpectrumConvAttention(4)
    convs = [m for m in model.convs if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(8, 5), (16, 10), (16, 20), (32, 40)]
    assert model(torch.zeros(3, 200)).shape == (3, 4)
    linears = [m for m in baselines.photometry_mlp(3, 5) if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 64), (64, 64), (64, 5)]


def _easy_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs whose brightness (target 0) and colour (target 1) are the targets."""
    y = np.stack([rng.uniform(0, 1, n), rng.uniform(-1, 1, n)], axis=1)
    yy, xx = np.mgrid[:12, :12]
    blob = np.exp(-((yy - 5.5) ** 2 + (xx - 5.5) ** 2) / 8.0)
    scale = 10 ** (y[:, :1] + 0.3 * y[:, 1:] * np.array([-1.0, 0.0, 1.0]))  # (n, 3) band fluxes
    images = scale[:, :, None, None] * blob + 0.05 * rng.normal(size=(n, 3, 12, 12))
    return images.astype(np.float32), y


@pytest.mark.slow
@pytest.mark.parametrize("which", ["image", "photometry"])
def test_image_baselines_beat_a_constant(which):
    rng = np.random.default_rng(0)
    images, y = _easy_images(400, rng)
    train = {"image": baselines.image_baseline, "photometry": baselines.photometry_baseline}[which]
    fitted = train(images[:300], y[:300], images[300:], seed=0, epochs=8 if which == "image" else 60)
    assert fitted.predictions.shape == (100, 2) and fitted.parameters > 0
    for j in range(2):  # a constant predictor scores R² <= 0
        assert r2_score(y[300:, j], fitted.predictions[:, j]) > 0.5


@pytest.mark.slow
def test_spectrum_baseline_beats_a_constant():
    rng = np.random.default_rng(0)
    n, length = 300, 200
    y = rng.uniform(0, 1, n)
    centre = 40 + 120 * y  # the line's position encodes the target
    flux = 1.0 + 3.0 * np.exp(-0.5 * ((np.arange(length) - centre[:, None]) / 3.0) ** 2)
    flux = (flux + 0.1 * rng.normal(size=(n, length))).astype(np.float32)
    fitted = baselines.spectrum_baseline(flux[:220], y[:220], flux[220:], seed=0, epochs=15)
    assert fitted.predictions.shape == (80,)
    assert r2_score(y[220:], fitted.predictions) > 0.5


def test_train_regressor_is_deterministic_and_rejects_bad_targets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=64)
    settings = baselines.TrainSettings(epochs=2, batch_size=16, seed=4)
    a = baselines.train_regressor(lambda k: baselines.mlp(3, k, (8,)), x, y, x, settings)
    b = baselines.train_regressor(lambda k: baselines.mlp(3, k, (8,)), x, y, x, settings)
    assert np.array_equal(a.predictions, b.predictions)
    with pytest.raises(Exception, match="finite targets"):
        baselines.train_regressor(lambda k: baselines.mlp(3, k, (8,)), x, np.full(64, np.nan), x, settings)


def test_photometry_knn_is_the_reference_knn_on_aperture_magnitudes():
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    images, y = _easy_images(200, rng)
    fitted = baselines.photometry_knn(images[:150], y[:150], images[150:])
    # By hand: magnitudes of a radius-4.5 aperture (3/8 of 12 pixels), scaled, 64 distance-weighted
    # neighbours, targets standardised with the training rows' mean and std.
    yy, xx = np.mgrid[:12, :12]
    inside = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 4.5**2
    mags = 22.5 - 2.5 * np.log10(np.maximum(images[..., inside].astype(np.float64).sum(-1), 1e-3))
    scaler = StandardScaler().fit(mags[:150])
    mean, std = y[:150].mean(0), y[:150].std(0)
    knn = KNeighborsRegressor(n_neighbors=64, weights="distance").fit(
        scaler.transform(mags[:150]), (y[:150] - mean) / std
    )
    expected = knn.predict(scaler.transform(mags[150:])) * std + mean
    assert fitted.parameters == 0 and fitted.predictions.shape == (50, 2)
    np.testing.assert_allclose(fitted.predictions, expected, rtol=1e-6, atol=1e-9)
    assert r2_score(y[150:, 1], fitted.predictions[:, 1]) > 0.5  # the colour target is read
    one = baselines.photometry_knn(images[:150], y[:150, 0], images[150:])
    np.testing.assert_allclose(one.predictions, fitted.predictions[:, 0], rtol=1e-6)


def test_batch_norm_statistics_are_recomputed_over_the_training_inputs():
    """After training, a batch norm's running statistics are the average of its inputs' statistics
    over the training set in batches of 256 (not the exponential average of the last batches), with
    the other layers as at prediction (the dropout before it off)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(512, 3)) * [1.0, 5.0, 0.1] + [2.0, -1.0, 0.0]).astype(np.float32)
    made = []

    def make(n_out):
        made.append(nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, n_out)))
        return made[-1]

    baselines.train_regressor(make, x, x.sum(axis=1), x[:8], baselines.TrainSettings(epochs=2, seed=0))
    norm = made[0][1]
    halves = x.reshape(2, 256, 3)
    np.testing.assert_allclose(norm.running_mean.numpy(), x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.running_var.numpy(), halves.var(axis=1, ddof=1).mean(axis=0), rtol=1e-5)
