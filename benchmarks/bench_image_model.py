"""Image model on held-out CFHT stamps (a disjoint region of the field): does it learn real properties?

    python benchmarks/bench_image_model.py [--model engine/data/image_model] [--out benchmarks/results/bench_image_model.json]

Stamps: every source detected in the CFHT I-band Abell 370 field (``engine.model.image_data``);
held out: the region right of 55 % of the width by a whole stamp side (never trained on; the image
tokenizer was fitted without it). Properties measured on the native pixels: aperture magnitude
(1"), half-light radius (3" curve of growth, Voronoi deblended) and ellipticity (1 - b/a).

* image -> properties: the median of each predicted distribution (image tokens are the only input)
  against the measured value, median absolute error and Spearman rank correlation; next to
  predicting the training median, kNN (k=10) on the image tokens (Hamming distance) and kNN (k=10)
  on the 32-component PCA of the resampled, asinh-stretched pixels; both kNNs use the same training
  rows as the model (the training stamps in their 8 flips/rotations).
* embedding neighbours: for each held-out stamp, its 5 nearest other held-out stamps by cosine of
  the model embedding (image only), and the same in pixel-PCA space; median |difference| of each
  property between neighbours, against random pairs (ratio < 1: neighbours agree).
* properties -> image: ROAR (steps=8; temperature 1, and greedy top_k=1) from the three measured properties of each
  held-out stamp; the aperture magnitude and half-light radius measured on the generated image
  (decoded at 0.1"/pix) against the requested ones; next to the tokenizer's round trip of the true
  stamp (the ceiling) and to the round trip of the training stamp nearest in standardised properties.
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

from sklearn.decomposition import PCA  # noqa: E402
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors  # noqa: E402

from engine.model.bundle import ModelBundle  # noqa: E402
from engine.model.image_data import CFHT_A370, IMAGE_SCALARS, dihedral, measure_stamps, region_split  # noqa: E402
from engine.model.train_image import IMAGE_MODALITY, encode_stamps, field_dataset, field_width  # noqa: E402
from engine.modalities import SCALARS_BY_NAME  # noqa: E402
from engine.modalities.images import survey_spec  # noqa: E402
from engine.sample import DATA_DIR  # noqa: E402
from engine.tokenizers.image import stretch_scale  # noqa: E402
from engine.tokenizers.stamps import Stamps  # noqa: E402

SEED = 0
K_PRED, K_NEIGHBOURS, N_PCA = 10, 5, 32


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def scores(pred: np.ndarray, true: np.ndarray) -> dict:
    ok = np.isfinite(pred) & np.isfinite(true)
    d = pred[ok] - true[ok]
    constant = np.ptp(pred[ok]) == 0  # a constant prediction has no rank correlation
    return {"n": int(ok.sum()), "median_abs_err": float(np.median(np.abs(d))), "bias": float(np.median(d)),
            "spearman": None if constant else spearman(pred[ok], true[ok])}


def pixel_features(tok, pixels: np.ndarray, survey: str, scale: float) -> np.ndarray:
    """(N, S, S) native stamps -> (N, crop^2) asinh(flux / survey softening) at the tokenizer's pixel scale."""
    prep = tok.preprocess_arrays(pixels[:, None], survey, scale)
    return np.where(prep.valid, np.arcsinh(prep.flux / prep.scale[:, :, None, None]), 0.0).reshape(len(pixels), -1)


def neighbour_agreement(features: np.ndarray, truth: dict, metric: str, rng: np.random.Generator) -> dict:
    """Median |property difference| to the K nearest other rows, over the median for random pairs."""
    nn = NearestNeighbors(n_neighbors=K_NEIGHBOURS + 1, metric=metric).fit(features)
    idx = nn.kneighbors(features, return_distance=False)[:, 1:]  # (N, K) without the row itself
    rand = rng.integers(0, len(features), size=idx.shape)
    out = {}
    for m, t in truth.items():
        near = np.nanmedian(np.abs(t[:, None] - t[idx]))
        far = np.nanmedian(np.abs(t[:, None] - t[rand]))
        out[m] = {"neighbours": float(near), "random_pairs": float(far), "ratio": float(near / far)}
    return out


def measured_on_decoded(tok, tokens: np.ndarray, survey) -> dict[str, np.ndarray]:
    """Aperture magnitude and half-light radius measured on decoded (N, n_tokens) tokens (0.1"/pix images)."""
    flux = tok.decode(tokens, survey.name)[:, 0]  # (N, S, S) native flux per output pixel
    n, scale = len(flux), tok.config.pixel_scale_arcsec
    zero = np.zeros(n)
    noise = float(stretch_scale(survey, scale)[0])  # ~ the sky sigma per output pixel
    m = measure_stamps(Stamps(flux, zero, zero, zero, zero, zero, 0.0, noise, scale, "decoded"), survey.zero_points_ab[0])
    return {"mag_aper": m["mag_aper"], "flux_radius": m["flux_radius_arcsec"]}


