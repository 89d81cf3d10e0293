"""Lance writing in two steps: workers write fragments, the driver checks ids and commits.

``FragmentWriter`` runs inside Ray (tasks) and returns, per batch and input unit, the fragment
metadata as JSON and the ``object_id``s it wrote. Nothing is visible until the driver
``commit``s a unit's fragments, after checking them (see ``engine.pipeline.units``);
fragments of a retried or abandoned task are never committed.
"""

from __future__ import annotations

import json
import logging

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import FragmentMetadata, write_fragments

from engine.pipeline.stages import NO_VALID_INPUT, UNIT

log = logging.getLogger(__name__)



class FragmentWriter:
    """Writes each batch as Lance fragments, one set per input unit, and reports what it wrote."""

    def __init__(self, uri: str, schema: pa.Schema, storage_options: dict | None = None) -> None:
        self.uri, self.schema, self.storage_options = uri, schema, storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.column(UNIT).to_numpy()
        out: dict[str, list] = {"unit": [], "fragments": [], "object_ids": [], "rows": [], "flagged": [], "no_valid": []}
        uniq = np.unique(units)
        for unit in uniq:
            part = batch if len(uniq) == 1 else batch.filter(pa.array(units == unit))  # usually one file per block
            part = part.select(self.schema.names).cast(self.schema)
            frags = write_fragments(part, self.uri, schema=self.schema, storage_options=self.storage_options)
            out["unit"].append(int(unit))
            out["fragments"].append(json.dumps([f.to_json() for f in frags]))
            out["object_ids"].append(part.column("object_id").to_numpy().astype(np.int64).tobytes())
            out["rows"].append(part.num_rows)
            flags = part.column("flags").to_numpy()
            out["flagged"].append(int((flags != 0).sum()))
            out["no_valid"].append(int(((flags & NO_VALID_INPUT) != 0).sum()))
        return pa.table(out)


def compare_ids(expected: np.ndarray, written: np.ndarray, limit: int = 5) -> dict:
    """Multiset comparison: ids lost, duplicated or unknown (a few examples each)."""
    if len(expected) == len(written) and np.array_equal(np.sort(expected), np.sort(written)):  # the usual case, fast
        return {"ok": True, "lost": [], "n_lost": 0, "unknown": [], "n_unknown": 0, "count_mismatch": [], "n_count_mismatch": 0}
    exp_u, exp_c = np.unique(expected, return_counts=True)
    got_u, got_c = np.unique(written, return_counts=True)
    lost = np.setdiff1d(exp_u, got_u)
    extra = np.setdiff1d(got_u, exp_u)
    common, ie, ig = np.intersect1d(exp_u, got_u, return_indices=True)
    wrong_count = common[exp_c[ie] != got_c[ig]]
    return {
        "ok": len(lost) == 0 and len(extra) == 0 and len(wrong_count) == 0,
        "lost": lost[:limit].tolist(), "n_lost": int(len(lost)),
        "unknown": extra[:limit].tolist(), "n_unknown": int(len(extra)),
        "count_mismatch": wrong_count[:limit].tolist(), "n_count_mismatch": int(len(wrong_count)),
    }


def commit(uri: str, schema: pa.Schema, fragments_json: list[dict], message: dict, create: bool,
           read_version: int | None = None, storage_options: dict | None = None) -> lance.LanceDataset:
    """One Lance transaction: create the table (first commit) or append to it, with a ledger message."""
    frags = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments_json]
    op = lance.LanceOperation.Overwrite(schema, frags) if create else lance.LanceOperation.Append(frags)
    if not create and read_version is None:
        read_version = lance.dataset(uri, storage_options=storage_options).version
    return lance.LanceDataset.commit(uri, op, read_version=read_version, storage_options=storage_options,
                                     commit_message=json.dumps(message))
