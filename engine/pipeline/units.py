"""Units of work (one input file each): planning, failures, and the commit ledger.

Each commit to the output table carries, in its Lance transaction, a JSON message naming the
units it completes and their row counts. The table's own history is therefore the manifest:
a unit is committed exactly when its rows are, so ``--resume`` after any crash knows exactly
which files to skip. A unit is committed only once every one of its rows has been written
and the written ``object_id``s equal the file's ids (as a multiset).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import lance
import numpy as np
import pyarrow as pa

from engine.errors import CatalogError
from engine.pipeline.read import Catalog, CatalogFile, read_columns
from engine.pipeline.write import compare_ids

log = logging.getLogger(__name__)

LEDGER_KEY = "engine_units"  # key of our commit message JSON


class UnitCounts(NamedTuple):
    rows: int
    flagged: int = 0  # rows with any flag bit set
    no_valid: int = 0  # rows with no valid input


@dataclass
class UnitProgress:
    """Fragments, ids and flag counts written so far for one input file."""

    file: CatalogFile
    fragments: list[dict] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    flagged: int = 0
    no_valid: int = 0

    @property
    def counts(self) -> UnitCounts:
        return UnitCounts(self.rows, self.flagged, self.no_valid)

    @property
    def complete(self) -> bool:
        return self.rows >= self.file.num_rows


def check_file(f: CatalogFile, required: dict[str, str]) -> str | None:
    """Why a file cannot be used (wrong schema), or None."""
    for col, role in required.items():
        if col not in f.schema.names:
            return f"required column {col!r} ({role}) is missing; the file has {f.schema.names}"
        typ = f.schema.field(col).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            return f"column {col!r} ({role}) has type {typ}; expected a numeric column"
    return None


def committed_units(uri: str, storage_options: dict | None = None) -> dict[str, UnitCounts]:
    """unit path -> its counts, from the ledger messages in the table's transaction history."""
    try:
        ds = lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError):
        return {}
    done: dict[str, UnitCounts] = {}
    for tr in ds.get_transactions():
        if tr is None:
            continue
        msg = (tr.transaction_properties or {}).get("__lance_commit_message")
        if not msg:
            continue
        try:
            units = json.loads(msg).get(LEDGER_KEY, {})
        except (json.JSONDecodeError, AttributeError):
            continue
        for path, counts in units.items():
            if path in done:
                raise CatalogError(f"{uri}: unit {path} appears in two commits; the table is inconsistent")
            done[path] = UnitCounts(*counts)
    return done


def read_unit_ids(catalog: Catalog, f: CatalogFile, id_column: str) -> np.ndarray:
    col = read_columns(catalog.filesystem, f.path, [id_column]).column(id_column)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise CatalogError(f"{f.path}: column {id_column!r} has {col.null_count} null id(s), first at row {row}")
    return col.to_numpy().astype(np.int64)


def verify_unit(unit: UnitProgress, expected_ids: np.ndarray) -> str | None:
    """None when the unit's written ids equal its input ids, else the reason."""
    written = np.concatenate(unit.ids) if unit.ids else np.empty(0, np.int64)
    check = compare_ids(expected_ids, written)
    if check["ok"]:
        return None
    return f"written ids do not match the file's ids ({check})"


def failure_reason(catalog: Catalog, f: CatalogFile) -> str:
    """Best explanation of why a unit did not complete: try to read it on the driver."""
    try:
        read_columns(catalog.filesystem, f.path, f.schema.names)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        return f"unreadable: {exc}"
    return "rows were not all written (a read or processing task failed; see the job log)"
