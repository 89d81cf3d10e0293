"""ScalarTokenizer: catalogue columns -> discrete bin tokens (quantile, linear or log binning).

Token ``0 .. n_bins-1`` is a real bin; token ``n_bins`` (``missing_token``) marks NaN, +-inf,
sentinel values (99, -99, -9999, ...) and absent columns. A missing value never lands in a
real bin. Fitting streams over Parquet files in record batches and keeps a bounded, seeded
reservoir per column, so memory does not grow with the catalogue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import CatalogError, CodecError, ConfigError
from engine.modalities import BINNINGS

FORMAT_VERSION = 1
DEFAULT_SENTINELS = (99.0, -99.0, 999.0, -999.0, 9999.0, -9999.0)


@dataclass(frozen=True)
class ScalarTokenizerConfig:
    columns: tuple[str, ...]
    binnings: tuple[str, ...] = ()  # one per column; empty means all "quantile"
    n_bins: int = 1024
    max_values_per_col: int = 2_000_000
    rng_seed: int = 0
    sentinels: tuple[float, ...] = DEFAULT_SENTINELS
    # Fit-time row filters (rows failing them are not used to place bin edges).
    mag_filter_col: str | None = None
    mag_min: float = -np.inf
    mag_max: float = np.inf
    magerr_cols: tuple[str, ...] = ()  # error columns checked against magerr_max
    magerr_max: float = np.inf
    # Derived columns (column, a, b): column = a - b (a colour), formed from the source columns a and b at fit
    # and encode time; missing where either source is. Sources need not be tokenized columns themselves.
    derived: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.columns:
            raise ConfigError("ScalarTokenizerConfig.columns is empty; name at least one column")
        for entry in self.derived:
            if len(entry) != 3 or entry[0] not in self.columns or entry[0] in entry[1:]:
                raise ConfigError(
                    f"ScalarTokenizerConfig.derived entry {entry!r}; expected (column, a, b) with column one of "
                    f"{list(self.columns)} and a, b other columns"
                )
        if len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"ScalarTokenizerConfig.columns has duplicates: {self.columns}")
        if self.binnings and len(self.binnings) != len(self.columns):
            raise ConfigError(
                f"ScalarTokenizerConfig.binnings has {len(self.binnings)} entries for "
                f"{len(self.columns)} columns; give one per column or none"
            )
        for b in self.binnings:
            if b not in BINNINGS:
                raise ConfigError(f"ScalarTokenizerConfig.binnings: {b!r} is not one of {BINNINGS}")
        if not 2 <= self.n_bins <= 65535:
            raise ConfigError(f"ScalarTokenizerConfig.n_bins={self.n_bins}; expected 2..65535")
        if self.max_values_per_col < self.n_bins:
            raise ConfigError(
                f"ScalarTokenizerConfig.max_values_per_col={self.max_values_per_col} must be >= n_bins={self.n_bins}"
            )
        if self.mag_min >= self.mag_max:
            raise ConfigError(f"mag_min={self.mag_min} must be < mag_max={self.mag_max}")

    @property
    def column_binnings(self) -> tuple[str, ...]:
        return self.binnings or ("quantile",) * len(self.columns)

    @property
    def source_columns(self) -> tuple[str, ...]:
        """Columns read from a catalogue: the tokenized ones, derived ones replaced by their sources."""
        derived = {d[0]: d[1:] for d in self.derived}
        return tuple(dict.fromkeys(c for col in self.columns for c in derived.get(col, (col,))))

    @property
    def filter_columns(self) -> tuple[str, ...]:
        extra = ((self.mag_filter_col,) if self.mag_filter_col else ()) + self.magerr_cols
        return tuple(dict.fromkeys(self.source_columns + extra))


def missing_mask(values: np.ndarray, sentinels: Iterable[float]) -> np.ndarray:
    """True where a value is NaN, +-inf or a sentinel."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    for s in sentinels:
        bad |= values == s
    return bad


