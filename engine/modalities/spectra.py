"""Typed, validated containers for spectra and ragged sequences (Gaia XP coefficients, light curves).

Each container names its own token stream (``token_key``), e.g. ``tok_spec_manga``, ``tok_xp_bp``,
``tok_lc_ztf_g``: one modality per survey/band, as in AION. Arrays are converted to float64 (ids to
int64) and frozen (read-only) on construction; every invalid input raises :class:`ModalityError`
naming the field, what was expected and what was found.

Bad pixels are *data*, not errors: non-finite flux, ``ivar == 0`` or ``mask == True`` mark a pixel
as unusable. A spectrum whose pixels are all bad is accepted; tokenizers flag such rows as invalid
(``valid == False``) instead of failing the whole batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModalityError

_NAME_RE = re.compile(r"^[a-z0-9_]+$")
XP_BANDS = ("bp", "rp")


def _name(owner: str, field: str, value) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ModalityError(f"{owner}.{field}: expected a lower-case name like 'manga' or 'ztf_g', got {value!r}")
    return value


def _array(owner: str, field: str, value, ndim: int, dtype=np.float64) -> np.ndarray:
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise ModalityError(f"{owner}.{field}: expected a numeric array, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ModalityError(f"{owner}.{field}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ModalityError(f"{owner}.{field}: expected {ndim} dimension(s), got shape {arr.shape}")
    arr = np.array(arr, dtype=dtype)  # private copy, then frozen
    arr.setflags(write=False)
    return arr


def _set(obj, field: str, value) -> None:
    object.__setattr__(obj, field, value)


def _check_wavelength(owner: str, wave: np.ndarray) -> None:
    if len(wave) < 2 or not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise ModalityError(f"{owner}.wavelength_aa: expected >= 2 finite positive values (Angstrom), got {wave[:5]}...")
    steps = np.diff(wave)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        raise ModalityError(
            f"{owner}.wavelength_aa: expected strictly increasing values, got {wave[i]} then {wave[i + 1]} at index {i}"
        )


def _check_ivar(owner: str, ivar: np.ndarray) -> None:
    if np.any(ivar < 0):  # NaN compares False: a NaN ivar is a bad pixel, not an error
        raise ModalityError(f"{owner}.ivar: expected values >= 0 (0 marks a bad pixel), got min {np.nanmin(ivar)}")


@dataclass(frozen=True)
class SpectrumBatch:
    """N spectra of one survey sampled on one shared wavelength grid (the usual layout of a survey file)."""

    survey: str
    wavelength_aa: np.ndarray  # (L,) strictly increasing, observed frame
    flux: np.ndarray  # (N, L)
    ivar: np.ndarray  # (N, L), >= 0
    mask: np.ndarray | None = None  # (N, L) bool, True = bad pixel
    redshift: np.ndarray | None = None  # (N,), needed for rest-frame tokenization
    object_id: np.ndarray | None = None  # (N,) int64; defaults to 0..N-1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _name(owner, "survey", self.survey)
        _set(self, "wavelength_aa", _array(owner, "wavelength_aa", self.wavelength_aa, 1))
        _check_wavelength(owner, self.wavelength_aa)
        flux = _array(owner, "flux", self.flux, 2)
        ivar = _array(owner, "ivar", self.ivar, 2)
        if flux.shape[1] != len(self.wavelength_aa):
            raise ModalityError(f"{owner}.flux: expected {len(self.wavelength_aa)} pixels per row (wavelength_aa), got shape {flux.shape}")
        if ivar.shape != flux.shape:
            raise ModalityError(f"{owner}.ivar: expected the shape of flux {flux.shape}, got {ivar.shape}")
        _check_ivar(owner, ivar)
        _set(self, "flux", flux)
        _set(self, "ivar", ivar)
        if self.mask is not None:
            mask = _array(owner, "mask", self.mask, 2, dtype=bool)
            if mask.shape != flux.shape:
                raise ModalityError(f"{owner}.mask: expected the shape of flux {flux.shape}, got {mask.shape}")
            _set(self, "mask", mask)
        n = flux.shape[0]
        if self.redshift is not None:
            z = _array(owner, "redshift", self.redshift, 1)
            if len(z) != n or not np.all(np.isfinite(z)) or np.any(z <= -1):
                raise ModalityError(f"{owner}.redshift: expected {n} finite values > -1, got {z[:5]} (length {len(z)})")
            _set(self, "redshift", z)
        ids = np.arange(n) if self.object_id is None else self.object_id
        ids = _array(owner, "object_id", ids, 1, dtype=np.int64)
        if len(ids) != n:
            raise ModalityError(f"{owner}.object_id: expected {n} ids, got {len(ids)}")
        _set(self, "object_id", ids)

    @property
    def token_key(self) -> str:
        return f"tok_spec_{self.survey}"

    @property
    def n_rows(self) -> int:
        return self.flux.shape[0]

    def bad_pixels(self) -> np.ndarray:
        """(N, L) bool: non-finite flux or ivar, ivar == 0, or masked."""
        bad = ~np.isfinite(self.flux) | ~np.isfinite(self.ivar) | (self.ivar <= 0)
        return bad if self.mask is None else bad | self.mask

    def row(self, i: int) -> "Spectrum":
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        return Spectrum(self.survey, self.wavelength_aa, self.flux[i], self.ivar[i], pick(self.mask),
                        None if self.redshift is None else float(self.redshift[i]), int(self.object_id[i]))


@dataclass(frozen=True)
class Spectrum:
    """One spectrum; ``to_batch()`` gives the (1, L) batch that tokenizers take."""

    survey: str
    wavelength_aa: np.ndarray  # (L,)
    flux: np.ndarray  # (L,)
    ivar: np.ndarray  # (L,)
    mask: np.ndarray | None = None
    redshift: float | None = None
    object_id: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for field in ("wavelength_aa", "flux", "ivar"):
            _set(self, field, _array(owner, field, getattr(self, field), 1))
        if self.mask is not None:
            _set(self, "mask", _array(owner, "mask", self.mask, 1, dtype=bool))
        for field in ("flux", "ivar", "mask"):
            arr = getattr(self, field)
            if arr is not None and len(arr) != len(self.wavelength_aa):
                raise ModalityError(
                    f"{owner}.{field}: expected {len(self.wavelength_aa)} values (one per wavelength), got {len(arr)}"
                )
        self.to_batch()  # the batch validates the rest (survey, monotonic wavelength, ivar >= 0, redshift)

    @property
    def token_key(self) -> str:
        return f"tok_spec_{self.survey}"

    def to_batch(self) -> SpectrumBatch:
        return SpectrumBatch(
            self.survey, self.wavelength_aa, self.flux[None], self.ivar[None],
            None if self.mask is None else self.mask[None],
            None if self.redshift is None else np.array([self.redshift]), np.array([self.object_id]),
        )


def _check_indptr(owner: str, indptr, n_values: int) -> np.ndarray:
    indptr = _array(owner, "indptr", indptr, 1, dtype=np.int64)
    if len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != n_values or np.any(np.diff(indptr) < 0):
        raise ModalityError(
            f"{owner}.indptr: expected non-decreasing offsets from 0 to {n_values} (n_rows + 1 entries), "
            f"got {indptr[:3]}...{indptr[-3:]} (length {len(indptr)})"
        )
    return indptr


def _row_ids(owner: str, ids, n_rows: int) -> np.ndarray:
    ids = _array(owner, "object_id", np.arange(n_rows) if ids is None else ids, 1, dtype=np.int64)
    if len(ids) != n_rows:
        raise ModalityError(f"{owner}.object_id: expected {n_rows} ids (one per row), got {len(ids)}")
    return ids


@dataclass(frozen=True)
class XPCoefficients:
    """Gaia XP continuous-spectrum coefficients of one band ('bp' or 'rp'), ragged: row i is
    ``coefficients[indptr[i]:indptr[i+1]]`` (coefficient index = position in the row)."""

    band: str
    coefficients: np.ndarray  # (total,)
    indptr: np.ndarray  # (n_rows + 1,) int64
    object_id: np.ndarray | None = None  # (n_rows,) int64; defaults to 0..n_rows-1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.band not in XP_BANDS:
            raise ModalityError(f"{owner}.band: expected one of {XP_BANDS}, got {self.band!r}")
        _set(self, "coefficients", _array(owner, "coefficients", self.coefficients, 1))
        _set(self, "indptr", _check_indptr(owner, self.indptr, len(self.coefficients)))
        _set(self, "object_id", _row_ids(owner, self.object_id, len(self.indptr) - 1))

    @property
    def token_key(self) -> str:
        return f"tok_xp_{self.band}"

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (one per element)."""
        return np.diff(self.indptr)

    @property
    def n_tokens(self) -> int:
        return int(self.indptr[-1])


