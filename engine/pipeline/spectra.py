"""Spectrum columns of a catalogue -> a token modality's tokens, vectorised over the rows that share a grid.

Catalogue layout (one spectrum per row, as survey releases ship them):

- ``flux`` and ``ivar``: list<float> or fixed_size_list<float> columns, one value per pixel;
- ``wavelength_aa``: the pixel wavelengths (Angstrom, observed frame) of the same row, a list column:
  SDSS spec-lite files carry ``loglam`` per spectrum and DESI one grid per arm; a shared grid
  repeated on every row costs little in Parquet (compressed), and rows with different grids simply
  form different groups here;
- ``redshift`` (optional; needed by rest-frame tokenizers of galaxies): a scalar column. Without it
  the spectra are taken at z = 0 (stellar libraries such as MILES are rest frame).

Column names default to the token modality's ``SPECTRUM_FIELDS`` and are remapped with
``--columns <modality>.<field>=<column>`` (e.g. ``tok_spec_miles.flux=FLUX``).

A row without a spectrum (null flux), with only bad pixels (all NaN, all ivar = 0) or with a broken
spectrum (flux/ivar/wavelength of different lengths; a wavelength that is not finite, positive and
strictly increasing) gets the modality's missing tokens; the two broken cases also set their own
flag bit (``SPECTRUM_FLAGS``) so the table counts them by reason. Nothing here fails the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import ConfigError
from engine.modalities.spectra import SpectrumBatch

log = logging.getLogger(__name__)

SPECTRUM_FIELDS = ("flux", "ivar", "wavelength_aa", "redshift")  # redshift is optional
BAD_LENGTHS = 1 << 17  # flags bit: flux, ivar and wavelength of a row have different lengths
BAD_WAVELENGTH = 1 << 18  # flags bit: a row's wavelength is not finite, positive and strictly increasing
SPECTRUM_FLAGS = {"bad_spectrum_lengths": BAD_LENGTHS, "bad_spectrum_wavelength": BAD_WAVELENGTH}


@dataclass(frozen=True)
class SpectrumColumns:
    """Catalogue columns of one spectrum token modality."""

    modality: str  # e.g. "tok_spec_miles"
    flux: str = "flux"
    ivar: str = "ivar"
    wavelength_aa: str = "wavelength_aa"
    redshift: str | None = None  # None: spectra at z = 0

    @property
    def fields(self) -> dict[str, str | None]:
        """Field -> catalogue column (redshift None when absent)."""
        return {f: getattr(self, f) for f in SPECTRUM_FIELDS}

    @property
    def required(self) -> list[str]:
        return [self.flux, self.ivar, self.wavelength_aa]

    @property
    def read(self) -> list[str]:
        return self.required + ([self.redshift] if self.redshift else [])


def spectrum_columns(modality: str, columns: dict[str, str]) -> SpectrumColumns:
    """The columns of ``modality``, with ``--columns <modality>.<field>=<column>`` overrides applied."""
    prefix = f"{modality}."
    over = {k[len(prefix):]: v for k, v in columns.items() if k.startswith(prefix)}
    unknown = sorted(set(over) - set(SPECTRUM_FIELDS))
    if unknown:
        raise ConfigError(f"--columns {[prefix + u for u in unknown]}: unknown spectrum field(s); expected "
                          f"{[prefix + f for f in SPECTRUM_FIELDS]}")
    return SpectrumColumns(modality, **over)


def check_spectrum_field(schema: pa.Schema, column: str, role: str) -> str | None:
    """Why ``column`` cannot hold spectra (missing, not a list of numbers), or None."""
    if column not in schema.names:
        return f"required column {column!r} ({role}) is missing; the file has {schema.names}"
    typ = schema.field(column).type
    list_types = (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ))
    if not (list_types and (pa.types.is_floating(typ.value_type) or pa.types.is_integer(typ.value_type))):
        return f"column {column!r} ({role}) has type {typ}; expected list<float> or fixed_size_list<float> (one value per pixel)"
    return None


def _ragged(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """List column -> flat values (float64), per-row lengths (N,) (0 for null rows) and null mask (N,)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr)
    null = lengths.is_null().to_numpy(zero_copy_only=False)
    n = lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return values, n, null


