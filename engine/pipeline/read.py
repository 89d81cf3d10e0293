"""Resolve catalogue inputs (paths, globs, directories, fsspec/pyarrow URIs) and check them before any work.

Every file's Parquet footer or FITS header is read up front: a missing or non-numeric required column
fails the job here, naming the file, the column and what is expected. FITS binary tables come through
as Arrow: vector columns (TFORM ``4300E``) as fixed_size_list, variable-length arrays (``PE()``) as list.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass

import numpy as np

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.io.fits.column import FITS2NUMPY
from astropy.table import Table

from engine.errors import CatalogError

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")
CATALOG_SUFFIXES = PARQUET_SUFFIXES + FITS_SUFFIXES


@dataclass(frozen=True)
class CatalogFile:
    path: str  # path within ``filesystem`` (no scheme)
    num_rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class Catalog:
    files: tuple[CatalogFile, ...]
    filesystem: pafs.FileSystem

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def has_columns(self, names: list[str]) -> bool:
        return all(all(n in f.schema.names for n in names) for f in self.files)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; non-native fsspec protocols go through FSSpecHandler."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def expand(specs: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """Paths, globs or directories (local or one remote filesystem) -> sorted Parquet/FITS file paths."""
    fs = None
    paths: list[str] = []
    for spec in specs:
        spec_fs, base = filesystem_for(spec)
        if fs is not None and type(spec_fs) is not type(fs):
            raise CatalogError(f"--catalog mixes filesystems ({spec!r}); give inputs from one filesystem per job")
        fs = spec_fs
        if any(ch in base for ch in "*?["):
            if isinstance(fs, pafs.LocalFileSystem):
                found = sorted(glob.glob(base))
            else:
                selector = pafs.FileSelector(base.split("*")[0].rsplit("/", 1)[0], recursive=True)
                import fnmatch

                found = sorted(i.path for i in fs.get_file_info(selector) if fnmatch.fnmatch(i.path, base))
            if not found:
                raise CatalogError(f"--catalog {spec!r} matches no files")
            paths.extend(found)
            continue
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise CatalogError(f"--catalog {spec!r}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            inner = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = sorted(i.path for i in inner if i.path.lower().endswith(CATALOG_SUFFIXES))
            if not found:
                raise CatalogError(f"--catalog {spec!r}: directory holds no Parquet or FITS files ({CATALOG_SUFFIXES})")
            paths.extend(found)
        else:
            paths.append(base)
    if not paths:
        raise CatalogError("--catalog names no input files")
    return fs, sorted(dict.fromkeys(paths))


def open_catalog(specs: list[str]) -> tuple[Catalog, dict[str, str]]:
    """Read every footer: the usable files, and the unreadable ones with the reason."""
    fs, paths = expand(specs)
    files, failed = [], {}
    for path in paths:
        if is_fits(path):
            try:
                num_rows, schema = _fits_header(fs, path)
            except (OSError, ValueError, IndexError) as exc:
                failed[path] = f"not a readable FITS table ({exc})"
                continue
            files.append(CatalogFile(path=path, num_rows=num_rows, schema=schema))
            continue
        try:
            meta = pq.ParquetFile(path, filesystem=fs).metadata
        except (OSError, pa.ArrowException) as exc:
            failed[path] = f"not a readable Parquet file ({exc})"
            continue
        files.append(CatalogFile(path=path, num_rows=meta.num_rows, schema=meta.schema.to_arrow_schema()))
    return Catalog(files=tuple(files), filesystem=fs), failed


def is_fits(path: str) -> bool:
    return path.lower().endswith(FITS_SUFFIXES)


def _fits_table_hdu(hdul):
    for hdu in hdul:
        if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
            return hdu
    raise ValueError(f"no table HDU; HDUs present: {[type(h).__name__ for h in hdul]}")


def _open_fits(fs: pafs.FileSystem, path: str):
    with fs.open_input_file(path) as f:
        raw = f.read()
    if path.lower().endswith(".gz"):
        raw = gzip.decompress(raw)
    return fits.open(io.BytesIO(raw), memmap=False)


def _fits_header(fs: pafs.FileSystem, path: str) -> tuple[int, pa.Schema]:
    """Row count and Arrow schema of the first table HDU (``fits_type`` of each column)."""
    with _open_fits(fs, path) as hdul:
        hdu = _fits_table_hdu(hdul)
        fields = [pa.field(c.name, fits_type(c, hdu.columns.dtype[c.name])) for c in hdu.columns]
        return int(hdu.header["NAXIS2"]), pa.schema(fields)


def _arrow_scalar(dtype: np.dtype) -> pa.DataType:
    if dtype.kind in "SU":
        return pa.string()
    try:
        return pa.from_numpy_dtype(dtype.newbyteorder("="))
    except pa.ArrowNotImplementedError:  # complex (TFORM C, M): no Arrow type; the column cannot be read
        return pa.null()


def _is_variable_length(column: fits.Column) -> bool:
    return getattr(column.format, "format", None) in ("P", "Q")  # TFORM PE(), QD(), ...


def fits_type(column: fits.Column, dtype: np.dtype) -> pa.DataType:
    """Arrow type of a FITS table column (``dtype``: its record dtype): a scalar as itself; a vector column
    (TFORM ``4300E``) as fixed_size_list<float>[4300], nested once per further TDIM axis; a variable-length
    array (``PE()``, ``QD()``, whose record holds only a length and a heap offset) as list<value>."""
    if _is_variable_length(column):
        return pa.list_(_arrow_scalar(np.dtype(FITS2NUMPY[column.format.p_format])))
    typ = _arrow_scalar(dtype.base)
    for size in reversed(dtype.shape):
        typ = pa.list_(typ, size)
    return typ


def _leaf(typ: pa.DataType) -> pa.DataType:
    while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ):
        typ = typ.value_type
    return typ


def _fits_array_column(hdu, name: str, typ: pa.DataType) -> pa.Array:
    """A vector or variable-length column as fixed_size_list / list (native byte order; integer TNULL -> null)."""
    column, leaf, rows = hdu.columns[name], _leaf(typ), hdu.data[name]
    if pa.types.is_list(typ):  # variable length: each row is its own array on the heap
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        data = np.concatenate([np.asarray(r) for r in rows] + [np.empty(0, leaf.to_pandas_dtype())])
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int64()).cast(pa.int32())  # raises past 2**31
    else:
        data = np.asarray(rows)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # FITS data are big-endian
    null = data == column.null if data.dtype.kind in "iu" and isinstance(column.null, int) else None
    values = pa.array(data.reshape(-1), type=leaf, mask=None if null is None or not null.any() else null.reshape(-1))
    if pa.types.is_list(typ):
        return pa.ListArray.from_arrays(offsets, values)
    for size in reversed(data.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def read_fits(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """The named columns of a FITS table as Arrow, typed as ``fits_type`` says: scalars (masked/TNULL/NaN ->
    null), vector columns as fixed_size_list, variable-length arrays as list (NaN pixels stay NaN)."""
    with _open_fits(fs, path) as hdul:
        hdu = _fits_table_hdu(hdul)
        types = {c.name: fits_type(c, hdu.columns.dtype[c.name]) for c in hdu.columns}
        for name in columns:
            if name not in types:
                raise CatalogError(f"{path}: FITS table has no column {name!r}; it has {list(types)}")
            if pa.types.is_null(_leaf(types[name])):
                raise CatalogError(f"{path}: FITS column {name!r} (TFORM {hdu.columns[name].format}) has no Arrow "
                                   "type (complex?); drop it from the job's columns")
        nested = [n for n in columns if pa.types.is_nested(types[n])]
        arrays = {n: _fits_array_column(hdu, n, types[n]) for n in nested}
        if len(nested) < len(columns):
            table = Table.read(hdu, mask_invalid=True)
            for name in (n for n in columns if n not in arrays):
                data, mask = np.ma.getdata(table[name]), np.ma.getmaskarray(table[name])
                data = data.astype(data.dtype.newbyteorder("="), copy=False)
                arrays[name] = pa.array(data, mask=mask if mask.any() else None)
    return pa.table({n: arrays[n] for n in columns})


def read_columns(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """Columns of one catalogue file, Parquet or FITS by extension."""
    if is_fits(path):
        return read_fits(fs, path, columns)
    return pq.read_table(path, columns=columns, filesystem=fs)


class ReadUnit:
    """Ray stage: one input file (a unit) -> its rows, projected, tagged with the unit's index (int32).

    One task per file (not Ray's own Parquet reader, which packs small files into one block):
    rows of a file arrive together and early, so a unit can complete and commit while the job
    runs, and a file that fails to read fails only its own unit.
    """

    def __init__(self, filesystem: pafs.FileSystem, columns: list[str], path_column: str, unit_column: str) -> None:
        self.filesystem, self.columns = filesystem, columns
        self.path_column, self.unit_column = path_column, unit_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for path, unit in zip(batch.column(self.path_column).to_pylist(), batch.column(self.unit_column).to_pylist()):
            table = read_columns(self.filesystem, path, self.columns)
            # an int32 tag, not the path: 4 bytes a row through the object store, and a cheap split in the writer
            parts.append(table.append_column(self.unit_column, pa.array(np.full(table.num_rows, unit, np.int32))))
        return pa.concat_tables(parts)
