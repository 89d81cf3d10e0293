"""Cutout columns of a catalogue -> an image token modality's tokens, vectorised over the rows that share a shape.

Catalogue layout (one cutout per row and image modality, e.g. ``tok_image_cfht_i``):

- ``cutout`` (default column ``cutout_<survey>``, e.g. ``cutout_cfht_i``): the pixels in the survey's
  native flux unit, background subtracted, NaN (or null) for bad pixels, in one of these forms:
    * ``fixed_size_list<float>[C*S*S]`` or ``list<float>``: a square stamp flattened C-order from
      (bands, S, S), bands = the modality's band count (1 for ``cfht_i``);
    * nested lists ``list<list<float>>`` (H rows of W pixels, one band) or ``list<list<list<float>>>``
      (bands x H x W); H and W need not be equal;
    * ``fixed_shape_tensor`` (Arrow's tensor extension type) of shape (H, W) or (bands, H, W);
    * ``binary`` / ``large_binary``: the raw little-endian float32 pixels of a flat square stamp.
  The stamp is centred on the object: pixel (H // 2, W // 2) is its centre. Different rows may have
  different sizes; rows sharing a shape and pixel scale are tokenized together.
- ``pixel_scale_arcsec`` (optional; a float column): the row's native pixel scale. Without it every
  row has the survey's nominal scale (``engine.modalities.images.SURVEYS``, 0.206" for CFHT I).

Column names are remapped with ``--columns <modality>.<field>=<column>``
(``tok_image_cfht_i.cutout=STAMP tok_image_cfht_i.pixel_scale_arcsec=PIXSCALE``).

A null cutout gets the modality's missing tokens (the row keeps its other inputs). A cutout without
a finite pixel, with another band count than the modality's, of a shape that is not an image
(ragged nested lists, a flat length that is not bands x S x S, an empty list) or with a pixel scale
that is not finite and > 0 gets the missing tokens and its own flag bit (``IMAGE_FLAGS``). Nothing
here fails the job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("cutout", "pixel_scale_arcsec")  # pixel_scale_arcsec is optional
EMPTY_CUTOUT = 1 << 20  # flags bit: a cutout without a single finite pixel
BAD_BANDS = 1 << 21  # flags bit: a cutout with another band count than the modality's
BAD_SHAPE = 1 << 22  # flags bit: a cutout that is not a (bands, H, W) image
BAD_PIXEL_SCALE = 1 << 23  # flags bit: a pixel scale that is not finite and > 0
IMAGE_FLAGS = {"empty_cutout": EMPTY_CUTOUT, "bad_cutout_bands": BAD_BANDS, "bad_cutout_shape": BAD_SHAPE,
               "bad_cutout_pixel_scale": BAD_PIXEL_SCALE}


@dataclass(frozen=True)
class ImageColumns:
    """Catalogue columns of one image token modality."""

    modality: str  # e.g. "tok_image_cfht_i"
    cutout: str
    pixel_scale_arcsec: str | None = None  # None: the survey's nominal pixel scale

    @property
    def fields(self) -> dict[str, str | None]:
        return {f: getattr(self, f) for f in IMAGE_FIELDS}

    @property
    def read(self) -> list[str]:
        return [self.cutout] + ([self.pixel_scale_arcsec] if self.pixel_scale_arcsec else [])


def field_overrides(modality: str, columns: dict[str, str], fields: tuple[str, ...], kind: str) -> dict[str, str]:
    """The ``--columns <modality>.<field>=<column>`` entries of one token modality as {field: column}."""
    over = {k.partition(".")[2]: v for k, v in columns.items() if k.partition(".")[0] == modality and "." in k}
    if unknown := sorted(set(over) - set(fields)):
        expected = [f"{modality}.{f}" for f in fields]
        raise ConfigError(f"--columns {[f'{modality}.{u}' for u in unknown]}: unknown {kind} field(s); expected {expected}")
    return over


def image_columns(modality: str, survey: str, columns: dict[str, str]) -> ImageColumns:
    """The columns of ``modality``, with ``--columns <modality>.<field>=<column>`` overrides applied."""
    return ImageColumns(modality, **{"cutout": f"cutout_{survey}", **field_overrides(modality, columns, IMAGE_FIELDS, "image")})


def _numeric(typ: pa.DataType) -> bool:
    return pa.types.is_floating(typ) or pa.types.is_integer(typ)


def _list_depth(typ: pa.DataType) -> tuple[int, pa.DataType]:
    """Nesting depth of list types and the innermost value type (0 for a non-list)."""
    depth = 0
    while pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        depth, typ = depth + 1, typ.value_type
    return depth, typ


def check_image_field(schema: pa.Schema, column: str, role: str) -> str | None:
    """Why ``column`` cannot hold cutouts (missing, not one of the layouts in the module doc), or None."""
    if column not in schema.names:
        return f"required column {column!r} ({role}) is missing; the file has {schema.names}"
    typ = schema.field(column).type
    if isinstance(typ, pa.FixedShapeTensorType):
        if len(typ.shape) not in (2, 3) or not _numeric(typ.value_type) or typ.permutation not in (None, list(range(len(typ.shape)))):
            return (f"column {column!r} ({role}) is a tensor of shape {typ.shape}, {typ.value_type}, permutation "
                    f"{typ.permutation}; expected a row-major numeric tensor of shape (H, W) or (bands, H, W)")
        return None
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return None
    depth, value = _list_depth(typ)
    if not (1 <= depth <= 3 and _numeric(value)):
        return (f"column {column!r} ({role}) has type {typ}; expected list<float> / fixed_size_list<float> (flat), "
                "list<list<float>> (H x W), list<list<list<float>>> (bands x H x W), a fixed_shape_tensor or binary float32")
    return None


@dataclass(frozen=True)
class Cutouts:
    """A batch's cutouts as flat pixels: row i is values[start[i] : start[i] + prod(shape[i])] C-order."""

    values: np.ndarray  # (P,) float64, NaN for bad pixels
    start: np.ndarray  # (N,) int64
    shape: np.ndarray  # (N, 3) int64 (bands, H, W); meaningful where ``ok``
    null: np.ndarray  # (N,) bool: no cutout
    bad_shape: np.ndarray  # (N,) bool: present but not an image


