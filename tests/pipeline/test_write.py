import numpy as np

from engine.pipeline.write import compare_ids


def test_compare_ids_is_a_multiset_comparison():
    ids = np.random.default_rng(2).permutation(10_000).astype(np.int64)
    assert compare_ids(ids, ids[::-1].copy())["ok"]  # order never matters

    lost = compare_ids(ids, np.delete(ids, [10, 20]))
    assert not lost["ok"] and lost["n_lost"] == 2 and sorted(lost["lost"]) == sorted(ids[[10, 20]].tolist())

    repeated = np.concatenate([ids[:-1], ids[:1]])  # same length: one id lost, another written twice
    rep = compare_ids(ids, repeated)
    assert not rep["ok"] and rep["lost"] == [int(ids[-1])] and rep["count_mismatch"] == [int(ids[0])]

    unknown = ids.copy()
    unknown[5] = -7
    unk = compare_ids(ids, unknown)
    assert not unk["ok"] and unk["unknown"] == [-7] and unk["lost"] == [int(ids[5])]

    dup_input = np.concatenate([ids, ids[:3]])  # duplicates in the file itself are fine when written as often
    assert compare_ids(dup_input, dup_input[::-1].copy())["ok"]
    assert not compare_ids(dup_input, ids)["ok"]
