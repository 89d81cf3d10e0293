"""The embed job: read -> tokenize (CPU actors) -> model (GPU/CPU actors) -> Lance fragments -> checked commit.

``EmbedConfig`` holds every choice (what runs where lives here, not in the stages);
``run_embed`` composes the stages on Ray Data and returns the job summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import lance
import numpy as np
import pyarrow as pa
import ray

import engine

from engine.cluster import embed_stage_resources
from engine.errors import ConfigError, OutputMismatchError, UnitsFailedError
from engine.model.bundle import PRECISIONS, ModelBundle, load_bundle
from engine.pipeline.duplicates import DuplicateCounter
from engine.pipeline.images import ImageColumns, check_image_field
from engine.pipeline.read import ReadUnit, filesystem_for, open_catalog
from engine.pipeline.spectra import check_spectrum_field
from engine.pipeline.stages import (ID, PASSTHROUGH, SOURCE_PATH, UNIT, EmbedStage, TokenizeStage, flag_legend,
                                    predicted_columns, token_inputs)
from engine.pipeline.units import (LEDGER_KEY, UnitCounts, UnitProgress, check_file, committed_units,
                                   failure_reason, read_unit_ids, verify_unit)
from engine.pipeline.write import FragmentWriter, commit
from engine.sample import DEFAULT_MODEL_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    catalog: tuple[str, ...]
    out: str
    model_dir: str = str(DEFAULT_MODEL_DIR)
    id_column: str = ID
    columns: dict[str, str] = field(default_factory=dict)  # input modality -> catalogue column override
    batch_size: int = 4096  # rows per model call
    precision: str = "auto"
    num_gpus: float = 0.0  # per model actor
    model_actors: int = 1
    model_threads: int = 1  # torch threads per CPU model actor
    model_cpus: float = 0.5  # Ray CPUs reserved per CPU model actor (Ray Data's file listing needs 1 free CPU)
    tokenizer_actors: int = 1
    overwrite: bool = False
    resume: bool = False  # skip input files already committed to --out (from the table's own commit ledger)
    max_failed_fraction: float = 0.0  # fail the job when more input files than this fail
    commit_seconds: float = 30.0  # group verified units into one Lance commit at most this often
    progress_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.catalog:
            raise ConfigError("EmbedConfig.catalog is empty: give --catalog PATHS_OR_GLOB_OR_URI")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {PRECISIONS}")
        for name in ("batch_size", "model_actors", "tokenizer_actors", "model_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EmbedConfig.{name}={getattr(self, name)}; expected >= 1")
        if self.model_cpus <= 0:
            raise ConfigError(f"EmbedConfig.model_cpus={self.model_cpus}; expected > 0")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume exclude each other")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ConfigError(f"--max-failed-fraction {self.max_failed_fraction}; expected 0..1")
        if self.num_gpus < 0:
            raise ConfigError(f"--num-gpus {self.num_gpus}; expected >= 0")

    def to_json(self) -> dict:
        return asdict(self)


def output_schema(bundle: ModelBundle, with_radec: bool, metadata: dict) -> pa.Schema:
    fields = [pa.field(ID, pa.int64(), nullable=False)]
    fields += [pa.field(c, pa.float64()) for c in PASSTHROUGH if with_radec]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), bundle.embedding_dim)))
    fields += [pa.field(c, pa.float32()) for c in predicted_columns(bundle.config)]
    fields.append(pa.field("flags", pa.int32()))
    return pa.schema(fields, metadata={"engine": json.dumps(metadata)})


def _table_exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path.rstrip("/") + "/_versions").type != pa.fs.FileType.NotFound


def _write_json(uri: str, payload: dict) -> None:
    fs, path = filesystem_for(uri)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(payload, indent=2).encode())


class _Ledger:
    """Driver-side bookkeeping: units in flight, commits, failures, progress."""

    def __init__(self, cfg: EmbedConfig, catalog, schema: pa.Schema, done: dict[str, UnitCounts], t0: float) -> None:
        self.cfg, self.catalog, self.schema, self.t0 = cfg, catalog, schema, t0
        self.files = {f.path: f for f in catalog.files}
        self.units = {p: UnitProgress(f) for p, f in self.files.items() if p not in done}
        self.ready: list[UnitProgress] = []
        self.committed: dict[str, UnitCounts] = {}
        self.failed: dict[str, str] = {}
        self.duplicates = DuplicateCounter()  # ids of every verified unit, for cross-file duplicates
        self.paths: list[str] = []  # unit index -> input file, set when the dataset is built
        self.table_exists = bool(done)
        self.last_commit = self.last_log = time.perf_counter()
        self.rows_total = sum(u.file.num_rows for u in self.units.values())
        self.rows_done = 0

    def add(self, result: pa.Table) -> None:
        cols = [result.column(c).to_pylist() for c in ("unit", "fragments", "object_ids", "flagged", "no_valid")]
        for unit_index, frag_json, ids_bytes, flagged, no_valid in zip(*cols):
            unit = self.units[self.paths[unit_index]]
            unit.flagged += flagged
            unit.no_valid += no_valid
            unit.fragments.extend(json.loads(frag_json))
            unit.ids.append(np.frombuffer(ids_bytes, dtype=np.int64))
            unit.rows += len(unit.ids[-1])
            self.rows_done += len(unit.ids[-1])
            if unit.complete:
                self._check(unit)
        now = time.perf_counter()
        if self.ready and now - self.last_commit >= self.cfg.commit_seconds:
            self.flush()
        if now - self.last_log >= self.cfg.progress_seconds:
            self.last_log = now
            rate = self.rows_done / (now - self.t0)
            eta = (self.rows_total - self.rows_done) / rate if rate else float("nan")
            log.info("progress: %d/%d rows, %d/%d units committed, %.0f rows/s, ETA %.0f s",
                     self.rows_done, self.rows_total, len(self.committed), len(self.units), rate, eta)

    def _check(self, unit: UnitProgress) -> None:
        expected = read_unit_ids(self.catalog, unit.file, self.cfg.id_column)
        problem = verify_unit(unit, expected)
        if problem:
            self.failed[unit.file.path] = problem
            log.error("%s: not committed: %s", unit.file.path, problem)
        else:
            self.ready.append(unit)
            self.duplicates.add(expected)

    def flush(self) -> None:
        """Commit every verified unit in one Lance transaction that names them."""
        if not self.ready:
            return
        fragments = [f for u in self.ready for f in u.fragments]
        message = {LEDGER_KEY: {u.file.path: list(u.counts) for u in self.ready}}
        commit(self.cfg.out, self.schema, fragments, message, create=not self.table_exists)
        self.table_exists = True
        for u in self.ready:
            self.committed[u.file.path] = u.counts
            u.fragments, u.ids = [], []
        self.ready = []
        self.last_commit = time.perf_counter()

    def finish(self) -> None:
        self.flush()
        for path, unit in self.units.items():
            if path not in self.committed and path not in self.failed:
                self.failed[path] = failure_reason(self.catalog, unit.file)
                log.error("%s: not committed: %s", path, self.failed[path])


def run_embed(cfg: EmbedConfig) -> dict:
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.model_dir)  # fails early on a bad model dir
    readable = list(bundle.input_columns) + list(bundle.config.token_sizes)
    unknown = sorted(k for k in cfg.columns if k.split(".")[0] not in readable)
    if unknown:
        raise ConfigError(f"--columns names unknown modalities {unknown}; the model reads {readable}")
    inputs = {m: cfg.columns.get(m, c) for m, c in bundle.input_columns.items()}
    token_cols = token_inputs(bundle.config, cfg.columns)  # token modality -> its catalogue columns ({} scalar-only)
    spectra = {m: s for m, s in token_cols.items() if not isinstance(s, ImageColumns)}
    images = {m: s for m, s in token_cols.items() if isinstance(s, ImageColumns)}
    required = {cfg.id_column: "object id (int64)", **{c: f"input {m}" for m, c in inputs.items()},
                **{s.redshift: f"{m} redshift" for m, s in spectra.items() if s.redshift},
                **{s.pixel_scale_arcsec: f"{m} pixel scale" for m, s in images.items() if s.pixel_scale_arcsec}}
    spectrum_fields = {c: f"{m} {f}" for m, s in spectra.items() for f, c in s.fields.items() if f != "redshift"}
    cutout_fields = {s.cutout: f"{m} cutout" for m, s in images.items()}
    exists = _table_exists(cfg.out)
    if exists and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--out {cfg.out} already holds a Lance table; pass --resume to finish it or --overwrite to replace it")

    catalog, failed = open_catalog(list(cfg.catalog))
    for f in catalog.files:
        reason = check_file(f, required) or next(filter(None, (
            *(check_spectrum_field(f.schema, c, role) for c, role in spectrum_fields.items()),
            *(check_image_field(f.schema, c, role) for c, role in cutout_fields.items()))), None)
        if reason:
            failed[f.path] = reason
    n_units = len(catalog.files) + len(failed) - sum(1 for f in catalog.files if f.path in failed)
    _check_failures(failed, n_units, cfg, stage="before any work")
    for path, reason in failed.items():
        log.error("%s: skipped: %s", path, reason)
    good = tuple(f for f in catalog.files if f.path not in failed)
    catalog = type(catalog)(files=good, filesystem=catalog.filesystem)
    with_radec = catalog.has_columns(list(PASSTHROUGH))
    metadata = {
        "engine_version": engine.__version__, "model_id": bundle.meta["model_id"], "model_version": bundle.meta["version"],
        "input_columns": {**inputs, **{m: s.fields for m, s in token_cols.items()}},
        "flags": flag_legend(bundle.config), "run_config": cfg.to_json(),
        "created_unix": time.time(),
    }
    schema = output_schema(bundle, with_radec, metadata)
    done = committed_units(cfg.out) if (exists and cfg.resume) else {}
    if exists and cfg.resume and not done and lance.dataset(cfg.out).count_rows():
        raise ConfigError(f"--resume: {cfg.out} holds rows but no record of which input files they came from "
                          "(not written by this engine's embed job); use --overwrite or another --out")
    if done:
        _check_resumable(cfg.out, schema, bundle)
        log.info("resuming %s: %d unit(s) already committed, skipped", cfg.out, len(done))
    elif exists and cfg.overwrite:
        log.info("replacing the table at %s", cfg.out)
    ledger = _Ledger(cfg, catalog, schema, done, t0)
    todo = [f for f in catalog.files if f.path in ledger.units and f.num_rows > 0]
    for f in catalog.files:
        if f.path in ledger.units and f.num_rows == 0:
            ledger.ready.append(ledger.units[f.path])  # empty file: a unit with nothing to write

    if todo:
        read = [*inputs.values(), *(c for s in token_cols.values() for c in s.read)]
        _run_dataset(cfg, catalog.filesystem, [f.path for f in todo], read, with_radec, schema, ledger)
    ledger.finish()
    failed.update(ledger.failed)
    summary = _summary(cfg, bundle, catalog, ledger, failed, done, t0)
    _write_json(cfg.out.rstrip("/") + ".summary.json", summary)
    _check_failures(failed, n_units, cfg, stage="after the run", summary=summary)
    return summary


def _run_dataset(cfg, filesystem, paths, input_columns, with_radec, schema, ledger) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = -1  # a failing file must not stop the others; its unit stays uncommitted
    read_cols = list(dict.fromkeys([cfg.id_column, *input_columns, *(PASSTHROUGH if with_radec else ())]))
    res = embed_stage_resources(cfg)  # one source for what each stage asks of the cluster
    ledger.paths = paths  # the writer reports units by their index in this list
    ds = ray.data.from_items([{SOURCE_PATH: p, UNIT: i} for i, p in enumerate(paths)], override_num_blocks=len(paths))
    ds = ds.map_batches(ReadUnit(filesystem, read_cols, SOURCE_PATH, UNIT), batch_size=1, batch_format="pyarrow", **res["read"])
    ds = ds.map_batches(
        TokenizeStage, fn_constructor_kwargs={"model_dir": cfg.model_dir, "id_column": cfg.id_column, "columns": cfg.columns},
        batch_size=cfg.batch_size, batch_format="pyarrow", **res["tokenize"],
    )
    use_gpu = cfg.num_gpus > 0
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"model_dir": cfg.model_dir, "precision": cfg.precision, "use_gpu": use_gpu,
                               "threads": None if use_gpu else cfg.model_threads},
        batch_size=cfg.batch_size, batch_format="pyarrow", **res["model"],
    )
    # Whole blocks (one input file each) per writer call: one fragment per file, and a file commits as soon as it is written.
    ds = ds.map_batches(FragmentWriter(cfg.out, schema), batch_size=None, batch_format="pyarrow", **res["write"])
    for result in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        ledger.add(result)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("Ray Data stats:\n%s", ds.stats())


def _check_resumable(uri: str, schema: pa.Schema, bundle: ModelBundle) -> None:
    existing = lance.dataset(uri).schema
    old = json.loads((existing.metadata or {}).get(b"engine", b"{}"))
    if old.get("model_version") != bundle.meta["version"] or existing.remove_metadata() != schema.remove_metadata():
        raise ConfigError(
            f"--resume: {uri} was written by model {old.get('model_id')}@{old.get('model_version')} with another schema; "
            f"this run uses {bundle.model_id}. Resume with the same model and inputs, or use --overwrite."
        )


def _check_failures(failed: dict[str, str], n_units: int, cfg: EmbedConfig, stage: str, summary: dict | None = None) -> None:
    if not failed:
        return
    frac = len(failed) / max(n_units, 1)
    if frac > cfg.max_failed_fraction or len(failed) == n_units:
        listing = "; ".join(f"{p}: {r}" for p, r in list(failed.items())[:5])
        raise UnitsFailedError(
            f"{len(failed)} of {n_units} input file(s) failed {stage} ({frac:.1%} > --max-failed-fraction "
            f"{cfg.max_failed_fraction:.1%}): {listing}", summary=summary)


def _summary(cfg, bundle, catalog, ledger: _Ledger, failed, done, t0) -> dict:
    table = lance.dataset(cfg.out) if ledger.table_exists else None
    rows_out = table.count_rows() if table is not None else 0
    unit_counts = list(done.values()) + list(ledger.committed.values())
    expected_out = sum(c.rows for c in unit_counts)
    if rows_out != expected_out:
        raise OutputMismatchError(f"{cfg.out}: table holds {rows_out} rows, the ledger of committed units says {expected_out}")
    n_dups, dup_examples = ledger.duplicates.duplicates()
    if n_dups:
        log.warning("%d object_id(s) occur more than once in the input (e.g. %s); each row is kept", n_dups, dup_examples)
    seconds = time.perf_counter() - t0
    rows_in = sum(f.num_rows for f in catalog.files if f.path not in failed)
    return {
        "out": cfg.out, "table_version": table.version if table is not None else None, "model": bundle.model_id,
        "files": len(catalog.files) + len([p for p in failed if p not in {f.path for f in catalog.files}]),
        "units_committed_this_run": len(ledger.committed), "units_skipped_already_committed": len(done),
        "failed_units": [{"path": p, "reason": r} for p, r in failed.items()],
        "empty_files": [f.path for f in catalog.files if f.num_rows == 0],
        "rows_in": int(rows_in), "rows_out": int(rows_out), "ids_match": rows_out == rows_in,
        "rows_flagged": sum(c.flagged for c in unit_counts), "rows_without_valid_input": sum(c.no_valid for c in unit_counts),
        "duplicate_ids": {"n": int(n_dups), "examples": dup_examples},
        "seconds": round(seconds, 2), "rows_per_second": round(ledger.rows_done / seconds, 1),
    }
