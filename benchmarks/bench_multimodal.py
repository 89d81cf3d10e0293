"""Any-to-any on held-out MILES stars with the shipped multimodal model (fixed seed, prints JSON).

    python benchmarks/bench_multimodal.py [--model engine/data/miles_model] [--out benchmarks/results/bench_multimodal.json]

Held-out stars: ``engine.sample.holdout_mask`` of the MILES star number (never trained on; the
tokenizers were fitted without them).

* spectrum -> (Teff, logg, [Fe/H]): the median of each predicted distribution against the
  catalogue value; next to predicting the training median and a kNN (k=5, distance weighted) on
  the spectrum as the model sees it (the tokens decoded back to normalised flux).
* (Teff, logg, [Fe/H]) -> spectrum by ROAR with steps=1 and steps=8, sampled at temperature 1 and
  greedy (top_k=1): per star the median over
  pixels of |Δflux| / σ (σ = scale / 100, the S/N MILES is assumed to have) and of |Δflux| / flux,
  then the median over stars; next to a kNN (k=5) in standardised (log Teff, logg, [Fe/H]) that
  averages the neighbours' spectra, and to the tokenizer's own round trip (the ceiling).

Every number is also given for the held-out stars with a catalogue Teff < 10,000 K (``*_teff_below_10000K``):
models trained before the MILES reader kept hot stars saw none, so that subset compares across them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.neighbors import KNeighborsRegressor  # noqa: E402

from engine.model.bundle import ModelBundle  # noqa: E402
from engine.model.train_multimodal import MILES_SCALARS, read_miles_dataset, subset  # noqa: E402
from engine.sample import DATA_DIR, holdout_mask  # noqa: E402
from engine.tokenizers.spectrum import to_latent  # noqa: E402

SEED = 0
SNR = 100.0  # engine.modalities.spectra.read_miles assumes this per-pixel S/N
COOL_TEFF_K = 10_000.0  # the "cool" subset: stars a model trained without hot stars can be compared on


def flux_errors(pred: np.ndarray, true: np.ndarray, scale: np.ndarray, cool: np.ndarray) -> dict:
    """Median over stars (all, and the ``cool`` ones) of the per-star median |Δflux|/σ and |Δflux|/|flux|;
    pred/true (N, P), cool (N,) bool."""
    d = np.abs(pred - true)
    ok = true != 0
    sig = np.nanmedian(d / (scale[:, None] / SNR), axis=1)
    rel = np.nanmedian(np.where(ok, d / np.where(ok, np.abs(true), 1.0), np.nan), axis=1)
    summary = lambda rows: {"median_abs_dflux_over_sigma": float(np.nanmedian(sig[rows])),  # noqa: E731
                            "median_rel_err": float(np.nanmedian(rel[rows]))}
    return {**summary(slice(None)), "teff_below_10000K": summary(cool)}


def param_errors(pred: np.ndarray, true: np.ndarray, cool: np.ndarray | None = None) -> dict:
    """Median/mean absolute error and median bias over the rows with a finite truth and prediction; with
    ``cool`` (bool per row) the same again over those rows."""
    ok = np.isfinite(true) & np.isfinite(pred)
    d = pred[ok] - true[ok]
    out = {"n": int(ok.sum()), "median_abs_err": float(np.median(np.abs(d))), "mean_abs_err": float(np.mean(np.abs(d))),
           "bias": float(np.median(d))}
    if cool is not None:
        out["teff_below_10000K"] = param_errors(pred[cool], true[cool])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DATA_DIR / "miles_model"))
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    bundle = ModelBundle.load(a.model)
    spectra, params = read_miles_dataset()
    hold = holdout_mask(spectra.object_id, bundle.meta["training"]["config"]["holdout_fraction"])
    tr, ho = np.flatnonzero(~hold), np.flatnonzero(hold)
    name = spectra.token_key
    tok = bundle.token_tokenizers[name]
    truth = {m: params[m].to_numpy() for m in MILES_SCALARS}
    cool = truth["teff"] < COOL_TEFF_K  # False where Teff is unknown
    report: dict = {"seed": SEED, "model": bundle.model_id, "n_train": len(tr), "n_holdout": len(ho),
                    "n_holdout_teff_below_10000K": int(cool[ho].sum())}

    # ---- spectrum -> parameters -----------------------------------------------------------
    t0 = time.perf_counter()
    out = bundle.generate({name: subset(spectra, ho)}, list(MILES_SCALARS), seed=SEED)
    report["spectrum_to_params_seconds"] = round(time.perf_counter() - t0, 2)
    feats = {k: tok.decode(tok.encode(subset(spectra, rows)).tokens, normalised=True) for k, rows in (("tr", tr), ("ho", ho))}
    s2p = {}
    for m in MILES_SCALARS:
        fit = np.isfinite(truth[m][tr])
        knn = KNeighborsRegressor(5, weights="distance").fit(feats["tr"][fit], truth[m][tr][fit])
        s2p[m] = {"model": param_errors(out[m]["median"], truth[m][ho], cool[ho]),
                  "knn_k5_on_token_flux": param_errors(knn.predict(feats["ho"]), truth[m][ho], cool[ho]),
                  "training_median": param_errors(np.full(len(ho), np.nanmedian(truth[m][tr])), truth[m][ho], cool[ho])}
    report["spectrum_to_params"] = s2p

    # ---- parameters -> spectrum (ROAR) ----------------------------------------------------
    complete = np.all([np.isfinite(truth[m]) for m in MILES_SCALARS], axis=0)
    rows = ho[complete[ho]]
    latent = to_latent(subset(spectra, rows), tok.config)
    true_flux = np.where(latent.ivar > 0, latent.flux, np.nan)
    p2s = {"n": len(rows), "n_teff_below_10000K": int(cool[rows].sum())}
    for (steps, top_k) in ((1, None), (8, None), (1, 1), (8, 1)):  # sampling at temperature 1, and greedy
        t0 = time.perf_counter()
        gen = bundle.generate({m: truth[m][rows] for m in MILES_SCALARS}, [name], steps=steps, top_k=top_k,
                              seed=SEED)[name]
        key = f"roar_steps_{steps}" + ("_greedy" if top_k == 1 else "")
        p2s[key] = {**flux_errors(gen["flux"][:, 0], true_flux, latent.scale, cool[rows]), "seconds": round(time.perf_counter() - t0, 2)}
    x = np.stack([np.log10(truth["teff"]), truth["logg"], truth["feh"]], axis=1)
    fit = tr[complete[tr]]
    mu, sd = x[fit].mean(0), x[fit].std(0)
    lat_tr = to_latent(subset(spectra, fit), tok.config)
    knn = KNeighborsRegressor(5).fit((x[fit] - mu) / sd, lat_tr.flux)
    p2s["knn_k5_in_param_space"] = flux_errors(knn.predict((x[rows] - mu) / sd), true_flux, latent.scale, cool[rows])
    p2s["tokenizer_round_trip"] = flux_errors(tok.decode(tok.encode(subset(spectra, rows)).tokens), true_flux,
                                              latent.scale, cool[rows])
    report["params_to_spectrum"] = p2s
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