class Reservoir:
    """Uniform fixed-size sample of a stream (Algorithm R, vectorised per chunk; seeded).

    Samples values, or with ``dim`` rows of ``dim`` values (chunks of shape (n, dim)).
    """

    def __init__(self, capacity: int, rng: np.random.Generator, dim: int | None = None) -> None:
        self.capacity = capacity
        self.rng = rng
        self.values = np.empty(capacity if dim is None else (capacity, dim), dtype=np.float64)
        self.size = 0
        self.seen = 0

    def add(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        fill = min(self.capacity - self.size, len(chunk))
        self.values[self.size : self.size + fill] = chunk[:fill]
        self.size += fill
        self.seen += fill
        rest = chunk[fill:]
        if len(rest):
            t = self.seen + np.arange(1, len(rest) + 1)  # 1-based stream position of each value
            j = np.floor(self.rng.random(len(rest)) * t).astype(np.int64)
            keep = j < self.capacity
            # Later values overwrite earlier ones at the same slot, as in the sequential algorithm.
            self.values[j[keep]] = rest[keep]
            self.seen += len(rest)

    def sample(self) -> np.ndarray:
        return self.values[: self.size]


def bin_edges(sample: np.ndarray, n_bins: int, binning: str, column: str) -> np.ndarray:
    if len(sample) == 0:
        raise CodecError(f"column {column!r}: no valid values to fit {binning} bins on (all missing or filtered)")
    if binning == "quantile":
        return np.quantile(sample, np.linspace(0.0, 1.0, n_bins + 1))
    lo, hi = float(sample.min()), float(sample.max())
    if binning == "linear":
        return np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
    positive = sample[sample > 0]
    if len(positive) == 0:
        raise CodecError(f"column {column!r}: log binning needs positive values; none found")
    lo, hi = float(positive.min()), float(positive.max())
    return np.geomspace(lo, hi if hi > lo else lo * 10.0, n_bins + 1)


def bin_centres(edges: np.ndarray, sample: np.ndarray, binning: str) -> np.ndarray:
    if binning == "quantile":
        n_bins = len(edges) - 1
        return np.quantile(sample, (np.arange(n_bins) + 0.5) / n_bins)
    if binning == "log":
        return np.sqrt(edges[:-1] * edges[1:])
    return 0.5 * (edges[:-1] + edges[1:])


class BinLookup:
    """``np.searchsorted(inner, x, side="right")`` for many x, ~3x faster on CPU.

    A uniform grid over the edges' range stores the answer at each cell start; each value starts
    from its cell's answer and steps up or down (vectorised) until ``inner[i-1] <= x < inner[i]``.
    The steps make the result exact whatever the grid's rounding; with quantile edges a cell
    rarely holds more than one edge, so one step usually settles every value.
    """

    def __init__(self, inner: np.ndarray, cells: int = 1 << 14) -> None:
        self.inner = np.asarray(inner, dtype=np.float64)
        lo, hi = (float(self.inner[0]), float(self.inner[-1])) if len(self.inner) else (0.0, 1.0)
        self.lo, self.cells = lo, cells
        self.scale = cells / (hi - lo) if hi > lo else 1.0
        grid = lo + np.arange(cells + 1) / self.scale
        self.start = np.concatenate([[0], np.searchsorted(self.inner, grid, side="right")])  # cell -1 (below lo) -> 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (N,) finite float64 -> bin index (N,) intp in 0..len(inner)."""
        n = len(self.inner)
        if n == 0:
            return np.zeros(len(x), dtype=np.intp)
        cell = np.clip(np.floor((x - self.lo) * self.scale), -1, self.cells).astype(np.intp) + 1
        idx = self.start[cell]
        while True:
            up = (idx < n) & (self.inner[np.minimum(idx, n - 1)] <= x)
            if not up.any():
                break
            idx += up
        while True:
            down = (idx > 0) & (self.inner[np.maximum(idx - 1, 0)] > x)
            if not down.any():
                break
            idx -= down
        return idx


@dataclass
class ScalarTokens:
    tokens: np.ndarray  # (N, C) int32, missing_token where missing
    missing: np.ndarray  # (N, C) bool
    columns: tuple[str, ...]


@dataclass
class ScalarTokenizer:
    config: ScalarTokenizerConfig
    edges: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n_bins+1,)
    centres: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n_bins,)
    _lookups: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # column -> (edges, BinLookup)

    @property
    def n_bins(self) -> int:
        return self.config.n_bins

    @property
    def missing_token(self) -> int:
        return self.config.n_bins

    @property
    def vocab_size(self) -> int:
        return self.config.n_bins + 1

    @property
    def is_fitted(self) -> bool:
        return set(self.edges) == set(self.config.columns)

    # ---- fitting -------------------------------------------------------------------------
    def fit(self, sources: Iterable[str | Path | pa.Table], batch_rows: int = 65536) -> "ScalarTokenizer":
        """Fit bin edges by streaming over Parquet files (or in-memory tables)."""
        cfg = self.config
        rng = np.random.default_rng(cfg.rng_seed)
        reservoirs = {c: Reservoir(cfg.max_values_per_col, rng) for c in cfg.columns}
        n_sources = 0
        for source in sources:
            n_sources += 1
            for batch in _iter_batches(source, cfg.filter_columns, batch_rows):
                batch = self.with_derived(batch)
                keep = self._row_filter(batch)
                for col in cfg.columns:
                    vals = np.asarray(batch[col], dtype=np.float64)[keep]
                    reservoirs[col].add(vals[~missing_mask(vals, cfg.sentinels)])
        if n_sources == 0:
            raise CatalogError("ScalarTokenizer.fit got no input files")
        for col, binning in zip(cfg.columns, cfg.column_binnings):
            sample = np.sort(reservoirs[col].sample())
            self.edges[col] = bin_edges(sample, cfg.n_bins, binning, col)
            self.centres[col] = bin_centres(self.edges[col], sample, binning)
        return self

    def _row_filter(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        cfg = self.config
        n = len(next(iter(batch.values())))
        keep = np.ones(n, dtype=bool)
        if cfg.mag_filter_col:
            mag = np.asarray(batch[cfg.mag_filter_col], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                keep &= (mag >= cfg.mag_min) & (mag <= cfg.mag_max)
        for err_col in cfg.magerr_cols:
            err = np.asarray(batch[err_col], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                keep &= err <= cfg.magerr_max
        return keep

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, columns: Mapping[str, np.ndarray]) -> ScalarTokens:
        """Map column arrays to tokens. A column absent from ``columns`` is all-missing."""
        self._require_fitted()
        names = self.config.columns
        columns = self.with_derived(columns)
        n = len(next(iter(columns.values()))) if columns else 0
        tokens = np.empty((n, len(names)), dtype=np.int32)
        missing = np.empty((n, len(names)), dtype=bool)
        for j, col in enumerate(names):
            if col not in columns:
                missing[:, j] = True
                tokens[:, j] = self.missing_token
                continue
            vals = np.asarray(columns[col], dtype=np.float64)
            bad = missing_mask(vals, self.config.sentinels)
            tok = self._lookup(col)(np.where(bad, 0.0, vals)).astype(np.int32)
            tok[bad] = self.missing_token
            tokens[:, j] = tok
            missing[:, j] = bad
        return ScalarTokens(tokens=tokens, missing=missing, columns=names)

    def with_derived(self, columns: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """``columns`` plus each derived column not given whose two sources are; NaN where a source is missing."""
        todo = [d for d in self.config.derived if d[0] not in columns and d[1] in columns and d[2] in columns]
        if not todo:
            return columns
        vals = {c: np.asarray(columns[c], dtype=np.float64) for d in todo for c in d[1:]}  # a magnitude feeds two colours
        bad = {c: missing_mask(v, self.config.sentinels) for c, v in vals.items()}
        out = dict(columns)
        for name, a, b in todo:
            out[name] = np.where(bad[a] | bad[b], np.nan, vals[a] - vals[b])
        return out

    def _lookup(self, col: str) -> BinLookup:
        """The column's bin search over its inner edges (values beyond the fitted range clip to the end bins)."""
        edges = self.edges[col]
        if col not in self._lookups or self._lookups[col][0] is not edges:  # built once per (re)fitted column
            self._lookups[col] = (edges, BinLookup(edges[1:-1]))
        return self._lookups[col][1]

    def decode(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Map (N, C) tokens back to bin values; the missing token decodes to NaN."""
        self._require_fitted()
        tokens = np.asarray(tokens)
        out = {}
        for j, col in enumerate(self.config.columns):
            tok = tokens[:, j]
            vals = self.centres[col][np.clip(tok, 0, self.n_bins - 1)]
            out[col] = np.where(tok == self.missing_token, np.nan, vals)
        return out

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CodecError("ScalarTokenizer is not fitted: call fit() or load() a saved state first")

    # ---- persistence (JSON, no pickle) ---------------------------------------------------
    def to_dict(self) -> dict:
        self._require_fitted()
        cfg = asdict(self.config)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        cfg = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in cfg.items()}
        return {
            "kind": "scalar",
            "format_version": FORMAT_VERSION,
            "config": cfg,
            "edges": {c: self.edges[c].tolist() for c in self.config.columns},
            "centres": {c: self.centres[c].tolist() for c in self.config.columns},
        }

    @classmethod
    def from_dict(cls, state: dict) -> "ScalarTokenizer":
        if state.get("kind") != "scalar" or state.get("format_version") != FORMAT_VERSION:
            raise CodecError(
                f"saved tokenizer has kind={state.get('kind')!r} format_version={state.get('format_version')!r}; "
                f"expected kind='scalar' format_version={FORMAT_VERSION}"
            )
        raw = dict(state["config"])
        defaults = {"mag_min": -np.inf, "mag_max": np.inf, "magerr_max": np.inf}
        for k, default in defaults.items():
            if raw.get(k) is None:
                raw[k] = default
        for k in ("columns", "binnings", "sentinels", "magerr_cols"):
            raw[k] = tuple(raw.get(k) or ())
        raw["derived"] = tuple(tuple(d) for d in raw.get("derived") or ())
        tok = cls(ScalarTokenizerConfig(**raw))
        tok.edges = {c: np.asarray(state["edges"][c], dtype=np.float64) for c in tok.config.columns}
        tok.centres = {c: np.asarray(state["centres"][c], dtype=np.float64) for c in tok.config.columns}
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "ScalarTokenizer":
        path = Path(path)
        if not path.is_file():
            raise CodecError(f"no saved tokenizer at {path}")
        return cls.from_dict(json.loads(path.read_text()))


def _iter_batches(source: str | Path | pa.Table, columns: tuple[str, ...], batch_rows: int):
    """Yield dicts of numpy arrays for ``columns`` from a Parquet file or an Arrow table."""
    if isinstance(source, pa.Table):
        _require_columns(source.schema.names, columns, "<in-memory table>")
        for rb in source.select(list(columns)).to_batches(batch_rows):
            yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in columns}
        return
    try:
        pf = pq.ParquetFile(source)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"{source}: cannot read as Parquet ({exc})") from exc
    _require_columns(pf.schema_arrow.names, columns, str(source))
    for rb in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _require_columns(present: Iterable[str], required: Iterable[str], where: str) -> None:
    missing = [c for c in required if c not in set(present)]
    if missing:
        raise CatalogError(f"{where}: missing column(s) {missing}; the tokenizer needs {list(required)}")
