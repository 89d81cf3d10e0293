"""Do the embeddings carry physics? Linear and nearest-neighbour redshift probes on SDSS MGS.

For every scored galaxy, probes are fitted only on galaxies of other folds, and the embedding comes
from a model that never trained on it: 5-fold CV with the folds of bench_photoz
(``kfold_index(object_id, 5)``; one model per fold, trained as in bench_photoz), or with
``--shipped`` the shipped default model and its 20 % hash holdout (probes fitted on its other 80 %).

Probes, each scored on the held-out rows with sigma_NMAD, outlier fractions and bias of (zp-zs)/(1+zs):
  ridge      standardised features -> z_spec, RidgeCV (alpha chosen by CV on the fit rows)
  knn10      median z_spec of the k=10 nearest fit rows (FAISS exact L2)
Representations: the model's embedding (mean-pooled encoder output, D=96); the standardised
r + colours the baselines use; the embedding of an untrained model of the same architecture
(random weights, same bin-value table): what the architecture alone gives; and random Gaussian
vectors of the same width (a control that must score badly: about as badly as predicting the
fit rows' median z for every galaxy, reported as ``constant_median``).

    python benchmarks/bench_embeddings.py [--quick | --shipped] [--epochs N] [--threads N]

Prints JSON; writes benchmarks/results/bench_embeddings[_quick|_shipped].json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench_photoz import N_FOLDS, RESULTS, SEED, r_and_colours, train_sdss_fold
from engine.index.build import make_index
from engine.model.bundle import ModelBundle
from engine.model.redshift import photoz_metrics
from engine.model.transformer import MultimodalTransformer
from engine.sample import DEFAULT_MODEL_DIR, SAMPLE_PATH, holdout_mask, kfold_index

K = 10
REPRESENTATIONS = ("embedding", "raw_r_colours", "untrained_model", "random_vectors")


def ridge_probe(x_fit: np.ndarray, z_fit: np.ndarray, x_score: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return probe.fit(x_fit, z_fit).predict(x_score)


def knn_median(x_fit: np.ndarray, z_fit: np.ndarray, x_score: np.ndarray, k: int = K) -> np.ndarray:
    """Median z of the k nearest fit rows in the representation's own L2 metric."""
    index = make_index("Flat", x_fit.shape[1], "l2")
    index.add_with_ids(np.ascontiguousarray(x_fit, np.float32), np.arange(len(x_fit), dtype=np.int64))
    _, nn = index.search(np.ascontiguousarray(x_score, np.float32), k)  # (N, k) row numbers
    return np.median(z_fit[nn], axis=1)


def representations(bundle: ModelBundle, table: pa.Table) -> dict[str, np.ndarray]:
    """(N, D) per representation for every row of ``table``."""
    tokens = bundle.tokenize({m: table[c].to_numpy() for m, c in bundle.input_columns.items()})
    emb = bundle.encode(tokens)  # (N, D)
    torch.manual_seed(SEED)
    untrained = MultimodalTransformer(bundle.config).eval()
    untrained.tok_emb.bin_values.copy_(bundle.model.tok_emb.bin_values)  # the tokenizer's bins, not learned
    emb_untrained = ModelBundle(model=untrained, tokenizer=bundle.tokenizer, meta=bundle.meta).encode(tokens)
    mags = np.stack([table[f"mag_{b}"].to_numpy() for b in "ugriz"], axis=1).astype(np.float64)
    raw = r_and_colours(mags, 2)  # standardised on the fit rows in probe_split
    rand = np.random.default_rng(SEED).standard_normal(emb.shape)
    out = {"embedding": emb, "raw_r_colours": raw, "untrained_model": emb_untrained, "random_vectors": rand}
    assert not any(np.isnan(v).any() for v in out.values())  # SDSS MGS rows all have ugriz
    return out


