"""Lance writing in two steps: workers write fragments, the driver checks ids and commits once.

``FragmentWriter`` runs inside Ray (tasks) and returns, per batch, the fragment metadata as
JSON and the ``object_id``s it wrote. ``commit`` verifies that the written ids equal the
input ids (as a multiset) before making the new table version visible: a job that lost or
duplicated rows never publishes a table.
"""

from __future__ import annotations

import json
import logging

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import FragmentMetadata, write_fragments

from engine.errors import OutputMismatchError

log = logging.getLogger(__name__)


class FragmentWriter:
    def __init__(self, uri: str, schema: pa.Schema, storage_options: dict | None = None) -> None:
        self.uri, self.schema, self.storage_options = uri, schema, storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.select(self.schema.names).cast(self.schema)
        frags = write_fragments(batch, self.uri, schema=self.schema, storage_options=self.storage_options)
        ids = batch.column("object_id").to_numpy()
        return pa.table({
            "fragments": [json.dumps([f.to_json() for f in frags])],
            "object_ids": [ids.astype(np.int64).tobytes()],
            "rows": [batch.num_rows],
        })


def compare_ids(expected: np.ndarray, written: np.ndarray, limit: int = 5) -> dict:
    """Multiset comparison: ids lost, duplicated or unknown (a few examples each)."""
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


def commit(uri: str, schema: pa.Schema, fragments_json: list[dict], expected_ids: np.ndarray,
           written_ids: np.ndarray, storage_options: dict | None = None) -> lance.LanceDataset:
    check = compare_ids(expected_ids, written_ids)
    if not check["ok"]:
        raise OutputMismatchError(
            f"not committing {uri}: written rows do not match input rows "
            f"(read {len(expected_ids)}, written {len(written_ids)}; {check})"
        )
    frags = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments_json]
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, frags), storage_options=storage_options)
    if ds.count_rows() != len(expected_ids):
        raise OutputMismatchError(f"{uri}: committed {ds.count_rows()} rows, expected {len(expected_ids)}")
    return ds
