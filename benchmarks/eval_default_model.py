"""Photo-z quality of a model through the whole pipeline, on galaxies it never trained on.

Writes the held-out galaxies' photometry (no redshift column) as a catalogue, runs the embed
job on it (local Ray), joins z_phot back by object_id, and scores against the spectroscopic
redshifts, next to a kNN (k=10, standardised r + colours) fitted on the training galaxies.
Prints JSON and writes benchmarks/results/eval_default_model.json.

    python benchmarks/eval_default_model.py [--model MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from engine.index.knn import knn_regress
from engine.model.redshift import coverage, photoz_metrics
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.sample import DEFAULT_MODEL_DIR, SAMPLE_PATH, holdout_mask

RESULTS = Path(__file__).parent / "results" / "eval_default_model.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sample = pq.read_table(SAMPLE_PATH)
    ids = sample["object_id"].to_numpy()
    hold = holdout_mask(ids)
    z = sample["z_spec"].to_numpy()
    with tempfile.TemporaryDirectory() as d:
        cat = Path(d) / "holdout_photometry.parquet"
        pq.write_table(sample.filter(pa.array(hold)).drop_columns(["z_spec"]), cat)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        summary = run_embed(EmbedConfig(catalog=(str(cat),), out=str(Path(d) / "out.lance"), model_dir=a.model))
        ray.shutdown()
        out = lance.dataset(str(Path(d) / "out.lance")).to_table().sort_by("object_id")
    order = np.argsort(ids[hold])
    assert np.array_equal(out["object_id"].to_numpy(), ids[hold][order])
    z_true = z[hold][order]
    mags = np.stack([sample[f"mag_{b}"].to_numpy() for b in "ugriz"], axis=1)
    feats = np.concatenate([mags[:, [2]], -np.diff(mags, axis=1)], axis=1)
    knn = knn_regress(feats[~hold], z[~hold], feats[hold][order], k=10)
    col = {c: out[c].to_numpy() for c in out.column_names if c.startswith("z_phot")}
    result = {
        "model": summary["model"], "n_holdout": int(hold.sum()), "n_train_pool": int((~hold).sum()),
        "embed_job": {k: summary[k] for k in ("rows_in", "rows_out", "ids_match", "rows_flagged", "seconds")},
        "model_z_phot_mean": photoz_metrics(col["z_phot_mean"], z_true),
        "model_z_phot_median": photoz_metrics(col["z_phot_median"], z_true),
        "coverage_68": coverage(col["z_phot_l68"], col["z_phot_u68"], z_true),
        "coverage_95": coverage(col["z_phot_l95"], col["z_phot_u95"], z_true),
        "knn_k10_r_colours": photoz_metrics(knn, z_true),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
