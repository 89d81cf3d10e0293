"""Pipeline stages: each is a class that loads what it needs once in ``__init__`` and maps batch -> batch.

Stages make no scheduling decisions (actors, GPUs, batch sizes live in the runner). Every
batch carries ``object_id``; outputs are built column by column from the same rows, so ids,
embeddings and predictions cannot drift apart whatever the batch size or order.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from engine.errors import CatalogError, ConfigError
from engine.modalities import Z_PHOT_COLUMNS, catalogue_inputs
from engine.model.config import ModelConfig
from engine.model.redshift import REDSHIFT
from engine.pipeline.images import IMAGE_FLAGS, ImageColumns, image_columns, tokenize_images
from engine.pipeline.spectra import SPECTRUM_FLAGS, SpectrumColumns, spectrum_columns, tokenize_spectra
from engine.tokenizers.scalar import missing_mask

log = logging.getLogger(__name__)

ID = "object_id"
PASSTHROUGH = ("ra", "dec")
UNIT, SOURCE_PATH = "unit", "path"  # internal: each row's input file, as an int32 index into the job's file list
NO_VALID_INPUT = 1 << 16  # flags bit: no usable input at all (embedding and z_phot are NaN)
PRED_SUMMARIES = ("median", "std")  # written as <target>_pred, <target>_pred_std for non-redshift scalar targets


def flag_legend(config: ModelConfig) -> dict[str, int]:
    """Bit value of each flag: bit i = input i missing/invalid (scalar inputs, then token modalities, model
    order), NO_VALID_INPUT, and for models reading spectra or images the bad-spectrum reasons
    (engine.pipeline.spectra) or bad-cutout reasons (engine.pipeline.images)."""
    from engine.modalities.registry import entry

    inputs = catalogue_inputs(config.input_modalities) + tuple(config.token_sizes)
    legend = {**{f"missing_{m}": 1 << i for i, m in enumerate(inputs)}, "no_valid_input": NO_VALID_INPUT}
    kinds = {entry(m).kind for m in config.token_sizes}
    legend.update({**(SPECTRUM_FLAGS if "spectrum" in kinds else {}), **(IMAGE_FLAGS if "image" in kinds else {})})
    if len(set(legend.values())) != len(legend):
        raise ConfigError(f"flag bits collide: {legend}")
    return legend


def pred_column(target: str, summary: str) -> str:
    return f"{target}_pred" if summary == "median" else f"{target}_pred_{summary}"


def predicted_columns(config: ModelConfig) -> tuple[str, ...]:
    """Per-object prediction columns written beside the embedding, decided by the model: ``z_phot_*`` when it
    predicts redshift; a model with token modalities (any-to-any) also writes ``<t>_pred`` (median of p) and
    ``<t>_pred_std`` for each other scalar target (e.g. teff_pred). Scalar-only models write z_phot_* only."""
    cols = tuple(Z_PHOT_COLUMNS) if REDSHIFT in config.target_modalities or not config.token_modalities else ()
    if config.token_modalities:
        cols += tuple(pred_column(t, k) for t in config.target_modalities if t != REDSHIFT for k in PRED_SUMMARIES)
    return cols


def token_inputs(config: ModelConfig, columns: dict[str, str] | None) -> dict[str, SpectrumColumns | ImageColumns]:
    """Token modality -> its catalogue columns; spectra and image cutouts can be read from a catalogue so far."""
    from engine.modalities.registry import entry

    out = {}
    for name in config.token_sizes:
        kind = entry(name).kind
        if kind == "spectrum":
            out[name] = spectrum_columns(name, columns or {})
        elif kind == "image":
            out[name] = image_columns(name, entry(name).survey, columns or {})
        else:
            raise ConfigError(f"token modality {name!r} is a {kind}; the embed job reads spectra and images only so far")
    return out


def tokenize_token_modality(batch: pa.Table, cols: SpectrumColumns | ImageColumns, tokenizer, survey: str):
    """One token modality's columns of a batch -> rows with ``tokens``, ``missing`` and reason ``flags``."""
    reader = tokenize_images if isinstance(cols, ImageColumns) else tokenize_spectra
    return reader(batch, cols, tokenizer, survey)


def _require(batch: pa.Table, columns: list[str], stage: str) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise CatalogError(f"{stage}: batch lacks column(s) {missing}; it has {batch.column_names}")


def fixed_size_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, K) numpy -> FixedSizeList<value_type>[K] (what Lance vector indexes accept)."""
    n, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), k)


def to_matrix(col: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """FixedSizeList column -> (N, K) numpy (handles chunks and slice offsets)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    k = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), k)


