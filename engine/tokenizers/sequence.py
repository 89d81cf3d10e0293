"""SequenceTokenizer: ragged per-object sequences -> flat tokens + int64 ``indptr`` (n_rows + 1).

Two modes, one per ragged modality kind:

* ``position_bins`` (Gaia XP coefficients): coefficient ``j`` of a row is binned with quantile bins
  fitted for position ``j`` alone (coefficients differ by orders of magnitude across positions);
  decode gives the bin's quantile centre. Rows longer than ``max_positions`` are an error.
* ``kmeans`` (light curves): each observation becomes the feature ``(log10(1 + dt_days), mag,
  log10(mag_err))`` (dt to the previous observation of the row, 0 for the first), standardised and
  assigned to the nearest centroid of a seeded faiss k-means codebook. Decode rebuilds times as the
  cumulative sum of the decoded dt, so **decoded times start at 0 in every row** unless
  ``time0_mjd`` is given.

Non-finite values get ``missing_token`` (= ``n_bins``) and decode to NaN. Row ``i``'s tokens are
``tokens[indptr[i]:indptr[i+1]]`` and ``indptr`` equals the input's, so empty rows stay empty.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from engine.errors import CodecError, ConfigError, ModalityError
from engine.modalities.spectra import LightCurves, XPCoefficients
from engine.tokenizers.scalar import Reservoir
from engine.tokenizers.spectrum import kmeans, nearest

FORMAT_VERSION = 1
MODES = {"position_bins": XPCoefficients, "kmeans": LightCurves}


@dataclass(frozen=True)
class SequenceTokenizerConfig:
    mode: str = "position_bins"
    n_bins: int = 256  # bins per position, or k-means codebook size
    max_positions: int = 64  # position_bins only
    max_values: int = 500_000  # reservoir size (per position, or feature rows)
    kmeans_niter: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"SequenceTokenizerConfig.mode={self.mode!r}; expected one of {sorted(MODES)}")
        if not 2 <= self.n_bins <= 65535:
            raise ConfigError(f"SequenceTokenizerConfig.n_bins={self.n_bins}; expected 2..65535")
        if self.max_positions < 1:
            raise ConfigError(f"SequenceTokenizerConfig.max_positions={self.max_positions}; expected >= 1")
        if self.max_values < self.n_bins:
            raise ConfigError(f"SequenceTokenizerConfig.max_values={self.max_values}; expected >= n_bins={self.n_bins}")


@dataclass(frozen=True)
class SequenceTokens:
    tokens: np.ndarray  # (total,) int32
    indptr: np.ndarray  # (n_rows + 1,) int64
    token_key: str
    object_id: np.ndarray  # (n_rows,) int64

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.indptr[i] : self.indptr[i + 1]]


def positions(indptr: np.ndarray) -> np.ndarray:
    """Index of each flat element within its row."""
    lengths = np.diff(indptr)
    return np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)


def lc_features(lc: LightCurves) -> np.ndarray:
    """(total, 3) features (log10(1 + dt), mag, log10(err)); dt = 0 at each row start."""
    dt = np.diff(lc.time_mjd, prepend=lc.time_mjd[:1] if len(lc.time_mjd) else lc.time_mjd)
    dt[lc.indptr[:-1][np.diff(lc.indptr) > 0]] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack([np.log10(1.0 + dt), lc.mag, np.log10(lc.mag_err)], axis=1)


class SequenceTokenizer:
    Config = SequenceTokenizerConfig

    def __init__(self, config: SequenceTokenizerConfig, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.config = config
        self.arrays = arrays  # position_bins: edges (P, B+1), centres (P, B); kmeans: codebook, mean, std

    @property
    def missing_token(self) -> int:
        return self.config.n_bins

    @property
    def vocab_size(self) -> int:
        return self.config.n_bins + 1

    def _require_fitted(self) -> None:
        if self.arrays is None:
            raise CodecError("SequenceTokenizer is not fitted: call fit() or load() a saved state first")

    def _check(self, seq) -> None:
        expected = MODES[self.config.mode]
        if not isinstance(seq, expected):
            raise ModalityError(f"SequenceTokenizer(mode={self.config.mode!r}): expected {expected.__name__}, got {type(seq).__name__}")
        if self.config.mode == "position_bins" and len(seq.indptr) > 1 and seq.lengths.max(initial=0) > self.config.max_positions:
            raise ModalityError(
                f"{seq.token_key}: expected rows of at most max_positions={self.config.max_positions} values, got {seq.lengths.max()}"
            )

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self, batches: Iterable[XPCoefficients | LightCurves]) -> "SequenceTokenizer":
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        if cfg.mode == "position_bins":
            res = [Reservoir(cfg.max_values, rng) for _ in range(cfg.max_positions)]
            for seq in batches:
                self._check(seq)
                pos, v = positions(seq.indptr), seq.coefficients
                ok = np.isfinite(v)
                order = np.argsort(pos[ok], kind="stable")
                bounds = np.searchsorted(pos[ok][order], np.arange(cfg.max_positions + 1))
                vs = v[ok][order]
                for p in range(cfg.max_positions):  # per position, not per object
                    res[p].add(vs[bounds[p] : bounds[p + 1]])
            q_edges = np.linspace(0.0, 1.0, cfg.n_bins + 1)
            q_mid = (np.arange(cfg.n_bins) + 0.5) / cfg.n_bins
            edges = np.full((cfg.max_positions, cfg.n_bins + 1), np.nan)
            centres = np.full((cfg.max_positions, cfg.n_bins), np.nan)
            for p, r in enumerate(res):
                if r.size:
                    edges[p], centres[p] = np.quantile(r.sample(), q_edges), np.quantile(r.sample(), q_mid)
            if not np.isfinite(edges[0]).all():
                raise CodecError("SequenceTokenizer.fit: expected finite values at position 0, got none")
            self.arrays = {"edges": edges, "centres": centres}
            return self
        pool = Reservoir(cfg.max_values, rng, dim=3)
        for seq in batches:
            self._check(seq)
            f = lc_features(seq)
            pool.add(f[np.isfinite(f).all(axis=1)])
        if pool.size < cfg.n_bins:
            raise CodecError(f"SequenceTokenizer.fit: expected >= n_bins={cfg.n_bins} valid observations, got {pool.size}")
        x = pool.sample()
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-12)
        book = kmeans((x - mean) / std, cfg.n_bins, cfg.kmeans_niter, cfg.seed)
        self.arrays = {"codebook": book, "mean": mean, "std": std}
        return self

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, seq: XPCoefficients | LightCurves) -> SequenceTokens:
        self._require_fitted()
        self._check(seq)
        if self.config.mode == "position_bins":
            pos, v = positions(seq.indptr), seq.coefficients
            edges = self.arrays["edges"]
            if len(pos) and not np.isfinite(edges[pos]).all():
                raise ModalityError(f"{seq.token_key}: positions up to {pos.max()} were never seen in fit; refit on longer rows")
            bad = ~np.isfinite(v)
            v = np.where(bad, 0.0, v)
            order = np.argsort(pos, kind="stable")
            bounds = np.searchsorted(pos[order], np.arange(self.config.max_positions + 1))
            tok = np.empty(len(v), dtype=np.int64)
            for p in range(self.config.max_positions):  # per position, not per object
                idx = order[bounds[p] : bounds[p + 1]]
                tok[idx] = np.searchsorted(edges[p, 1:-1], v[idx], side="right")
        else:
            f = lc_features(seq)
            bad = ~np.isfinite(f).all(axis=1)
            x = (np.where(bad[:, None], 0.0, f) - self.arrays["mean"]) / self.arrays["std"]
            tok = nearest(x, np.ones_like(x), self.arrays["codebook"])
        tok = np.where(bad, self.missing_token, tok).astype(np.int32)
        return SequenceTokens(tok, seq.indptr.copy(), seq.token_key, seq.object_id.copy())

    def decode(self, tokens: SequenceTokens, time0_mjd: np.ndarray | None = None) -> XPCoefficients | LightCurves:
        self._require_fitted()
        tok, indptr = np.asarray(tokens.tokens), np.asarray(tokens.indptr, dtype=np.int64)
        if len(indptr) < 1 or indptr[-1] != len(tok):
            raise ModalityError(f"SequenceTokenizer.decode: expected indptr ending at {len(tok)}, got {indptr[-3:]}")
        missing = tok == self.missing_token
        k = np.clip(tok, 0, self.config.n_bins - 1)
        band = tokens.token_key.split("_", 2)[-1]
        if self.config.mode == "position_bins":
            vals = self.arrays["centres"][positions(indptr), k]
            return XPCoefficients(band, np.where(missing, np.nan, vals), indptr, tokens.object_id)
        f = self.arrays["codebook"][k] * self.arrays["std"] + self.arrays["mean"]
        f[missing] = np.nan
        dt = np.where(missing, 0.0, 10.0 ** f[:, 0] - 1.0)
        lengths = np.diff(indptr)
        starts = indptr[:-1][lengths > 0]
        dt[starts] = 0.0
        c = np.cumsum(dt)
        t = c - np.repeat(c[starts], lengths[lengths > 0])
        if time0_mjd is not None:
            t = t + np.repeat(np.asarray(time0_mjd, dtype=np.float64), lengths)
        return LightCurves(band, t, f[:, 1], 10.0 ** f[:, 2], indptr, tokens.object_id)

    # ---- persistence: JSON + safetensors, no pickle ------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        self._require_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {"kind": "sequence", "format_version": FORMAT_VERSION, "config": asdict(self.config)}
        (d / "tokenizer.json").write_text(json.dumps(state, indent=1))
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(d / "tokenizer.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> "SequenceTokenizer":
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / "tokenizer.json").is_file() or not (d / "tokenizer.safetensors").is_file():
            raise CodecError(f"no saved sequence tokenizer in {d}: expected tokenizer.json and tokenizer.safetensors")
        state = json.loads((d / "tokenizer.json").read_text())
        if state.get("kind") != "sequence" or state.get("format_version") != FORMAT_VERSION:
            raise CodecError(
                f"{d}: saved tokenizer has kind={state.get('kind')!r} format_version={state.get('format_version')!r}; "
                f"expected kind='sequence' format_version={FORMAT_VERSION}"
            )
        return cls(SequenceTokenizerConfig(**state["config"]), load_file(str(d / "tokenizer.safetensors")))
