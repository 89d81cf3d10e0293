import numpy as np
import pytest

from engine.model.redshift import coverage, photoz_metrics, pit, summarize

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