def _fault_injection() -> None:
    """Test hook: with ENGINE_FAULT_KILL_MODEL_ACTOR_ONCE=<path>, the first model call anywhere kills its process."""
    marker = os.environ.get("ENGINE_FAULT_KILL_MODEL_ACTOR_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        log.warning("fault injection: killing model actor pid %d", os.getpid())
        os._exit(1)


class TokenizeStage:
    """Catalogue rows -> ``object_id``, passthrough columns, ``tokens`` (FSL int32[T]), ``flags`` and, for a
    model with token modalities, one FSL int32[N] column per modality (named after it)."""

    def __init__(self, model_dir: str, id_column: str = ID, columns: dict[str, str] | None = None) -> None:
        # torch-free: tokenizer, read and write workers never import torch
        from engine.model.files import load_token_tokenizers, load_tokenizer, model_config

        self.tokenizer, inputs = load_tokenizer(model_dir)  # no model weights in tokenizer actors
        self.modalities = tuple(inputs)  # catalogue inputs: one flag bit each
        self.tok_columns = list(inputs.values())  # tokenizer's own names
        self.cat_columns = [(columns or {}).get(m, c) for m, c in zip(self.modalities, self.tok_columns)]
        self.id_column = id_column
        config, path = model_config(model_dir)
        self.n_tokens = len(config.input_modalities)  # the tokenizer's first columns, colours formed from the magnitudes
        self.token_cols = token_inputs(config, columns)  # {} for scalar-only models: their path is unchanged
        self.token_tokenizers = load_token_tokenizers(path, config) if self.token_cols else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        token_cols = [c for cols in self.token_cols.values() for c in cols.read]
        _require(batch, [self.id_column, *self.cat_columns, *token_cols], "tokenize stage")
        values = {}
        for tok_col, cat_col in zip(self.tok_columns, self.cat_columns):
            col = batch.column(cat_col)
            values[tok_col] = col.to_numpy().astype(np.float64) if col.null_count == 0 else (
                col.cast(pa.float64()).to_numpy(zero_copy_only=False))  # nulls -> NaN -> missing token
        enc = self.tokenizer.encode(values)
        tokens = enc.tokens[:, : self.n_tokens]
        n_in = len(self.modalities)
        missing = np.stack([missing_mask(values[c], self.tokenizer.config.sentinels) for c in self.tok_columns], axis=1)
        flags = (missing.astype(np.int64) << np.arange(n_in)).sum(axis=1)
        no_input = enc.missing[:, : self.n_tokens].all(axis=1)
        extra = {}
        if self.token_cols:
            from engine.modalities.registry import entry

            for bit, (name, cols) in enumerate(self.token_cols.items(), start=n_in):
                rows = tokenize_token_modality(batch, cols, self.token_tokenizers[name], entry(name).survey)
                flags |= (rows.missing.astype(np.int64) << bit) | rows.flags
                no_input &= rows.missing
                extra[name] = fixed_size_list(rows.tokens, pa.int32())
        flags[no_input] |= NO_VALID_INPUT
        out = {ID: batch.column(self.id_column).cast(pa.int64())}
        out.update({c: batch.column(c).cast(pa.float64()) for c in PASSTHROUGH if c in batch.column_names})
        if UNIT in batch.column_names:
            out[UNIT] = batch.column(UNIT)
        out["tokens"] = fixed_size_list(tokens, pa.int32())
        out.update(extra)
        out["flags"] = pa.array(flags.astype(np.int32))
        return pa.table(out)


class EmbedStage:
    """Tokens -> ``embedding`` (FSL float32[D]) and the model's prediction columns (``predicted_columns``:
    ``z_phot_*``, ``<target>_pred``), on GPU when given one."""

    def __init__(self, model_dir: str, precision: str = "auto", use_gpu: bool = False, threads: int | None = None) -> None:
        from engine.model.noop import NOOP, load_noop

        if model_dir == NOOP:  # no torch at all: the no-op model measures the engine alone
            self.bundle, self.device, self.autocast = load_noop(), "cpu", None
            self.token_modalities, self.columns = (), predicted_columns(self.bundle.config)
            return
        import torch

        from engine.model.bundle import load_bundle, resolve_device_dtype

        if threads:
            torch.set_num_threads(threads)
        self.device, self.autocast = resolve_device_dtype(precision, use_gpu)
        self.bundle = load_bundle(model_dir).to(self.device)
        self.token_modalities = tuple(self.bundle.config.token_sizes)
        self.columns = predicted_columns(self.bundle.config)
        log.info("model %s on %s (autocast %s)", self.bundle.model_id, self.device, self.autocast)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require(batch, [ID, "tokens", "flags", *self.token_modalities], "embed stage")
        _fault_injection()
        tokens = to_matrix(batch.column("tokens"), np.int64)
        valid = tokens != self.bundle.tokenizer.missing_token
        if self.token_modalities:  # decided once per batch: scalar-only models never reach this
            pred = self._predict_multi(batch, tokens, valid)
        else:
            pred = self.bundle.predict(tokens, valid, self.autocast)
        out = {ID: batch.column(ID)}
        out.update({c: batch.column(c) for c in PASSTHROUGH if c in batch.column_names})
        out["embedding"] = fixed_size_list(pred["embedding"].astype(np.float32), pa.float32())
        out.update({c: pa.array(pred[c], pa.float32()) for c in self.columns})
        out["flags"] = batch.column("flags")
        if UNIT in batch.column_names:
            out[UNIT] = batch.column(UNIT)
        return pa.table(out)

    def _predict_multi(self, batch: pa.Table, tokens: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        from engine.model.generate import predict_scalars, stack_multi

        multi = stack_multi(self.bundle, {m: to_matrix(batch.column(m), np.int64) for m in self.token_modalities})
        targets = self.bundle.config.target_modalities
        pred = predict_scalars(self.bundle, tokens, valid, multi, targets, self.autocast)
        return {**pred, **{pred_column(t, k): pred[f"{t}_{k}"] for t in targets if t != REDSHIFT for k in PRED_SUMMARIES}}
