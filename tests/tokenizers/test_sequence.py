"""SequenceTokenizer on ragged data. There are no Gaia XP or ZTF files in the project's data, so these
fixtures are seeded synthetic sequences with XP-like (per-position scales spanning decades) and
ZTF-like (irregular cadence, 15-21 mag) statistics."""

from dataclasses import replace

import numpy as np
import pytest

from engine.errors import CodecError, ConfigError, ModalityError
from engine.modalities.spectra import LightCurves, XPCoefficients
from engine.tokenizers.sequence import SequenceTokenizer, SequenceTokenizerConfig, SequenceTokens, positions


def _xp(n_rows: int, seed: int, max_len: int = 55) -> XPCoefficients:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, n_rows)
    lengths[:3] = [0, max_len, 1]  # an empty row, a full row, a single value
    indptr = np.r_[0, np.cumsum(lengths)]
    pos = positions(indptr)
    return XPCoefficients("bp", rng.normal(size=indptr[-1]) * 10.0 ** (3 - pos / 10), indptr, 1000 + np.arange(n_rows))


def _lc(n_rows: int, seed: int) -> LightCurves:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 80, n_rows)
    lengths[:2] = [0, 1]
    indptr = np.r_[0, np.cumsum(lengths)]
    dt = rng.exponential(3.0, indptr[-1])
    dt[indptr[:-1][lengths > 0]] = 0.0
    t = np.cumsum(dt) + 58000.0
    base = np.repeat(rng.uniform(15, 21, n_rows), lengths)
    err = 0.02 * 10 ** (0.2 * (base - 15))
    return LightCurves("ztf_g", t, base + rng.normal(0, 1, len(t)) * err, err, indptr)


@pytest.fixture(scope="module")
def xp_tok():
    return SequenceTokenizer(SequenceTokenizerConfig(mode="position_bins", n_bins=64, max_positions=55)).fit(
        [_xp(300, 0), _xp(300, 1)])


@pytest.fixture(scope="module")
def lc_tok():
    return SequenceTokenizer(SequenceTokenizerConfig(mode="kmeans", n_bins=128, kmeans_niter=10)).fit([_lc(200, 0)])


def test_xp_indptr_is_kept_and_rows_round_trip(xp_tok):
    xp = _xp(100, 7)
    enc = xp_tok.encode(xp)
    assert enc.indptr.dtype == np.int64 and np.array_equal(enc.indptr, xp.indptr)
    assert enc.token_key == "tok_xp_bp" and len(enc.row(0)) == 0 and len(enc.row(1)) == 55
    assert np.array_equal(np.diff(enc.indptr), xp.lengths)
    dec = xp_tok.decode(enc)
    assert np.array_equal(dec.indptr, xp.indptr) and dec.band == "bp"
    assert np.array_equal(enc.object_id, xp.object_id) and np.array_equal(dec.object_id, xp.object_id)
    # each decoded value lies in the bin of its own position that holds the input (inside the fitted range)
    pos = positions(xp.indptr)
    edges = xp_tok.arrays["edges"][pos]
    k = enc.tokens
    lo, hi = edges[np.arange(len(k)), k], edges[np.arange(len(k)), k + 1]
    inside = (xp.coefficients > edges[:, 0]) & (xp.coefficients < edges[:, -1])
    assert inside.mean() > 0.95
    assert np.all((dec.coefficients[inside] >= lo[inside]) & (dec.coefficients[inside] <= hi[inside]))
    assert np.all((xp.coefficients[inside] >= lo[inside]) & (xp.coefficients[inside] <= hi[inside]))


def test_xp_tokens_are_monotonic_in_the_value_at_each_position(xp_tok):
    xp = _xp(200, 3)
    tok, pos = xp_tok.encode(xp).tokens, positions(xp.indptr)
    for p in (0, 20, 54):
        sel = pos == p
        order = np.argsort(xp.coefficients[sel])
        assert np.all(np.diff(tok[sel][order]) >= 0)


def test_xp_missing_values_and_too_long_rows(xp_tok):
    xp = XPCoefficients("bp", np.array([1.0, np.nan, 2.0]), np.array([0, 3]))
    enc = xp_tok.encode(xp)
    assert enc.tokens[1] == xp_tok.missing_token and (enc.tokens[[0, 2]] < 64).all()
    assert np.isnan(xp_tok.decode(enc).coefficients[1])
    with pytest.raises(ModalityError, match=r"expected rows of at most max_positions=55 values, got 56"):
        xp_tok.encode(XPCoefficients("bp", np.ones(56), np.array([0, 56])))


