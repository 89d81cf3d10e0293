"""SpectrumTokenizer: spectra -> one scale token + one codebook token per fixed-length patch.

Pipeline (all batch-vectorised over rows):

1. bad pixels (non-finite, ``ivar <= 0``, ``mask``) and pixels within ``sky_half_width_aa`` of the
   configured sky lines (observed frame) get weight 0;
2. resampling onto a log-uniform latent grid (rest or observed frame) by linear interpolation; the
   variance is propagated, and a latent pixel is valid only if both native neighbours are valid
   (no coverage -> invalid);
3. the ivar-weighted median of the valid latent flux is the row's *scale*; its log10 is binned
   into ``n_scale_bins`` linear bins (the scale token) so decode restores the flux level;
4. the normalised flux is cut into ``n_pixels / patch_length`` patches; each patch gets the
   codebook centroid with the smallest ivar-weighted squared distance over its valid pixels
   (a chi^2 fit, so masked pixels never influence a token). A patch with no valid pixel gets
   ``missing_token``. With ``n_stages > 1`` further codebooks encode the residual (residual VQ).
5. optional hybrid codec (``global_tokens = G > 0``, ``engine.tokenizers.spectrum_basis``): before step 4,
   G tokens quantise the coefficients of a global basis (PCA of the training spectra) and the patch
   codebooks code the residual.

Token layout per row: ``[scale, global_0 .. global_{G-1}, patch_0 stage_0, .., patch_0 stage_{S-1},
patch_1 stage_0, ..]`` in one vocabulary: codebook tokens ``0 .. S*K-1`` (stage s uses ``s*K .. (s+1)*K-1``),
with G > 0 the global coefficient levels ``S*K .. S*K+K-1`` (shared by every coefficient), then the
missing token, then the scale tokens. A row with no valid pixel is returned with
``valid == False`` and every token (scale included) missing -- an all-masked spectrum is a per-row
flag, not an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from engine.errors import CodecError, ConfigError, ModalityError
from engine.modalities.spectra import SpectrumBatch
from engine.tokenizers.scalar import Reservoir
from engine.tokenizers.spectrum_basis import GlobalBasis, decode_global, encode_global, fit_global

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: global_tokens (hybrid codec); version-1 files still load
LOADABLE_VERSIONS = (1, 2)
FRAMES = ("rest", "observed")
# Strong night-sky emission lines (air, Angstrom): [O I] 5577, Na D 5890/5896, [O I] 6300/6364.
DEFAULT_SKY_LINES_AA = (5577.34, 5889.95, 5895.92, 6300.30, 6363.78)


@dataclass(frozen=True)
class SpectrumTokenizerConfig:
    wave_min_aa: float = 3550.0
    wave_max_aa: float = 7400.0
    n_pixels: int = 4096
    frame: str = "rest"
    # 64-pixel patches x 4 residual stages: on a validation split of the MILES training stars this gave
    # 0.74 sigma vs 1.58 for 16-pixel patches x 1 stage at the same 256 content tokens (benchmarks/tok_spectrum.py)
    patch_length: int = 64
    codebook_size: int = 1024
    n_stages: int = 4  # > 1: residual codebooks, each encoding what the previous stages left
    n_scale_bins: int = 1024
    scale_margin_dex: float = 1.0  # scale bins extend this far beyond the fitted log10-scale range
    sky_lines_aa: tuple[float, ...] = DEFAULT_SKY_LINES_AA
    sky_half_width_aa: float = 3.0
    max_patches: int = 200_000
    kmeans_niter: int = 20
    seed: int = 0
    global_tokens: int = 0  # > 0: hybrid codec, that many quantised global-basis coefficients first
    max_global_spectra: int = 5_000  # reservoir of whole spectra the global basis is fitted on

    def __post_init__(self) -> None:
        def bad(field, value, allowed):
            raise ConfigError(f"SpectrumTokenizerConfig.{field}={value!r}; expected {allowed}")

        if not 0 < self.wave_min_aa < self.wave_max_aa:
            bad("wave_min_aa/wave_max_aa", (self.wave_min_aa, self.wave_max_aa), "0 < wave_min_aa < wave_max_aa")
        if self.frame not in FRAMES:
            bad("frame", self.frame, f"one of {FRAMES}")
        if self.patch_length < 1 or self.n_pixels < self.patch_length or self.n_pixels % self.patch_length:
            bad("patch_length", self.patch_length, f"a divisor of n_pixels={self.n_pixels}")
        if not 2 <= self.codebook_size <= 65536:
            bad("codebook_size", self.codebook_size, "2..65536")
        if not 1 <= self.n_stages <= 8 or self.n_stages * self.codebook_size > 2**31 - 2**17:
            bad("n_stages", self.n_stages, "1..8 (with n_stages * codebook_size < 2**31)")
        if not 2 <= self.n_scale_bins <= 65536:
            bad("n_scale_bins", self.n_scale_bins, "2..65536")
        if self.scale_margin_dex < 0 or self.sky_half_width_aa < 0:
            bad("scale_margin_dex/sky_half_width_aa", (self.scale_margin_dex, self.sky_half_width_aa), ">= 0")
        if self.max_patches < self.codebook_size:
            bad("max_patches", self.max_patches, f">= codebook_size={self.codebook_size}")
        if self.kmeans_niter < 1:
            bad("kmeans_niter", self.kmeans_niter, ">= 1")
        if not 0 <= self.global_tokens <= min(self.n_pixels, 4096):
            bad("global_tokens", self.global_tokens, f"0..{min(self.n_pixels, 4096)}")
        if self.max_global_spectra < max(self.global_tokens, 1):
            bad("max_global_spectra", self.max_global_spectra, f">= max(global_tokens, 1)={max(self.global_tokens, 1)}")

    @property
    def n_patches(self) -> int:
        return self.n_pixels // self.patch_length

    @property
    def n_tokens(self) -> int:
        """Tokens per spectrum: one scale token, global_tokens, then n_stages per patch."""
        return 1 + self.global_tokens + self.n_patches * self.n_stages

    def latent_wavelength_aa(self) -> np.ndarray:
        return np.geomspace(self.wave_min_aa, self.wave_max_aa, self.n_pixels)


@dataclass(frozen=True)
class LatentSpectra:
    """Spectra on the latent grid. ``flux``/``ivar`` are in original units; ``flux / scale`` is what is tokenized."""

    flux: np.ndarray  # (N, M), 0 where invalid
    ivar: np.ndarray  # (N, M), 0 where invalid
    scale: np.ndarray  # (N,), NaN for rows with no valid pixel
    valid: np.ndarray  # (N,) bool
    object_id: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class SpectrumTokens:
    tokens: np.ndarray  # (N, n_tokens) int32
    valid: np.ndarray  # (N,) bool; False = no valid pixel, all tokens missing
    object_id: np.ndarray  # (N,) int64
    token_key: str


def to_latent(batch: SpectrumBatch, cfg: SpectrumTokenizerConfig) -> LatentSpectra:
    """Mask, resample onto the latent grid (propagating ivar) and measure the ivar-weighted median scale."""
    wave = batch.wavelength_aa
    bad = batch.bad_pixels()
    for line in cfg.sky_lines_aa:
        bad = bad | (np.abs(wave - line) <= cfg.sky_half_width_aa)[None, :]
    lam = cfg.latent_wavelength_aa()[None, :]  # (1, M), rest or observed
    if cfg.frame == "rest":
        if batch.redshift is None:
            raise ModalityError(f"{batch.token_key}: rest-frame tokenization expected a redshift per spectrum, got none")
        lam = lam * (1.0 + batch.redshift[:, None])  # (N, M) observed wavelength of each latent pixel
    lam = np.broadcast_to(lam, (batch.n_rows, cfg.n_pixels))
    hi = np.searchsorted(wave, lam, side="right")  # (N, M)
    covered = (hi > 0) & (hi < len(wave)) | (lam == wave[-1])
    hi = np.clip(hi, 1, len(wave) - 1)
    lo = hi - 1
    frac = np.clip((lam - wave[lo]) / (wave[hi] - wave[lo]), 0.0, 1.0)
    rows = np.arange(batch.n_rows)[:, None]
    good = ~bad
    flux0 = np.where(good, batch.flux, 0.0)
    var0 = np.where(good, 1.0 / np.where(good, batch.ivar, 1.0), 0.0)
    # a neighbour with zero interpolation weight does not matter
    ok = covered & (good[rows, lo] | (frac == 1.0)) & (good[rows, hi] | (frac == 0.0))
    flux = (1.0 - frac) * flux0[rows, lo] + frac * flux0[rows, hi]
    var = (1.0 - frac) ** 2 * var0[rows, lo] + frac**2 * var0[rows, hi]
    ok &= var > 0
    ivar = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    flux = np.where(ok, flux, 0.0)
    scale = weighted_median(flux, ivar)
    fallback = weighted_median(np.abs(flux), ivar)  # emission-line or noise-dominated rows
    scale = np.where(scale > 0, scale, fallback)
    valid = ok.any(axis=1) & (scale > 0)
    scale = np.where(valid, scale, np.nan)
    return LatentSpectra(flux, np.where(valid[:, None], ivar, 0.0), scale, valid, batch.object_id)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise weighted median (N, M) -> (N,); NaN where a row has no positive weight."""
    order = np.argsort(np.where(weights > 0, values, np.inf), axis=1)
    v = np.take_along_axis(values, order, axis=1)
    cw = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
    total = cw[:, -1:]
    idx = np.minimum((cw < 0.5 * total).sum(axis=1), values.shape[1] - 1)
    out = v[np.arange(len(v)), idx]
    return np.where(total[:, 0] > 0, out, np.nan)


