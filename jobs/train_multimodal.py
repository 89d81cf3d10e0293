"""Train the any-to-any MILES stellar model (spectrum <-> Teff, logg, [Fe/H]) with the 4M objective:

    python jobs/train_multimodal.py --miles-dir /work/shared/data/mangadap/miles --out MODEL_DIR

Stars are held out by a hash of their MILES number; tokenizers are fitted on the training stars
only. The resolved config is written into MODEL_DIR/config.json (``training.config``).
"""

from __future__ import annotations

import argparse
import json
import logging

from engine.model.train_multimodal import MILES_DIR, MultimodalTrainConfig, train_miles


def main(argv: list[str] | None = None) -> None:
    d = MultimodalTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--miles-dir", default=str(MILES_DIR), help="MILES FITS spectra + MILES_params.db")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--model-id", default=d.model_id)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--encoder-depth", type=int, default=d.encoder_depth)
    p.add_argument("--decoder-depth", type=int, default=d.decoder_depth)
    p.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = MultimodalTrainConfig(model_id=a.model_id, steps=a.steps, batch_size=a.batch_size, lr=a.lr, dim=a.dim,
                                encoder_depth=a.encoder_depth, decoder_depth=a.decoder_depth,
                                holdout_fraction=a.holdout_fraction, seed=a.seed, threads=a.threads)
    _, report = train_miles(cfg, a.out, a.miles_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
