import numpy as np
import pytest

from engine.model.redshift import coverage, fit_pit_map, pit, recalibrate, redshift_probs, redshift_summary, softmax, summarize

EDGES = np.linspace(0.0, 1.0, 201)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian p(z) of width 0.02 around a centre, while the truth scatters by 0.04 with heavy tails."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.3, 0.7, n)
    z = centre + 0.04 * rng.standard_t(4, n)
    logits = -0.5 * ((CENTRES[None, :] - centre[:, None]) / 0.02) ** 2
    return logits, z


def test_pit_map_makes_held_out_intervals_cover_as_claimed():
    fit_logits, fit_z = _overconfident(2000, seed=0)
    test_logits, test_z = _overconfident(5000, seed=1)
    pit_map = fit_pit_map(pit(softmax(fit_logits), EDGES, fit_z))
    x, y = pit_map
    assert x[0] == 0.0 and x[-1] == 1.0 and np.all(np.diff(x) > 0) and {0.025, 0.15865, 0.5, 0.84135, 0.975} <= set(y)
    before = summarize(softmax(test_logits), EDGES, CENTRES)
    after = summarize(redshift_probs(test_logits, 1.0, {"pit_map": pit_map}), EDGES, CENTRES)
    cov = lambda s, lo, hi: coverage(s[f"z_phot_{lo}"], s[f"z_phot_{hi}"], test_z)  # noqa: E731
    assert cov(before, "l68", "u68") < 0.50 and cov(before, "l95", "u95") < 0.80  # overconfident as built
    assert abs(cov(after, "l68", "u68") - 0.68) < 0.03 and abs(cov(after, "l95", "u95") - 0.95) < 0.015
    dev = lambda u: np.abs(np.histogram(u, bins=10, range=(0, 1))[0] / len(u) - 0.1).max()  # noqa: E731
    raw, mapped = pit(softmax(test_logits), EDGES, test_z), pit(redshift_probs(test_logits, 1.0, {"pit_map": pit_map}), EDGES, test_z)
    assert dev(raw) > 0.15 and dev(mapped) < 0.03  # PIT histogram: U-shaped before, flat to within sampling + knots after


def test_recalibrated_probabilities_stay_a_distribution_and_identity_without_a_map():
    logits, _ = _overconfident(50, seed=2)
    probs = softmax(logits)
    assert recalibrate(probs, None) is probs
    identity = [np.linspace(0, 1, 21).tolist()] * 2
    np.testing.assert_allclose(recalibrate(probs, identity), probs, atol=1e-9)
    out = recalibrate(probs, [[0.0, 0.1, 0.9, 1.0], [0.0, 0.2, 0.8, 1.0]])  # PITs pile up in the tails: widen
    assert (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0)
    # the median bin is kept (G maps 0.5 to 0.5 here) while the tails get more mass than before
    np.testing.assert_allclose(summarize(out, EDGES, CENTRES)["z_phot_median"], summarize(probs, EDGES, CENTRES)["z_phot_median"], atol=1e-5)
    assert (summarize(out, EDGES, CENTRES)["z_phot_std"] > summarize(probs, EDGES, CENTRES)["z_phot_std"]).all()


@pytest.mark.parametrize("calibration", [None, {}, "fitted"])
def test_redshift_summary_equals_summarize_of_the_calibrated_probs(calibration):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(500, len(CENTRES))) * 4.0
    if calibration == "fitted":
        u = rng.beta(0.6, 0.6, 2000)  # an overconfident model's PITs pile up at 0 and 1
        calibration = {"pit_map": fit_pit_map(u)}
    a = summarize(redshift_probs(logits, 0.8, calibration), EDGES, CENTRES)
    b = redshift_summary(logits, 0.8, calibration, EDGES, CENTRES)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)
    if calibration:  # and the map did change the intervals, so the equality is not the identity's
        plain = summarize(redshift_probs(logits, 0.8, None), EDGES, CENTRES)
        assert np.abs(plain["z_phot_u95"] - a["z_phot_u95"]).max() > 1e-3
