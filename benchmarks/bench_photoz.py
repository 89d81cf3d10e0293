"""Photo-z benchmark: our model next to kNN and gradient boosting on identical, leak-free splits.

SDSS MGS (engine/data/sdss_mgs.parquet, 5,000 real galaxies): 5-fold cross-validation by
``kfold_index(object_id, 5)``; every scored galaxy is scored by models (ours and baselines)
that never saw it. Our model trains with ``engine.model.train`` on the other four folds (its
p(z) temperature is calibrated on a validation split drawn from those folds).
RAIL DC2 (simulated LSST, z to 3): trained on the training file, scored on the validation file;
magnitudes of 99 are non-detections (missing tokens for our model, NaN for gradient boosting,
the band's 99th-percentile detected magnitude for kNN).

Baselines use r + colours (standardised for kNN, k=10; scikit-learn HistGradientBoostingRegressor).
Metrics: sigma_NMAD, outlier fractions (|d|>0.15 and LSST's |d|>max(0.06, 3 sigma_IQR)), bias,
68/95 % interval coverage and PIT of our p(z). Our p(z) is calibrated on the validation split
(``TrainConfig.calibration``); the same models are also scored with the coverage temperature alone
(``ours_temperature_only``) and with the NLL-fitted temperature (``ours_nll_temperature``). Prints JSON; writes benchmarks/results/bench_photoz[_quick].json
and PNGs (z_phot vs z_spec, PIT histogram).

    python benchmarks/bench_photoz.py [--quick] [--epochs N] [--threads N] [--set field=json_value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.model.bundle import ModelBundle
from engine.model.generate import generate_from_tokens, stack_tokens
from engine.model.redshift import REDSHIFT, coverage, photoz_metrics, pit
from engine.model.train import TrainConfig, train
from engine.sample import SAMPLE_PATH, kfold_index

RESULTS = Path(__file__).parent / "results"
DC2_DIR = Path("/work/shared/data/rail_dc2")
N_FOLDS = 5
SEED = 0
LSST = "ugrizy"


# ---- baselines -----------------------------------------------------------------------------
def r_and_colours(mags: np.ndarray, r_index: int) -> np.ndarray:
    """(N, bands) magnitudes -> (N, 1 + bands-1) [r, colours]; NaN stays NaN."""
    return np.concatenate([mags[:, [r_index]], -np.diff(mags, axis=1)], axis=1)


def baselines(feats_fit: np.ndarray, z_fit: np.ndarray, feats_score: np.ndarray, fill: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=10))
    knn.fit(np.where(np.isnan(feats_fit), fill, feats_fit), z_fit)
    gbm = HistGradientBoostingRegressor(random_state=SEED).fit(feats_fit, z_fit)
    return {"knn": knn.predict(np.where(np.isnan(feats_score), fill, feats_score)), "gbm": gbm.predict(feats_score)}


# ---- our model -----------------------------------------------------------------------------
def train_sdss_fold(f: int, cfg_kwargs: dict, work: Path) -> tuple[Path, dict]:
    """Our model trained on the four SDSS folds other than ``f`` (validation split drawn from them)."""
    cfg = TrainConfig(model_id=f"bench-sdss-fold{f}", n_folds=N_FOLDS, holdout_fold=f, seed=SEED, **cfg_kwargs)
    out = work / f"sdss_fold{f}"
    return out, train([str(SAMPLE_PATH)], cfg, str(out))


VARIANTS = ("ours", "ours_temperature_only", "ours_nll_temperature")  # calibrations scored on the same logits


def score_model(model_dir: str, table: pa.Table, z_true: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Summaries + PIT with the bundle's calibration ("ours") and, for comparison on the same logits, with
    the coverage temperature alone ("ours_temperature_only": no PIT map) and with the NLL-fitted temperature
    the calibration started from ("ours_nll_temperature")."""
    bundle = ModelBundle.load(model_dir)
    tokens = bundle.tokenize({m: table[c].to_numpy() for m, c in bundle.input_columns.items()})
    tok, valid = stack_tokens(bundle, tokens)
    calibration = bundle.meta.get("calibration", {})
    bare = {k: v for k, v in calibration.items() if k != "pit_map"}
    variants = {"ours": (bundle.meta["temperature"], calibration),
                "ours_temperature_only": (bundle.meta["temperature"], bare),
                "ours_nll_temperature": (calibration.get("temperature_nll", bundle.meta["temperature"]), bare)}
    scored = {}
    for name, (t, cal) in variants.items():
        bundle.meta["temperature"], bundle.meta["calibration"] = t, cal
        out = generate_from_tokens(bundle, tok, valid, [REDSHIFT], seed=SEED, return_probs=True)[REDSHIFT]
        out["pit"] = pit(out["probs"], out["edges"], z_true)
        scored[name] = {k: v for k, v in out.items() if k not in ("probs", "edges", "samples")}
    return scored


