"""The synthetic galaxy population: physics that both modalities share."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.stats import spearmanr

from encoders.astroclip import survey, synth


@pytest.fixture(scope="module")
def galaxies():
    rng = np.random.default_rng(11)
    pop, flux = synth.draw_population(rng, 60)
    wave = survey.wavelength_grid(3600.0, 9824.0, 2.0)
    images = survey.observe_images(pop, flux, rng, 48)
    spectra = survey.observe_spectra(pop, images.fibre_fraction, rng, wave, survey.in_dark_programme(flux))
    return pop, flux, images, spectra


def _template(quiescent: bool, loglam: np.ndarray) -> np.ndarray:
    """Rest-frame spectrum of an archetype galaxy (not any of the test galaxies)."""
    pop = synth.Population(
        z=np.array([1e-6]),
        log_mstar=np.array([11.0 if quiescent else 10.0]),
        log_ssfr=np.array([-12.0 if quiescent else -9.7]),
        quiescent=np.array([quiescent]),
        age_gyr=np.array([7.0 if quiescent else 3.0]),
        metallicity=np.array([0.019]),
        a_v=np.array([0.1 if quiescent else 0.5]),
        sigma_v=np.array([180.0 if quiescent else 80.0]),
        sigma_gas=np.array([60.0]),
        r_eff_kpc=np.array([3.0]),
        sersic_n=np.array([4.0]),
        axis_ratio=np.array([1.0]),
        position_angle=np.array([0.0]),
        lum_dist_mpc=np.array([10.0]),
        ang_dist_mpc=np.array([10.0]),
    )
    lam = 10**loglam
    edges = survey.pixel_edges(lam)
    return synth.observed_continuum(pop, lam)[0] + synth.bin_integrated_lines(pop, edges, 0.8)[0]


def _highpass(x: np.ndarray) -> np.ndarray:
    return x - gaussian_filter1d(x, 150)  # keeps lines, H&K and the 4000 Å break


def test_cross_correlation_with_rest_frame_templates_recovers_the_redshift(galaxies):
    """Cross-correlating each noisy spectrum with a rest-frame archetype of its class (emission-line
    or quiescent; not the galaxy's own parameters) over log-wavelength lags finds its redshift."""
    pop, _, _, spectra = galaxies
    step = 1e-4  # in log10 wavelength (~69 km/s)
    obs_grid = np.arange(np.log10(3600.0), np.log10(9824.0), step)
    tmpl_grid = np.arange(np.log10(3600.0 / 2.2), np.log10(9824.0), step)
    templates = {
        q: _highpass(_template(q, tmpl_grid) / _template(q, tmpl_grid).mean()) for q in (False, True)
    }
    errors = []
    for k in range(len(pop)):
        good = ~spectra.mask[k]
        lam = spectra.wavelength[good]
        obs = np.interp(10**obs_grid, lam, spectra.flux[k][good])
        weight = np.interp(10**obs_grid, lam, spectra.ivar[k][good])
        obs = _highpass(obs / max(abs(obs.mean()), 1e-3)) * weight / weight.mean()
        t = templates[bool(pop.quiescent[k])]
        # obs[n] pairs with t[n + m]: log(1 + z) = (obs_grid[0] - tmpl_grid[0]) - m * step
        corr = np.correlate(t, obs, mode="valid")
        energy = np.convolve(t**2, np.ones(len(obs)), mode="valid")
        z = 10 ** ((obs_grid[0] - tmpl_grid[0]) - np.arange(len(corr)) * step) - 1
        score = np.where((z > 0.0) & (z < 1.15), corr / np.sqrt(energy), -np.inf)
        errors.append(abs(z[int(np.argmax(score))] - pop.z[k]) / (1 + pop.z[k]))
    errors = np.array(errors)
    lines, quiescent = errors[~pop.quiescent], errors[pop.quiescent]
    assert np.mean(lines < 2e-3) >= 0.9, np.sort(lines)  # emission lines pin z to < 140 km/s
    assert np.mean(quiescent < 1e-2) >= 0.7, np.sort(quiescent)  # H&K and the 4000 Å break, at low S/N
    assert np.mean(errors < 1e-2) >= 0.8


def test_redshift_shifts_emission_lines_to_the_observed_wavelength():
    rng = np.random.default_rng(0)
    pop, _ = synth.draw_population(rng, 200)
    star_forming = pop.take(np.flatnonzero(~pop.quiescent)[:5])
    wave = survey.wavelength_grid(3600.0, 9824.0, 0.8)
    lines = synth.bin_integrated_lines(star_forming, survey.pixel_edges(wave), 0.8)
    for k in range(len(star_forming)):
        observed = synth.LINES["OIII_5008"] * (1 + star_forming.z[k])
        if observed < 9800:
            window = np.abs(wave - observed) < 30
            assert wave[window][np.argmax(lines[k][window])] == pytest.approx(observed, abs=1.0)


def test_images_carry_the_photometry_and_colours_redden_with_redshift(galaxies):
    pop, flux, images, _ = galaxies
    total = np.where(images.mask, 0, images.array).sum(axis=(2, 3))
    noise = np.sqrt(np.where(images.mask, 0, 1 / np.maximum(images.ivar, 1e-12)).sum(axis=(2, 3)))
    centre_masked = images.mask[:, :, 16:32, 16:32].any(axis=(1, 2, 3))
    compact = (pop.r_eff_arcsec < 1.5) & ~centre_masked
    assert compact.sum() > 20
    # cutouts hold (nearly) all the light of compact galaxies in every band, within the noise
    assert np.all(np.abs(total[compact] - flux[compact]) < 5 * noise[compact] + 0.1 * flux[compact])
    g_r = -2.5 * np.log10(np.clip(total[:, 0] / np.clip(total[:, 1], 1e-3, None), 1e-3, None))
    assert spearmanr(g_r, pop.z).statistic > 0.4
    assert spearmanr(pop.r_eff_arcsec, pop.z).statistic < -0.3


@pytest.mark.slow
def test_flux_limit_and_mass_bound_are_consistent():
    rng = np.random.default_rng(5)
    candidates = synth.draw_candidates(rng, 20000, bounded=False)
    selected = synth.select_targets(synth.photometry(candidates))
    assert selected.sum() > 100
    # the sampler's mass bound never excludes a galaxy that would pass the flux limit
    assert np.all(candidates.log_mstar[selected] > synth.mass_bound(candidates.z[selected]))
    pop, flux = synth.draw_population(np.random.default_rng(5), 300)
    assert synth.select_targets(flux).all()
    assert 0.15 < pop.quiescent.mean() < 0.85 and pop.z.min() > 0 and pop.z.max() < 1.15


def test_noise_and_ivar_agree(galaxies):
    _, _, images, spectra = galaxies
    good = ~spectra.mask
    model_free = spectra.flux - gaussian_filter1d(spectra.flux, 15, axis=1)  # rough continuum removal
    pulls = (model_free * np.sqrt(spectra.ivar))[good]
    assert 0.7 < np.std(pulls[np.abs(pulls) < 10]) < 1.3
    corner = images.array[:, :, :6, :6]
    pulls = (corner * np.sqrt(images.ivar[:, :, :6, :6]))[~images.mask[:, :, :6, :6]]
    assert 0.8 < np.std(pulls) < 1.5  # sky-dominated corners: unit pulls (plus faint galaxy wings)
