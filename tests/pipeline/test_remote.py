"""The embed job reading from and writing to S3: a real S3-protocol server (moto) on 127.0.0.1."""

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

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.5)
    # pyarrow reads AWS_ENDPOINT_URL, Lance (object_store) AWS_ENDPOINT and AWS_ALLOW_HTTP
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "RAY_AUTH_MODE": "disabled"}
    yield env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_embed_from_s3_to_s3(s3_env, holdout_table):
    old = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="survey")
        fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1")
        halves = [holdout_table.slice(0, 500), holdout_table.slice(500)]
        for i, part in enumerate(halves):
            pq.write_table(part, f"survey/release/part-{i}.parquet", filesystem=fs)
        res = subprocess.run([sys.executable, str(ROOT / "jobs" / "embed.py"), "--catalog", "s3://survey/release/",
                              "--out", "s3://survey/out/holdout.lance"], capture_output=True, text=True, timeout=600,
                             env={**os.environ})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{"out"')))
        assert summary["files"] == 2 and summary["rows_out"] == holdout_table.num_rows
        import lance

        got = lance.dataset("s3://survey/out/holdout.lance").to_table(columns=["object_id", "z_phot_mean"])
        assert np.array_equal(np.sort(got["object_id"].to_numpy()), np.sort(holdout_table["object_id"].to_numpy()))
        with fs.open_input_stream("survey/out/holdout.lance.summary.json") as f:
            assert json.loads(f.read())["rows_out"] == holdout_table.num_rows
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