def properties_to_image(bundle, tok, survey, t_ho: dict, t_tr: dict, tok_ho: np.ndarray, tok_tr: np.ndarray) -> dict:
    complete = np.all([np.isfinite(t_ho[m]) for m in IMAGE_SCALARS], axis=0)
    given = {m: t_ho[m][complete] for m in IMAGE_SCALARS}
    gen = bundle.generate(given, [IMAGE_MODALITY], steps=8, seed=SEED)[IMAGE_MODALITY]["tokens"][:, 0]
    greedy = bundle.generate(given, [IMAGE_MODALITY], steps=8, top_k=1, seed=SEED)[IMAGE_MODALITY]["tokens"][:, 0]
    x_tr = np.stack([t_tr[m] for m in IMAGE_SCALARS], 1)
    ok_tr = np.isfinite(x_tr).all(1)
    mu, sd = x_tr[ok_tr].mean(0), x_tr[ok_tr].std(0)
    nearest = NearestNeighbors(n_neighbors=1).fit((x_tr[ok_tr] - mu) / sd)
    pick = nearest.kneighbors((np.stack([given[m] for m in IMAGE_SCALARS], 1) - mu) / sd, return_distance=False)[:, 0]
    methods = {"model_roar_steps8": gen, "model_roar_steps8_greedy": greedy, "tokenizer_round_trip_of_the_true_stamp": tok_ho[complete],
               "nearest_training_stamp_in_property_space": tok_tr[ok_tr][pick]}
    out = {"n": int(complete.sum())}
    for name, tokens in methods.items():
        got = measured_on_decoded(tok, tokens, survey)
        out[name] = {m: scores(got[m], given[m]) for m in got}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DATA_DIR / "image_model"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_image_model.json"))
    a = p.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    bundle = ModelBundle.load(a.model)
    tok = bundle.token_tokenizers[IMAGE_MODALITY]
    survey = survey_spec("cfht_i")
    stamps, table = field_dataset(CFHT_A370, tok.config.crop_size, tok.config.pixel_scale_arcsec, survey.zero_points_ab[0])
    fit, held = region_split(stamps, field_width(CFHT_A370))
    cols = {m: SCALARS_BY_NAME[m].column for m in IMAGE_SCALARS}
    truth = {m: table[c].to_numpy() for m, c in cols.items()}
    tr, ho = stamps.take(np.flatnonzero(fit)), stamps.take(np.flatnonzero(held))
    t_ho = {m: v[held] for m, v in truth.items()}
    t_tr8 = {m: np.tile(v[fit], 8) for m, v in truth.items()}
    tok_ho = encode_stamps(tok, ho.pixels, survey.name, ho.pixel_scale_arcsec)
    tok_tr8 = np.concatenate([encode_stamps(tok, dihedral(tr.pixels, k), survey.name, tr.pixel_scale_arcsec) for k in range(8)])
    pix_tr8 = np.concatenate([pixel_features(tok, dihedral(tr.pixels, k), survey.name, tr.pixel_scale_arcsec) for k in range(8)])
    pca = PCA(N_PCA, random_state=SEED).fit(pix_tr8)
    pc_tr8, pc_ho = pca.transform(pix_tr8), pca.transform(pixel_features(tok, ho.pixels, survey.name, ho.pixel_scale_arcsec))

    gen = bundle.generate({IMAGE_MODALITY: tok_ho}, list(IMAGE_SCALARS), seed=SEED)
    pred = {}
    for m in IMAGE_SCALARS:
        ok = np.isfinite(t_tr8[m])
        knn_tok = KNeighborsRegressor(K_PRED, metric="hamming").fit(tok_tr8[ok], t_tr8[m][ok])
        knn_pix = KNeighborsRegressor(K_PRED).fit(pc_tr8[ok], t_tr8[m][ok])
        pred[m] = {
            "model": scores(gen[m]["median"], t_ho[m]),
            "knn_k10_image_tokens_hamming": scores(knn_tok.predict(tok_ho), t_ho[m]),
            "knn_k10_pixel_pca32": scores(knn_pix.predict(pc_ho), t_ho[m]),
            "training_median": scores(np.full(len(tok_ho), np.nanmedian(t_tr8[m])), t_ho[m]),
        }
    emb = bundle.encode(bundle.tokenize({IMAGE_MODALITY: tok_ho}))
    tok_tr = tok_tr8[: int(fit.sum())]  # the unflipped training stamps
    p2i = properties_to_image(bundle, tok, survey, t_ho, {m: v[fit] for m, v in truth.items()}, tok_ho, tok_tr)
    report = {
        "model": bundle.model_id, "seed": SEED, "field": str(CFHT_A370),
        "n_train_stamps": int(fit.sum()), "n_holdout_stamps": int(held.sum()),
        "holdout": "CFHT A370 stamps with centroid x > 0.55 * width + one stamp side (disjoint region)",
        "image_to_properties": pred,
        "embedding_neighbours_k5": {
            "model_embedding_cosine": neighbour_agreement(emb, t_ho, "cosine", rng),
            "pixel_pca32_euclidean": neighbour_agreement(pc_ho, t_ho, "euclidean", rng),
        },
        "properties_to_image": p2i,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
