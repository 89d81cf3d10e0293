import numpy as np
import pytest

from engine.model.redshift import coverage, fit_coverage_temperature, photoz_metrics, pit, pit_coverage, softmax, summarize

EDGES = np.linspace(0.0, 1.0, 11)
CENTRES = 0.5 * (EDGES[:-1] + EDGES[1:])


def test_uniform_pz_summaries_are_exact():
    s = summarize(np.full((1, 10), 0.1), EDGES, CENTRES)
    assert s["z_phot_mean"][0] == pytest.approx(0.5)
    assert s["z_phot_median"][0] == pytest.approx(0.5)
    assert s["z_phot_std"][0] == pytest.approx(np.sqrt(1 / 12), rel=1e-5)  # uniform on [0, 1]
    assert s["z_phot_l68"][0] == pytest.approx(0.15865, abs=1e-5)
    assert s["z_phot_u95"][0] == pytest.approx(0.975, abs=1e-5)


def test_single_bin_pz_stays_inside_the_bin():
    p = np.zeros((2, 10))
    p[0, 3] = 1.0
    p[1, 7] = 1.0
    s = summarize(p, EDGES, CENTRES)
    np.testing.assert_allclose(s["z_phot_mode"], [0.35, 0.75], atol=1e-7)
    np.testing.assert_allclose(s["z_phot_mean"], [0.35, 0.75], atol=1e-7)
    assert np.all((s["z_phot_l95"] >= [0.3, 0.7]) & (s["z_phot_u95"] <= [0.4 + 1e-7, 0.8 + 1e-7]))
    assert np.all(s["z_phot_l95"] <= s["z_phot_l68"]) and np.all(s["z_phot_l68"] <= s["z_phot_median"])
    assert np.all(s["z_phot_median"] <= s["z_phot_u68"]) and np.all(s["z_phot_u68"] <= s["z_phot_u95"])


def test_pit_of_true_values_drawn_from_the_pz_is_uniform():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=4000)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(4000)
    k = (cdf < u[:, None]).sum(axis=1)
    z = EDGES[k] + rng.random(4000) * 0.1  # draw z from each p(z) (uniform within bins)
    values = pit(p, EDGES, z)
    hist = np.histogram(values, bins=10, range=(0, 1))[0]
    assert hist.min() > 320 and hist.max() < 480


def test_photoz_metrics_on_known_offsets():
    z = np.full(100, 0.1)
    zp = z + 0.011 * np.r_[np.ones(50), -np.ones(50)]  # |d| = 0.01 for every object
    zp[0] = 0.5  # one catastrophic outlier
    m = photoz_metrics(zp, z)
    assert m["outlier_frac_0.15"] == pytest.approx(0.01)
    assert m["sigma_nmad"] == pytest.approx(1.4826 * 0.01, rel=1e-6)
    assert coverage(z - 0.01, z + 0.01, z + np.r_[np.zeros(68), np.ones(32)]) == pytest.approx(0.68)


def test_coverage_temperature_recovers_the_true_width_of_overdispersed_gaussians():
    """Logits of N(mu, (1.3 s)^2) while z ~ N(mu, s^2): T = 1/1.3^2 makes the p(z) exact."""
    rng = np.random.default_rng(1)
    edges = np.linspace(0.0, 1.0, 401)
    centres = 0.5 * (edges[:-1] + edges[1:])
    mu, s = rng.uniform(0.3, 0.7, 4000), rng.uniform(0.02, 0.05, 4000)
    z = mu + s * rng.standard_normal(4000)
    logits = -0.5 * ((centres[None, :] - mu[:, None]) / (1.3 * s[:, None])) ** 2
    t, record = fit_coverage_temperature(logits, edges, z)
    assert t == pytest.approx(1 / 1.3**2, rel=0.08)
    assert record["coverage_fitted"] == pytest.approx([0.6827, 0.95], abs=0.01) and record["n_rows"] == 4000
    s_cal = summarize(softmax(logits, t), edges, centres)
    assert coverage(s_cal["z_phot_l68"], s_cal["z_phot_u68"], z) == pytest.approx(0.6827, abs=0.015)
    s_raw = summarize(softmax(logits, 1.0), edges, centres)
    assert coverage(s_raw["z_phot_l68"], s_raw["z_phot_u68"], z) > 0.75  # uncalibrated: too wide
    assert pit_coverage(pit(softmax(logits, t), edges, z), 0.025, 0.975) == pytest.approx(0.95, abs=0.01)