def probe_split(bundle: ModelBundle, table: pa.Table, z: np.ndarray, fit: np.ndarray, score: np.ndarray) -> dict:
    """Predictions on ``score`` rows for every representation x probe, fitted on ``fit`` rows."""
    reps = representations(bundle, table)
    raw = reps["raw_r_colours"]
    reps["raw_r_colours"] = (raw - raw[fit].mean(axis=0)) / raw[fit].std(axis=0)  # kNN needs comparable scales
    preds = {(rep, probe): fn(x[fit], z[fit], x[score])
             for rep, x in reps.items() for probe, fn in (("ridge", ridge_probe), ("knn10", knn_median))}
    return preds | {"constant_median": np.full(len(score), np.median(z[fit]))}  # knows nothing about the object


def summarise(parts: list[dict], z: np.ndarray) -> dict:
    out = {rep: {probe: photoz_metrics(np.concatenate([p[(rep, probe)] for p in parts]), z)
                 for probe in ("ridge", "knn10")} for rep in REPRESENTATIONS}
    out["constant_median"] = photoz_metrics(np.concatenate([p["constant_median"] for p in parts]), z)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 of the 5 folds, 15 epochs")
    mode.add_argument("--shipped", action="store_true", help="the shipped model on its own holdout (no training)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    table = pq.read_table(SAMPLE_PATH)
    ids, z = table["object_id"].to_numpy(), table["z_spec"].to_numpy().astype(np.float64)
    parts, z_scored, scored_ids = [], [], []
    if a.shipped:
        hold = holdout_mask(ids)  # the split the shipped model was trained with (engine.model.train, n_folds=0)
        bundle = ModelBundle.load(DEFAULT_MODEL_DIR)
        parts.append(probe_split(bundle, table, z, np.flatnonzero(~hold), np.flatnonzero(hold)))
        z_scored, scored_ids = [z[hold]], [ids[hold]]
        split = f"shipped model {bundle.model_id}: its 20 % hash holdout (holdout_mask), probes fitted on the other 80 %"
    else:
        folds = [0, 1] if a.quick else list(range(N_FOLDS))
        cfg_kwargs = {"epochs": a.epochs or (15 if a.quick else 60), "threads": a.threads}
        fold = kfold_index(ids, N_FOLDS)
        with tempfile.TemporaryDirectory() as d:
            for f in folds:
                model_dir, report = train_sdss_fold(f, cfg_kwargs, Path(d))
                hold = fold == f
                assert report["split"]["holdout"] == int(hold.sum())  # the model never trained on the scored fold
                parts.append(probe_split(ModelBundle.load(model_dir), table, z, np.flatnonzero(~hold), np.flatnonzero(hold)))
                z_scored.append(z[hold])
                scored_ids.append(ids[hold])
        split = f"{N_FOLDS}-fold CV by kfold_index(object_id, {N_FOLDS}), folds {folds} scored; one model per fold, {cfg_kwargs}"
    z_all = np.concatenate(z_scored)
    assert len(np.unique(np.concatenate(scored_ids))) == len(z_all)  # each object scored once
    result = {"split": split, "n_scored": len(z_all), "k": K, "seed": SEED, "results": summarise(parts, z_all)}
    r = result["results"]
    result["verdict"] = {
        "embedding_knn_vs_raw_knn_sigma_nmad": [r["embedding"]["knn10"]["sigma_nmad"], r["raw_r_colours"]["knn10"]["sigma_nmad"]],
        "embedding_ridge_vs_raw_ridge_sigma_nmad": [r["embedding"]["ridge"]["sigma_nmad"], r["raw_r_colours"]["ridge"]["sigma_nmad"]],
        # random vectors should do no better than predicting the fit rows' median z for everyone
        "random_control_fails": bool(min(r["random_vectors"][p]["sigma_nmad"] for p in ("ridge", "knn10"))
                                     > 0.8 * r["constant_median"]["sigma_nmad"]),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    suffix = "_shipped" if a.shipped else "_quick" if a.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_embeddings{suffix}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