def test_light_curve_round_trip_keeps_row_boundaries_and_is_close(lc_tok):
    lc = _lc(80, 9)
    enc = lc_tok.encode(lc)
    assert np.array_equal(enc.indptr, lc.indptr) and enc.token_key == "tok_lc_ztf_g"
    t0 = lc.time_mjd[lc.indptr[:-1][lc.lengths > 0]]
    first = np.zeros(len(lc.lengths))
    first[lc.lengths > 0] = t0
    dec = lc_tok.decode(enc, time0_mjd=first)
    assert np.array_equal(dec.indptr, lc.indptr)  # the LightCurves constructor also re-checks time order per row
    assert np.array_equal(dec.time_mjd[lc.indptr[:-1][lc.lengths > 0]], t0)
    # measured: median |dmag| 0.13 mag (a single global median mag is off by ~1.5), median |log10 err ratio| 0.026,
    # with 128 centroids shared by (dt, mag, err)
    dmag = np.median(np.abs(dec.mag - lc.mag))
    assert dmag < 0.2 and dmag < 0.15 * np.median(np.abs(lc.mag - np.median(lc.mag)))
    assert np.median(np.abs(np.log10(dec.mag_err / lc.mag_err))) < 0.05
    relative = lc_tok.decode(enc)
    assert np.all(relative.time_mjd[lc.indptr[:-1][lc.lengths > 0]] == 0.0)


def test_light_curve_non_finite_mag_gets_missing_token(lc_tok):
    lc = LightCurves("ztf_g", np.array([1.0, 2.0, 3.0]), np.array([18.0, np.nan, 18.5]), np.full(3, 0.05), np.array([0, 3]))
    enc = lc_tok.encode(lc)
    assert enc.tokens.tolist()[1] == lc_tok.missing_token and enc.tokens[0] != lc_tok.missing_token
    assert np.isnan(lc_tok.decode(enc).mag[1])


def test_wrong_container_type_is_rejected(xp_tok, lc_tok):
    with pytest.raises(ModalityError, match=r"mode='position_bins'\): expected XPCoefficients, got LightCurves"):
        xp_tok.encode(_lc(3, 0))
    with pytest.raises(ModalityError, match=r"expected LightCurves, got ndarray"):
        lc_tok.encode(np.ones(3))


def test_decode_rejects_inconsistent_indptr(xp_tok):
    with pytest.raises(ModalityError, match=r"expected indptr ending at 3"):
        xp_tok.decode(SequenceTokens(np.zeros(3, dtype=np.int32), np.array([0, 2]), "tok_xp_bp", np.array([7])))


@pytest.mark.parametrize("fixture,data", [("xp_tok", lambda: _xp(50, 5)), ("lc_tok", lambda: _lc(30, 5))])
def test_save_load_gives_identical_tokens(fixture, data, request, tmp_path):
    tok = request.getfixturevalue(fixture)
    tok.save(tmp_path)
    loaded = SequenceTokenizer.load(tmp_path)
    assert loaded.config == tok.config
    x = data()
    assert np.array_equal(loaded.encode(x).tokens, tok.encode(x).tokens)


def test_fit_is_seeded_and_unfitted_or_bad_config_fail(lc_tok):
    again = SequenceTokenizer(lc_tok.config).fit([_lc(200, 0)])
    assert np.array_equal(again.arrays["codebook"], lc_tok.arrays["codebook"])
    other = SequenceTokenizer(replace(lc_tok.config, seed=3)).fit([_lc(200, 0)])
    assert not np.array_equal(other.arrays["codebook"], lc_tok.arrays["codebook"])
    with pytest.raises(CodecError, match=r"not fitted"):
        SequenceTokenizer(SequenceTokenizerConfig()).encode(_xp(3, 0))
    with pytest.raises(ConfigError, match=r"mode='bins'; expected one of"):
        SequenceTokenizerConfig(mode="bins")
    with pytest.raises(CodecError, match=r"expected >= n_bins=128 valid observations, got 0"):
        SequenceTokenizer(lc_tok.config).fit([])
