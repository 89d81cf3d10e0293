from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError, ModalityError
from engine.modalities import registry
from engine.modalities.spectra import LightCurves, Spectrum, SpectrumBatch, XPCoefficients, read_manga, read_miles

DATA = Path(__file__).parents[1] / "data" / "spectra"
WAVE = np.linspace(4000.0, 5000.0, 50)


def _spec(**kw):
    args = dict(survey="manga", wavelength_aa=WAVE, flux=np.ones(50), ivar=np.ones(50))
    return Spectrum(**{**args, **kw})


def test_valid_spectrum_is_frozen_float64_with_its_token_key():
    s = _spec(flux=np.arange(50, dtype=np.float32), redshift=0.1)
    assert s.token_key == "tok_spec_manga"
    assert s.flux.dtype == np.float64 and s.flux[3] == 3.0
    with pytest.raises(ValueError):
        s.flux[0] = 5.0  # read-only
    b = s.to_batch()
    assert b.n_rows == 1 and b.redshift[0] == 0.1 and b.object_id.dtype == np.int64


def test_non_monotonic_wavelength_is_rejected_with_the_offending_index():
    w = WAVE.copy()
    w[10] = w[9]
    with pytest.raises(ModalityError, match=r"wavelength_aa: expected strictly increasing.*index 9"):
        _spec(wavelength_aa=w)


def test_mismatched_flux_ivar_lengths_are_rejected():
    with pytest.raises(ModalityError, match=r"ivar: expected 50 values.*got 49"):
        _spec(ivar=np.ones(49))
    with pytest.raises(ModalityError, match=r"ivar: expected the shape of flux \(2, 50\), got \(2, 49\)"):
        SpectrumBatch("manga", WAVE, np.ones((2, 50)), np.ones((2, 49)))


def test_negative_ivar_is_rejected_but_nan_ivar_is_a_bad_pixel():
    with pytest.raises(ModalityError, match=r"ivar: expected values >= 0.*-1"):
        _spec(ivar=np.r_[np.ones(49), -1.0])
    s = _spec(ivar=np.r_[np.ones(49), np.nan], flux=np.r_[np.nan, np.ones(49)])
    bad = s.to_batch().bad_pixels()[0]
    assert bad[0] and bad[-1] and bad.sum() == 2


@pytest.mark.parametrize("flux", ["abc", {"a": 1}, None, np.array(["x"] * 50)])
def test_wrong_types_are_rejected(flux):
    with pytest.raises(ModalityError, match=r"flux: expected a numeric array"):
        _spec(flux=flux)


def test_bad_survey_names_and_shapes_are_rejected():
    with pytest.raises(ModalityError, match=r"survey: expected a lower-case name.*'SDSS DR16'"):
        _spec(survey="SDSS DR16")
    with pytest.raises(ModalityError, match=r"flux: expected 2 dimension"):
        SpectrumBatch("manga", WAVE, np.ones(50), np.ones(50))
    with pytest.raises(ModalityError, match=r"redshift: expected 2 finite values"):
        SpectrumBatch("manga", WAVE, np.ones((2, 50)), np.ones((2, 50)), redshift=np.array([0.1]))


def test_all_masked_spectrum_is_accepted_as_data():
    s = _spec(mask=np.ones(50, dtype=bool))
    assert s.to_batch().bad_pixels().all()


def test_xp_coefficients_ragged_rows_and_errors():
    xp = XPCoefficients("rp", np.arange(5.0), np.array([0, 2, 2, 5]))
    assert xp.token_key == "tok_xp_rp"
    assert xp.lengths.tolist() == [2, 0, 3] and xp.n_tokens == 5
    assert xp.object_id.tolist() == [0, 1, 2]
    with pytest.raises(ModalityError, match=r"object_id: expected 3 ids \(one per row\), got 2"):
        XPCoefficients("rp", np.arange(5.0), np.array([0, 2, 2, 5]), np.array([4, 5]))
    with pytest.raises(ModalityError, match=r"band: expected one of \('bp', 'rp'\), got 'g'"):
        XPCoefficients("g", np.arange(5.0), np.array([0, 5]))
    with pytest.raises(ModalityError, match=r"indptr: expected non-decreasing offsets from 0 to 5"):
        XPCoefficients("bp", np.arange(5.0), np.array([0, 3, 2, 5]))
    with pytest.raises(ModalityError, match=r"indptr: expected non-decreasing offsets from 0 to 5"):
        XPCoefficients("bp", np.arange(5.0), np.array([0, 4]))


