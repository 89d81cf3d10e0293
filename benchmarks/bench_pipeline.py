"""Pipeline throughput and memory, side by side in one run (ratios; this machine is noisy).

    python benchmarks/bench_pipeline.py [--quick] [--seed 0]

Measures, on synthetic releases resampled from the real sample (engine.release):
  * e2e rows/s of jobs/embed.py with the default model, and the same model in a bare loop over
    pre-tokenized in-memory arrays (same batch size and precision): their ratio;
  * a straightforward single-process script (read Parquet -> tokenize -> model -> write Lance): our
    ratio to it;
    both at the same number of torch threads, twice: one thread (one model actor), and the whole
    machine (os.cpu_count() threads: the engine runs that many one-thread model actors, the bare loop
    and the script one process with that many threads);
  * the engine's own overhead with the no-op model (64-d embedding out), next to a bare Ray Data ->
    lance-ray pipeline (benchmarks/bare_ray_pipeline.py) on the same release;
  * peak RSS of the whole job (driver + every Ray process: the job's process group) at two sizes.
Prints JSON and writes benchmarks/results/bench_pipeline[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
BATCH = 4096


def release(n_rows: int, seed: int) -> Path:
    from engine.release import make_release

    d = OUT / f"release_{n_rows}_{seed}"
    if not (d / "_done").exists():
        shutil.rmtree(d, ignore_errors=True)
        make_release(d, n_rows, max(4, n_rows // 250_000), seed=seed)
        (d / "_done").touch()
    return d


def _group_rss(pgid: int) -> int:
    """Sum of RSS over every process in a process group (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:  # field 5: pgrp
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return total


def run_job(catalog: Path, model: str, tag: str, model_actors: int = 1) -> dict:
    out = OUT / f"{tag}.lance"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "jobs" / "embed.py"), "--catalog", str(catalog), "--out", str(out),
           "--model", model, "--batch-size", str(BATCH), "--model-threads", "1", "--model-actors", str(model_actors),
           "--precision", "fp32"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _group_rss(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    t.join()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the job's own local Ray, if any
    except ProcessLookupError:
        pass
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{stdout[-3000:]}")
    summary = json.loads(next(line for line in stdout.splitlines() if line.startswith('{"out"')))
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": summary["rows_out"], "wall_seconds": round(wall, 2), "rows_per_s_wall": round(summary["rows_out"] / wall, 1),
            "rows_per_s_pipeline": summary["rows_per_second"], "peak_rss_mb": round(peak[0] / 2**20, 1)}


def model_only(catalog: Path, n_rows: int, threads: int) -> dict:
    import torch

    from engine.model.bundle import ModelBundle
    from engine.sample import DEFAULT_MODEL_DIR

    torch.set_num_threads(threads)
    bundle = ModelBundle.load(DEFAULT_MODEL_DIR)
    files = sorted(catalog.glob("*.parquet"))
    table = pq.read_table(files[0]).slice(0, n_rows)
    enc = bundle.tokenizer.encode({c: table[c].to_numpy() for c in bundle.input_columns.values()})
    n = len(bundle.config.input_modalities)
    tokens, valid = enc.tokens[:, :n], ~enc.missing[:, :n]
    bundle.predict(tokens[:BATCH], valid[:BATCH])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(tokens), BATCH):
        bundle.predict(tokens[s : s + BATCH], valid[s : s + BATCH])
    dt = time.perf_counter() - t0
    return {"rows": len(tokens), "rows_per_s": round(len(tokens) / dt, 1)}