def patches(latent: LatentSpectra, cfg: SpectrumTokenizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Normalised flux and normalised ivar cut into patches: both (N, n_patches, patch_length)."""
    s = np.where(latent.valid, latent.scale, 1.0)[:, None]
    shape = (len(s), cfg.n_patches, cfg.patch_length)
    return (latent.flux / s).reshape(shape), (latent.ivar * s**2).reshape(shape)


def nearest(x: np.ndarray, w: np.ndarray, codebook: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """argmin_k sum_i w_i (x_i - c_ki)^2 for rows of x (P, L) with weights w (P, L); (P,) int64."""
    c2 = (codebook**2).T  # (L, K)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        xs, ws = x[s : s + chunk], w[s : s + chunk]
        d = ws @ c2 - 2.0 * (ws * xs) @ codebook.T  # (P, K); the sum w x^2 term is constant per row
        out[s : s + chunk] = np.argmin(d, axis=1)
    return out


def kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """Seeded single-thread faiss k-means (2 threads are 7-80x slower on small boxes); (k, d) float64."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, max_points_per_centroid=10**6)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    return km.centroids.astype(np.float64)


def fit_residual_codebooks(x: np.ndarray, cfg: SpectrumTokenizerConfig) -> np.ndarray:
    """Residual k-means: stage s clusters what stages < s left; (P, L) patches -> (n_stages, K, L)."""
    books = []
    for stage in range(cfg.n_stages):
        book = kmeans(x, cfg.codebook_size, cfg.kmeans_niter, cfg.seed + stage)
        books.append(book)
        x = x - book[nearest(x, np.ones_like(x), book)]
    return np.stack(books)


class SpectrumTokenizer:
    Config = SpectrumTokenizerConfig

    def __init__(self, config: SpectrumTokenizerConfig, codebooks: np.ndarray | None = None,
                 scale_edges: np.ndarray | None = None, global_basis: GlobalBasis | None = None) -> None:
        self.config = config
        self.codebooks = codebooks  # (n_stages, K, patch_length)
        self.scale_edges = scale_edges  # (n_scale_bins + 1,) log10 scale
        self.global_basis = global_basis  # hybrid codec only (global_tokens > 0)

    # ---- vocabulary ------------------------------------------------------------------------------
    @property
    def global_offset(self) -> int:
        return self.config.n_stages * self.config.codebook_size

    @property
    def missing_token(self) -> int:
        return self.global_offset + (self.config.codebook_size if self.config.global_tokens else 0)

    @property
    def scale_offset(self) -> int:
        return self.missing_token + 1

    @property
    def scale_missing_token(self) -> int:
        return self.scale_offset + self.config.n_scale_bins

    @property
    def vocab_size(self) -> int:
        return self.scale_missing_token + 1

    @property
    def latent_wavelength_aa(self) -> np.ndarray:
        return self.config.latent_wavelength_aa()

    @property
    def is_fitted(self) -> bool:
        hybrid_ok = self.global_basis is not None or not self.config.global_tokens
        return self.codebooks is not None and self.scale_edges is not None and hybrid_ok

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CodecError("SpectrumTokenizer is not fitted: call fit() or load() a saved state first")

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self, batches: Iterable[SpectrumBatch]) -> "SpectrumTokenizer":
        """Fit the scale bins and codebook(s) on a stream of batches, keeping bounded reservoirs of
        fully valid patches (``max_patches``) and log10 scales."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        hybrid = cfg.global_tokens > 0
        pool = Reservoir(cfg.max_global_spectra if hybrid else cfg.max_patches, rng,
                         dim=2 * cfg.n_pixels if hybrid else cfg.patch_length)
        scales = Reservoir(cfg.max_patches, rng)
        n_rows = 0
        for batch in batches:
            latent = to_latent(batch, cfg)
            x, w = patches(latent, cfg)
            if hybrid:  # whole spectra [flux | ivar], (n, 2M)
                pool.add(np.hstack([x.reshape(batch.n_rows, -1), w.reshape(batch.n_rows, -1)])[latent.valid])
            else:
                full = (w > 0).all(axis=2) & latent.valid[:, None]
                pool.add(x[full])
            scales.add(np.log10(latent.scale[latent.valid]))
            n_rows += batch.n_rows
        x = pool.sample()
        if hybrid:  # the patch codebooks are fitted on what the global basis leaves
            self.global_basis, x = fit_global(x[:, : cfg.n_pixels], x[:, cfg.n_pixels :], cfg, rng)
        if len(x) < cfg.codebook_size:
            raise CodecError(
                f"SpectrumTokenizer.fit: expected >= codebook_size={cfg.codebook_size} fully valid patches, "
                f"got {len(x)} from {n_rows} spectra; give more spectra or a smaller codebook"
            )
        log.info("fitting %d x %d-entry codebook(s) on %d patches from %d spectra",
                 cfg.n_stages, cfg.codebook_size, len(x), n_rows)
        self.codebooks = fit_residual_codebooks(x, cfg)
        s = scales.sample()
        lo, hi = float(s.min()) - cfg.scale_margin_dex, float(s.max()) + cfg.scale_margin_dex
        self.scale_edges = np.linspace(lo, hi if hi > lo else lo + 1.0, cfg.n_scale_bins + 1)
        return self

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, batch: SpectrumBatch) -> SpectrumTokens:
        self._require_fitted()
        cfg = self.config
        latent = to_latent(batch, cfg)
        x, w = patches(latent, cfg)
        n, g = batch.n_rows, cfg.global_tokens
        tokens = np.empty((n, cfg.n_tokens), dtype=np.int32)
        if g:
            tokens[:, 1 : 1 + g], x = encode_global(self.global_basis, x, w, latent.valid, cfg.codebook_size,
                                                    self.global_offset, self.missing_token)
        flat_x, flat_w = x.reshape(-1, cfg.patch_length), w.reshape(-1, cfg.patch_length)
        codes = np.empty((n * cfg.n_patches, cfg.n_stages), dtype=np.int64)
        for stage, book in enumerate(self.codebooks):
            k = nearest(flat_x, flat_w, book)
            codes[:, stage] = k + stage * cfg.codebook_size
            flat_x = flat_x - book[k]
        empty = ~(w > 0).any(axis=2).reshape(-1) | np.repeat(~latent.valid, cfg.n_patches)
        codes[empty] = self.missing_token
        tokens[:, 1 + g :] = codes.reshape(n, -1)
        log_s = np.log10(np.where(latent.valid, latent.scale, 1.0))
        bins = np.searchsorted(self.scale_edges[1:-1], log_s, side="right")
        outside = latent.valid & ((log_s < self.scale_edges[0]) | (log_s > self.scale_edges[-1]))
        if outside.any():
            log.warning("%s: %d spectra have a flux scale outside the fitted range 10^[%.2f, %.2f]; "
                        "their scale token is clipped to the end bin", batch.token_key, int(outside.sum()),
                        self.scale_edges[0], self.scale_edges[-1])
        tokens[:, 0] = np.where(latent.valid, self.scale_offset + bins, self.scale_missing_token)
        return SpectrumTokens(tokens, latent.valid, latent.object_id, batch.token_key)

    def decode(self, tokens: np.ndarray, normalised: bool = False) -> np.ndarray:
        """(N, n_tokens) tokens -> (N, n_pixels) flux on ``latent_wavelength_aa`` (NaN where missing).
        With ``normalised=True`` the scale token is ignored and flux / scale is returned."""
        self._require_fitted()
        cfg = self.config
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != cfg.n_tokens:
            raise ModalityError(f"SpectrumTokenizer.decode: expected tokens of shape (N, {cfg.n_tokens}), got {tokens.shape}")
        n, g = len(tokens), cfg.global_tokens
        codes = tokens[:, 1 + g :].reshape(n, cfg.n_patches, cfg.n_stages)
        shape = (n, cfg.n_patches, cfg.patch_length)
        flux = decode_global(self.global_basis, tokens[:, 1 : 1 + g], cfg.codebook_size, self.global_offset,
                             self.missing_token, shape) if g else np.zeros(shape)
        for stage, book in enumerate(self.codebooks):
            k = codes[:, :, stage] - stage * cfg.codebook_size
            flux += book[np.clip(k, 0, cfg.codebook_size - 1)]
        flux[(codes == self.missing_token).any(axis=2)] = np.nan
        flux = flux.reshape(len(tokens), cfg.n_pixels)
        if normalised:
            return flux
        return flux * self.decode_scale(tokens[:, 0])[:, None]

    def decode_scale(self, scale_tokens: np.ndarray) -> np.ndarray:
        """Scale tokens -> flux scale (bin centre in log10); NaN for the missing scale token."""
        self._require_fitted()
        b = np.clip(np.asarray(scale_tokens) - self.scale_offset, 0, self.config.n_scale_bins - 1)
        centres = 0.5 * (self.scale_edges[:-1] + self.scale_edges[1:])
        return np.where(np.asarray(scale_tokens) == self.scale_missing_token, np.nan, 10.0 ** centres[b])

    # ---- persistence: JSON + safetensors, no pickle ------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        self._require_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        state = {"kind": "spectrum", "format_version": FORMAT_VERSION, "config": cfg}
        (d / "tokenizer.json").write_text(json.dumps(state, indent=1))
        arrays = {"codebooks": np.ascontiguousarray(self.codebooks), "scale_edges": self.scale_edges}
        if self.global_basis is not None:
            arrays.update(self.global_basis.arrays())
        save_file(arrays, str(d / "tokenizer.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> "SpectrumTokenizer":
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / "tokenizer.json").is_file() or not (d / "tokenizer.safetensors").is_file():
            raise CodecError(f"no saved spectrum tokenizer in {d}: expected tokenizer.json and tokenizer.safetensors")
        state = json.loads((d / "tokenizer.json").read_text())
        if state.get("kind") != "spectrum" or state.get("format_version") not in LOADABLE_VERSIONS:
            raise CodecError(
                f"{d}: saved tokenizer has kind={state.get('kind')!r} format_version={state.get('format_version')!r}; "
                f"expected kind='spectrum' format_version in {LOADABLE_VERSIONS}"
            )
        raw = dict(state["config"])
        raw["sky_lines_aa"] = tuple(raw["sky_lines_aa"])
        arrays = load_file(str(d / "tokenizer.safetensors"))
        return cls(SpectrumTokenizerConfig(**raw), arrays["codebooks"], arrays["scale_edges"],
                   GlobalBasis.from_arrays(arrays))
