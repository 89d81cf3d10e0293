"""Left-join the embed job's photo-z predictions back into a user's catalogue, by object id.

Every catalogue row and column is kept, in order; the requested ``z_phot_*`` columns (and
optionally ``flags``) are appended. Rows whose id is not in the table get a missing value:
null in Parquet, NaN (floats) or TNULL (ints) in FITS; a NaN that comes from the table
itself means "in the table, but no valid prediction".

The table is streamed, never loaded: each record batch of (object_id, requested columns) is
matched against the catalogue's sorted unique ids with ``np.searchsorted``. Memory is
O(catalogue + one batch) whatever the table's size; a full scan of a few columns was
chosen over an ``object_id IN (...)`` filter because it needs no scalar index and its
cost does not depend on how many ids the catalogue holds (a filter string of 10^6 ids does).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa

from engine.catalog.io import Catalog, OutputColumn, catalog_format, integer_column, read_catalog, write_catalog
from engine.errors import CatalogError, ConfigError
from engine.modalities import Z_PHOT_COLUMNS, scalar_spec

if TYPE_CHECKING:
    import lance

logger = logging.getLogger(__name__)

TABLE_ID_COLUMN = "object_id"
FLAGS_COLUMN = "flags"
FLAGS_DESCRIPTION = "bitmask of missing or invalid inputs, one bit per model input modality"
Z_PHOT_UNIT = scalar_spec("redshift").unit  # "" = dimensionless
_EXAMPLES = 5  # ids quoted in messages


@dataclass(frozen=True)
class JoinConfig:
    catalog: str  # Parquet or FITS, local path or fsspec URI
    table: str  # Lance table written by the embed job
    out: str  # Parquet or FITS; format from the extension
    id_column: str = "object_id"  # the catalogue's id column
    columns: tuple[str, ...] = tuple(Z_PHOT_COLUMNS)
    with_flags: bool = False
    overwrite: bool = False  # replace catalogue columns that have an output column's name
    batch_size: int = 65_536

    def __post_init__(self) -> None:
        if not self.columns:
            raise ConfigError(f"JoinConfig.columns is empty; choose from {list(Z_PHOT_COLUMNS)}")
        unknown = [c for c in self.columns if c not in Z_PHOT_COLUMNS]
        if unknown:
            raise ConfigError(f"JoinConfig.columns: unknown {unknown}; allowed: {list(Z_PHOT_COLUMNS)}")
        if len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"JoinConfig.columns has duplicates: {list(self.columns)}")
        if not self.id_column:
            raise ConfigError("JoinConfig.id_column is empty; name the catalogue's id column")
        if self.batch_size < 1:
            raise ConfigError(f"JoinConfig.batch_size={self.batch_size}; expected >= 1")
        catalog_format(self.catalog)
        catalog_format(self.out)

    @property
    def table_columns(self) -> tuple[str, ...]:
        return self.columns + ((FLAGS_COLUMN,) if self.with_flags else ())


@dataclass(frozen=True)
class JoinSummary:
    rows: int
    matched: int
    unmatched: int
    columns_added: tuple[str, ...]
    out: str

    def to_dict(self) -> dict:
        return {**asdict(self), "columns_added": list(self.columns_added)}


def join_catalog(config: JoinConfig) -> JoinSummary:
    """Read the catalogue, look its ids up in the table, write the joined catalogue to ``config.out``."""
    catalog = read_catalog(config.catalog)
    ids, id_valid = integer_column(catalog, config.id_column)
    replace = output_collisions(catalog, config.table_columns, catalog_format(config.out) == "fits")
    if replace and not config.overwrite:
        raise CatalogError(
            f"catalogue {catalog.path} already has column(s) {sorted(replace.values())}; pass overwrite=True "
            "(--overwrite) to replace them, or rename them first"
        )
    keys = np.unique(ids[id_valid])  # sorted
    values, valid, found = lookup(config.table, keys, config.table_columns, config.batch_size)
    key_of_row = np.searchsorted(keys, ids[id_valid])  # every non-null id is a key
    matched = _per_row(found, id_valid, key_of_row)
    new = [
        OutputColumn(
            name,
            _per_row(values[name], id_valid, key_of_row),
            matched & _per_row(valid[name], id_valid, key_of_row),
            None if name == FLAGS_COLUMN else Z_PHOT_UNIT,
            FLAGS_DESCRIPTION if name == FLAGS_COLUMN else Z_PHOT_COLUMNS[name],
        )
        for name in config.table_columns
    ]
    write_catalog(catalog, config.out, new, replace)
    n_unmatched = int((~matched).sum())
    if n_unmatched:
        examples = ids[~matched & id_valid][:_EXAMPLES].tolist()
        logger.warning(
            "%d of %d catalogue rows have no match in %s (%d with a null id); e.g. ids %s",
            n_unmatched, len(ids), config.table, int((~id_valid).sum()), examples,
        )
    return JoinSummary(len(ids), int(matched.sum()), n_unmatched, config.table_columns, config.out)


def _per_row(per_key: np.ndarray, id_valid: np.ndarray, key_of_row: np.ndarray) -> np.ndarray:
    out = np.zeros(len(id_valid), dtype=per_key.dtype)
    out[id_valid] = per_key[key_of_row]
    return out


def output_collisions(catalog: Catalog, names: Sequence[str], case_insensitive: bool) -> dict[str, str]:
    """Output column name -> the existing catalogue column it would overwrite (FITS names ignore case)."""
    fold = str.lower if case_insensitive else str
    existing = {fold(c): c for c in catalog.columns}
    return {n: existing[fold(n)] for n in names if fold(n) in existing}


def match_ids(keys: np.ndarray, batch_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``batch_ids`` found in the sorted unique ``keys``, and the key position of each such row."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, batch_ids), len(keys) - 1)
    rows = np.flatnonzero(keys[pos] == batch_ids)
    return rows, pos[rows]


def lookup(
    table_uri: str, keys: np.ndarray, columns: Sequence[str], batch_size: int = 65_536
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """For each of the sorted unique ``keys``: the table's ``columns`` values, their non-null masks, and found.

    Raises CatalogError if a key appears twice in the table (ids absent from ``keys`` are not checked).
    """
    dataset = _open_table(table_uri, columns)
    schema = dataset.schema
    values = {c: np.zeros(len(keys), dtype=schema.field(c).type.to_pandas_dtype()) for c in columns}
    valid = {c: np.zeros(len(keys), dtype=bool) for c in columns}
    found = np.zeros(len(keys), dtype=bool)
    if not len(keys):
        return values, valid, found
    for batch in dataset.to_batches(columns=[TABLE_ID_COLUMN, *columns], batch_size=batch_size):
        batch_ids = batch.column(TABLE_ID_COLUMN).to_numpy(zero_copy_only=False)
        rows, pos = match_ids(keys, batch_ids)
        _check_unique(table_uri, keys, pos, found)
        found[pos] = True
        for c in columns:
            col = batch.column(c).take(pa.array(rows))
            valid[c][pos] = col.is_valid().to_numpy(zero_copy_only=False)
            values[c][pos] = col.fill_null(pa.scalar(0).cast(col.type)).to_numpy(zero_copy_only=False)
    return values, valid, found


def _check_unique(table_uri: str, keys: np.ndarray, pos: np.ndarray, found: np.ndarray) -> None:
    uniq, counts = np.unique(pos, return_counts=True)
    dup = np.union1d(uniq[counts > 1], pos[found[pos]])
    if len(dup):
        raise CatalogError(
            f"Lance table {table_uri} has duplicate {TABLE_ID_COLUMN} values (e.g. {keys[dup[:_EXAMPLES]].tolist()}); "
            "each object must appear once. Rebuild the table (was the embed job's output appended twice?)"
        )


def _open_table(table_uri: str, columns: Sequence[str]) -> lance.LanceDataset:
    import lance  # lazy: heavy, and only this step needs it

    try:
        dataset = lance.dataset(table_uri)
    except (ValueError, OSError) as e:
        raise CatalogError(f"cannot open Lance table {table_uri}: {e}. Pass the embed job's output (--table)") from e
    present = dataset.schema.names
    missing = [c for c in (TABLE_ID_COLUMN, *columns) if c not in present]
    if missing:
        raise CatalogError(
            f"Lance table {table_uri} lacks column(s) {missing}; columns present: {present}. "
            "Choose --columns among those present, or re-run the embed job"
        )
    id_type = dataset.schema.field(TABLE_ID_COLUMN).type
    if not pa.types.is_integer(id_type):
        raise CatalogError(f"Lance table {table_uri}: {TABLE_ID_COLUMN} has type {id_type}; expected int64")
    return dataset
