"""Build the FAISS index of a Lance embedding table, beside it in ``<table>.faiss/``.

    python jobs/index.py --table demo_out/sdss_mgs.lance [--factory 'IVF1024,Flat'] [--metric cosine|l2] [--nprobe 32]

Prints a one-line JSON summary; the resolved config and provenance are in ``<table>.faiss/index.json``.
"""

import argparse
import json
import logging
import sys
import time

from engine.errors import EngineError
from engine.index.build import IndexConfig, build_index, index_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", required=True, help="Lance table URI (local path or fsspec/Lance URI)")
    p.add_argument("--factory", default=None, help="FAISS factory string (default: chosen by table size)")
    p.add_argument("--metric", default="cosine", choices=("cosine", "l2"))
    p.add_argument("--nprobe", type=int, default=None, help="default IVF lists searched per query")
    p.add_argument("--batch-size", type=int, default=65_536, help="rows per streamed record batch")
    p.add_argument("--seed", type=int, default=0, help="training-sample seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        config = IndexConfig(
            factory=args.factory, metric=args.metric, nprobe=args.nprobe, batch_size=args.batch_size, seed=args.seed
        )
        meta = build_index(args.table, config)
    except EngineError as e:
        logging.getLogger("jobs.index").error("%s", e)
        return 2
    summary = {
        "index": index_dir(args.table),
        "factory": meta.factory,
        "metric": meta.metric,
        "n_vectors": meta.n_vectors,
        "n_skipped": sum(meta.n_skipped.values()),
        "table_version": meta.table_version,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
