"""Pull the embed job's photo-z predictions back into a user's catalogue (left join by id).

    python jobs/join.py --catalog cat.fits --table out/table.lance --out cat_zphot.fits

Runs on the driver (no Ray tasks): memory is bounded by the catalogue, the table is streamed.
Prints a one-line JSON summary and writes the resolved config and summary to ``OUT.join.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

import fsspec

from engine.catalog.join import JoinConfig, join_catalog
from engine.errors import EngineError
from engine.modalities import Z_PHOT_COLUMNS


def parse_args(argv: list[str] | None = None) -> JoinConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True, help="Parquet (.parquet/.pq) or FITS (.fits/.fit/.fits.gz), path or URI")
    p.add_argument("--table", required=True, help="Lance table written by jobs/embed.py")
    p.add_argument("--out", required=True, help="output catalogue; format from the extension")
    p.add_argument("--id-column", default="object_id", help="the catalogue's id column (default: object_id)")
    p.add_argument("--columns", default=",".join(Z_PHOT_COLUMNS), help="comma-separated z_phot_* (default: all)")
    p.add_argument("--with-flags", action="store_true", help="also add the table's flags column")
    p.add_argument("--overwrite", action="store_true", help="replace catalogue columns that have an output name")
    p.add_argument("--batch-size", type=int, default=65_536, help="Lance rows per scanned batch")
    a = p.parse_args(argv)
    return JoinConfig(
        catalog=a.catalog,
        table=a.table,
        out=a.out,
        id_column=a.id_column,
        columns=tuple(c.strip() for c in a.columns.split(",") if c.strip()),
        with_flags=a.with_flags,
        overwrite=a.overwrite,
        batch_size=a.batch_size,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
        summary = join_catalog(config)
    except EngineError as e:
        logging.getLogger("jobs.join").error("%s: %s", type(e).__name__, e)
        return 2
    with fsspec.open(f"{config.out}.join.json", "w") as f:
        json.dump({"config": asdict(config), "summary": summary.to_dict()}, f, indent=2)
    print(json.dumps(summary.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
