"""Read and write user catalogues (Parquet or FITS, local paths or fsspec URIs).

A catalogue is held in its own format's native table: an Arrow table for Parquet, an astropy
``Table`` for FITS (with the primary header kept aside), so a same-format round trip keeps
the input's column types, units, descriptions and header keywords. The format is chosen by
the file's extension; a cross-format write converts column by column and fails on a column
the target format cannot store. Local outputs are written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Iterator, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table

from engine.errors import CatalogError, ConfigError

logger = logging.getLogger(__name__)

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".fits": "fits", ".fit": "fits", ".fits.gz": "fits"}
_PER_COLUMN_KEYWORD = re.compile(r"^T[A-Z]{2,5}(\d+)$")  # TCOMMn, TUCDn, TLMINn, ... (structural ones are gone)


@dataclass(frozen=True)
class Catalog:
    path: str
    table: pa.Table | Table  # Arrow for Parquet input, astropy for FITS input
    primary_header: fits.Header | None = None  # FITS only

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names if isinstance(self.table, pa.Table) else self.table.colnames)


@dataclass(frozen=True)
class OutputColumn:
    """A column to add, one value per catalogue row; invalid rows become null (Parquet), NaN or TNULL (FITS)."""

    name: str
    values: np.ndarray  # (N,)
    valid: np.ndarray  # (N,) bool
    unit: str | None  # astropy unit string, "" for dimensionless, None for none
    description: str


def catalog_format(path: str) -> str:
    """``"parquet"`` or ``"fits"`` from the file extension."""
    lower = path.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return SUFFIXES[suffix]
    raise ConfigError(f"{path}: unsupported catalogue extension; expected one of {sorted(SUFFIXES)}")


def read_catalog(path: str) -> Catalog:
    fmt = catalog_format(path)
    try:
        if fmt == "parquet":
            fs, fs_path = fsspec.core.url_to_fs(path)
            return Catalog(path, pq.read_table(fs_path, filesystem=fs))
        with fsspec.open(path, "rb", compression="infer") as f:
            raw = io.BytesIO(f.read())
    except FileNotFoundError:
        raise CatalogError(f"catalogue {path} not found; check the path or URI") from None
    except (OSError, pa.ArrowException) as e:
        raise CatalogError(f"cannot read catalogue {path} as {fmt}: {e}") from e
    return _read_fits(path, raw)


def _read_fits(path: str, raw: IO[bytes]) -> Catalog:
    try:
        hdul = fits.open(raw, memmap=False)
    except OSError as e:
        raise CatalogError(f"cannot read catalogue {path} as FITS: {e}") from e
    with hdul:
        tables = [i for i, h in enumerate(hdul) if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
        if not tables:
            raise CatalogError(f"{path}: no table HDU; HDUs present: {[type(h).__name__ for h in hdul]}")
        if len(hdul) > 2:
            logger.warning("%s: reading table HDU %d only; the output will not carry the other HDUs", path, tables[0])
        table = Table.read(hdul[tables[0]], mask_invalid=False, character_as_bytes=False)
        primary = hdul[0].header.copy()
    for key in [k for k in table.meta if k.startswith("TCOMM") and k[5:].isdigit()]:
        comment = table.meta.pop(key)
        index = int(key[5:]) - 1
        if index < len(table.columns) and not table.columns[index].description:
            table.columns[index].description = comment
    return Catalog(path, table, primary)


def integer_column(catalog: Catalog, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The int64 values of column ``name`` and a mask of its non-null rows."""
    if name not in catalog.columns:
        raise CatalogError(
            f"catalogue {catalog.path} has no id column {name!r}; columns present: {catalog.columns}. "
            "Pass the catalogue's id column name (--id-column)"
        )
    col = catalog.table[name]
    if isinstance(col, pa.ChunkedArray):
        values, null = _arrow_values(col.combine_chunks())
    else:
        values, null = np.ma.getdata(col), np.ma.getmaskarray(col)
    if values.dtype.kind not in "iu" or values.ndim != 1:
        got = col.type if isinstance(col, pa.ChunkedArray) else values.dtype
        raise CatalogError(
            f"catalogue {catalog.path}: id column {name!r} has type {got}; expected an integer type "
            "(ids are int64). Cast the column to int64 or choose another --id-column"
        )
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        raise CatalogError(f"catalogue {catalog.path}: id column {name!r} has uint64 values above the int64 range")
    return values.astype(np.int64, copy=False), ~null


def write_catalog(
    catalog: Catalog, out: str, new: Sequence[OutputColumn] = (), replace: Mapping[str, str] | None = None
) -> None:
    """Write ``catalog`` with the ``new`` columns appended (or put in place of ``replace[new_name]``) to ``out``."""
    replace = replace or {}
    if catalog_format(out) == "parquet":
        table = _with_arrow_columns(_to_arrow(catalog), new, replace)
        with open_output(out) as f:
            pq.write_table(table, f)
        return
    hdul = fits.HDUList([fits.PrimaryHDU(header=catalog.primary_header), _fits_hdu(catalog, new, replace)])
    with open_output(out) as f:
        if out.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="wb") as gz:
                hdul.writeto(gz)
        else:
            hdul.writeto(f)


