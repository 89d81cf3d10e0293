"""Tokenizer fidelity on held-out REAL data next to a same-token-budget baseline, and CPU throughput.

    python benchmarks/bench_tokenizers.py [--seed 0] [--quick] [--kinds image] [--out FILE]

Prints one JSON document (one entry per tokenizer kind) and writes it to --out (default
benchmarks/results/bench_tokenizers.json); kinds not run keep their previous entry there. Each kind lives in its own module with a
``run(seed: int, quick: bool) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
KINDS = {"spectrum": "tok_spectrum", "image": "tok_image"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller training budgets, for routine runs")
    p.add_argument("--kinds", nargs="*", default=list(KINDS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_tokenizers.json")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    result = {}
    for kind in a.kinds:
        result[kind] = {"seed": a.seed, "quick": a.quick, **importlib.import_module(KINDS[kind]).run(seed=a.seed, quick=a.quick)}
    out = a.out
    out.parent.mkdir(exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous = {k: v for k, v in previous.items() if k in KINDS}  # drop the old top-level seed/quick keys
    out.write_text(json.dumps({**previous, **result}, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
