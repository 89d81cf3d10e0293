import dataclasses
import json
import logging
from pathlib import Path

import faiss
import lance
import numpy as np
import pyarrow as pa
import pytest

import engine
from engine.errors import CatalogError, ConfigError, SearchError
from engine.index.build import (
    IndexConfig,
    build_index,
    choose_factory,
    default_nprobe,
    embeddings_to_matrix,
    index_dir,
    make_index,
    write_index,
)
from engine.index.query import open_index, read_index, search_id


@pytest.mark.parametrize(
    "n, dim, expected",
    [
        (1, 64, "Flat"),
        (99_999, 64, "Flat"),
        (100_000, 64, "IVF1265,Flat"),  # 4 * sqrt(1e5) = 1264.9
        (1_000_000, 64, "IVF4000,Flat"),
        (2_000_000, 64, "IVF5657,Flat"),
        (2_000_001, 64, "IVF5657,PQ16"),  # 64 dims / 16 = 4 dims per subquantizer
        (10_000_000, 768, "IVF12649,PQ64"),  # capped at 64 subquantizers
        (10_000_000, 100, "IVF12649,PQ25"),  # largest divisor of 100 that is <= 25
        (10_000_000, 8, "IVF12649,PQ2"),
    ],
)
def test_choose_factory_by_size(n, dim, expected):
    assert choose_factory(n, dim) == expected


def test_default_nprobe_is_about_sqrt_nlist_and_never_above_it():
    assert [default_nprobe(n) for n in (1, 4, 16, 1265, 12649)] == [1, 2, 4, 36, 112]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "dot"}, r"IndexConfig.metric='dot'; expected one of \('cosine', 'l2'\)"),
        ({"factory": " "}, r"IndexConfig.factory is empty"),
        ({"batch_size": 0}, r"IndexConfig.batch_size=0"),
        ({"nprobe": 0}, r"IndexConfig.nprobe=0"),
    ],
)
def test_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IndexConfig(**kwargs)


def test_build_writes_index_and_metadata_beside_table(table_uri):
    meta = build_index(table_uri, IndexConfig(batch_size=1000))  # 5 streamed batches
    root = Path(index_dir(table_uri))
    assert root == Path(table_uri + ".faiss")
    assert sorted(p.name for p in root.iterdir()) == ["index.faiss", "index.json"]
    saved = json.loads((root / "index.json").read_text())
    assert saved["table_uri"] == table_uri
    assert saved["table_version"] == lance.dataset(table_uri).version == 1
    assert saved["n_vectors"] == 5000 and saved["n_rows_read"] == 5000
    assert saved["dim"] == 8
    assert saved["metric"] == "cosine" and saved["factory"] == "Flat" and saved["nprobe"] is None
    assert saved["n_skipped"] == {"null": 0, "non_finite": 0, "zero_norm": 0}
    assert saved["engine_version"] == engine.__version__
    assert saved["train_size"] == 0
    assert meta.n_vectors == 5000 and meta.built_at == saved["built_at"]


def test_rows_without_usable_embedding_are_skipped_counted_and_logged(write_table, sample_embedding, sample_ids, caplog):
    emb = sample_embedding.copy()
    emb[[3, 10, 11], 2] = np.nan
    emb[20, 0] = np.inf
    emb[30] = 0.0  # no cosine direction
    flat = pa.array(emb.ravel(), pa.float32())
    validity = np.ones(len(emb), bool)
    validity[[40, 41]] = False
    arr = pa.FixedSizeListArray.from_arrays(flat, 8, mask=pa.array(~validity))
    uri = write_table(embedding=arr)
    with caplog.at_level(logging.WARNING, logger="engine.index.build"):
        meta = build_index(uri)
    assert meta.n_skipped == {"null": 2, "non_finite": 4, "zero_norm": 1}
    assert meta.n_vectors == 5000 - 7 and meta.n_rows_read == 5000
    assert "skipped 7 of 5000 rows" in caplog.text
    si = open_index(uri)
    found = search_id(si, sample_ids[0], k=5000)
    skipped_ids = set(sample_ids[[3, 10, 11, 20, 30, 40, 41]].tolist())
    assert len(found.object_id) == 4993 and not skipped_ids & set(found.object_id.tolist())
    with pytest.raises(SearchError, match=rf"object_id {sample_ids[3]} .* null or non-finite embedding"):
        search_id(si, sample_ids[3], k=3)


def test_embeddings_to_matrix_normalises_kept_rows_for_cosine():
    arr = pa.array([[3.0, 4.0], None, [0.0, 0.0], [1.0, np.nan], [0.0, -2.0]], pa.list_(pa.float32(), 2))
    x, keep, skipped = embeddings_to_matrix(arr.slice(0), "cosine")
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, -1.0]])
    assert keep.tolist() == [True, False, False, False, True]
    assert skipped == {"null": 1, "non_finite": 1, "zero_norm": 1}
    x_l2, keep_l2, _ = embeddings_to_matrix(arr.slice(2), "l2")  # offset slice; l2 keeps zero rows raw
    np.testing.assert_array_equal(x_l2, [[0.0, 0.0], [0.0, -2.0]])
    assert keep_l2.tolist() == [True, False, True]