@contextlib.contextmanager
def open_output(out: str) -> Iterator[IO[bytes]]:
    """A binary file for ``out``: a local path is written to a temporary file renamed on success."""
    fs, fs_path = fsspec.core.url_to_fs(out)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        with fs.open(fs_path, "wb") as f:  # an object-store PUT is already all-or-nothing
            yield f
        return
    directory, name = os.path.split(os.path.abspath(fs_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, fs_path)
    except BaseException:
        os.unlink(tmp)
        raise


def _field_metadata(unit: str | None, description: str | None) -> dict[bytes, bytes] | None:
    meta = {} if unit is None else {b"unit": unit.encode()}
    if description:
        meta[b"description"] = description.encode()
    return meta or None


def _with_arrow_columns(table: pa.Table, new: Sequence[OutputColumn], replace: Mapping[str, str]) -> pa.Table:
    for col in new:
        metadata = _field_metadata(col.unit, col.description)
        field = pa.field(col.name, pa.from_numpy_dtype(col.values.dtype), metadata=metadata)
        array = pa.array(col.values, type=field.type, mask=~col.valid)
        if col.name in replace:
            table = table.set_column(table.column_names.index(replace[col.name]), field, array)
        else:
            table = table.append_column(field, array)
    return table


def _fits_hdu(catalog: Catalog, new: Sequence[OutputColumn], replace: Mapping[str, str]) -> fits.BinTableHDU:
    table = _to_astropy(catalog)
    for col in new:
        kind = MaskedColumn if not col.valid.all() else Column
        kwargs = {"mask": ~col.valid} if kind is MaskedColumn else {}
        column = kind(col.values, name=col.name, unit=col.unit, description=col.description, **kwargs)
        if col.name in replace:
            old = replace[col.name]
            stale = str(table.colnames.index(old) + 1)
            for key in [k for k in table.meta if (m := _PER_COLUMN_KEYWORD.match(k)) and m.group(1) == stale]:
                del table.meta[key]
            table.replace_column(old, column)
            if old != col.name:
                table.rename_column(old, col.name)
        else:
            table.add_column(column)
    buffer = io.BytesIO()  # Table.write, unlike table_to_hdu, adds astropy's YAML block (descriptions)
    table.write(buffer, format="fits")
    buffer.seek(0)
    hdu = fits.open(buffer, memmap=False)[1]
    for i, name in enumerate(table.colnames, start=1):
        if table[name].description:  # TCOMMn: the description for readers other than astropy
            after = f"TUNIT{i}" if f"TUNIT{i}" in hdu.header else f"TFORM{i}"
            hdu.header.set(f"TCOMM{i}", table[name].description, after=after)
    return hdu


def _to_arrow(catalog: Catalog) -> pa.Table:
    if isinstance(catalog.table, pa.Table):
        return catalog.table
    fields, arrays = [], []
    for col in catalog.table.itercols():
        data, mask = np.ma.getdata(col), np.ma.getmaskarray(col)
        data = data.astype(data.dtype.newbyteorder("="), copy=False)  # FITS data are big-endian
        if data.dtype.kind == "S":
            data = np.char.decode(data, "ascii")
        if data.dtype.kind not in "biufU" or data.ndim > 2:
            raise CatalogError(
                f"catalogue {catalog.path}: column {col.name!r} ({data.dtype}, shape {data.shape[1:]}) cannot be "
                "written to Parquet; drop it or write FITS"
            )
        m = mask if mask.any() else None
        if data.ndim == 2:
            flat = pa.array(data.ravel(), mask=None if m is None else m.ravel())
            array = pa.FixedSizeListArray.from_arrays(flat, data.shape[1])
        else:
            array = pa.array(data, mask=m)
        unit = None if col.unit is None else col.unit.to_string()
        fields.append(pa.field(col.name, array.type, metadata=_field_metadata(unit, col.description)))
        arrays.append(array)
    if catalog.table.meta:
        logger.info("%s: FITS header keywords are not carried into Parquet", catalog.path)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _arrow_values(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Numpy values of a flat Arrow array (nulls filled with 0 / False / "") and its null mask."""
    null = array.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.fill_null("").to_numpy(zero_copy_only=False).astype(str), null
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type):
        fill = pa.scalar(False) if pa.types.is_boolean(array.type) else pa.scalar(0).cast(array.type)
        return array.fill_null(fill).to_numpy(zero_copy_only=False), null
    return np.asarray(array.to_numpy(zero_copy_only=False)), null  # the caller rejects the object dtype


def _to_astropy(catalog: Catalog) -> Table:
    if isinstance(catalog.table, Table):
        return catalog.table.copy(copy_data=False)
    table = Table()
    for field, chunked in zip(catalog.table.schema, catalog.table.columns):
        array = chunked.combine_chunks()
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
            values, null = _arrow_values(array.values.slice(array.offset * size, len(array) * size))
            row_null = array.is_null().to_numpy(zero_copy_only=False)[:, None]
            values, null = values.reshape(-1, size), null.reshape(-1, size) | row_null
        else:
            values, null = _arrow_values(array)
        if values.dtype.kind not in "biufU" or (values.ndim == 2 and values.dtype.kind == "U"):
            raise CatalogError(
                f"catalogue {catalog.path}: column {field.name!r} has Arrow type {field.type}, which FITS cannot "
                "store; drop or convert it, or write Parquet (.parquet)"
            )
        if values.dtype.kind == "U" and not all(v.isascii() for v in values.tolist()):
            raise CatalogError(
                f"catalogue {catalog.path}: column {field.name!r} has non-ASCII strings, which FITS cannot store; "
                "transliterate them or write Parquet (.parquet)"
            )
        meta = field.metadata or {}
        unit = meta[b"unit"].decode() if b"unit" in meta else None
        kwargs = dict(name=field.name, unit=unit, description=meta.get(b"description", b"").decode() or None)
        table.add_column(MaskedColumn(values, mask=null, **kwargs) if null.any() else Column(values, **kwargs))
    return table