def _lengths(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """List array -> per-row lengths (0 for null rows) and the null mask."""
    lengths = pc.list_value_length(arr)
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), lengths.is_null().to_numpy(zero_copy_only=False)


def _flat(n_pix: np.ndarray, null: np.ndarray, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat stamps of n_pix values: (shape (N, 3), bad shape) for square (n_bands, S, S) stamps."""
    side = np.sqrt(n_pix / n_bands).round().astype(np.int64)
    bad = ~null & ((n_bands * side * side != n_pix) | (n_pix == 0))
    return np.stack([np.full(len(n_pix), n_bands), side, side], axis=1), bad


def _nested(arr: pa.Array, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nested list rows (H x W, or bands x H x W) -> (shape (N, 3), leaf values per row, null, bad shape).

    A row is an image when, at every level, all its sub-lists are non-null and equally long."""
    n0, null = _lengths(arr)
    n = len(arr)
    dims, bad = [n0], np.zeros(n, bool)
    owner, counts, level = np.arange(n), n0, arr
    for _ in range(depth - 1):
        level = level.flatten()
        owner = np.repeat(owner, counts)  # the row each element of this level belongs to
        counts, sub_null = _lengths(level)
        lo, hi = np.full(n, np.iinfo(np.int64).max), np.full(n, -1)
        np.minimum.at(lo, owner, counts)
        np.maximum.at(hi, owner, counts)
        np.logical_or.at(bad, owner, sub_null)
        bad |= (hi >= 0) & (lo != hi)
        dims.append(np.maximum(hi, 0))
    leaves = np.bincount(owner, weights=counts, minlength=n).astype(np.int64)
    shape = np.stack(dims if depth == 3 else [np.ones(n, np.int64), *dims], axis=1)
    return shape, leaves, null, ~null & (bad | (shape == 0).any(axis=1))


def read_cutouts(col: pa.ChunkedArray | pa.Array, n_bands: int) -> Cutouts:
    """A cutout column (any layout of the module doc) -> flat pixels, per-row offsets and shapes."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return _binary(arr, n_bands)
    if isinstance(arr.type, pa.FixedShapeTensorType):
        dims = tuple(arr.type.shape)
        null = arr.is_null().to_numpy(zero_copy_only=False)
        arr = arr.storage
        shape = np.tile((1, *dims) if len(dims) == 2 else dims, (len(arr), 1))
        n_pix, bad = np.where(null, 0, math.prod(dims)), np.zeros(len(arr), bool)
    else:
        depth, _ = _list_depth(arr.type)
        if depth == 1:
            n_pix, null = _lengths(arr)
            shape, bad = _flat(n_pix, null, n_bands)
        else:
            shape, n_pix, null, bad = _nested(arr, depth)
    values = arr
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    values = values.to_numpy(zero_copy_only=False).astype(np.float64)  # null pixels -> NaN: masked
    return Cutouts(values, np.cumsum(n_pix) - n_pix, shape, null, bad)


def _binary(arr: pa.Array, n_bands: int) -> Cutouts:
    """Binary float32 little-endian flat stamps -> Cutouts (bytes gathered, so rows need no 4-byte alignment)."""
    null = arr.is_null().to_numpy(zero_copy_only=False)
    offsets_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], offsets_type)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    n_bytes = np.where(null, 0, np.diff(offsets))
    n_pix = n_bytes // 4
    shape, bad = _flat(n_pix, null, n_bands)
    bad |= ~null & (n_bytes % 4 != 0)
    keep = np.flatnonzero(~null & ~bad)
    n_kept = 4 * n_pix[keep]  # bytes of each kept row, gathered into one contiguous run
    idx = np.repeat(offsets[keep] - (np.cumsum(n_kept) - n_kept), n_kept) + np.arange(n_kept.sum())
    values = data[idx].view("<f4").astype(np.float64)
    n_pix = np.where(null | bad, 0, n_pix)
    return Cutouts(values, np.cumsum(n_pix) - n_pix, shape, null, bad)


@dataclass(frozen=True)
class ImageRows:
    tokens: np.ndarray  # (N, n_tokens) int32; missing_token for rows without a usable cutout
    missing: np.ndarray  # (N,) bool: no usable cutout
    flags: np.ndarray  # (N,) int64: IMAGE_FLAGS bits


def _pixel_scales(batch: pa.Table, cols: ImageColumns, nominal: float) -> np.ndarray:
    if cols.pixel_scale_arcsec is None:
        return np.full(batch.num_rows, nominal)
    scale = batch.column(cols.pixel_scale_arcsec).cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.where(np.isnan(scale) & batch.column(cols.pixel_scale_arcsec).is_null().to_numpy(zero_copy_only=False),
                    nominal, scale)  # null: the nominal scale; NaN, inf, <= 0: a bad scale


def tokenize_images(batch: pa.Table, cols: ImageColumns, tokenizer, survey: str) -> ImageRows:
    """A batch's cutouts -> tokens; rows sharing a (bands, H, W) shape and pixel scale are tokenized together."""
    from engine.modalities.images import survey_spec

    spec = survey_spec(survey)
    cut = read_cutouts(batch.column(cols.cutout), spec.n_bands)
    n = batch.num_rows
    scale = _pixel_scales(batch, cols, spec.pixel_scale_arcsec)
    flags = np.zeros(n, np.int64)
    present = ~cut.null
    flags[present & cut.bad_shape] |= BAD_SHAPE
    wrong_bands = present & ~cut.bad_shape & (cut.shape[:, 0] != spec.n_bands)
    flags[wrong_bands] |= BAD_BANDS
    bad_scale = present & ~(np.isfinite(scale) & (scale > 0))
    flags[bad_scale] |= BAD_PIXEL_SCALE
    ok = present & (flags == 0)
    tokens = np.full((n, tokenizer.config.n_tokens), tokenizer.missing_token, np.int32)
    missing = np.ones(n, bool)
    keys = np.column_stack([cut.shape, scale.view(np.int64)])  # exact float bits: equal scales group together
    for key in np.unique(keys[ok], axis=0):
        rows = np.flatnonzero(ok & (keys == key).all(axis=1))
        c, h, w = (int(v) for v in key[:3])
        pix = cut.values[cut.start[rows, None] + np.arange(c * h * w)].reshape(len(rows), c, h, w)
        empty = ~np.isfinite(pix).any(axis=(1, 2, 3))
        flags[rows[empty]] |= EMPTY_CUTOUT
        rows, pix = rows[~empty], pix[~empty]
        if len(rows):
            prep = tokenizer.preprocess_arrays(pix, survey, float(scale[rows[0]]))
            tokens[rows] = tokenizer.encode_prepared(prep)
            missing[rows] = False
    if flags.any():
        log.warning("%s: %d cutout(s) without finite pixels, %d with a wrong band count, %d not an image, %d with a "
                    "bad pixel scale; tokenized as missing and flagged", cols.modality,
                    *(int(((flags & b) != 0).sum()) for b in IMAGE_FLAGS.values()))
    return ImageRows(tokens, missing, flags)
