"""Bad files, bad rows, duplicate ids, a killed driver and a killed model actor: nothing lost, nothing doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import UnitsFailedError
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.pipeline.units import committed_units
from engine.release import make_release

ROOT = Path(__file__).resolve().parents[2]


def _ids(paths) -> np.ndarray:
    return np.sort(np.concatenate([pq.read_table(p, columns=["object_id"])["object_id"].to_numpy() for p in paths]))


def _table_ids(uri) -> np.ndarray:
    return np.sort(lance.dataset(str(uri)).to_table(columns=["object_id"])["object_id"].to_numpy())


def test_release_generator_is_deterministic_and_realistic(tmp_path):
    a = make_release(tmp_path / "a", 3000, 3, seed=5)
    b = make_release(tmp_path / "b", 3000, 3, seed=5)
    ta, tb = pq.read_table(a[1]), pq.read_table(b[1])
    assert ta.equals(tb) and len(a) == 3
    ids = _ids(a)
    assert len(np.unique(ids)) == 3000
    r = ta["mag_r"].to_numpy()
    assert 11 < r.min() and r.max() < 19  # SDSS MGS r < 17.8 plus noise
    hp = make_release(tmp_path / "hp", 2000, 2, seed=5, healpix_nside=1)
    assert all(p.parent.name.startswith("healpix=") for p in hp)
    assert len(_ids(hp)) == 2000


def test_bad_files_are_reported_and_the_rest_completes(ray_session, model_dir, tmp_path):
    good = make_release(tmp_path / "in", 3000, 3, seed=1)
    (tmp_path / "in" / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(500))
    pq.write_table(pq.read_table(good[0]).drop_columns(["mag_i"]), tmp_path / "in" / "wrong_schema.parquet")
    pq.write_table(pq.read_table(good[0]).slice(0, 0), tmp_path / "in" / "empty.parquet")
    dup = pq.read_table(good[1]).slice(0, 10)  # 10 ids that also occur in part-00001
    pq.write_table(dup, tmp_path / "in" / "dups.parquet")
    out = tmp_path / "o.lance"
    cfg = EmbedConfig(catalog=(str(tmp_path / "in"),), out=str(out), model_dir=model_dir, max_failed_fraction=0.5)
    s = run_embed(cfg)
    failed = {Path(f["path"]).name: f["reason"] for f in s["failed_units"]}
    assert set(failed) == {"corrupt.parquet", "wrong_schema.parquet"}
    assert "not a readable Parquet file" in failed["corrupt.parquet"]
    assert "'mag_i'" in failed["wrong_schema.parquet"]
    assert [Path(p).name for p in s["empty_files"]] == ["empty.parquet"]
    assert s["duplicate_ids"]["n"] == 10
    expected = np.sort(np.concatenate([_ids(good), dup["object_id"].to_numpy()]))
    assert np.array_equal(_table_ids(out), expected)  # duplicates kept row by row, reported
    written = json.loads(Path(str(out) + ".summary.json").read_text())
    assert written["failed_units"] == s["failed_units"] and written["rows_out"] == 3010
    # the same input with the default tolerance (0) fails, naming the files, before any work
    with pytest.raises(UnitsFailedError, match=r"2 of 7 input file\(s\) failed before any work.*corrupt.parquet"):
        run_embed(EmbedConfig(catalog=(str(tmp_path / "in"),), out=str(tmp_path / "o2.lance"), model_dir=model_dir))
    assert not (tmp_path / "o2.lance").exists()


def _embed_cmd(catalog, out, *extra):
    return [sys.executable, str(ROOT / "jobs" / "embed.py"), "--catalog", str(catalog), "--out", str(out),
            "--batch-size", "2000", *extra]


def _popen(cmd, env=None):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_driver_killed_mid_run_then_resume_is_exactly_once(tmp_path):
    paths = make_release(tmp_path / "in", 120_000, 24, seed=2)
    out = tmp_path / "o.lance"
    proc = _popen(_embed_cmd(tmp_path / "in", out) + ["--commit-seconds", "0"])
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = committed_units(str(out)) if (out / "_versions").exists() else {}
            if 0 < len(done) < 24:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed: " + proc.stdout.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; then its local Ray
    finally:
        _kill_group(proc)
    before = committed_units(str(out))
    assert 0 < len(before) < 24
    res = subprocess.run(_embed_cmd(tmp_path / "in", out, "--resume"), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{"out"')))
    assert summary["units_skipped_already_committed"] == len(before)
    assert summary["units_committed_this_run"] == 24 - len(before)
    assert np.array_equal(_table_ids(out), _ids(paths))  # every id exactly once
    assert len(committed_units(str(out))) == 24


def test_model_actor_killed_mid_run_is_survived(tmp_path):
    paths = make_release(tmp_path / "in", 40_000, 8, seed=3)
    out = tmp_path / "o.lance"
    marker = tmp_path / "crashed"
    proc = _popen(_embed_cmd(tmp_path / "in", out), env={"ENGINE_FAULT_KILL_MODEL_ACTOR_ONCE": str(marker)})
    try:
        stdout, _ = proc.communicate(timeout=600)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, stdout[-3000:]
    assert marker.exists()  # the actor really died once
    assert np.array_equal(_table_ids(out), _ids(paths))
