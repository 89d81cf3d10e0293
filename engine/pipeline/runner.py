"""The embed job: read -> tokenize (CPU actors) -> model (GPU/CPU actors) -> Lance fragments -> checked commit.

``EmbedConfig`` holds every choice (what runs where lives here, not in the stages);
``run_embed`` composes the stages on Ray Data and returns the job summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray

import engine
from engine.errors import ConfigError
from engine.model.bundle import PRECISIONS, ModelBundle
from engine.modalities import Z_PHOT_COLUMNS
from engine.pipeline.read import filesystem_for, open_catalog, read_ids
from engine.pipeline.stages import ID, NO_VALID_INPUT, PASSTHROUGH, EmbedStage, TokenizeStage, flag_legend
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
    write_rows: int = 65536  # rows per Lance fragment write
    overwrite: bool = False
    progress_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.catalog:
            raise ConfigError("EmbedConfig.catalog is empty: give --catalog PATHS_OR_GLOB_OR_URI")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {PRECISIONS}")
        for name in ("batch_size", "model_actors", "tokenizer_actors", "write_rows", "model_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EmbedConfig.{name}={getattr(self, name)}; expected >= 1")
        if self.model_cpus <= 0:
            raise ConfigError(f"EmbedConfig.model_cpus={self.model_cpus}; expected > 0")
        if self.num_gpus < 0:
            raise ConfigError(f"--num-gpus {self.num_gpus}; expected >= 0")

    def to_json(self) -> dict:
        return asdict(self)


def output_schema(bundle: ModelBundle, with_radec: bool, metadata: dict) -> pa.Schema:
    fields = [pa.field(ID, pa.int64(), nullable=False)]
    fields += [pa.field(c, pa.float64()) for c in PASSTHROUGH if with_radec]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), bundle.embedding_dim)))
    fields += [pa.field(c, pa.float32()) for c in Z_PHOT_COLUMNS]
    fields.append(pa.field("flags", pa.int32()))
    return pa.schema(fields, metadata={"engine": json.dumps(metadata)})


def _table_exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path.rstrip("/") + "/_versions").type != pa.fs.FileType.NotFound


def run_embed(cfg: EmbedConfig) -> dict:
    t0 = time.perf_counter()
    bundle = ModelBundle.load(cfg.model_dir)  # fails early on a bad model dir
    unknown = sorted(set(cfg.columns) - set(bundle.config.input_modalities))
    if unknown:
        raise ConfigError(f"--columns names unknown modalities {unknown}; the model reads {list(bundle.config.input_modalities)}")
    inputs = {m: cfg.columns.get(m, c) for m, c in bundle.input_columns.items()}
    required = {cfg.id_column: "object id (int64)", **{c: f"input {m}" for m, c in inputs.items()}}
    catalog = open_catalog(list(cfg.catalog), required)
    if _table_exists(cfg.out) and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out} already holds a Lance table; pass --overwrite to replace it")
    input_ids = read_ids(catalog, cfg.id_column)
    uniq, counts = np.unique(input_ids, return_counts=True)
    dup_ids = uniq[counts > 1]
    if len(dup_ids):
        log.warning("%d object_id(s) occur more than once in the input (e.g. %s); each row is kept and reported",
                    len(dup_ids), dup_ids[:5].tolist())

    with_radec = catalog.has_columns(list(PASSTHROUGH))
    metadata = {
        "engine_version": engine.__version__, "model_id": bundle.meta["model_id"], "model_version": bundle.meta["version"],
        "input_columns": inputs, "flags": flag_legend(bundle.config.input_modalities), "run_config": cfg.to_json(),
        "created_unix": time.time(),
    }
    schema = output_schema(bundle, with_radec, metadata)
    read_cols = list(dict.fromkeys([cfg.id_column, *inputs.values(), *(PASSTHROUGH if with_radec else ())]))

    ds = ray.data.read_parquet(catalog.paths, filesystem=catalog.filesystem, num_cpus=0.5).select_columns(read_cols)
    ds = ds.map_batches(
        TokenizeStage, fn_constructor_kwargs={"model_dir": cfg.model_dir, "id_column": cfg.id_column, "columns": cfg.columns},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors),
    )
    use_gpu = cfg.num_gpus > 0
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"model_dir": cfg.model_dir, "precision": cfg.precision, "use_gpu": use_gpu,
                               "threads": None if use_gpu else cfg.model_threads},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_gpus=cfg.num_gpus,
        num_cpus=1 if use_gpu else cfg.model_cpus, compute=ray.data.ActorPoolStrategy(size=cfg.model_actors),
    )
    ds = ds.map_batches(FragmentWriter(cfg.out, schema), batch_size=cfg.write_rows, batch_format="pyarrow", num_cpus=0.25)

    fragments, written, rows_done, last = [], [], 0, time.perf_counter()
    for result in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for frag_json, ids_bytes in zip(result.column("fragments").to_pylist(), result.column("object_ids").to_pylist()):
            fragments.extend(json.loads(frag_json))
            written.append(np.frombuffer(ids_bytes, dtype=np.int64))
            rows_done += len(written[-1])
        if time.perf_counter() - last > cfg.progress_seconds:
            last = time.perf_counter()
            rate = rows_done / (last - t0)
            eta = (len(input_ids) - rows_done) / rate if rate else float("nan")
            log.info("progress: %d/%d rows (%.0f rows/s, ETA %.0fs)", rows_done, len(input_ids), rate, eta)
    written_ids = np.concatenate(written) if written else np.empty(0, np.int64)
    table = commit(cfg.out, schema, fragments, input_ids, written_ids)

    flags = table.to_table(columns=["flags"]).column("flags").to_numpy()
    seconds = time.perf_counter() - t0
    return {
        "out": cfg.out, "table_version": table.version, "model": bundle.model_id, "files": len(catalog.files),
        "rows_in": int(len(input_ids)), "rows_out": int(table.count_rows()), "ids_match": True,
        "rows_flagged": int((flags != 0).sum()), "rows_without_valid_input": int(((flags & NO_VALID_INPUT) != 0).sum()),
        "duplicate_ids": {"n": int(len(dup_ids)), "examples": dup_ids[:5].tolist()},
        "seconds": round(seconds, 2), "rows_per_second": round(len(input_ids) / seconds, 1),
    }

