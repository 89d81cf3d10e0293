"""Cut postage stamps around sources detected in a FITS image (deterministic, vectorised).

Pipeline: sigma-clipped background and noise -> Gaussian-smoothed detection image ->
local maxima above ``detect_sigma`` with enough connected-looking area -> flux-weighted centroid ->
stamps of ``size_pix`` centred on the rounded centroid, padded with NaN beyond the image edge
(or skipped, by config) -> per-stamp metadata (x, y, ra/dec from the WCS, peak S/N, file, scale).
Saturated pixels (at or above the field's saturation level, from the FITS header's ``SATURATE`` or
``MAXLIN`` by default) are NaN in the stamps, i.e. masked: their flux is unknown, so no codec is
trained or scored on them. Detection and centroids still use them, so the set of stamps does not change.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from engine.errors import CatalogError, ConfigError, ModalityError

log = logging.getLogger(__name__)
EDGE_MODES = ("pad", "skip")
SATURATION_KEYS = ("SATURATE", "MAXLIN")  # header keywords holding the saturation / linearity limit, first found wins


@dataclass(frozen=True)
class StampConfig:
    size_pix: int = 64  # stamp side in native pixels
    detect_sigma: float = 5.0  # peak of the smoothed image, in units of its noise
    smooth_fwhm_pix: float = 2.0  # Gaussian detection filter
    min_area_pix: int = 5  # pixels above 2*detect_sigma/3 in the 7x7 box around the peak
    min_separation_pix: int = 4  # local-maximum radius (deblending scale)
    centroid_radius_pix: int = 3  # half side of the centroid box
    edge: str = "pad"  # "pad" with NaN or "skip" stamps that cross the edge
    max_sources: int = 10_000
    clip_sigma: float = 3.0

    def __post_init__(self) -> None:
        checks = {
            "size_pix": (self.size_pix >= 4, ">= 4"),
            "detect_sigma": (self.detect_sigma > 0, "> 0"),
            "smooth_fwhm_pix": (self.smooth_fwhm_pix >= 0, ">= 0"),
            "min_area_pix": (1 <= self.min_area_pix <= 49, "1..49"),
            "min_separation_pix": (self.min_separation_pix >= 1, ">= 1"),
            "centroid_radius_pix": (self.centroid_radius_pix >= 1, ">= 1"),
            "edge": (self.edge in EDGE_MODES, f"one of {EDGE_MODES}"),
            "max_sources": (self.max_sources >= 1, ">= 1"),
            "clip_sigma": (self.clip_sigma > 0, "> 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"StampConfig.{name}={getattr(self, name)!r}; expected {allowed}")


@dataclass(frozen=True)
class Field:
    """One image plane with its WCS (or None) and pixel scale."""

    data: np.ndarray  # (H, W) float64
    pixel_scale_arcsec: float
    wcs: WCS | None
    source_file: str
    saturation: float | None = None  # pixels >= this (data units, before background subtraction) are masked in stamps


@dataclass(frozen=True)
class Stamps:
    pixels: np.ndarray  # (N, S, S) float32, background subtracted, NaN outside the image
    x_pix: np.ndarray  # (N,) flux-weighted centroid, 0-based column
    y_pix: np.ndarray  # (N,) 0-based row
    ra_deg: np.ndarray  # (N,) NaN without WCS
    dec_deg: np.ndarray
    peak_snr: np.ndarray  # (N,) background-subtracted peak pixel / sky sigma
    background: float
    noise: float  # sky sigma per native pixel
    pixel_scale_arcsec: float
    source_file: str
    n_saturated: np.ndarray | None = None  # (N,) saturated (masked) pixels per stamp

    def __len__(self) -> int:
        return len(self.x_pix)

    def take(self, idx: np.ndarray) -> "Stamps":
        pick = lambda a: a[idx]  # noqa: E731
        return Stamps(pick(self.pixels), pick(self.x_pix), pick(self.y_pix), pick(self.ra_deg), pick(self.dec_deg),
                      pick(self.peak_snr), self.background, self.noise, self.pixel_scale_arcsec, self.source_file,
                      None if self.n_saturated is None else pick(self.n_saturated))


def read_field(path: str | Path, hdu: int | str = 0, saturation: float | str | None = "header") -> Field:
    """Read one 2-D image plane; the pixel scale comes from the WCS.

    ``saturation``: the level at and above which pixels are saturated (masked in stamps): "header" takes the
    first of SATURATION_KEYS the header has (none: no level), a number is the level itself, None: no masking.
    """
    path = Path(path)
    try:
        with fits.open(path) as hdul:
            data = np.asarray(hdul[hdu].data, dtype=np.float64)
            header = hdul[hdu].header
    except (OSError, KeyError, IndexError) as exc:
        raise CatalogError(f"{path}: cannot read image HDU {hdu!r} ({exc})") from exc
    if data.ndim != 2:
        raise ModalityError(f"{path}[{hdu}]: expected a 2-D image; got shape {data.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header).celestial
    if not wcs.has_celestial:
        raise ModalityError(f"{path}[{hdu}]: expected a celestial WCS to know the pixel scale; got none")
    scale = float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
    if isinstance(saturation, str):
        if saturation != "header":
            raise ConfigError(f"read_field: saturation={saturation!r}; expected 'header', a number or None")
        saturation = next((float(header[k]) for k in SATURATION_KEYS if k in header), None)
    if saturation is not None and not np.isfinite(saturation):
        raise ModalityError(f"{path}[{hdu}]: expected a finite saturation level; got {saturation}")
    return Field(data, scale, wcs, str(path), saturation)


def estimate_background(data: np.ndarray, clip_sigma: float = 3.0) -> tuple[float, float]:
    """Sigma-clipped (median, std) of the finite pixels."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        raise ModalityError("estimate_background: expected finite pixels; got none")
    _, median, std = sigma_clipped_stats(finite, sigma=clip_sigma, maxiters=10)
    if not std > 0:
        raise ModalityError(f"estimate_background: expected a positive sky sigma; got {std}")
    return float(median), float(std)