def naive_script(catalog: Path, tag: str, threads: int) -> dict:
    """What a user would write by hand: one process, file by file."""
    import lance
    import pyarrow as pa
    import torch

    from engine.model.bundle import ModelBundle
    from engine.sample import DEFAULT_MODEL_DIR

    torch.set_num_threads(threads)
    out = OUT / f"{tag}.lance"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    bundle = ModelBundle.load(DEFAULT_MODEL_DIR)
    cols = list(bundle.input_columns.values())
    n = len(bundle.config.input_modalities)
    rows = 0
    for i, f in enumerate(sorted(catalog.glob("*.parquet"))):
        t = pq.read_table(f, columns=["object_id", *cols])
        enc = bundle.tokenizer.encode({c: t[c].to_numpy() for c in cols})
        parts = [bundle.predict(enc.tokens[s : s + BATCH, :n], ~enc.missing[s : s + BATCH, :n])
                 for s in range(0, t.num_rows, BATCH)]
        emb = np.concatenate([p["embedding"] for p in parts])
        data = {"object_id": t["object_id"],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                "z_phot_mean": pa.array(np.concatenate([p["z_phot_mean"] for p in parts]))}
        lance.write_dataset(pa.table(data), str(out), mode="append" if i else "create")
        rows += t.num_rows
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "rows_per_s": round(rows / dt, 1)}


def bare_pipeline(catalog: Path) -> dict:
    """benchmarks/bare_ray_pipeline.py in its own process and Ray instance."""
    cmd = [sys.executable, str(HERE / "bare_ray_pipeline.py"), str(catalog), str(OUT / "bare.lance")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        raise RuntimeError(f"bare pipeline failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]  # Ray may print after the result line
    if not lines:
        raise RuntimeError(f"bare pipeline printed no JSON result; stdout ends:\n{proc.stdout[-2000:]}")
    res = json.loads(lines[-1])
    return {**res, "wall_seconds": round(time.perf_counter() - t0, 2)}


def model_comparison(release_dir: Path, n_model_only: int, threads: int) -> dict:
    """Model-only loop, e2e job and the naive script, all at ``threads`` torch threads in total."""
    res = {"torch_threads_total": threads, "engine_model_actors": threads, "engine_threads_per_actor": 1,
           "model_only": model_only(release_dir, n_model_only, threads),
           "e2e_default_model": run_job(release_dir, "engine/data/default_model", f"e2e_model_{threads}", threads),
           "naive_script": naive_script(release_dir, f"naive_{threads}", threads)}
    e2e = res["e2e_default_model"]["rows_per_s_wall"]
    res["ratio_e2e_to_model_only"] = round(e2e / res["model_only"]["rows_per_s"], 3)
    res["ratio_e2e_to_naive"] = round(e2e / res["naive_script"]["rows_per_s"], 3)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small N for routine runs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    OUT.mkdir(exist_ok=True)
    n_model = 100_000 if a.quick else 1_000_000
    n_small, n_large = (200_000, 1_000_000) if a.quick else (1_000_000, 10_000_000)
    cpus = os.cpu_count() or 1
    res: dict = {"quick": a.quick, "seed": a.seed, "batch_size": BATCH, "cpus": cpus}
    model_release = release(n_model, a.seed)
    res["whole_machine"] = model_comparison(model_release, min(n_model, 100_000), cpus)
    res["one_thread"] = model_comparison(model_release, min(n_model, 100_000), 1)
    res[f"noop_{n_small}"] = run_job(release(n_small, a.seed), "noop", "noop_small")
    res[f"noop_{n_large}"] = run_job(release(n_large, a.seed), "noop", "noop_large")
    res[f"bare_ray_lance_{n_large}"] = bare_pipeline(release(n_large, a.seed))
    res["ratio_noop_to_bare"] = round(
        res[f"noop_{n_large}"]["rows_per_s_pipeline"] / res[f"bare_ray_lance_{n_large}"]["rows_per_s"], 3)
    res["peak_rss_ratio_large_to_small"] = round(
        res[f"noop_{n_large}"]["peak_rss_mb"] / res[f"noop_{n_small}"]["peak_rss_mb"], 3)
    res["noop_time_ratio_large_to_small"] = round(
        res[f"noop_{n_large}"]["wall_seconds"] / res[f"noop_{n_small}"]["wall_seconds"], 3)
    name = "bench_pipeline_quick.json" if a.quick else "bench_pipeline.json"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
