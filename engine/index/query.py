"""Search a table's FAISS index by object_id or by vector; neighbours carry ``z_phot_mean``.

:func:`open_index` loads ``T.faiss/`` (see :mod:`engine.index.build`) and compares the
table's current Lance version with the one the index was built from. A mismatch is reported
as a :class:`Staleness` (or raised as :class:`StaleIndexError` with ``strict=True``).

Distances: ``cosine`` reports 1 - cosine similarity (0 = same direction), ``l2`` the
Euclidean distance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import fsspec
import lance
import numpy as np

from engine.errors import CatalogError, SearchError, StaleIndexError
from engine.index.build import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    INDEX_FILE,
    META_FILE,
    IndexMeta,
    embeddings_to_matrix,
    index_dir,
    open_table,
)

log = logging.getLogger(__name__)

Z_COLUMN = "z_phot_mean"


@dataclass(frozen=True)
class Staleness:
    table_uri: str
    index_version: int  # table version the index was built from
    table_version: int  # table version now

    @property
    def message(self) -> str:
        return (
            f"stale index: {index_dir(self.table_uri)} was built from table version {self.index_version}, "
            f"but the table is at version {self.table_version}; results may miss new rows or return "
            f"removed ones. Rebuild with: python jobs/index.py --table {self.table_uri}"
        )


@dataclass(frozen=True)
class SearchIndex:
    table_uri: str
    index: faiss.Index
    meta: IndexMeta
    dataset: lance.LanceDataset  # the table at its current version
    nprobe: int | None  # IVF lists searched; None for indexes without inverted lists
    stale: Staleness | None


@dataclass(frozen=True)
class Neighbours:
    object_id: np.ndarray  # (k,) int64, nearest first
    distance: np.ndarray  # (k,) float32
    z_phot_mean: np.ndarray  # (k,) float32, NaN where the table has no value

    def rows(self) -> list[dict]:
        """One dict per neighbour: rank (1-based), object_id, distance, z_phot_mean (None if NaN)."""
        return [
            {
                "rank": r + 1,
                "object_id": int(i),
                "distance": float(d),
                "z_phot_mean": None if np.isnan(z) else float(z),
            }
            for r, (i, d, z) in enumerate(zip(self.object_id, self.distance, self.z_phot_mean))
        ]


def read_index(table_uri: str) -> tuple[faiss.Index, IndexMeta]:
    """Load ``index.faiss`` and ``index.json`` from beside the table."""
    root = index_dir(table_uri)
    fs, path = fsspec.core.url_to_fs(root)
    meta_path = f"{path}/{META_FILE}"
    if not fs.exists(meta_path):
        raise SearchError(
            f"no index for table {table_uri}: {root}/{META_FILE} does not exist; "
            f"build it with: python jobs/index.py --table {table_uri}"
        )
    with fs.open(meta_path, "rb") as f:
        meta = IndexMeta.from_json(f.read().decode(), source=f"{root}/{META_FILE}")
    with fs.open(f"{path}/{INDEX_FILE}", "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    if index.d != meta.dim or index.ntotal != meta.n_vectors:
        raise SearchError(
            f"{root}: index.faiss holds {index.ntotal} vectors of dim {index.d}, index.json says "
            f"{meta.n_vectors} of dim {meta.dim}; rebuild with: python jobs/index.py --table {table_uri}"
        )
    return index, meta


def check_staleness(table_uri: str, meta: IndexMeta, table_version: int) -> Staleness | None:
    """A Staleness if the table is no longer at the version the index was built from."""
    if table_version == meta.table_version:
        return None
    return Staleness(table_uri, meta.table_version, table_version)


def open_index(table_uri: str, *, nprobe: int | None = None, strict: bool = False) -> SearchIndex:
    """Load the index of ``table_uri`` and check it against the table's current version.

    ``nprobe`` overrides the default stored at build time (IVF indexes only). With ``strict``
    a stale index raises :class:`StaleIndexError`; otherwise ``SearchIndex.stale`` reports it.
    """
    index, meta = read_index(table_uri)
    ds = open_table(table_uri)
    stale = check_staleness(table_uri, meta, ds.version)
    if stale is not None:
        if strict:
            raise StaleIndexError(stale.message)
        log.warning("%s", stale.message)
    if nprobe is not None and nprobe < 1:
        raise SearchError(f"nprobe={nprobe}; expected an integer >= 1")
    ivf = faiss.try_extract_index_ivf(index)
    used = None
    if ivf is not None:
        used = min(nprobe or meta.nprobe or 1, ivf.nlist)
        ivf.nprobe = used
    elif nprobe is not None:
        log.info("nprobe=%d ignored: %r has no inverted lists", nprobe, meta.factory)
    return SearchIndex(table_uri, index, meta, ds, used, stale)


def as_query_matrix(vectors: np.ndarray, dim: int, source: str) -> np.ndarray:
    """Validate query vectors of shape (D,) or (n, D); returns (n, D) float32."""
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise SearchError(
            f"{source}: query vectors have shape {np.asarray(vectors).shape}; the index expects "
            f"dimension {dim}, i.e. shape ({dim},) or (n, {dim}) with n >= 1. Use embeddings from the "
            "model that wrote the table"
        )
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise SearchError(f"{source}: query vectors must be finite numbers; got dtype {x.dtype} with NaN, inf or non-numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


def load_query_vectors(path: str, dim: int) -> np.ndarray:
    """Read a ``.npy`` file of shape (D,) or (n, D) (no pickles); returns (n, D) float32."""
    try:
        with fsspec.open(path, "rb") as f:
            x = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SearchError(
            f"cannot read query vectors from {path}: {e}; expected a .npy file of shape ({dim},) or (n, {dim})"
        ) from e
    return as_query_matrix(x, dim, source=path)


def embedding_of(si: SearchIndex, object_id: int) -> np.ndarray:
    """The stored embedding (D,) of one object, read from the table with a Lance filter."""
    object_id = int(object_id)
    tbl = si.dataset.to_table(columns=[EMBEDDING_COLUMN], filter=f"{ID_COLUMN} = {object_id}")
    if tbl.num_rows == 0:
        raise SearchError(
            f"object_id {object_id} is not in table {si.table_uri} (version {si.dataset.version}); "
            "check the id and that --table names the table it comes from"
        )
    if tbl.num_rows > 1:
        raise CatalogError(f"{si.table_uri}: object_id {object_id} occurs {tbl.num_rows} times; ids must be unique")
    x, keep, _ = embeddings_to_matrix(tbl.column(EMBEDDING_COLUMN), "l2")
    if not keep[0]:
        raise SearchError(
            f"object_id {object_id} in table {si.table_uri} has a null or non-finite embedding; "
            "it is not in the index and cannot be a query"
        )
    return x[0]


def lookup_z(ds: lance.LanceDataset, object_ids: np.ndarray) -> np.ndarray:
    """``z_phot_mean`` for each id (NaN where the id or the column is absent), one Lance query."""
    object_ids = np.asarray(object_ids, dtype=np.int64)
    z = np.full(len(object_ids), np.nan, dtype=np.float32)
    if len(object_ids) == 0:
        return z
    if Z_COLUMN not in ds.schema.names:
        log.warning("table has no %r column; neighbours are returned without it", Z_COLUMN)
        return z
    wanted = ", ".join(str(i) for i in np.unique(object_ids))
    tbl = ds.to_table(columns=[ID_COLUMN, Z_COLUMN], filter=f"{ID_COLUMN} IN ({wanted})")
    ids = tbl.column(ID_COLUMN).to_numpy().astype(np.int64)
    values = tbl.column(Z_COLUMN).to_numpy(zero_copy_only=False).astype(np.float32)
    order = np.argsort(ids)
    ids, values = ids[order], values[order]
    if len(ids) == 0:
        return z
    pos = np.minimum(np.searchsorted(ids, object_ids), len(ids) - 1)
    found = ids[pos] == object_ids
    z[found] = values[pos[found]]
    return z


def search_vectors(si: SearchIndex, vectors: np.ndarray, k: int) -> list[Neighbours]:
    """The ``k`` nearest indexed objects of each query vector ((D,) or (n, D)); one Neighbours per row."""
    if k < 1:
        raise SearchError(f"k={k}; expected an integer >= 1")
    x = as_query_matrix(vectors, si.meta.dim, source="query")  # (n, D)
    if si.meta.metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise SearchError("query: an all-zero vector has no cosine direction; give a non-zero vector")
        x = x / norms
    scores, ids = si.index.search(x, k)  # (n, k) each; id -1 where fewer than k were found
    if si.meta.metric == "cosine":
        dist = np.clip(1.0 - scores, 0.0, 2.0)
    else:
        dist = np.sqrt(np.maximum(scores, 0.0))
    z = lookup_z(si.dataset, ids[ids >= 0])
    results, start = [], 0
    for row_ids, row_dist in zip(ids, dist):
        found = row_ids >= 0
        n = int(found.sum())
        nb = Neighbours(row_ids[found].astype(np.int64), row_dist[found].astype(np.float32), z[start : start + n])
        results.append(nb)
        start += n
    return results


def search_id(si: SearchIndex, object_id: int, k: int) -> Neighbours:
    """The ``k`` nearest indexed objects of a table object (itself first, at distance ~0)."""
    return search_vectors(si, embedding_of(si, object_id), k)[0]
