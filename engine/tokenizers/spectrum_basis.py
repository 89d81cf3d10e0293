"""Hybrid spectrum codec: a global basis in front of the patch codebooks (``global_tokens = G > 0``).

G tokens quantise the chi^2-fitted coefficients of a global basis (PCA of the normalised training
spectra), each into ``codebook_size`` uniform levels over its training range; the patch codebooks of
``engine.tokenizers.spectrum`` then code the residual. Stellar spectra are low-dimensional, so a global
basis captures their shape with few tokens and the patches fix the rest.

Tokens: coefficient level q of any coefficient is token ``offset + q`` (the levels are shared by every
coefficient; ``SpectrumTokenizer.global_offset``); a row without a usable spectrum gets the missing
token for every coefficient. Saved as ``global_mean``, ``global_basis``, ``global_lo``, ``global_hi``
beside the codebooks (tokenizer format version 2).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import CodecError

if TYPE_CHECKING:
    from engine.tokenizers.spectrum import SpectrumTokenizerConfig

log = logging.getLogger(__name__)

ARRAY_PREFIX = "global_"  # safetensors keys: global_mean, global_basis, global_lo, global_hi


@dataclass(frozen=True)
class GlobalBasis:
    """Global basis of the hybrid codec: mean + quantised coefficients @ basis, in normalised flux."""

    mean: np.ndarray  # (M,)
    basis: np.ndarray  # (G, M), orthonormal rows
    lo: np.ndarray  # (G,) training range of each coefficient
    hi: np.ndarray  # (G,)

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray, n_comp: int) -> "GlobalBasis":
        """PCA of (N, M) normalised spectra (invalid pixels take the pixel mean); coefficient ranges from
        the same chi^2 fit that encode uses."""
        good = w > 0
        mean = np.where(good, x, 0.0).sum(0) / np.maximum(good.sum(0), 1)
        _, _, vt = np.linalg.svd(np.where(good, x, mean) - mean, full_matrices=False)  # vt (min(N, M), M)
        basis = np.zeros((n_comp, x.shape[1]))
        basis[: min(n_comp, len(vt))] = vt[:n_comp]  # fewer spectra than components: the rest stay 0
        c = cls(mean, basis, np.zeros(n_comp), np.zeros(n_comp)).coefficients(x, w)
        return cls(mean, basis, c.min(0), c.max(0))

    def coefficients(self, x: np.ndarray, w: np.ndarray, chunk: int = 16) -> np.ndarray:
        """chi^2 fit: argmin_c sum_m w (x - mean - c @ basis)^2 per row; (N, M) -> (N, G)."""
        g = len(self.basis)
        out = np.zeros((len(x), g))
        # rows with one weight everywhere (e.g. MILES: constant sigma, no mask): orthonormal basis -> projection
        flat = (w == w[:, :1]).all(axis=1) & (w[:, 0] > 0)
        out[flat] = (x[flat] - self.mean) @ self.basis.T
        for s in range(0, len(x), chunk):
            if flat[s : s + chunk].all():
                continue
            ws = w[s : s + chunk]
            a = (self.basis[None] * ws[:, None, :]) @ self.basis.T  # (n, G, G)
            a += (1e-9 * np.maximum(np.trace(a, axis1=1, axis2=2), 1e-12) / g)[:, None, None] * np.eye(g)
            b = (ws * (x[s : s + chunk] - self.mean)) @ self.basis.T  # (n, G)
            c = np.linalg.solve(a, b[..., None])[..., 0]
            out[s : s + chunk] = np.where(flat[s : s + chunk, None], out[s : s + chunk], c)
        return out

    def quantise(self, c: np.ndarray, levels: int) -> np.ndarray:
        """(N, G) coefficients -> (N, G) level indices in 0..levels-1 (clipped to the training range)."""
        step = np.where(self.hi > self.lo, (self.hi - self.lo) / (levels - 1), 1.0)
        return np.clip(np.round((c - self.lo) / step), 0, levels - 1).astype(np.int64)

    def reconstruct(self, q: np.ndarray, levels: int) -> np.ndarray:
        """(N, G) level indices -> (N, M) normalised flux."""
        step = np.where(self.hi > self.lo, (self.hi - self.lo) / (levels - 1), 1.0)
        return self.mean + (self.lo + q * step) @ self.basis

    # ---- persistence (safetensors arrays beside the codebooks) --------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{ARRAY_PREFIX}{k}": np.ascontiguousarray(v) for k, v in asdict(self).items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "GlobalBasis | None":
        """The saved basis, or None for a tokenizer without one (format version 1, or global_tokens = 0)."""
        if f"{ARRAY_PREFIX}mean" not in arrays:
            return None
        return cls(*(arrays[f"{ARRAY_PREFIX}{k}"] for k in ("mean", "basis", "lo", "hi")))


def fit_global(x: np.ndarray, w: np.ndarray, cfg: SpectrumTokenizerConfig,
               rng: np.random.Generator) -> tuple[GlobalBasis, np.ndarray]:
    """Fit the basis on (N, M) normalised spectra with weights w; return it and the fully valid residual
    patches (P, patch_length), at most ``max_patches`` of them, for the patch codebooks."""
    if len(x) == 0:
        raise CodecError("SpectrumTokenizer.fit: expected >= 1 valid spectrum for the global basis, got 0")
    log.info("fitting a %d-component global basis on %d spectra", cfg.global_tokens, len(x))
    gb = GlobalBasis.fit(x, w, cfg.global_tokens)
    q = gb.quantise(gb.coefficients(x, w), cfg.codebook_size)
    shape = (len(x), cfg.n_patches, cfg.patch_length)
    r = (x - gb.reconstruct(q, cfg.codebook_size)).reshape(shape)
    r = r[(w.reshape(shape) > 0).all(axis=2)]
    if len(r) > cfg.max_patches:
        r = r[np.sort(rng.choice(len(r), cfg.max_patches, replace=False))]
    return gb, r


def encode_global(gb: GlobalBasis, x: np.ndarray, w: np.ndarray, valid: np.ndarray, levels: int, offset: int,
                  missing_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Patched spectra x, w (n, P, L) -> the G coefficient tokens (n, G) (missing where not ``valid``) and
    the residual (n, P, L) the patch codebooks encode."""
    n = len(x)
    q = gb.quantise(gb.coefficients(x.reshape(n, -1), w.reshape(n, -1)), levels)  # (n, G)
    residual = x - gb.reconstruct(q, levels).reshape(x.shape)
    return np.where(valid[:, None], offset + q, missing_token), residual


def decode_global(gb: GlobalBasis, tokens: np.ndarray, levels: int, offset: int, missing_token: int,
                  shape: tuple[int, int, int]) -> np.ndarray:
    """(n, G) coefficient tokens -> (n, P, L) normalised flux of the basis; NaN rows where any token is missing."""
    flux = gb.reconstruct(np.clip(tokens - offset, 0, levels - 1), levels).reshape(shape)
    flux[(tokens == missing_token).any(axis=1)] = np.nan
    return flux
