"""The embed job submitted with a real `ray job submit` to a head node this test starts and stops itself.

The head runs in its own process group (``ray start --head --block``) and is stopped by
signalling that group only: never ``ray stop``, which would end every Ray process on the host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    gcs, dash = _free_port(), _free_port()
    # Every fixed default port gets a free one: the session's own local Ray already holds the defaults.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats", *ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not come up: {Path(log.name).read_text()[-2000:]}")
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        # `ray start` recorded this head as the host's current cluster; a later plain ray.init() would try to join it.
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.exists() and f":{gcs}" in marker.read_text():
            marker.unlink()


def test_embed_job_via_ray_job_submit(head, holdout_table, tmp_path):
    address, env = head
    catalog = tmp_path / "holdout.parquet"
    pq.write_table(holdout_table, catalog)
    out = tmp_path / "submitted.lance"
    cmd = [RAY, "job", "submit", "--address", address, "--runtime-env-json",
           json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), "--",
           sys.executable, str(ROOT / "jobs" / "embed.py"), "--catalog", str(catalog), "--out", str(out),
           "--batch-size", "500"]
    deadline = time.time() + 180
    while True:  # the dashboard answers before the head's job agent is ready; submission is refused until then
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in res.stderr + res.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{"out"')))
    assert summary["rows_in"] == summary["rows_out"] == holdout_table.num_rows
    got = lance.dataset(str(out)).to_table(columns=["object_id", "z_phot_mean"])
    assert np.array_equal(np.sort(got["object_id"].to_numpy()), np.sort(holdout_table["object_id"].to_numpy()))
    assert np.isfinite(got["z_phot_mean"].to_numpy()).all()
