"""Command line: ``python -m engine <command> ...``.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: a function that adds its
arguments to a subparser and a function that runs it and returns an exit code. Adding a
command is adding an entry. Results go to stdout; warnings and errors are logged (stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from engine.errors import EngineError

log = logging.getLogger(__name__)

EXIT_ERROR = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- search -------------------------------------------------------------------------------


def _add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="Lance table URI written by the embed job")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--id", type=int, dest="object_id", help="object_id of a table row to search around")
    query.add_argument("--vector", help=".npy file with one (D,) or several (n, D) query vectors")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to search (default: stored with the index)")
    p.add_argument("--strict", action="store_true", help="fail instead of warning when the index is stale")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _format_table(label: str, rows: list[dict]) -> str:
    lines = [label, f"{'rank':>4}  {'object_id':>20}  {'distance':>10}  {'z_phot_mean':>11}"]
    for r in rows:
        z = "nan" if r["z_phot_mean"] is None else f"{r['z_phot_mean']:.4f}"
        lines.append(f"{r['rank']:>4}  {r['object_id']:>20}  {r['distance']:>10.6f}  {z:>11}")
    return "\n".join(lines)


def _run_search(args: argparse.Namespace) -> int:
    from engine.index.build import index_dir
    from engine.index.query import load_query_vectors, open_index, search_id, search_vectors

    si = open_index(args.table, nprobe=args.nprobe, strict=args.strict)  # logs a stale index
    if args.object_id is not None:
        results = [({"object_id": args.object_id}, search_id(si, args.object_id, args.k))]
    else:
        found = search_vectors(si, load_query_vectors(args.vector, si.meta.dim), args.k)
        results = [({"vector": args.vector, "row": i}, nb) for i, nb in enumerate(found)]
    if args.json:
        print(
            json.dumps(
                {
                    "table": args.table,
                    "index": index_dir(args.table),
                    "factory": si.meta.factory,
                    "metric": si.meta.metric,
                    "nprobe": si.nprobe,
                    "stale": None if si.stale is None else si.stale.message,
                    "results": [{"query": q, "neighbours": nb.rows()} for q, nb in results],
                }
            )
        )
        return 0
    for query, nb in results:
        what = f"object_id {query['object_id']}" if "object_id" in query else f"{query['vector']} row {query['row']}"
        label = f"{len(nb.object_id)} nearest to {what} ({si.meta.factory}, {si.meta.metric} distance)"
        print(_format_table(label, nb.rows()))
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "search", "nearest neighbours of an object or vector in a table's FAISS index", _add_search_arguments, _run_search
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Astronomy embedding engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; engine errors are logged and give exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EngineError as e:
        log.error("%s", e)
        return EXIT_ERROR