def test_light_curve_time_must_not_decrease_within_a_row_but_may_across_rows():
    t = np.array([10.0, 11.0, 11.0, 1.0, 2.0])  # row 2 starts earlier than row 1 ended: fine
    lc = LightCurves("ztf_g", t, np.full(5, 18.0), np.full(5, 0.1), np.array([0, 3, 3, 5]))
    assert lc.token_key == "tok_lc_ztf_g" and lc.lengths.tolist() == [3, 0, 2]
    with pytest.raises(ModalityError, match=r"time_mjd: expected non-decreasing times within each row, got 11.0 then 1.0"):
        LightCurves("ztf_g", t, np.full(5, 18.0), np.full(5, 0.1), np.array([0, 5]))
    with pytest.raises(ModalityError, match=r"mag: expected 5 values"):
        LightCurves("ztf_g", t, np.full(4, 18.0), np.full(5, 0.1), np.array([0, 5]))
    with pytest.raises(ModalityError, match=r"mag_err: expected values >= 0"):
        LightCurves("ztf_g", t, np.full(5, 18.0), np.full(5, -0.1), np.array([0, 5]))


def test_readers_on_the_real_fixtures():
    manga = read_manga(DATA / "MaNGA_test_spectra.fits.gz")
    assert manga.flux.shape == (8, 4563) and manga.token_key == "tok_spec_manga"
    assert np.allclose(np.diff(np.log10(manga.wavelength_aa)), 1e-4)
    assert manga.bad_pixels()[5].all()  # the fully masked spaxel
    assert 0.01 < manga.redshift.min() and manga.redshift.max() < 0.2
    miles = read_miles(sorted((DATA / "miles").glob("*.fits"))[:3])
    assert miles.object_id.tolist() == [1, 17, 33]
    assert miles.wavelength_aa[0] == 3540.5 and np.isclose(miles.wavelength_aa[1] - miles.wavelength_aa[0], 0.9)
    snr = np.median(miles.flux, axis=1) * np.sqrt(miles.ivar[:, 0])
    assert np.allclose(snr, 100.0)


def test_registry_token_keys_are_unique_and_entries_build_configured_tokenizers():
    keys = list(registry.REGISTRY)
    assert len(keys) == len(set(keys))
    assert {"tok_spec_manga", "tok_spec_miles", "tok_xp_bp", "tok_xp_rp", "tok_lc_ztf_g"} <= set(keys)
    tok = registry.entry("tok_spec_miles").build(codebook_size=32)
    assert tok.config.sky_lines_aa == () and tok.config.codebook_size == 32
    assert registry.entry("tok_xp_bp").build().config.mode == "position_bins"
    assert registry.entry("tok_lc_ztf_g").build().config.mode == "kmeans"
    assert registry.entry("tok_spec_manga").tokens_per_object() == 257  # scale + 64 patches x 4 stages
    assert registry.entry("tok_xp_bp").tokens_per_object() is None  # ragged: one token per element
    assert {e.token_key for e in registry.entries("spectrum")} == {k for k in keys if k.startswith("tok_spec_")}
    with pytest.raises(ConfigError, match=r"unknown modality 'tok_spec_nope'"):
        registry.entry("tok_spec_nope")


def test_registry_entry_for_a_missing_tokenizer_module_fails_clearly():
    e = registry.ModalityEntry("image", "legacy", "engine.tokenizers.not_there:Tok")
    assert e.token_key == "tok_image_legacy"
    with pytest.raises(ConfigError, match=r"tok_image_legacy: tokenizer .* is not available"):
        e.build()
    with pytest.raises(ConfigError, match=r"kind='radio'"):
        registry.ModalityEntry("radio", "lofar", registry.SPECTRUM)
