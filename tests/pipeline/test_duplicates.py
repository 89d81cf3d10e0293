import numpy as np
import pytest

from engine.pipeline.duplicates import DuplicateCounter


def _oracle(chunks, limit=5):
    uniq, counts = np.unique(np.concatenate(chunks), return_counts=True)
    dups = uniq[counts > 1]
    return len(dups), dups[:limit].tolist()


@pytest.mark.parametrize("spill_rows", [10**9, 0, 5000])  # all in memory, spill from the first id, spill midway
def test_duplicates_match_np_unique_whether_or_not_ids_spill(tmp_path, spill_rows):
    rng = np.random.default_rng(11)
    chunks = [rng.integers(-(2**62), 2**62, size=n) for n in (3000, 4000, 2500)]
    chunks[1][:40] = chunks[0][100:140]  # cross-chunk duplicates
    chunks[2][7] = chunks[2][8] = chunks[1][500]  # an id three times
    chunks.append(np.array([-1, -1, 0, 2**63 - 1, 2**63 - 1], dtype=np.int64))  # extremes of int64
    counter = DuplicateCounter(spill_rows=spill_rows, n_buckets=7, tmp_dir=str(tmp_path))
    for c in chunks:
        counter.add(c)
    assert (counter.dir is not None) == (spill_rows < 10**9)
    assert counter.duplicates() == _oracle(chunks) and _oracle(chunks)[0] == 40 + 1 + 2
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_spilled_buckets_hold_every_id_once_and_are_bounded(tmp_path):
    ids = np.arange(200_000, dtype=np.int64) * 3  # consecutive-ish ids, as surveys number them
    counter = DuplicateCounter(spill_rows=0, n_buckets=16, tmp_dir=str(tmp_path))
    counter.add(ids)
    sizes = [p.stat().st_size // 8 for p in counter.dir.glob("*.i64")]
    assert sum(sizes) == len(ids) and len(sizes) == 16
    assert max(sizes) < 1.2 * len(ids) / 16  # the hash spreads them: memory per bucket ~ total / buckets
    assert counter.duplicates() == (0, [])