@dataclass(frozen=True)
class LightCurves:
    """Light curves of one survey band (e.g. 'ztf_g'), ragged: row i is ``[indptr[i]:indptr[i+1]]`` of
    ``time_mjd``/``mag``/``mag_err``; time is non-decreasing within a row."""

    band: str
    time_mjd: np.ndarray  # (total,)
    mag: np.ndarray  # (total,)
    mag_err: np.ndarray  # (total,), >= 0
    indptr: np.ndarray  # (n_rows + 1,) int64
    object_id: np.ndarray | None = None  # (n_rows,) int64; defaults to 0..n_rows-1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _name(owner, "band", self.band)
        for field in ("time_mjd", "mag", "mag_err"):
            _set(self, field, _array(owner, field, getattr(self, field), 1))
        n = len(self.time_mjd)
        for field in ("mag", "mag_err"):
            if len(getattr(self, field)) != n:
                raise ModalityError(f"{owner}.{field}: expected {n} values (one per time_mjd), got {len(getattr(self, field))}")
        if not np.all(np.isfinite(self.time_mjd)):
            raise ModalityError(f"{owner}.time_mjd: expected finite times, got {np.sum(~np.isfinite(self.time_mjd))} non-finite")
        if np.any(self.mag_err < 0):
            raise ModalityError(f"{owner}.mag_err: expected values >= 0, got min {np.nanmin(self.mag_err)}")
        _set(self, "indptr", _check_indptr(owner, self.indptr, n))
        _set(self, "object_id", _row_ids(owner, self.object_id, len(self.indptr) - 1))
        step = np.diff(self.time_mjd)
        within_row = np.ones(max(n - 1, 0), dtype=bool)
        within_row[self.indptr[1:-1][(self.indptr[1:-1] > 0) & (self.indptr[1:-1] < n)] - 1] = False
        if np.any((step < 0) & within_row):
            i = int(np.argmax((step < 0) & within_row))
            raise ModalityError(
                f"{owner}.time_mjd: expected non-decreasing times within each row, got {self.time_mjd[i]} then "
                f"{self.time_mjd[i + 1]} at flat index {i}"
            )

    @property
    def token_key(self) -> str:
        return f"tok_lc_{self.band}"

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (one per element)."""
        return np.diff(self.indptr)

    @property
    def n_tokens(self) -> int:
        return int(self.indptr[-1])


# ---- readers for the survey files we have (FITS) -----------------------------------------------
def read_manga(path: str | Path, survey: str = "manga") -> SpectrumBatch:
    """MaNGA DAP test file: HDUs WAVE (L,), FLUX/IVAR/MASK (N, L), Z (N,). MASK != 0 is bad."""
    from astropy.io import fits

    with fits.open(path) as h:
        return SpectrumBatch(survey, h["WAVE"].data, h["FLUX"].data, h["IVAR"].data,
                             h["MASK"].data != 0, h["Z"].data)


def read_miles(paths: list[str | Path], snr_per_pixel: float = 100.0, survey: str = "miles") -> SpectrumBatch:
    """MILES stellar spectra (one FITS image each; linear grid CRVAL1 + CDELT1 * i, rest frame).

    MILES ships no error array: ivar is set from an assumed constant ``snr_per_pixel`` relative to
    each spectrum's median flux (σ = median / snr). object_id is the MILES star number (m0001V -> 1).
    """
    from astropy.io import fits

    fluxes, ids, wave = [], [], None
    for p in paths:
        with fits.open(p) as h:
            hdr, data = h[0].header, np.asarray(h[0].data, dtype=np.float64)
        w = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(len(data)) - (hdr.get("CRPIX1", 1) - 1))
        if wave is None:
            wave = w
        elif len(w) != len(wave) or not np.allclose(w, wave):
            raise ModalityError(f"{p}: expected the MILES grid of the first file ({len(wave)} px from {wave[0]}), got {len(w)} px from {w[0]}")
        fluxes.append(data)
        m = re.search(r"m(\d+)V", Path(p).name)
        ids.append(int(m.group(1)) if m else len(ids))
    flux = np.stack(fluxes)
    sigma = np.abs(np.median(flux, axis=1, keepdims=True)) / snr_per_pixel
    ivar = np.where(sigma > 0, 1.0 / np.maximum(sigma, 1e-300) ** 2, 0.0) * np.ones_like(flux)
    return SpectrumBatch(survey, wave, flux, ivar, redshift=np.zeros(len(flux)), object_id=np.array(ids))