def gaussian_smooth(data: np.ndarray, fwhm_pix: float) -> np.ndarray:
    """Separable Gaussian convolution (zero padding), NaN treated as 0."""
    data = np.nan_to_num(data, nan=0.0)
    if fwhm_pix == 0:
        return data
    sigma = fwhm_pix / 2.3548
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(data, r)
    win = np.lib.stride_tricks.sliding_window_view
    rows = (win(padded, 2 * r + 1, axis=1) @ k)  # (H+2r, W)
    return win(rows, 2 * r + 1, axis=0) @ k  # (H, W)


def _max_filter(data: np.ndarray, radius: int) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view
    padded = np.pad(data, radius, constant_values=-np.inf)
    rows = win(padded, 2 * radius + 1, axis=1).max(-1)
    return win(rows, 2 * radius + 1, axis=0).max(-1)


def _box_sum(data: np.ndarray, radius: int) -> np.ndarray:
    c = np.pad(data.astype(np.float64), ((radius + 1, radius), (radius + 1, radius))).cumsum(0).cumsum(1)
    k = 2 * radius + 1
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def _gather(data: np.ndarray, yc: np.ndarray, xc: np.ndarray, half: int, size: int) -> np.ndarray:
    """(N, size, size) patches whose pixel [half, half] is (yc, xc); NaN outside the image."""
    off = np.arange(size) - half
    yy = yc[:, None, None] + off[None, :, None]
    xx = xc[:, None, None] + off[None, None, :]
    h, w = data.shape
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    out = data[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    return np.where(inside, out, np.nan)


def detect_sources(data: np.ndarray, noise: float, cfg: StampConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks (y, x) of the smoothed, background-subtracted image and their smoothed S/N, brightest first."""
    smooth = gaussian_smooth(data, cfg.smooth_fwhm_pix)
    _, smooth_noise = estimate_background(smooth[np.isfinite(data)], cfg.clip_sigma)
    snr = smooth / smooth_noise
    snr[~np.isfinite(data)] = -np.inf
    is_peak = (snr >= _max_filter(snr, cfg.min_separation_pix)) & (snr > cfg.detect_sigma)
    area = _box_sum(snr > 2 * cfg.detect_sigma / 3, 3)
    is_peak &= area >= cfg.min_area_pix
    y, x = np.nonzero(is_peak)
    s = snr[y, x]
    order = np.lexsort((x, y, -s))[: cfg.max_sources]  # brightest first, ties by position
    return y[order], x[order], s[order]


def centroids(data: np.ndarray, y: np.ndarray, x: np.ndarray, radius: int, iters: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Flux-weighted centroid (positive pixels) in a (2r+1)^2 box, re-centred ``iters`` times."""
    yc, xc = y.astype(np.float64), x.astype(np.float64)
    off = np.arange(-radius, radius + 1, dtype=np.float64)
    for _ in range(iters):
        yi, xi = np.round(yc).astype(np.int64), np.round(xc).astype(np.int64)
        patch = np.nan_to_num(_gather(data, yi, xi, radius, 2 * radius + 1), nan=0.0).clip(min=0)
        tot = patch.sum((1, 2))
        ok = tot > 0
        dy = (patch.sum(2) @ off) / np.where(ok, tot, 1)
        dx = (patch.sum(1) @ off) / np.where(ok, tot, 1)
        step_ok = ok & (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
        yc = np.where(step_ok, yi + dy, yc)
        xc = np.where(step_ok, xi + dx, xc)
    return yc, xc


def cut_stamps(field: Field, cfg: StampConfig = StampConfig()) -> Stamps:
    """Detect sources in ``field`` and cut one background-subtracted stamp per source."""
    background, noise = estimate_background(field.data, cfg.clip_sigma)
    sub = field.data - background
    y, x, _ = detect_sources(sub, noise, cfg)
    yc, xc = centroids(sub, y, x, cfg.centroid_radius_pix)
    yi, xi = np.round(yc).astype(np.int64), np.round(xc).astype(np.int64)
    half = cfg.size_pix // 2
    if cfg.edge == "skip":
        h, w = sub.shape
        keep = (yi - half >= 0) & (xi - half >= 0) & (yi - half + cfg.size_pix <= h) & (xi - half + cfg.size_pix <= w)
        n_drop = int((~keep).sum())
        y, x, yc, xc, yi, xi = (a[keep] for a in (y, x, yc, xc, yi, xi))
        if n_drop:
            log.info("%s: %d source(s) dropped, stamp crosses the image edge", field.source_file, n_drop)
    pixels = _gather(sub, yi, xi, half, cfg.size_pix)
    saturated = np.zeros(pixels.shape, bool)
    if field.saturation is not None:
        with np.errstate(invalid="ignore"):
            saturated = pixels >= field.saturation - background
    pixels = np.where(saturated, np.nan, pixels).astype(np.float32)
    peak_snr = np.nan_to_num(_gather(sub, y, x, 0, 1)[:, 0, 0]) / noise
    if field.wcs is not None and len(xc):
        ra, dec = field.wcs.pixel_to_world_values(xc, yc)
    else:
        ra = dec = np.full(len(xc), np.nan)
    n_saturated = saturated.sum((1, 2))
    log.info("%s: %d stamps of %d px (sky %.4g +- %.4g; %d with saturated pixels masked)", field.source_file, len(xc),
             cfg.size_pix, background, noise, int((n_saturated > 0).sum()))
    return Stamps(pixels, xc, yc, np.asarray(ra, np.float64), np.asarray(dec, np.float64), peak_snr,
                  background, noise, field.pixel_scale_arcsec, field.source_file, n_saturated)


def first_image_hdu(path: str | Path) -> int:
    """Index of the first HDU holding a 2-D image."""
    try:
        with fits.open(path) as hdul:
            for i, h in enumerate(hdul):
                if h.data is not None and np.ndim(h.data) == 2:
                    return i
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read FITS ({exc})") from exc
    raise ModalityError(f"{path}: expected an HDU with a 2-D image; got none")


def stamp_images(field: Field, bands: tuple[str, ...], crop_size: int, pixel_scale_arcsec: float,
                 cfg: StampConfig = StampConfig()) -> tuple[Stamps, list]:
    """Cut stamps (even side) large enough to cover ``crop_size`` pixels of ``pixel_scale_arcsec`` after
    resampling, and wrap each as a single-band :class:`engine.modalities.images.Image` of ``bands``."""
    from dataclasses import replace

    from engine.modalities.images import Image

    if len(bands) != 1:
        raise ModalityError(f"stamp_images: a field is one image plane; expected 1 band, got {bands}")
    size = int(np.ceil(crop_size * pixel_scale_arcsec / field.pixel_scale_arcsec)) + 2
    stamps = cut_stamps(field, replace(cfg, size_pix=size + size % 2))
    return stamps, [Image(p[None].astype(np.float64), bands, stamps.pixel_scale_arcsec) for p in stamps.pixels]
