"""The reference the engine's no-op overhead is compared with: a bare, hand-written Ray Data -> lance-ray pipeline.

    python benchmarks/bare_ray_pipeline.py RELEASE_DIR OUT.lance

Ray's own Parquet reader, a searchsorted tokenizer over 1024 bins (a task, fused by Ray into the actor),
a no-op actor that writes the same output columns as ``--model noop`` (64-d embedding, eight z_phot
columns, flags, ra/dec), and ``lance_ray.write_lance``. No per-file units, id checks, ledger or
resume. Prints one JSON line; ``seconds`` is timed after ``ray.init`` like the engine's own
``rows_per_second``.
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
import time

import lance
import lance_ray
import numpy as np
import pyarrow as pa
import ray

MAGS = [f"mag_{b}" for b in "ugriz"]
Z_PHOT = ["z_phot_mean", "z_phot_median", "z_phot_mode", "z_phot_std", "z_phot_l68", "z_phot_u68", "z_phot_l95", "z_phot_u95"]
EDGES = np.linspace(10.0, 30.0, 1025)


def fsl(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def tokenize(batch: pa.Table) -> pa.Table:
    tokens = np.stack([np.searchsorted(EDGES, batch[c].to_numpy()) for c in MAGS], axis=1).astype(np.int32)
    return pa.table({"object_id": batch["object_id"], "ra": batch["ra"], "dec": batch["dec"], "tokens": fsl(tokens)})


class NoOp:
    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = batch["tokens"].combine_chunks().flatten().to_numpy().reshape(-1, len(MAGS))
        emb = np.zeros((len(tokens), 64), np.float32)
        emb[:, : len(MAGS)] = tokens
        nan = pa.array(np.full(len(tokens), np.nan, np.float32))
        out = {"object_id": batch["object_id"], "ra": batch["ra"], "dec": batch["dec"], "embedding": fsl(emb)}
        out.update({c: nan for c in Z_PHOT})
        out["flags"] = pa.array(np.zeros(len(tokens), np.int32))
        return pa.table(out)


def main() -> None:
    release, out = sys.argv[1], sys.argv[2]
    shutil.rmtree(out, ignore_errors=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(sorted(glob.glob(f"{release}/*.parquet")), columns=["object_id", "ra", "dec", *MAGS])
    ds = ds.map_batches(tokenize, batch_format="pyarrow", batch_size=4096)
    ds = ds.map_batches(NoOp, batch_format="pyarrow", batch_size=4096, compute=ray.data.ActorPoolStrategy(size=1))
    lance_ray.write_lance(ds, out)
    seconds = time.perf_counter() - t0
    rows = lance.dataset(out).count_rows()
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}))


if __name__ == "__main__":
    main()