def test_ids_above_2_31_round_trip_as_int64(write_table, sample_embedding, sample_ids, knn_oracle):
    offset = 2**33
    uri = write_table(id_offset=offset)
    build_index(uri)
    si = open_index(uri)
    query_id = int(sample_ids[123] + offset)
    found = search_id(si, query_id, k=10)
    assert found.object_id.dtype == np.int64
    assert found.object_id[0] == query_id and query_id > 2**32
    expected_ids, _ = knn_oracle(sample_embedding, sample_ids + offset, sample_embedding[123], 10)
    np.testing.assert_array_equal(found.object_id, expected_ids)


def test_ivf_factory_override_with_full_nprobe_equals_exact_search(table_uri, sample_embedding, sample_ids, knn_oracle):
    meta = build_index(table_uri, IndexConfig(factory="IVF16,Flat", nprobe=16))
    assert (meta.factory, meta.nprobe, meta.train_size) == ("IVF16,Flat", 16, 5000)  # whole table < 10k
    si = open_index(table_uri)
    assert si.nprobe == 16
    for row in (0, 777, 4999):
        found = search_id(si, sample_ids[row], k=20)
        ids, dist = knn_oracle(sample_embedding, sample_ids, sample_embedding[row], 20)
        np.testing.assert_array_equal(found.object_id, ids)
        np.testing.assert_allclose(found.distance, dist, atol=1e-5)


def test_non_ivf_factory_is_wrapped_so_ids_survive(table_uri, sample_ids):
    meta = build_index(table_uri, IndexConfig(factory="HNSW16", nprobe=8))
    assert meta.nprobe is None  # no inverted lists: nprobe is ignored, not stored
    found = search_id(open_index(table_uri), sample_ids[42], k=10)
    assert found.object_id[0] == sample_ids[42]
    assert set(found.object_id.tolist()) <= set(sample_ids.tolist())


def test_l2_metric_matches_euclidean_brute_force(table_uri, sample_embedding, sample_ids, knn_oracle):
    build_index(table_uri, IndexConfig(metric="l2"))
    found = search_id(open_index(table_uri), sample_ids[9], k=10)
    ids, dist = knn_oracle(sample_embedding, sample_ids, sample_embedding[9], 10, metric="l2")
    np.testing.assert_array_equal(found.object_id, ids)
    np.testing.assert_allclose(found.distance, dist, atol=1e-5)


def test_bad_factory_string_is_a_config_error(table_uri):
    with pytest.raises(ConfigError, match=r"factory='IVFoops' is not a valid FAISS factory string for dim=8"):
        build_index(table_uri, IndexConfig(factory="IVFoops"))


def test_too_few_training_vectors_for_nlist_is_a_config_error(table_uri):
    with pytest.raises(ConfigError, match=r"'IVF8192,Flat' needs at least 8192 valid training vectors, got 5000"):
        build_index(table_uri, IndexConfig(factory="IVF8192,Flat"))


def test_duplicate_object_ids_are_rejected(tmp_path):
    uri = str(tmp_path / "dupes.lance")
    emb = pa.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], pa.list_(pa.float32(), 2))
    lance.write_dataset(pa.table({"object_id": pa.array([7, 8, 7], pa.int64()), "embedding": emb}), uri)
    with pytest.raises(CatalogError, match=r"1 object_ids occur more than once \(e.g. \[7\]\)"):
        build_index(uri)


def test_missing_embedding_column_names_table_and_columns(tmp_path):
    uri = str(tmp_path / "noemb.lance")
    lance.write_dataset(pa.table({"object_id": pa.array([1, 2], pa.int64())}), uri)
    with pytest.raises(CatalogError, match=r"noemb.lance has no 'embedding' column; it has \['object_id'\]"):
        build_index(uri)


def test_unreadable_table_uri_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match=r"cannot open Lance table .*nowhere.lance"):
        build_index(str(tmp_path / "nowhere.lance"))


def test_pq_factories_skip_polysemous_training():
    # Polysemous training is minutes of annealing that plain PQ search never uses.
    ivfpq = make_index("IVF4,PQ2", 8, "cosine")
    assert faiss.downcast_index(faiss.extract_index_ivf(ivfpq)).do_polysemous_training is False
    pq = make_index("PQ2", 8, "l2")
    assert isinstance(pq, faiss.IndexIDMap2)
    assert faiss.downcast_index(pq.index).do_polysemous_training is False


def test_index_files_round_trip_through_an_fsspec_uri(indexed_uri):
    index, meta = read_index(indexed_uri)
    remote = dataclasses.replace(meta, table_uri="memory://bucket/sdss.lance")
    assert write_index(index, remote) == "memory://bucket/sdss.lance.faiss"
    index2, meta2 = read_index("memory://bucket/sdss.lance")
    assert meta2 == remote and index2.ntotal == 5000
    x = np.eye(8, dtype=np.float32)
    np.testing.assert_array_equal(index2.search(x, 3)[1], index.search(x, 3)[1])
