import numpy as np
import pytest

from engine.errors import SearchError, StaleIndexError
from engine.index.build import IndexConfig, build_index
from engine.index.query import (
    check_staleness,
    embedding_of,
    load_query_vectors,
    lookup_z,
    open_index,
    search_id,
    search_vectors,
)


@pytest.fixture(scope="module")
def si(indexed_uri):
    return open_index(indexed_uri)


@pytest.mark.parametrize("row", [0, 1, 2500, 4321, 4999])
def test_flat_neighbours_equal_brute_force_cosine(si, row, sample_embedding, sample_ids, knn_oracle):
    found = search_id(si, sample_ids[row], k=10)
    ids, dist = knn_oracle(sample_embedding, sample_ids, sample_embedding[row], 10)
    np.testing.assert_array_equal(found.object_id, ids)
    np.testing.assert_allclose(found.distance, dist, atol=1e-5)


def test_query_object_is_rank_one_at_distance_zero(si, sample_ids):
    found = search_id(si, sample_ids[17], k=5)
    assert found.object_id[0] == sample_ids[17]
    assert found.distance[0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(found.distance) >= 0)
    assert found.rows()[0] == {
        "rank": 1,
        "object_id": int(sample_ids[17]),
        "distance": float(found.distance[0]),
        "z_phot_mean": float(found.z_phot_mean[0]),
    }


def test_neighbours_carry_z_phot_mean_of_their_rows(si, sample, sample_ids):
    found = search_id(si, sample_ids[300], k=10)
    z_by_id = dict(zip(sample_ids.tolist(), sample.column("z_spec").to_numpy().astype(np.float32).tolist()))
    np.testing.assert_array_equal(found.z_phot_mean, [z_by_id[i] for i in found.object_id.tolist()])


def test_lookup_z_keeps_query_order_and_marks_unknown_ids_nan(si, sample, sample_ids):
    z = sample.column("z_spec").to_numpy().astype(np.float32)
    got = lookup_z(si.dataset, np.array([sample_ids[9], 42, sample_ids[2], sample_ids[9]]))
    np.testing.assert_array_equal(got, [z[9], np.nan, z[2], z[9]])


def test_embedding_of_returns_the_stored_row(si, sample_embedding, sample_ids):
    np.testing.assert_array_equal(embedding_of(si, sample_ids[55]), sample_embedding[55])


def test_vector_queries_match_id_queries_row_by_row(si, sample_embedding, sample_ids):
    rows = [5, 6, 7]
    by_vector = search_vectors(si, sample_embedding[rows] * 3.0, k=8)  # cosine ignores scale
    assert len(by_vector) == 3
    for row, found in zip(rows, by_vector):
        expected = search_id(si, sample_ids[row], k=8)
        np.testing.assert_array_equal(found.object_id, expected.object_id)
        np.testing.assert_allclose(found.distance, expected.distance, atol=1e-6)


def test_k_larger_than_index_returns_every_vector_once(si, sample_ids):
    found = search_id(si, sample_ids[0], k=6000)
    assert len(found.object_id) == 5000
    assert sorted(found.object_id.tolist()) == sorted(sample_ids.tolist())


def test_unknown_id_names_id_and_table(si, indexed_uri):
    with pytest.raises(SearchError, match=rf"object_id 42 is not in table {indexed_uri} \(version 1\)"):
        search_id(si, 42, k=3)


def test_wrong_dimension_vector_says_expected_and_got(si):
    with pytest.raises(SearchError, match=r"shape \(5,\); the index expects dimension 8"):
        search_vectors(si, np.ones(5, np.float32), k=3)


def test_npy_query_file_wrong_dimension_and_round_trip(si, tmp_path, sample_embedding):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 5), np.float32))
    with pytest.raises(SearchError, match=r"bad.npy: query vectors have shape \(3, 5\); the index expects dimension 8"):
        load_query_vectors(str(bad), dim=8)
    good = tmp_path / "good.npy"
    np.save(good, sample_embedding[10].astype(np.float64))
    loaded = load_query_vectors(str(good), dim=8)
    assert loaded.dtype == np.float32 and loaded.shape == (1, 8)
    np.testing.assert_array_equal(loaded[0], sample_embedding[10])


def test_npy_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SearchError, match=r"cannot read query vectors from .*objects.npy"):
        load_query_vectors(str(path), dim=8)


def test_non_finite_or_zero_query_vectors_are_rejected(si):
    with pytest.raises(SearchError, match="must be finite"):
        search_vectors(si, np.full(8, np.nan), k=3)
    with pytest.raises(SearchError, match="all-zero vector"):
        search_vectors(si, np.zeros(8), k=3)
    with pytest.raises(SearchError, match=r"k=0; expected an integer >= 1"):
        search_vectors(si, np.ones(8), k=0)


def test_missing_index_says_how_to_build_it(table_uri):
    with pytest.raises(SearchError, match=rf"no index for table {table_uri}.*python jobs/index.py --table {table_uri}"):
        open_index(table_uri)


def test_staleness_detected_after_append(table_uri, append_rows, sample_ids):
    build_index(table_uri)
    assert open_index(table_uri).stale is None
    append_rows(table_uri, 10)
    si = open_index(table_uri)
    assert (si.stale.index_version, si.stale.table_version) == (1, 2)
    assert "Rebuild with: python jobs/index.py --table" in si.stale.message
    with pytest.raises(StaleIndexError, match=r"built from table version 1, but the table is at version 2"):
        open_index(table_uri, strict=True)
    # The stale index still answers, but only with the rows it was built from.
    found = search_id(si, sample_ids[0], k=5000 + 10)
    assert len(found.object_id) == 5000
    new_row = search_id(si, sample_ids[0] + 10_000, k=3)  # in the table, not yet in the index
    assert new_row.object_id[0] == sample_ids[0] and new_row.distance[0] == pytest.approx(0.0, abs=1e-6)
    build_index(table_uri)
    assert open_index(table_uri).stale is None and open_index(table_uri).meta.n_vectors == 5010


def test_check_staleness_compares_versions(si):
    assert check_staleness("t.lance", si.meta, si.meta.table_version) is None
    stale = check_staleness("t.lance", si.meta, si.meta.table_version + 3)
    assert (stale.table_uri, stale.index_version, stale.table_version) == ("t.lance", 1, 4)
    assert stale.message.endswith("Rebuild with: python jobs/index.py --table t.lance")


def test_nprobe_override_sets_lists_searched(table_uri):
    build_index(table_uri, IndexConfig(factory="IVF16,Flat"))
    assert open_index(table_uri).nprobe == 4  # default: sqrt(16)
    assert open_index(table_uri, nprobe=16).nprobe == 16
    assert open_index(table_uri, nprobe=99).nprobe == 16  # never more than nlist
