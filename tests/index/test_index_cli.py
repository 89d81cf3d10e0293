import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cli import build_parser, main
from engine.index.build import index_dir

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_search_subprocess_prints_k_neighbours(indexed_uri, sample_ids):
    query = int(sample_ids[0])
    proc = run("-m", "engine", "search", "--table", indexed_uri, "--id", str(query), "-k", "7")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"7 nearest to object_id {query} (Flat, cosine distance)"
    assert lines[1].split() == ["rank", "object_id", "distance", "z_phot_mean"]
    rows = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    assert int(rows[0][1]) == query and float(rows[0][2]) == pytest.approx(0.0, abs=1e-6)
    assert all(int(r[1]) in set(sample_ids.tolist()) for r in rows)
    assert "stale" not in proc.stderr


def test_index_job_then_stale_table_makes_search_warn(table_uri, append_rows, sample_ids):
    job = run("jobs/index.py", "--table", table_uri)
    assert job.returncode == 0, job.stderr
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["index"] == index_dir(table_uri) and summary["factory"] == "Flat"
    assert (summary["n_vectors"], summary["table_version"], summary["n_skipped"]) == (5000, 1, 0)
    append_rows(table_uri, 3)
    proc = run("-m", "engine", "search", "--table", table_uri, "--id", str(sample_ids[1]), "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: stale index")]
    assert len(warning) == 1
    assert "built from table version 1, but the table is at version 2" in warning[0]
    assert f"Rebuild with: python jobs/index.py --table {table_uri}" in warning[0]
    assert "built from table version 1" in json.loads(proc.stdout)["stale"]
    strict = run("-m", "engine", "search", "--table", table_uri, "--id", str(sample_ids[1]), "--strict")
    assert strict.returncode == 2 and "ERROR: stale index" in strict.stderr and strict.stdout == ""


def test_search_json_in_process(indexed_uri, sample_ids, sample_embedding, knn_oracle, capsys):
    assert main(["search", "--table", indexed_uri, "--id", str(sample_ids[99]), "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["factory"], out["metric"], out["stale"], out["nprobe"]) == ("Flat", "cosine", None, None)
    (result,) = out["results"]
    assert result["query"] == {"object_id": int(sample_ids[99])}
    ids, dist = knn_oracle(sample_embedding, sample_ids, sample_embedding[99], 4)
    assert [n["object_id"] for n in result["neighbours"]] == ids.tolist()
    np.testing.assert_allclose([n["distance"] for n in result["neighbours"]], dist, atol=1e-5)
    assert [n["rank"] for n in result["neighbours"]] == [1, 2, 3, 4]


def test_search_vector_file_gives_one_block_per_row(indexed_uri, sample_ids, sample_embedding, tmp_path, capsys):
    path = tmp_path / "q.npy"
    np.save(path, sample_embedding[[3, 8]])
    assert main(["search", "--table", indexed_uri, "--vector", str(path), "-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["query"]["row"] for r in results] == [0, 1]
    assert [r["neighbours"][0]["object_id"] for r in results] == [int(sample_ids[3]), int(sample_ids[8])]


def test_unknown_id_and_wrong_dimension_exit_2_with_message(indexed_uri, tmp_path, caplog, capsys):
    with caplog.at_level(logging.ERROR, logger="engine.cli"):
        assert main(["search", "--table", indexed_uri, "--id", "42"]) == 2
    assert f"object_id 42 is not in table {indexed_uri}" in caplog.text
    path = tmp_path / "short.npy"
    np.save(path, np.ones(3, np.float32))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="engine.cli"):
        assert main(["search", "--table", indexed_uri, "--vector", str(path)]) == 2
    assert "query vectors have shape (3,); the index expects dimension 8" in caplog.text
    assert capsys.readouterr().out == ""


def test_id_and_vector_are_mutually_exclusive_and_one_is_required(indexed_uri):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--table", indexed_uri])
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--table", indexed_uri, "--id", "1", "--vector", "x.npy"])
