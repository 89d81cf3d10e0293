"""Spectrum tokenizer fidelity on held-out REAL spectra vs same-token-budget baselines, and 1-thread throughput.

Data (read from /work/shared/data/mangadap): 984 MILES stellar spectra split by star number
(m%04d with number % 5 == 0 held out, never used for fitting) and the 8 MaNGA spaxel spectra of
``MaNGA_test_spectra.fits.gz`` (held out; one is fully masked and is skipped as invalid). The
tokenizer is fitted on the other 80% of MILES plus the 3 spectra of ``MaNGA_multicomp_test_spectra``.

Fidelity: median over valid latent pixels of |decoded - input| / sigma, input and sigma resampled to
the latent grid. MaNGA has real ivar. MILES ships no errors: sigma = median flux / 100 (an assumed
S/N = 100 per pixel), so for MILES the number is also 100 x the median relative error.

Learned codec: the hybrid one (``global_tokens`` quantised global-basis coefficients + residual patch codes)
at 256 content tokens; G (with the patch length / stage count that fills the budget) is chosen on a
validation split of the TRAINING stars (id % 5 == 1, fitted on the rest of the training set), never on
the held-out sets, then refitted on the whole training set.

Baselines get the same number of content tokens (global_tokens + n_patches x n_stages) at the same bits per token
(log2 codebook_size) and share the scale token and normalisation:
  * pca:        that many principal components of the training spectra, fitted by chi^2 per spectrum,
                each coefficient uniformly quantised over its training range;
  * downsample: that many ivar-weighted block means, uniformly quantised, linearly interpolated back.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.modalities.registry import entry  # noqa: E402
from engine.modalities.spectra import SpectrumBatch, read_manga, read_miles  # noqa: E402
from engine.tokenizers.spectrum import SpectrumTokenizer, patches, to_latent  # noqa: E402

DATA = Path("/work/shared/data/mangadap")
MILES_SNR = 100.0


def _subset(b: SpectrumBatch, keep: np.ndarray) -> SpectrumBatch:
    pick = lambda a: None if a is None else a[keep]  # noqa: E731
    return SpectrumBatch(b.survey, b.wavelength_aa, b.flux[keep], b.ivar[keep], pick(b.mask), pick(b.redshift), b.object_id[keep])


def _load():
    # one tokenizer (the registered MaNGA config, rest frame) is fitted on stars and galaxies together
    miles = read_miles(sorted(glob.glob(str(DATA / "miles" / "MILES_res2.50_star_m*V.fits"))), MILES_SNR, survey="manga")
    held = miles.object_id % 5 == 0
    multicomp = read_manga(DATA / "MaNGA_multicomp_test_spectra.fits.gz")
    test = read_manga(DATA / "MaNGA_test_spectra.fits.gz")
    return [_subset(miles, ~held), multicomp], {"miles_heldout": _subset(miles, held), "manga_test": test}


def _quantise(c: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    n = 2**bits - 1
    step = np.where(hi > lo, (hi - lo) / n, 1.0)
    return lo + np.clip(np.round((c - lo) / step), 0, n) * step


class PCABaseline:
    def __init__(self, x: np.ndarray, w: np.ndarray, n_comp: int, bits: int) -> None:
        self.mean = np.where(w > 0, x, 0).sum(0) / np.maximum((w > 0).sum(0), 1)
        filled = np.where(w > 0, x, self.mean)  # invalid training pixels take the pixel mean
        _, _, vt = np.linalg.svd(filled - self.mean, full_matrices=False)
        self.v = vt[: min(n_comp, len(vt))]  # (k, M)
        c = (filled - self.mean) @ self.v.T
        self.lo, self.hi, self.bits = c.min(0), c.max(0), bits

    def reconstruct(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        c = np.empty((len(x), len(self.v)))
        for s in range(0, len(x), 16):  # chi^2 normal equations, 16 spectra at a time (baseline only)
            a = (self.v[None] * w[s : s + 16, None, :]) @ self.v.T + 1e-9 * np.eye(len(self.v))
            b = (w[s : s + 16] * (x[s : s + 16] - self.mean)) @ self.v.T
            c[s : s + 16] = np.linalg.solve(a, b[..., None])[..., 0]
        return self.mean + _quantise(c, self.lo, self.hi, self.bits) @ self.v


class DownsampleBaseline:
    def __init__(self, x: np.ndarray, w: np.ndarray, n_blocks: int, bits: int) -> None:
        self.n, self.bits = n_blocks, bits
        means = self._means(x, w)
        self.lo, self.hi = np.nanmin(means), np.nanmax(means)

    def _means(self, x, w):
        xb, wb = x.reshape(len(x), self.n, -1), w.reshape(len(w), self.n, -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (xb * wb).sum(2) / wb.sum(2)

    def reconstruct(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        m = self._means(x, w)
        m = _quantise(np.where(np.isfinite(m), m, 1.0), self.lo, self.hi, self.bits)
        block = x.shape[1] // self.n
        centres, grid = np.arange(self.n) * block + (block - 1) / 2, np.arange(x.shape[1])
        return np.stack([np.interp(grid, centres, row) for row in m])  # baseline only, not timed


def _stats(recon_flux: np.ndarray, latent) -> dict:
    ok = (latent.ivar > 0) & latent.valid[:, None] & np.isfinite(recon_flux)
    dev = np.abs(recon_flux - latent.flux)[ok]
    z = dev * np.sqrt(latent.ivar[ok])
    rel = dev / np.broadcast_to(latent.scale[:, None], latent.flux.shape)[ok]
    return {"median_abs_dflux_over_sigma": float(np.median(z)), "p90_abs_dflux_over_sigma": float(np.quantile(z, 0.9)),
            "median_abs_dflux_over_scale": float(np.median(rel)), "n_spectra": int(latent.valid.sum()), "n_pixels": int(ok.sum())}


_THROUGHPUT = """
import json, sys, time, numpy as np
sys.path.insert(0, {root!r})
from engine.tokenizers.spectrum import SpectrumTokenizer
from benchmarks.tok_spectrum import _load
tok = SpectrumTokenizer.load({path!r})
b = _load()[1]["miles_heldout"]
tok.encode(b); t = time.perf_counter(); enc = tok.encode(b); te = time.perf_counter() - t
t = time.perf_counter(); tok.decode(enc.tokens); td = time.perf_counter() - t
print(json.dumps({{"encode_spectra_per_s": b.n_rows / te, "decode_spectra_per_s": b.n_rows / td, "n_spectra": b.n_rows}}))
"""


def _throughput(tok_dir: str) -> dict:
    """Encode/decode speed in a fresh process pinned to one thread (BLAS/OpenMP read these at import)."""
    env = {**os.environ, **{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-c", _THROUGHPUT.format(root=str(ROOT), path=tok_dir)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# (global_tokens, patch_length, n_stages), each 256 content tokens. Earlier validation runs of the pure patch
# codec (global_tokens=0) on the same split: 16x1 1.58, 32x2 1.01, 64x4 0.74, 128x8 0.66 sigma.
CANDIDATES = ((64, 128, 6), (128, 256, 8), (192, 512, 8))


def _median_z(tok: SpectrumTokenizer, batch: SpectrumBatch) -> float:
    latent = to_latent(batch, tok.config)
    return _stats(tok.decode(tok.encode(batch).tokens), latent)["median_abs_dflux_over_sigma"]


def choose_global_tokens(base, seed: int, fit_batches: list, max_patches: int) -> tuple[dict, dict]:
    """Pick (global_tokens, patch_length, n_stages) on a validation split of the training stars only."""
    stars, others = fit_batches[0], fit_batches[1:]
    val = stars.object_id % 5 == 1
    scores = {}
    for g, pl, st in CANDIDATES:
        tok = base.build(seed=seed, global_tokens=g, patch_length=pl, n_stages=st, max_patches=max_patches)
        tok.fit([_subset(stars, ~val), *others])
        scores[f"G{g}_p{pl}x{st}"] = _median_z(tok, _subset(stars, val))
    best = min(range(len(CANDIDATES)), key=lambda i: list(scores.values())[i])
    g, pl, st = CANDIDATES[best]
    return dict(global_tokens=g, patch_length=pl, n_stages=st), scores


def run(seed: int, quick: bool) -> dict:
    base = entry("tok_spec_manga")
    fit_batches, tests = _load()
    max_patches = 100_000 if quick else 200_000  # hybrid pools hold far fewer patches: both keep all
    t = time.perf_counter()
    overrides, val_scores = choose_global_tokens(base, seed, fit_batches, max_patches)
    select_s = time.perf_counter() - t
    tok = base.build(seed=seed, max_patches=max_patches, **overrides)
    cfg = tok.config
    t = time.perf_counter()
    tok.fit(fit_batches)
    fit_s = time.perf_counter() - t
    bits = int(np.ceil(np.log2(cfg.codebook_size)))
    train = [to_latent(b, cfg) for b in fit_batches]
    tx = np.concatenate([patches(lt, cfg)[0].reshape(len(lt.flux), -1)[lt.valid] for lt in train])
    tw = np.concatenate([patches(lt, cfg)[1].reshape(len(lt.flux), -1)[lt.valid] for lt in train])
    n_content = cfg.n_tokens - 1
    baselines = {"pca": PCABaseline(tx, tw, n_content, bits), "downsample": DownsampleBaseline(tx, tw, n_content, bits)}
    result = {"config": {k: v for k, v in vars(cfg).items() if k != "sky_lines_aa"}, "n_tokens_per_spectrum": cfg.n_tokens,
              "validation_median_abs_dflux_over_sigma": val_scores, "selection_seconds": select_s,
              "bits_per_token": bits, "fit_seconds": fit_s, "miles_assumed_snr_per_pixel": MILES_SNR,
              "n_fit_spectra": int(sum(b.n_rows for b in fit_batches))}
    for name, batch in tests.items():
        latent = to_latent(batch, cfg)
        enc = tok.encode(batch)
        scale = tok.decode_scale(enc.tokens[:, 0])[:, None]  # every method uses the quantised scale
        row = {"learned": _stats(tok.decode(enc.tokens), latent)}
        x, w = (a.reshape(len(latent.flux), -1) for a in patches(latent, cfg))
        for bname, bl in baselines.items():
            row[bname] = _stats(bl.reconstruct(x, w) * scale, latent)
        learned = row["learned"]["median_abs_dflux_over_sigma"]
        row["learned_beats"] = {b: bool(learned < row[b]["median_abs_dflux_over_sigma"]) for b in baselines}
        result[name] = row
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        result["throughput_1_thread"] = _throughput(d)
    return result


if __name__ == "__main__":
    print(json.dumps(run(seed=0, quick="--full" not in sys.argv), indent=2))
