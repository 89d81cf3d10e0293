"""Build a FAISS index over a Lance table's ``embedding`` column, keyed by int64 ``object_id``.

The table is streamed in record batches, so memory is bounded by the index and the training
sample, not by the table. The index type follows the table's row count (:func:`choose_factory`)
unless a FAISS factory string overrides it. Rows whose embedding is null, non-finite (or, for
the cosine metric, all zero) are skipped, counted in ``index.json`` and logged.

For a table at URI ``T`` the index lives beside it, in ``T.faiss/``::

    T.faiss/index.faiss   faiss.serialize_index bytes
    T.faiss/index.json    IndexMeta; written last, so its presence marks a complete index

Both are written with fsspec, so any URI fsspec and Lance both understand works.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

import faiss
import fsspec
import lance
import numpy as np
import pyarrow as pa

from engine import __version__
from engine.errors import CatalogError, ConfigError, SearchError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ID_COLUMN = "object_id"
EMBEDDING_COLUMN = "embedding"
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
METRICS = ("cosine", "l2")
FLAT_MAX_VECTORS = 100_000  # below this an exact search is fast enough
IVF_FLAT_MAX_VECTORS = 2_000_000  # above this uncompressed vectors cost too much memory
PQ_MAX_SUBQUANTIZERS = 64
PQ_MIN_DIMS_PER_SUBQUANTIZER = 4
MIN_TRAIN_VECTORS = 10_000  # 8-bit PQ codebooks want >= 39 * 256 training points


@dataclass(frozen=True)
class IndexConfig:
    factory: str | None = None  # FAISS factory string, e.g. "IVF1024,Flat"; None: choose_factory
    metric: str = "cosine"  # "cosine" (L2-normalise + inner product) or "l2"
    nprobe: int | None = None  # IVF lists searched by default; None: default_nprobe(nlist)
    batch_size: int = 65_536  # rows per Lance record batch
    max_train_vectors: int = 1_000_000  # upper bound of the IVF/PQ training sample
    train_per_list: int = 64  # training vectors wanted per IVF list
    seed: int = 0  # training-sample seed

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"IndexConfig.metric={self.metric!r}; expected one of {METRICS}")
        if self.factory is not None and not self.factory.strip():
            raise ConfigError("IndexConfig.factory is empty; give a FAISS factory string or None to choose by size")
        for name in ("batch_size", "max_train_vectors", "train_per_list"):
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexConfig.{name}={getattr(self, name)}; expected an integer >= 1")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"IndexConfig.nprobe={self.nprobe}; expected an integer >= 1 or None")


@dataclass(frozen=True)
class IndexMeta:
    table_uri: str
    table_version: int  # Lance dataset version the index was built from
    n_vectors: int
    dim: int
    metric: str
    factory: str
    nprobe: int | None  # None for indexes without inverted lists
    n_rows_read: int
    n_skipped: dict[str, int]  # reason -> rows: "null", "non_finite", "zero_norm"
    train_size: int  # 0 when the index needs no training
    seed: int
    engine_version: str
    built_at: str  # ISO 8601, UTC
    build_seconds: float
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> IndexMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SearchError(f"{source} is not valid JSON ({e}); rebuild the index with jobs/index.py") from e
        if raw.get("format_version") != FORMAT_VERSION:
            raise SearchError(
                f"{source} has format_version={raw.get('format_version')!r}; this engine reads "
                f"{FORMAT_VERSION}. Rebuild the index with jobs/index.py"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - raw.keys())
        if missing:
            raise SearchError(f"{source} lacks {missing}; rebuild the index with jobs/index.py")
        return cls(**{k: v for k, v in raw.items() if k in names})


def index_dir(table_uri: str) -> str:
    """The index directory beside a table: ``/data/x.lance`` -> ``/data/x.lance.faiss``."""
    return table_uri.rstrip("/") + ".faiss"


def choose_factory(n_vectors: int, dim: int) -> str:
    """FAISS factory string for ``n_vectors`` of dimension ``dim``: exact, IVF, then IVF+PQ."""
    if n_vectors < FLAT_MAX_VECTORS:
        return "Flat"
    nlist = max(1, round(4 * math.sqrt(n_vectors)))
    if n_vectors <= IVF_FLAT_MAX_VECTORS:
        return f"IVF{nlist},Flat"
    m_max = max(1, min(PQ_MAX_SUBQUANTIZERS, dim // PQ_MIN_DIMS_PER_SUBQUANTIZER))
    m = max(d for d in range(1, m_max + 1) if dim % d == 0)  # PQ needs dim % m == 0
    return f"IVF{nlist},PQ{m}"


def default_nprobe(nlist: int) -> int:
    """Lists searched per query when the config gives none: about sqrt(nlist)."""
    return max(1, min(nlist, round(math.sqrt(nlist))))


def open_table(table_uri: str) -> lance.LanceDataset:
    """Open a Lance table, naming the URI if it cannot be read."""
    try:
        return lance.dataset(table_uri)
    except (OSError, ValueError) as e:
        raise CatalogError(f"cannot open Lance table {table_uri!r}: {e}; check the --table URI") from e


def embedding_dim(schema: pa.Schema, table_uri: str) -> int:
    """Dimension of the table's embedding column; checks both needed columns and their types."""
    for name in (ID_COLUMN, EMBEDDING_COLUMN):
        if name not in schema.names:
            raise CatalogError(f"Lance table {table_uri} has no {name!r} column; it has {schema.names}")
    id_type = schema.field(ID_COLUMN).type
    if not pa.types.is_integer(id_type):
        raise CatalogError(f"{table_uri}: {ID_COLUMN!r} is {id_type}; expected int64")
    emb_type = schema.field(EMBEDDING_COLUMN).type
    if not (pa.types.is_fixed_size_list(emb_type) and pa.types.is_floating(emb_type.value_type)):
        raise CatalogError(
            f"{table_uri}: {EMBEDDING_COLUMN!r} is {emb_type}; expected fixed_size_list<float32>[D]"
        )
    return emb_type.list_size