def _wavelength_ok(wave: np.ndarray) -> np.ndarray:
    """(G, L) -> (G,) bool: finite, positive, strictly increasing."""
    return np.isfinite(wave).all(axis=1) & (wave > 0).all(axis=1) & (np.diff(wave, axis=1) > 0).all(axis=1)


@dataclass(frozen=True)
class SpectrumRows:
    tokens: np.ndarray  # (N, n_tokens) int32; missing_token for rows without a usable spectrum
    missing: np.ndarray  # (N,) bool: no usable spectrum
    flags: np.ndarray  # (N,) int64: BAD_LENGTHS / BAD_WAVELENGTH bits


def tokenize_spectra(batch: pa.Table, cols: SpectrumColumns, tokenizer, survey: str) -> SpectrumRows:
    """A batch's spectra -> tokens; rows sharing a wavelength grid are tokenized together."""
    flux, n_flux, null_flux = _ragged(batch.column(cols.flux))
    ivar, n_ivar, null_ivar = _ragged(batch.column(cols.ivar))
    wave, n_wave, null_wave = _ragged(batch.column(cols.wavelength_aa))
    n = batch.num_rows
    z = np.zeros(n) if cols.redshift is None else batch.column(cols.redshift).cast(pa.float64()).to_numpy(zero_copy_only=False)
    flags = np.zeros(n, np.int64)
    present = ~(null_flux | null_ivar | null_wave) & (n_flux > 0)
    same = (n_flux == n_ivar) & (n_flux == n_wave)
    flags[present & ~same] |= BAD_LENGTHS
    ok = present & same & np.isfinite(z) & (z > -1)
    tokens = np.full((n, tokenizer.config.n_tokens), tokenizer.missing_token, np.int32)
    missing = np.ones(n, bool)
    starts = {"flux": np.cumsum(n_flux) - n_flux, "ivar": np.cumsum(n_ivar) - n_ivar, "wave": np.cumsum(n_wave) - n_wave}
    for length in np.unique(n_flux[ok]):
        rows = np.flatnonzero(ok & (n_flux == length))
        take = lambda values, key: values[starts[key][rows, None] + np.arange(length)]  # noqa: E731  (g, L)
        w = take(wave, "wave")
        good = _wavelength_ok(w)
        flags[rows[~good]] |= BAD_WAVELENGTH
        rows, w = rows[good], w[good]
        if not len(rows):
            continue
        f, iv = take(flux, "flux"), take(ivar, "ivar")
        iv = np.where(np.isfinite(iv) & (iv > 0), iv, 0.0)  # negative / NaN ivar: a bad pixel, not an error
        grids, grid_of = np.unique(w, axis=0, return_inverse=True)
        for g, grid in enumerate(grids):  # usually one: a survey's shared grid
            sel = np.flatnonzero(grid_of.reshape(-1) == g)
            spec = SpectrumBatch(survey, grid, f[sel], iv[sel], redshift=z[rows[sel]])
            enc = tokenizer.encode(spec)
            tokens[rows[sel]] = np.where(enc.valid[:, None], enc.tokens, tokenizer.missing_token)
            missing[rows[sel]] = ~enc.valid
    if flags.any():
        log.warning("%s: %d row(s) with flux/ivar/wavelength of different lengths, %d with a bad wavelength "
                    "grid; tokenized as missing and flagged", cols.modality, int(((flags & BAD_LENGTHS) != 0).sum()),
                    int(((flags & BAD_WAVELENGTH) != 0).sum()))
    return SpectrumRows(tokens, missing, flags)
