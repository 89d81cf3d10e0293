"""The image model's data: stamps cut from a real field, properties measured on them, a region split.

No redshifts exist for the mpdaf fields, so an image modality's scalar companions are properties
measured on the stamps themselves, on the native pixels (background subtracted by the stamp cutter,
then the local sky: the median of the pixels beyond ``MEASURE_RADIUS_ARCSEC`` within 3 sky sigma):

- ``mag_aper``: ``zero_point - 2.5 log10(F)``, F the flux within ``APERTURE_RADIUS_ARCSEC`` of the
  source centroid (NaN when the aperture crosses the field edge or F <= 0). The CFHT zero-point is
  nominal, so magnitudes are relative;
- ``flux_radius_arcsec``: the radius enclosing half the flux within ``MEASURE_RADIUS_ARCSEC``
  (curve of growth, a pixel counted within radius R by the fraction R - r + 1/2 of its width,
  clipped to 0..1; within a few % of sigma sqrt(2 ln 2) for noiseless Gaussians);
- ``ellipticity``: ``1 - b/a`` from the flux-weighted second moments of the pixels above 2 sky sigma
  within ``MEASURE_RADIUS_ARCSEC`` (NaN with fewer than ``MIN_PIXELS``).

The last two use only the pixels nearer to this source's centroid than to any other detected source
(a Voronoi deblend), so a neighbour does not inflate the size. Held-out stamps come from a disjoint
region of the field (``region_split``): no held-out pixel is in any training stamp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.tokenizers.stamps import StampConfig, Stamps, cut_stamps, read_field

DATA_DIR = Path("/work/shared/data/mpdaf")
CFHT_A370 = DATA_DIR / "a370II.fits"  # CFHT I band, Abell 370, 0.206"/pix, ~660 sources
HST_A478 = DATA_DIR / "a478hst-cutout.fits"  # HST F814W, Abell 478 (HDU 1): extra tokenizer training stamps
IMAGE_SCALARS = ("mag_aper", "flux_radius", "ellipticity")  # rows of engine.modalities.SCALARS
APERTURE_RADIUS_ARCSEC = 1.0
MEASURE_RADIUS_ARCSEC = 3.0
MIN_PIXELS = 5
SPLIT_FRAC = 0.55  # training stamps: centroid x < SPLIT_FRAC * width; held out: beyond it by one stamp side


def stamp_size_pix(crop_size: int, crop_scale_arcsec: float, native_scale_arcsec: float) -> int:
    """Odd native stamp side covering the tokenizer's crop: the source sits on the centre pixel, so the
    eight flips/rotations of a stamp keep it there."""
    size = int(np.ceil(crop_size * crop_scale_arcsec / native_scale_arcsec)) + 2
    return size + 1 - size % 2


def cut_field(path: str | Path, crop_size: int, crop_scale_arcsec: float, hdu: int = 0) -> Stamps:
    """Every detected source of a FITS image as an odd-sized, background-subtracted stamp (brightest first)."""
    field = read_field(path, hdu)
    return cut_stamps(field, StampConfig(size_pix=stamp_size_pix(crop_size, crop_scale_arcsec, field.pixel_scale_arcsec)))


def _own_pixels(stamps: Stamps, field_x: np.ndarray, field_y: np.ndarray) -> np.ndarray:
    """(N, S, S) True where a stamp pixel is nearer to its source than to any other source at (field_x, field_y)."""
    n, s, _ = stamps.pixels.shape
    half = s // 2
    off = np.arange(s) - half
    own = np.ones((n, s, s), bool)
    for i in range(n):
        yi, xi = np.round(stamps.y_pix[i]), np.round(stamps.x_pix[i])
        py, px = (yi + off)[:, None], (xi + off)[None, :]  # field coordinates of the stamp pixels
        d_self = (py - stamps.y_pix[i]) ** 2 + (px - stamps.x_pix[i]) ** 2
        near = np.flatnonzero((np.abs(field_x - xi) < s) & (np.abs(field_y - yi) < s)
                              & ((field_x != stamps.x_pix[i]) | (field_y != stamps.y_pix[i])))
        for j in near:
            own[i] &= d_self <= (py - field_y[j]) ** 2 + (px - field_x[j]) ** 2
    return own


def measure_stamps(stamps: Stamps, zero_point_ab: float) -> dict[str, np.ndarray]:
    """Aperture magnitude, half-light radius (arcsec) and ellipticity of each stamp's central source (see module doc)."""
    p = stamps.pixels.astype(np.float64)  # (N, S, S)
    n, s, _ = p.shape
    off = np.arange(s) - s // 2
    dy = stamps.y_pix - np.round(stamps.y_pix)  # centroid offset from the centre pixel
    dx = stamps.x_pix - np.round(stamps.x_pix)
    ry = off[None, :, None] - dy[:, None, None]  # (N, S, 1)
    rx = off[None, None, :] - dx[:, None, None]  # (N, 1, S)
    r = np.hypot(ry, rx) * stamps.pixel_scale_arcsec  # (N, S, S)
    finite = np.isfinite(p)
    sky_pix = (finite & (r > MEASURE_RADIUS_ARCSEC) & (np.abs(p) < 3.0 * stamps.noise)).reshape(n, -1)
    sky = np.array([np.median(row[k]) if k.any() else 0.0 for row, k in zip(p.reshape(n, -1), sky_pix)])
    p = p - sky[:, None, None]  # what the field's global background left
    flux = np.where(finite, p, 0.0)

    ap = r <= APERTURE_RADIUS_ARCSEC
    f_ap = (flux * ap).sum((1, 2))
    ok = (finite | ~ap).all((1, 2)) & (f_ap > 0)
    mag = np.where(ok, zero_point_ab - 2.5 * np.log10(np.where(ok, f_ap, 1.0)), np.nan)

    region = _own_pixels(stamps, stamps.x_pix, stamps.y_pix) & (r <= MEASURE_RADIUS_ARCSEC) & finite
    w = np.where(region, flux, 0.0)
    total = w.sum((1, 2))
    lo, hi = np.zeros(n), np.full(n, MEASURE_RADIUS_ARCSEC)
    for _ in range(30):  # bisection on the radius enclosing half of ``total``
        mid = 0.5 * (lo + hi)
        inside = np.clip((mid[:, None, None] - r) / stamps.pixel_scale_arcsec + 0.5, 0.0, 1.0)  # pixel fraction within mid
        low = (w * inside).sum((1, 2)) < 0.5 * total
        lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
    r50 = np.where(total > 0, 0.5 * (lo + hi), np.nan)

    bright = region & (p > 2.0 * stamps.noise)
    wt = np.where(bright, flux, 0.0)
    m0 = wt.sum((1, 2))
    safe = np.where(m0 > 0, m0, 1.0)
    my, mx = (wt * ry).sum((1, 2)) / safe, (wt * rx).sum((1, 2)) / safe
    yy = (wt * (ry - my[:, None, None]) ** 2).sum((1, 2)) / safe
    xx = (wt * (rx - mx[:, None, None]) ** 2).sum((1, 2)) / safe
    xy = (wt * (ry - my[:, None, None]) * (rx - mx[:, None, None])).sum((1, 2)) / safe
    root = np.sqrt(((xx - yy) / 2) ** 2 + xy**2)
    l1, l2 = (xx + yy) / 2 + root, np.maximum((xx + yy) / 2 - root, 0.0)
    enough = bright.sum((1, 2)) >= MIN_PIXELS
    ell = np.where(enough & (l1 > 0), 1.0 - np.sqrt(l2 / np.where(l1 > 0, l1, 1.0)), np.nan)
    return {"mag_aper": mag, "flux_radius_arcsec": r50, "ellipticity": ell}


def region_split(stamps: Stamps, width_pix: int, frac: float = SPLIT_FRAC) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held) bool masks: fit stamps left of ``frac * width``; held-out ones right of it by a whole stamp side."""
    side = stamps.pixels.shape[-1]
    return stamps.x_pix < frac * width_pix, stamps.x_pix > frac * width_pix + side


def dihedral(pixels: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations (k = 0..7) of (..., S, S) stamps about their centre pixel."""
    out = np.rot90(pixels, k % 4, axes=(-2, -1))
    return np.ascontiguousarray(np.flip(out, axis=-1) if k >= 4 else out)