def embeddings_to_matrix(arr: pa.Array, metric: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Arrow fixed-size-list embeddings -> (kept rows (m, D) float32, keep mask (n,), skip counts).

    Null rows, rows with any non-finite value and, for ``cosine``, all-zero rows are dropped;
    kept rows are L2-normalised for ``cosine``.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n, dim = len(arr), arr.type.list_size
    values = arr.values.slice(arr.offset * dim, n * dim)  # nulls inside become NaN below
    x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)  # (n, D)
    not_null = arr.is_valid().to_numpy(zero_copy_only=False)
    finite = np.isfinite(x).all(axis=1)
    keep = not_null & finite
    skipped = {"null": int((~not_null).sum()), "non_finite": int((not_null & ~finite).sum()), "zero_norm": 0}
    x = x[keep]
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        nonzero = norms > 0
        skipped["zero_norm"] = int((~nonzero).sum())
        keep[np.flatnonzero(keep)[~nonzero]] = False
        x = x[nonzero] / norms[nonzero, None]
    return np.ascontiguousarray(x, dtype=np.float32), keep, skipped


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """An empty FAISS index that accepts int64 ids (non-IVF indexes are wrapped in IndexIDMap2)."""
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise ConfigError(
            f"IndexConfig.factory={factory!r} is not a valid FAISS factory string for dim={dim} ({e}); "
            "examples: 'Flat', 'IVF1024,Flat', 'IVF4096,PQ16', 'HNSW32'"
        ) from e
    ivf = faiss.try_extract_index_ivf(index)
    for part in (index, ivf):
        part = faiss.downcast_index(part) if part is not None else None
        if hasattr(part, "do_polysemous_training"):
            # The factory turns on polysemous PQ training: minutes of annealing that only
            # Hamming-threshold search (which we never use) benefits from.
            part.do_polysemous_training = False
    if ivf is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)
    return index


def _training_sample(ds: lance.LanceDataset, size: int, config: IndexConfig) -> np.ndarray:
    """A seeded random sample of valid (normalised for cosine) embeddings, read with ``take``."""
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(ds.count_rows(), size=size, replace=False))
    parts = []
    for start in range(0, size, config.batch_size):
        tbl = ds.take(rows[start : start + config.batch_size], columns=[EMBEDDING_COLUMN])
        x, _, _ = embeddings_to_matrix(tbl.column(EMBEDDING_COLUMN), config.metric)
        parts.append(x)
    return np.concatenate(parts)


