"""Real Lance tables from the SDSS sample: embedding = standardised magnitudes and colours (D=8)."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.index.build import IndexConfig, build_index
from engine.sample import SAMPLE_PATH



def features(sample: pa.Table) -> np.ndarray:
    """(N, 8) float32: standardised mag_r, u-g, g-r, r-i, i-z, mag_u, mag_z, magerr_r."""
    m = {b: sample.column(f"mag_{b}").to_numpy() for b in "ugriz"}
    cols = [m["r"], m["u"] - m["g"], m["g"] - m["r"], m["r"] - m["i"], m["i"] - m["z"], m["u"], m["z"]]
    cols.append(sample.column("magerr_r").to_numpy())
    x = np.stack(cols, axis=1)
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def embed_table(sample: pa.Table, embedding: np.ndarray | pa.Array, id_offset: int = 0) -> pa.Table:
    """The embed job's schema, with z_spec standing in for the photo-z posterior summary."""
    z = sample.column("z_spec").to_numpy().astype(np.float32)
    sd = (0.02 * (1 + z)).astype(np.float32)
    if isinstance(embedding, np.ndarray):
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel(), pa.float32()), embedding.shape[1])
    cols = {
        "object_id": pa.array(sample.column("object_id").to_numpy() + id_offset, pa.int64()),
        "embedding": embedding,
        "z_phot_mean": z,
        "z_phot_median": z,
        "z_phot_mode": z,
        "z_phot_std": sd,
        "z_phot_l68": z - sd,
        "z_phot_u68": z + sd,
        "z_phot_l95": z - 2 * sd,
        "z_phot_u95": z + 2 * sd,
        "flags": np.zeros(len(z), np.int32),
    }
    return pa.table(cols)


def _brute_force(emb: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, metric: str = "cosine"):
    """Oracle kNN in float64: (ids, distances) of the k nearest rows, ties broken by row order."""
    e, q = emb.astype(np.float64), query.astype(np.float64)
    if metric == "cosine":
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        d = 1.0 - e @ (q / np.linalg.norm(q))
    else:
        d = np.sqrt(((e - q) ** 2).sum(axis=1))
    order = np.argsort(d, kind="stable")[:k]
    return ids[order], d[order]


@pytest.fixture(scope="session")
def sample() -> pa.Table:
    return pq.read_table(SAMPLE_PATH)


@pytest.fixture(scope="session")
def sample_embedding(sample) -> np.ndarray:
    return features(sample)


@pytest.fixture(scope="session")
def sample_ids(sample) -> np.ndarray:
    return sample.column("object_id").to_numpy().astype(np.int64)


@pytest.fixture(scope="session")
def knn_oracle():
    """``knn_oracle(emb, ids, query, k, metric="cosine") -> (ids, distances)``, brute force in numpy."""
    return _brute_force


@pytest.fixture
def write_table(tmp_path, sample, sample_embedding):
    """``write_table(name, embedding=None, id_offset=0) -> uri``: a fresh Lance table (version 1)."""

    def write(name: str = "sdss.lance", embedding=None, id_offset: int = 0) -> str:
        uri = str(tmp_path / name)
        emb = sample_embedding if embedding is None else embedding
        lance.write_dataset(embed_table(sample, emb, id_offset), uri)
        return uri

    return write


@pytest.fixture(scope="session")
def append_rows(sample, sample_embedding):
    """``append_rows(uri, n=10)``: append the first n sample rows under new ids (a new table version)."""

    def append(uri: str, n: int = 10) -> None:
        extra = embed_table(sample.slice(0, n), sample_embedding[:n], id_offset=10_000)
        lance.write_dataset(extra, uri, mode="append")

    return append


@pytest.fixture
def table_uri(write_table) -> str:
    """A fresh Lance table (version 1) per test, for tests that change it."""
    return write_table()


@pytest.fixture(scope="session")
def indexed_uri(tmp_path_factory, sample, sample_embedding) -> str:
    """A Lance table with its default (Flat, cosine) index built; read-only for tests."""
    uri = str(tmp_path_factory.mktemp("indexed") / "sdss.lance")
    lance.write_dataset(embed_table(sample, sample_embedding), uri)
    build_index(uri, IndexConfig())
    return uri
