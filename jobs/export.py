"""Export a model dir for serving (TorchScript): python jobs/export.py --model MODEL_DIR --out FILE.pt"""

from __future__ import annotations

import argparse
import json
import logging

from engine.model.bundle import ModelBundle
from engine.model.export import export_torchscript, load_exported


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="model directory (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("--out", required=True, help="TorchScript file to write (.pt)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = export_torchscript(ModelBundle.load(a.model), a.out)
    _, meta = load_exported(path)
    print(json.dumps({"out": str(path), "model_id": meta["model_id"], "inputs": meta["inputs"]}, indent=2))


if __name__ == "__main__":
    main()
