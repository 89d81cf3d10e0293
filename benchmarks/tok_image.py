"""Image tokenizer: fidelity on held-out REAL stamps vs same-token-budget baselines, and CPU throughput.

Stamps are cut around sources detected in the mpdaf fields (/work/shared/data/mpdaf):
  fit      : CFHT I-band Abell 370, columns x < 55% of the width; HST F814W Abell 478 (whole field)
  held out : CFHT Abell 370, x > 55% + one stamp (disjoint region); HST F606W HDF-S (other field, band, depth)
Metrics are on linear flux at the common pixel scale, against the preprocessed input:
  * rel. flux error in a central aperture of radius 0.5" (median |dF|/F over stamps with aperture S/N > 20),
  * per-pixel RMS in units of the sky sigma (sky sigma from the original image resampled the same way),
    over the whole stamp and within 1.5" of the centre.
Baselines with the same budget (g*g tokens of log2(vocab) bits): (a) block average to g*g pixels, each
arcsinh value quantized to vocab levels, upsampled (nearest or bilinear, chosen on the fit set);
(b) PCA with g*g components fitted on the fit set, each coefficient quantized to vocab levels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from astropy.stats import sigma_clipped_stats

from engine.modalities.images import Image
from engine.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, Prepared, inverse_stretch, resample
from engine.tokenizers.stamps import StampConfig, cut_stamps, read_field

DATA = Path("/work/shared/data/mpdaf")
FIELDS = {  # name: (file, hdu, band)
    "cfht_a370": ("a370II.fits", 0, "CFHT-I"),
    "hst_a478": ("a478hst-cutout.fits", 1, "HST-F814W"),
    "hst_hdfs": ("HST-HDFS.fits", 1, "HST-F606W"),
}
SPLIT_FRAC = 0.55
APERTURE_ARCSEC, CORE_ARCSEC, MIN_APERTURE_SNR = 0.5, 1.5, 20.0


def _field_stamps(name: str, cfg: ImageTokenizerConfig):
    file, hdu, band = FIELDS[name]
    field = read_field(DATA / file, hdu)
    size = int(np.ceil(cfg.crop_size * cfg.pixel_scale_arcsec / field.pixel_scale_arcsec)) + 2
    stamps = cut_stamps(field, StampConfig(size_pix=size + size % 2))
    # sky sigma per output pixel: resample a source-poor-agnostic central patch of the original image
    h, w = field.data.shape
    n = min(h, w, int(25.0 / field.pixel_scale_arcsec))  # up to 25" on a side
    patch = field.data[h // 2 - n // 2 : h // 2 - n // 2 + n, w // 2 - n // 2 : w // 2 - n // 2 + n] - stamps.background
    out = int(n * field.pixel_scale_arcsec / cfg.pixel_scale_arcsec) - 2
    res, ok = resample(patch[None, None], np.isfinite(patch)[None, None], field.pixel_scale_arcsec, cfg.pixel_scale_arcsec, out)
    sky_sigma = float(sigma_clipped_stats(res[ok], sigma=3.0, maxiters=10)[2])
    images = [Image(p[None].astype(np.float64), (band,), stamps.pixel_scale_arcsec) for p in stamps.pixels]
    return stamps, images, sky_sigma


def _metrics(rec: np.ndarray, prep: Prepared, sky_sigma: float, pixel_scale: float) -> dict:
    s = rec.shape[-1]
    yy, xx = np.mgrid[:s, :s] - s // 2
    r = np.hypot(yy, xx) * pixel_scale
    ap, core = r <= APERTURE_ARCSEC, r <= CORE_ARCSEC
    v = prep.valid[:, 0]
    diff = (rec[:, 0] - prep.flux[:, 0]) / sky_sigma
    f_true, f_rec = (a[:, 0][:, ap].sum(-1) for a in (prep.flux, rec))
    bright = f_true > MIN_APERTURE_SNR * sky_sigma * np.sqrt(ap.sum())
    rel = np.abs(f_rec - f_true)[bright] / f_true[bright]
    return {
        "aperture_rel_flux_err_median": float(np.median(rel)),
        "aperture_rel_flux_err_p90": float(np.quantile(rel, 0.9)),
        "n_aperture_stamps": int(bright.sum()),
        "rms_per_pixel_sigma": float(np.sqrt((diff**2)[v].mean())),
        "rms_core_sigma": float(np.sqrt((diff**2)[v & core].mean())),
    }


class BlockBaseline:
    def __init__(self, grid: int, levels: int, mode: str = "nearest") -> None:
        self.grid, self.levels, self.mode = grid, levels, mode

    def fit(self, prep: Prepared) -> "BlockBaseline":
        z = self._blocks(prep)
        self.lo, self.hi = float(z.min()), float(z.max())
        return self

    def _blocks(self, prep: Prepared) -> np.ndarray:
        f = torch.from_numpy(prep.flux)
        return np.arcsinh(F.adaptive_avg_pool2d(f, self.grid).numpy() / prep.scale[:, :, None, None])

    def reconstruct(self, prep: Prepared) -> np.ndarray:
        z = np.clip(self._blocks(prep), self.lo, self.hi)
        q = np.round((z - self.lo) / (self.hi - self.lo) * (self.levels - 1))
        blocks = inverse_stretch(self.lo + q / (self.levels - 1) * (self.hi - self.lo), prep.scale[:, :, None, None])
        up = F.interpolate(torch.from_numpy(blocks), size=prep.flux.shape[-1], mode=self.mode,
                           **({} if self.mode == "nearest" else {"align_corners": False}))
        return up.numpy()


class PCABaseline:
    def __init__(self, n_comp: int, levels: int) -> None:
        self.n_comp, self.levels = n_comp, levels

    def fit(self, prep: Prepared) -> "PCABaseline":
        x = prep.x.reshape(len(prep.x), -1).astype(np.float64)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.comp = vt[: self.n_comp]
        c = (x - self.mean) @ self.comp.T
        self.lo, self.hi = c.min(0), c.max(0)
        return self

    def reconstruct(self, prep: Prepared) -> np.ndarray:
        x = prep.x.reshape(len(prep.x), -1).astype(np.float64)
        c = np.clip((x - self.mean) @ self.comp.T, self.lo, self.hi)
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        c = self.lo + np.round((c - self.lo) / span * (self.levels - 1)) / (self.levels - 1) * span
        z = (c @ self.comp + self.mean).reshape(prep.x.shape)
        return inverse_stretch(z, prep.scale[:, :, None, None])


def _throughput(tok: ImageTokenizer, prep: Prepared, n: int) -> dict:
    torch.set_num_threads(1)
    sub = Prepared(prep.x[:n], prep.valid[:n], prep.flux[:n], prep.scale[:n])
    tok.encode_prepared(sub)  # warm-up
    t0 = time.perf_counter()
    tokens = tok.encode_prepared(sub)
    t1 = time.perf_counter()
    tok.decode_stretched(tokens)
    t2 = time.perf_counter()
    return {"encode_stamps_per_s_1thread": n / (t1 - t0), "decode_stamps_per_s_1thread": n / (t2 - t1), "n_stamps": n}


def run(seed: int, quick: bool) -> dict:
    t_start = time.perf_counter()
    cfg = ImageTokenizerConfig(surveys=("hst_f606w", "hst_f814w", "cfht_i"), steps=150 if quick else 450, seed=seed)
    cfht_stamps, cfht_images, cfht_sigma = _field_stamps("cfht_a370", cfg)
    _, a478_images, _ = _field_stamps("hst_a478", cfg)
    _, hdfs_images, hdfs_sigma = _field_stamps("hst_hdfs", cfg)
    width = 1909  # A370 image width in pixels
    half = cfht_stamps.pixels.shape[-1] // 2
    in_fit = cfht_stamps.x_pix < SPLIT_FRAC * width
    held = cfht_stamps.x_pix > SPLIT_FRAC * width + 2 * half  # no pixel shared with any fit stamp
    fit_images = [im for im, k in zip(cfht_images, in_fit) if k] + a478_images
    held_sets = {
        "cfht_a370_disjoint_region": ([im for im, k in zip(cfht_images, held) if k], cfht_sigma),
        "hst_hdfs_other_field": (hdfs_images, hdfs_sigma),
    }
    tok = ImageTokenizer(cfg)
    t0 = time.perf_counter()
    tok.fit(fit_images)
    fit_s = time.perf_counter() - t0
    fit_prep = tok.preprocess(fit_images)
    grid, vocab = tok.token_grid, tok.vocab_size
    # the block baseline's upsampling mode is chosen on the fit set (never on held-out stamps)
    modes = {m: BlockBaseline(grid, vocab, m).fit(fit_prep) for m in ("nearest", "bilinear")}
    fit_rms = {m: float(np.sqrt((((b.reconstruct(fit_prep) - fit_prep.flux) ** 2)[fit_prep.valid]).mean())) for m, b in modes.items()}
    block = modes[min(fit_rms, key=fit_rms.get)]
    pca = PCABaseline(grid * grid, vocab).fit(fit_prep)
    result = {
        "config": {"crop_size": cfg.crop_size, "pixel_scale_arcsec": cfg.pixel_scale_arcsec, "levels": list(cfg.levels),
                   "tokens_per_stamp": grid * grid, "vocab_size": vocab, "steps": cfg.steps, "train_crop": cfg.train_crop},
        "n_fit_stamps": len(fit_images),
        "fit_seconds": fit_s,
        "block_baseline_upsampling": block.mode,
        "held_out": {},
    }
    for name, (images, sigma) in held_sets.items():
        prep = tok.preprocess(images)
        tokens = tok.encode_prepared(prep)
        survey = "cfht_i" if name.startswith("cfht") else "hst_f606w"
        rec = tok.decode(tokens, survey)
        result["held_out"][name] = {
            "n_stamps": len(images),
            "sky_sigma_per_output_pixel": sigma,
            "distinct_tokens_used": int(len(np.unique(tokens))),
            "learned": _metrics(rec, prep, sigma, cfg.pixel_scale_arcsec),
            "baseline_block": _metrics(block.reconstruct(prep), prep, sigma, cfg.pixel_scale_arcsec),
            "baseline_pca": _metrics(pca.reconstruct(prep), prep, sigma, cfg.pixel_scale_arcsec),
        }
    result["throughput"] = _throughput(tok, fit_prep, min(256, len(fit_images)))
    result["total_seconds"] = time.perf_counter() - t_start
    return result


if __name__ == "__main__":
    import json
    import logging

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(seed=0, quick=True), indent=2))