def metrics(pred: dict[str, np.ndarray], z: np.ndarray) -> dict:
    res = {name: photoz_metrics(pred[name], z) for name in ("z_phot_median", "z_phot_mean", "z_phot_mode")}
    res["coverage_68"] = coverage(pred["z_phot_l68"], pred["z_phot_u68"], z)
    res["coverage_95"] = coverage(pred["z_phot_l95"], pred["z_phot_u95"], z)
    u = pred["pit"]
    ecdf = np.sort(u)
    n = len(u)
    res["pit"] = {
        "hist10": np.histogram(u, bins=10, range=(0, 1))[0].tolist(),
        "ks": float(np.max(np.maximum(np.arange(1, n + 1) / n - ecdf, ecdf - np.arange(n) / n))),
        "frac_outside_0.01_0.99": float(np.mean((u < 0.01) | (u > 0.99))),  # 0.02 if calibrated
        "mean": float(np.mean(u)),
    }
    return res


def verdict(res: dict) -> dict:
    ours = res["ours"]["z_phot_median"]["sigma_nmad"]
    best = min(("knn", "gbm"), key=lambda k: res[k]["sigma_nmad"])
    cov_ok = abs(res["ours"]["coverage_68"] - 0.68) <= 0.03 and abs(res["ours"]["coverage_95"] - 0.95) <= 0.03
    return {"best_baseline": best, "best_baseline_sigma_nmad": res[best]["sigma_nmad"], "ours_sigma_nmad": ours,
            "beats_best_baseline": bool(ours < res[best]["sigma_nmad"]), "coverage_within_3_points": bool(cov_ok)}


def sdss(cfg_kwargs: dict, folds: list[int], work: Path) -> tuple[dict, dict]:
    table = pq.read_table(SAMPLE_PATH)
    ids, z = table["object_id"].to_numpy(), table["z_spec"].to_numpy().astype(np.float64)
    fold = kfold_index(ids, N_FOLDS)
    mags = np.stack([table[f"mag_{b}"].to_numpy() for b in "ugriz"], axis=1).astype(np.float64)
    feats = r_and_colours(mags, 2)
    preds: dict[str, list] = {**{v: [] for v in VARIANTS}, "knn": [], "gbm": [], "z": [], "object_id": []}
    train_seconds, temperatures = [], []
    for f in folds:
        hold = fold == f
        model_dir, report = train_sdss_fold(f, cfg_kwargs, work)
        assert report["split"]["holdout"] == int(hold.sum())  # the model never trained on the scored fold
        train_seconds.append(report["train_seconds"])
        temperatures.append({"coverage": report["temperature"], **report["calibration"]})
        for name, scored in score_model(str(model_dir), table.filter(pa.array(hold)), z[hold]).items():
            preds[name].append(scored)
        base = baselines(feats[~hold], z[~hold], feats[hold], fill=np.zeros(feats.shape[1]))
        preds["knn"].append(base["knn"])
        preds["gbm"].append(base["gbm"])
        preds["z"].append(z[hold])
        preds["object_id"].append(ids[hold])
    z_all = np.concatenate(preds["z"])
    assert len(np.unique(np.concatenate(preds["object_id"]))) == len(z_all)  # each object scored once
    joined = {name: {k: np.concatenate([p[k] for p in preds[name]]) for k in preds[name][0]} for name in VARIANTS}
    ours = joined["ours"]
    res = {"n_scored": len(z_all), "folds_scored": folds, "n_folds": N_FOLDS, "train_seconds_per_fold": train_seconds,
           "calibration_per_fold": temperatures, **{name: metrics(v, z_all) for name, v in joined.items()},
           "knn": {"method": "kNN k=10, standardised r + colours", **photoz_metrics(np.concatenate(preds["knn"]), z_all)},
           "gbm": {"method": "HistGradientBoostingRegressor, r + colours",
                   **photoz_metrics(np.concatenate(preds["gbm"]), z_all)}}
    res["verdict"] = verdict(res)
    return res, {"z": z_all, "ours": ours["z_phot_median"], "gbm": np.concatenate(preds["gbm"]), "pit": ours["pit"]}


def read_dc2(path: Path) -> pa.Table:
    with h5py.File(path, "r") as h:
        g = h["photometry"]
        return pa.table({k: np.asarray(g[k][:]) for k in g.keys()})


