"""Model-only throughput and FLOPs: the shipped default model and an AION-base-sized config.

Throughput (objects/s) of ``model(tokens, valid, ["redshift"])`` (what ModelBundle.predict runs:
encoder + pooled embedding + the redshift decoder query; no tokenizing or p(z) summaries) by
batch size, precision (fp32, bf16 autocast on CPU) and torch threads (1, 2). FLOPs per object
are counted with torch.utils.flop_counter.FlopCounterMode (matmuls and attention; 2 per MAC),
for the encoder alone and for the full forward. The AION-base-sized model (dim 768, 12 encoder +
12 decoder blocks, 12 heads, random weights) skips its slowest cells unless --full; skipped
cells are listed. The machine may be shared: the load average is recorded next to the numbers.
Prints JSON; writes benchmarks/results/bench_model[_quick].json.

    python benchmarks/bench_model.py [--quick] [--full]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.model.bundle import ModelBundle
from engine.model.redshift import REDSHIFT
from engine.model.transformer import MultimodalTransformer
from engine.sample import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).parent / "results"
SEED = 0


def inputs(cfg, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T = len(cfg.input_modalities)
    tok = torch.from_numpy(rng.integers(0, cfg.n_bins, size=(batch, T)))
    valid = torch.from_numpy(rng.random((batch, T)) > 0.05)  # a few missing bands, as in real catalogues
    return tok, valid


def flops_per_object(model: MultimodalTransformer, batch: int = 64) -> dict[str, float]:
    tok, valid = inputs(model.cfg, batch, np.random.default_rng(SEED))
    out = {}
    with torch.inference_mode():
        for name, fn in (("encode", lambda: model.encode(tok, valid)), ("forward", lambda: model(tok, valid, [REDSHIFT]))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[f"{name}_flops_per_object"] = counter.get_total_flops() / batch
    return out


def throughput(model: MultimodalTransformer, batch: int, dtype: torch.dtype | None, min_seconds: float, max_reps: int) -> dict:
    tok, valid = inputs(model.cfg, batch, np.random.default_rng(SEED))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        model(tok[:64], valid[:64], [REDSHIFT])  # warm-up (kernels, allocator)
        reps, t0 = 0, time.perf_counter()
        while reps < max_reps and (reps == 0 or time.perf_counter() - t0 < min_seconds):
            model(tok, valid, [REDSHIFT])
            reps += 1
        dt = time.perf_counter() - t0
    return {"objects_per_s": round(batch * reps / dt, 1), "seconds": round(dt, 2), "reps": reps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="batch 256 and 1024 only, shorter timing")
    p.add_argument("--full", action="store_true", help="also time the AION-base model at batch 4096 with 1 thread")
    a = p.parse_args()
    torch.manual_seed(SEED)
    default = ModelBundle.load(DEFAULT_MODEL_DIR).model.eval()
    aion_cfg = replace(default.cfg, dim=768, encoder_depth=12, decoder_depth=12, num_heads=12)
    aion = MultimodalTransformer(aion_cfg).eval()
    batches = (256, 1024) if a.quick else (256, 1024, 4096)
    t_start = time.perf_counter()
    result = {"quick": a.quick, "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "load_average_start": os.getloadavg(), "models": {}}
    for name, model in (("default", default), ("aion_base_sized", aion)):
        torch.set_num_threads(2)
        n_params = sum(p.numel() for p in model.parameters())
        entry = {"config": model.cfg.to_dict(), "parameters": n_params, **flops_per_object(model), "runs": [], "skipped": []}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                for batch in batches:
                    if name == "aion_base_sized" and batch == 4096 and threads == 1 and not a.full:
                        entry["skipped"].append({"threads": threads, "precision": precision, "batch": batch,
                                                 "reason": "slow on 2 CPU cores; run with --full"})
                        continue
                    slow = name == "aion_base_sized"
                    r = throughput(model, batch, dtype, min_seconds=0.3 if a.quick else 1.0, max_reps=1 if slow else 50)
                    entry["runs"].append({"threads": threads, "precision": precision, "batch": batch, **r})
                    print(json.dumps({"model": name, **entry["runs"][-1]}), flush=True)
        result["models"][name] = entry
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("bench_model_quick.json" if a.quick else "bench_model.json")).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
