"""Stamp properties against analytic sources, the region split and the flips/rotations of the image model's data."""

from pathlib import Path

import numpy as np
from engine.model.image_data import cut_field, dihedral, measure_stamps, region_split, stamp_size_pix
from engine.tokenizers.stamps import Stamps

CUTOUT = Path(__file__).parents[1] / "data" / "images" / "cfht_a370_cutout.fits"
SCALE = 0.2


def _gaussian_stamps(sigmas_pix: list[tuple[float, float]], flux: float, size: int = 51,
                     shifts_pix: tuple[int, ...] = (0,)) -> Stamps:
    """Each stamp: elliptical Gaussians (sigma_x, sigma_y in pixels) at x offsets ``shifts_pix`` from its centre pixel,
    noiseless; stamp i is centred on a source at field x = 100 + 12 i (so twin sources see each other)."""
    off = np.arange(size) - size // 2
    yy, xx = np.meshgrid(off, off, indexing="ij")
    pix = []
    for sx, sy in sigmas_pix:
        g = sum(np.exp(-0.5 * (((xx - d) / sx) ** 2 + (yy / sy) ** 2)) for d in shifts_pix)
        pix.append(flux * g / (2 * np.pi * sx * sy))
    n = len(pix)
    x, y = 100.0 + 12.0 * np.arange(n), np.full(n, 100.0)
    return Stamps(np.array(pix, np.float32), x, y, y, y, np.ones(n), 0.0, 1e-3, SCALE, "synthetic")


R50_2PIX = 2.0 * np.sqrt(2 * np.log(2)) * SCALE  # half-light radius of a circular Gaussian of sigma 2 px, arcsec


def test_gaussian_sources_give_their_analytic_properties():
    m = measure_stamps(_gaussian_stamps([(2.0, 2.0), (2.4, 1.2), (2.0, 1.5)], flux=1e4), zero_point_ab=25.0)
    # mag in 1" (5 px) radius of a circular Gaussian: F (1 - exp(-r^2 / 2 sigma^2))
    np.testing.assert_allclose(m["mag_aper"][0], 25.0 - 2.5 * np.log10(1e4 * (1 - np.exp(-(25 / 8)))), atol=0.02)
    np.testing.assert_allclose(m["flux_radius_arcsec"][0], R50_2PIX, rtol=0.05)
    # second moments above 2 sigma of a noiseless Gaussian: b/a = sigma_y / sigma_x (up to pixelisation)
    np.testing.assert_allclose(m["ellipticity"], [0.0, 0.5, 0.25], atol=0.03)


def test_a_neighbour_does_not_inflate_the_size():
    # two stamps of the same pair of sources 12 px apart, each centred on one of them
    pair = Stamps(np.stack([_gaussian_stamps([(2.0, 2.0)], 1e4, shifts_pix=(0, 12)).pixels[0],
                            _gaussian_stamps([(2.0, 2.0)], 1e4, shifts_pix=(0, -12)).pixels[0]]),
                  np.array([100.0, 112.0]), np.full(2, 100.0), np.zeros(2), np.zeros(2), np.ones(2), 0.0, 1e-3, SCALE, "pair")
    deblended = measure_stamps(pair, 25.0)["flux_radius_arcsec"]
    blended = measure_stamps(pair.take(np.array([0])), 25.0)["flux_radius_arcsec"]  # the neighbour not in the list
    np.testing.assert_allclose(deblended, R50_2PIX, rtol=0.05)
    assert blended[0] > 2 * R50_2PIX


def test_real_stamps_split_flip_and_measure():
    stamps = cut_field(CUTOUT, 96, 0.1)
    assert stamps.pixels.shape[1:] == (49, 49) and stamp_size_pix(96, 0.1, 0.206) == 49  # odd: the source on the centre
    fit, held = region_split(stamps, 320)
    assert fit.sum() == 27 and held.sum() == 8 and not (fit & held).any()
    assert stamps.x_pix[held].min() - stamps.x_pix[fit].max() > 49  # no stamp pixel shared across the split
    for k in range(8):
        once = dihedral(stamps.pixels, k)
        assert once.shape == stamps.pixels.shape and np.array_equal(once[:, 24, 24], stamps.pixels[:, 24, 24], equal_nan=True)
    assert np.array_equal(dihedral(dihedral(stamps.pixels, 1), 3), stamps.pixels, equal_nan=True)
    m = measure_stamps(stamps, 30.0)
    ok = np.isfinite(m["mag_aper"])
    assert ok.sum() >= len(stamps) - 5
    # brighter in the aperture -> larger peak S/N, on real sources
    assert np.corrcoef(m["mag_aper"][ok], np.log(stamps.peak_snr[ok]))[0, 1] < -0.8
