"""Embed a catalogue: python jobs/embed.py --catalog PATHS_OR_GLOB_OR_URI --out LANCE_URI [--model MODEL_DIR]

Runs unchanged on a laptop (starts a local Ray) and under `ray job submit` (joins the cluster).
"""

from __future__ import annotations

import argparse
import json
import logging

import ray

from engine.errors import UnitsFailedError
from engine.model.bundle import PRECISIONS
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.sample import DEFAULT_MODEL_DIR


def parse_columns(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        modality, sep, column = pair.partition("=")
        if not sep or not modality or not column:
            raise SystemExit(f"--columns expects MODALITY=COLUMN pairs (e.g. mag_r=rmag), got {pair!r}")
        out[modality] = column
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", nargs="+", required=True, help="Parquet files, globs, directories or URIs (s3://, gs://, ...)")
    p.add_argument("--out", required=True, help="output Lance table (path or URI)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model directory (default: the shipped model)")
    p.add_argument("--id-column", default="object_id", help="the catalogue's int64 id column")
    p.add_argument("--columns", nargs="*", default=[], metavar="MODALITY=COLUMN", help="map model inputs to catalogue columns")
    p.add_argument("--batch-size", type=int, default=EmbedConfig.batch_size)
    p.add_argument("--precision", default="auto", help=f"one of {PRECISIONS}; auto = bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (0 = CPU)")
    p.add_argument("--model-actors", type=int, default=EmbedConfig.model_actors)
    p.add_argument("--model-threads", type=int, default=EmbedConfig.model_threads)
    p.add_argument("--tokenizer-actors", type=int, default=EmbedConfig.tokenizer_actors)
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at --out")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run: skip input files already committed")
    p.add_argument("--commit-seconds", type=float, default=EmbedConfig.commit_seconds,
                   help="commit verified input files to the table at most this often (0 = as each completes)")
    p.add_argument("--max-failed-fraction", type=float, default=0.0,
                   help="tolerate this fraction of bad input files (reported in the summary) before failing")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = EmbedConfig(
        catalog=tuple(a.catalog), out=a.out, model_dir=a.model, id_column=a.id_column, columns=parse_columns(a.columns),
        batch_size=a.batch_size, precision=a.precision, num_gpus=a.num_gpus, model_actors=a.model_actors,
        model_threads=a.model_threads, tokenizer_actors=a.tokenizer_actors, overwrite=a.overwrite,
        resume=a.resume, max_failed_fraction=a.max_failed_fraction, commit_seconds=a.commit_seconds,
    )
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    try:
        summary = run_embed(cfg)
    except UnitsFailedError as exc:
        if exc.summary:
            print(json.dumps(exc.summary))
        raise SystemExit(f"embed job failed: {exc}") from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