def _train(index: faiss.Index, ds: lance.LanceDataset, factory: str, config: IndexConfig) -> int:
    """Train ``index`` if it needs it; returns the number of training vectors used."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    wanted = max(config.train_per_list * nlist, MIN_TRAIN_VECTORS)
    size = min(ds.count_rows(), wanted, config.max_train_vectors)
    sample = _training_sample(ds, size, config)
    if len(sample) < max(nlist, 1):
        raise ConfigError(
            f"factory {factory!r} needs at least {max(nlist, 1)} valid training vectors, got {len(sample)}; "
            "use a smaller nlist or the exact 'Flat' index for a table this small"
        )
    log.info("training %s on %d sampled vectors (seed %d)", factory, len(sample), config.seed)
    index.train(sample)
    return len(sample)


def _add_batches(
    index: faiss.Index, ds: lance.LanceDataset, table_uri: str, config: IndexConfig
) -> tuple[int, dict[str, int]]:
    """Stream the table into ``index``; returns (rows read, skip counts). Checks ids are unique."""
    n_read, skipped, ids_added = 0, {"null": 0, "non_finite": 0, "zero_norm": 0}, []
    for batch in ds.to_batches(columns=[ID_COLUMN, EMBEDDING_COLUMN], batch_size=config.batch_size):
        id_col = batch.column(ID_COLUMN)
        if id_col.null_count:
            raise CatalogError(f"{table_uri}: {id_col.null_count} rows have a null {ID_COLUMN}; every row needs one")
        ids = id_col.to_numpy().astype(np.int64, copy=False)
        x, keep, batch_skipped = embeddings_to_matrix(batch.column(EMBEDDING_COLUMN), config.metric)
        index.add_with_ids(x, ids[keep])
        ids_added.append(ids[keep])
        n_read += batch.num_rows
        skipped = {k: skipped[k] + batch_skipped[k] for k in skipped}
    all_ids = np.sort(np.concatenate(ids_added)) if ids_added else np.zeros(0, np.int64)
    dupes = np.unique(all_ids[1:][all_ids[1:] == all_ids[:-1]])
    if len(dupes):
        raise CatalogError(
            f"{table_uri}: {len(dupes)} {ID_COLUMN}s occur more than once (e.g. {dupes[:5].tolist()}); "
            "ids must be unique for the index to map neighbours back to rows"
        )
    if index.ntotal != len(all_ids):
        raise CatalogError(f"{table_uri}: index holds {index.ntotal} vectors after adding {len(all_ids)} rows")
    return n_read, skipped


def write_index(index: faiss.Index, meta: IndexMeta) -> str:
    """Write ``index.faiss`` then ``index.json`` beside the table; returns the index directory."""
    root = index_dir(meta.table_uri)
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    meta_path = f"{path}/{META_FILE}"
    if fs.exists(meta_path):  # until the new index is fully written, the directory is incomplete
        fs.rm(meta_path)
    with fs.open(f"{path}/{INDEX_FILE}", "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    with fs.open(meta_path, "wb") as f:
        f.write(meta.to_json().encode())
    return root


def build_index(table_uri: str, config: IndexConfig = IndexConfig()) -> IndexMeta:
    """Build, train and write the index of ``table_uri``'s embeddings; returns its metadata."""
    t0 = time.perf_counter()
    ds = open_table(table_uri)  # pinned to the version read now, even if the table moves on
    dim = embedding_dim(ds.schema, table_uri)
    n_rows = ds.count_rows()
    if n_rows == 0:
        raise CatalogError(f"Lance table {table_uri} has no rows; run the embed job first")
    factory = config.factory or choose_factory(n_rows, dim)
    log.info(
        "indexing %s (version %d, %d rows, dim %d) as %r, metric %s",
        table_uri, ds.version, n_rows, dim, factory, config.metric,
    )
    index = make_index(factory, dim, config.metric)
    train_size = _train(index, ds, factory, config)
    n_read, skipped = _add_batches(index, ds, table_uri, config)
    if sum(skipped.values()):
        n_skipped = sum(skipped.values())
        log.warning("%s: skipped %d of %d rows without a usable embedding: %s", table_uri, n_skipped, n_read, skipped)
    if index.ntotal == 0:
        raise CatalogError(f"Lance table {table_uri} has no valid embeddings ({skipped}); nothing to index")
    ivf = faiss.try_extract_index_ivf(index)
    nprobe = None
    if ivf is not None:
        nprobe = min(config.nprobe or default_nprobe(ivf.nlist), ivf.nlist)
    elif config.nprobe is not None:
        log.info("nprobe=%d ignored: %r has no inverted lists", config.nprobe, factory)
    meta = IndexMeta(
        table_uri=table_uri,
        table_version=ds.version,
        n_vectors=int(index.ntotal),
        dim=dim,
        metric=config.metric,
        factory=factory,
        nprobe=nprobe,
        n_rows_read=n_read,
        n_skipped=skipped,
        train_size=train_size,
        seed=config.seed,
        engine_version=__version__,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - t0, 3),
    )
    root = write_index(index, meta)
    log.info("wrote %d vectors to %s in %.2f s", meta.n_vectors, root, meta.build_seconds)
    return meta