def dc2(cfg_kwargs: dict, work: Path) -> tuple[dict, dict]:
    train_t, score_t = read_dc2(DC2_DIR / "test_dc2_training_9816.hdf5"), read_dc2(DC2_DIR / "test_dc2_validation_9816.hdf5")
    assert not set(train_t["id"].to_numpy()) & set(score_t["id"].to_numpy())
    train_path = work / "dc2_train.parquet"
    pq.write_table(train_t, train_path)
    cfg = TrainConfig(
        model_id="bench-dc2", inputs=("mag_i", *(f"colour_{a}{b}" for a, b in zip(LSST, LSST[1:]))),  # i + 5 colours
        id_column="id", z_column="redshift",
        holdout_fraction=0.0, seed=SEED,
        columns={f"mag_{b}": f"mag_{b}_lsst" for b in LSST},
        error_columns_by_input={f"mag_{b}": f"mag_err_{b}_lsst" for b in LSST}, **cfg_kwargs,
    )
    report = train([str(train_path)], cfg, str(work / "dc2_model"))
    z = score_t["redshift"].to_numpy().astype(np.float64)
    scored = score_model(str(work / "dc2_model"), score_t, z)
    ours = scored["ours"]

    def mags_of(t: pa.Table) -> np.ndarray:
        m = np.stack([t[f"mag_{b}_lsst"].to_numpy() for b in LSST], axis=1).astype(np.float64)
        return np.where(m >= 90.0, np.nan, m)  # 99 = non-detection

    m_fit, m_score = mags_of(train_t), mags_of(score_t)
    limit = np.nanpercentile(m_fit, 99, axis=0)  # kNN needs a value: a non-detection sits at the faint end
    f_fit, f_score = r_and_colours(m_fit, 2), r_and_colours(m_score, 2)
    fill = np.nanmedian(r_and_colours(np.where(np.isnan(m_fit), limit, m_fit), 2), axis=0)
    base = baselines(f_fit, train_t["redshift"].to_numpy().astype(np.float64), f_score, fill)
    res = {"n_train_file": train_t.num_rows, "n_scored": len(z), "model_split": report["split"],
           "train_seconds": report["train_seconds"], "temperature": report["temperature"],
           "calibration": report["calibration"],
           **{name: metrics(scored[name], z) for name in VARIANTS if name != "ours"},
           "non_detection_frac": {b: float(np.mean(np.isnan(m_score[:, j]))) for j, b in enumerate(LSST)},
           "ours": metrics(ours, z),
           "knn": {"method": "kNN k=10, standardised r + colours (non-detected colours -> training median)",
                   **photoz_metrics(base["knn"], z)},
           "gbm": {"method": "HistGradientBoostingRegressor, r + colours (NaN for non-detections)",
                   **photoz_metrics(base["gbm"], z)}}
    res["verdict"] = verdict(res)
    return res, {"z": z, "ours": ours["z_phot_median"], "gbm": base["gbm"], "pit": ours["pit"]}


def plots(curves: dict[str, dict], suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 5))
    for ax, name in zip(np.atleast_1d(axes), names):
        c = curves[name]
        ax.scatter(c["z"], c["gbm"], s=1, alpha=0.3, color="tab:gray", label="GBM")
        ax.scatter(c["z"], c["ours"], s=1, alpha=0.4, color="tab:blue", label="ours (p(z) median)")
        hi = float(np.max(c["z"])) * 1.05
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="z_spec", ylabel="z_phot", title=name)
        ax.legend(markerscale=8, loc="upper left")
    fig.tight_layout()
    zz = RESULTS / f"bench_photoz_zphot_vs_zspec{suffix}.png"
    fig.savefig(zz, dpi=110)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for ax, name in zip(np.atleast_1d(axes), names):
        u = curves[name]["pit"]
        ax.hist(u, bins=20, range=(0, 1), color="tab:blue")
        ax.axhline(len(u) / 20, color="k", lw=0.8)
        ax.set(xlabel="PIT", ylabel="objects", title=f"{name}: PIT (flat = calibrated)")
    fig.tight_layout()
    ph = RESULTS / f"bench_photoz_pit{suffix}.png"
    fig.savefig(ph, dpi=110)
    return [str(zz), str(ph)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 of the 5 folds scored (< 5 min)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="TrainConfig override")
    p.add_argument("--only", choices=("sdss", "dc2"), default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per training (default 1; on a busy 2-core machine "
                        "1 thread trained ~10x faster per step than 2, which stall on each other)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(SEED)
    cfg_kwargs = {"epochs": a.epochs or TrainConfig.epochs, "threads": a.threads or 1}
    for item in a.set:
        k, v = item.split("=", 1)
        cfg_kwargs[k] = json.loads(v)
    TrainConfig(**cfg_kwargs)  # validate early
    t0 = time.perf_counter()
    result: dict = {"quick": a.quick, "train_overrides": cfg_kwargs, "seed": SEED,
                    "train_config_defaults": {k: v for k, v in asdict(TrainConfig()).items() if k not in cfg_kwargs}}
    curves = {}
    with tempfile.TemporaryDirectory() as d:
        if a.only in (None, "sdss"):
            t = time.perf_counter()
            result["sdss_mgs"], curves["SDSS MGS (5-fold CV)"] = sdss(cfg_kwargs, [0, 1] if a.quick else list(range(N_FOLDS)), Path(d))
            result["sdss_mgs"]["seconds"] = round(time.perf_counter() - t, 1)
        if a.only in (None, "dc2"):
            t = time.perf_counter()
            result["rail_dc2"], curves["RAIL DC2 (validation file)"] = dc2(cfg_kwargs, Path(d))
            result["rail_dc2"]["seconds"] = round(time.perf_counter() - t, 1)
    suffix = (f"_{a.only}" if a.only else "") + ("_quick" if a.quick else "")
    result["plots"] = plots(curves, suffix)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["torch_threads"] = torch.get_num_threads()
    RESULTS.mkdir(exist_ok=True)
    name = f"bench_photoz{suffix}" + ("_" + re.sub(r"[^\w.]+", "", "_".join(a.set)) if a.set else "") + ".json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
