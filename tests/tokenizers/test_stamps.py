from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError, ModalityError
from engine.tokenizers.stamps import Field, StampConfig, centroids, cut_stamps, estimate_background, read_field

CUTOUT = Path(__file__).parents[1] / "data" / "images" / "cfht_a370_cutout.fits"


@pytest.fixture(scope="module")
def field():
    return read_field(CUTOUT)


def _inject(field, x0, y0, peak, sigma_pix=1.5):
    yy, xx = np.mgrid[: field.data.shape[0], : field.data.shape[1]]
    src = peak * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sigma_pix**2)
    return Field(field.data + src, field.pixel_scale_arcsec, field.wcs, "injected.fits")


def test_background_and_noise_of_the_real_cfht_cutout(field):
    bkg, noise = estimate_background(field.data)
    assert 1980 < bkg < 2000 and 7 < noise < 12  # CFHT sky ~1990 ADU, sigma ~9-10 ADU
    assert field.pixel_scale_arcsec == pytest.approx(0.2056, abs=1e-3)


def test_injected_source_is_detected_at_the_right_position_with_metadata(field):
    _, noise = estimate_background(field.data)
    x0, y0 = 41.3, 270.6  # an empty patch of the real cutout
    before = cut_stamps(field, StampConfig(size_pix=32))
    after = cut_stamps(_inject(field, x0, y0, 40 * noise), StampConfig(size_pix=32))
    assert len(after) == len(before) + 1
    d = np.hypot(after.x_pix - x0, after.y_pix - y0)
    k = int(np.argmin(d))
    assert d[k] < 0.15  # flux-weighted centroid within 0.15 px
    assert 30 < after.peak_snr[k] < 50  # injected peak 40 sigma on top of one noisy pixel
    ra, dec = field.wcs.pixel_to_world_values(x0, y0)
    assert after.ra_deg[k] == pytest.approx(float(ra), abs=0.2 / 3600) and after.dec_deg[k] == pytest.approx(float(dec), abs=0.2 / 3600)
    assert after.source_file == "injected.fits" and after.pixel_scale_arcsec == field.pixel_scale_arcsec
    stamp = after.pixels[k]  # background subtracted, centred on the rounded centroid
    assert np.unravel_index(np.nanargmax(stamp), stamp.shape) == (16, 16)
    assert stamp[16, 16] == pytest.approx(40 * noise, rel=0.3)
    assert abs(np.nanmedian(stamp)) < noise


def test_centroid_recovers_subpixel_offsets_without_noise():
    yy, xx = np.mgrid[:40, :40]
    truth = np.array([[10.0, 12.0], [20.37, 25.81], [30.5, 8.25]])
    img = sum(np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.5**2) for y, x in truth)
    yc, xc = centroids(img, np.round(truth[:, 0]).astype(int), np.round(truth[:, 1]).astype(int), radius=4)
    assert np.allclose(yc, truth[:, 0], atol=0.02) and np.allclose(xc, truth[:, 1], atol=0.02)


def test_edge_stamps_are_nan_padded_or_skipped_and_cutting_is_deterministic(field):
    padded = cut_stamps(field, StampConfig(size_pix=64))
    again = cut_stamps(field, StampConfig(size_pix=64))
    np.testing.assert_array_equal(padded.pixels, again.pixels)
    near_edge = (padded.x_pix < 31) | (padded.y_pix < 31) | (padded.x_pix > 288) | (padded.y_pix > 288)
    assert near_edge.any()
    assert np.isnan(padded.pixels[near_edge]).any(axis=(1, 2)).all()
    assert not np.isnan(padded.pixels[~near_edge]).any()
    skipped = cut_stamps(field, StampConfig(size_pix=64, edge="skip"))
    assert len(skipped) == int((~near_edge).sum()) and not np.isnan(skipped.pixels).any()


def test_bad_config_and_inputs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="edge='crop'"):
        StampConfig(edge="crop")
    with pytest.raises(ConfigError, match="size_pix=2"):
        StampConfig(size_pix=2)
    with pytest.raises(ModalityError, match="expected finite pixels"):
        estimate_background(np.full((10, 10), np.nan))


def test_saturated_pixels_are_masked_in_stamps_without_changing_the_detections(field, tmp_path):
    from astropy.io import fits

    _, noise = estimate_background(field.data)
    x0, y0 = 41.3, 270.6
    star = _inject(field, x0, y0, 400 * noise)  # a star whose core passes the level below
    level = float(np.median(field.data) + 200 * noise)
    hdr = field.wcs.to_header()
    hdr["MAXLIN"] = level
    fits.PrimaryHDU(star.data.astype(np.float32), hdr).writeto(tmp_path / "sat.fits")
    sat = read_field(tmp_path / "sat.fits")  # the level comes from the header
    assert sat.saturation == pytest.approx(level) and read_field(CUTOUT).saturation is None
    plain = read_field(tmp_path / "sat.fits", saturation=None)
    assert plain.saturation is None and read_field(tmp_path / "sat.fits", saturation=5e4).saturation == 5e4
    a, b = cut_stamps(sat, StampConfig(size_pix=32)), cut_stamps(plain, StampConfig(size_pix=32))
    np.testing.assert_array_equal(a.x_pix, b.x_pix)  # same sources, same centroids
    k = int(np.argmin(np.hypot(a.x_pix - x0, a.y_pix - y0)))
    over = np.nan_to_num(b.pixels[k]) >= level - a.background  # the stamp pixels at or above the level
    assert 3 <= over.sum() == a.n_saturated[k] and np.isnan(a.pixels[k][over]).all()
    np.testing.assert_array_equal(a.pixels[k][~over], b.pixels[k][~over])  # nothing else changes
    over_all = np.nan_to_num(b.pixels) >= level - a.background  # and in every stamp (a neighbour's may hold the star)
    np.testing.assert_array_equal(a.n_saturated, over_all.sum((1, 2)))
    assert np.isnan(a.pixels[over_all]).all() and b.n_saturated.sum() == 0
    assert a.take(np.array([k])).n_saturated.tolist() == [a.n_saturated[k]]
    with pytest.raises(ConfigError, match="saturation='auto'; expected 'header', a number or None"):
        read_field(tmp_path / "sat.fits", saturation="auto")
