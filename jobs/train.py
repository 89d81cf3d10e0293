"""Fit the tokenizer and train the model: python jobs/train.py --catalog FILE.parquet [...] --out MODEL_DIR

Checkpoints (weights, optimizer, scheduler, RNG states, position in the epoch) are written to
MODEL_DIR/checkpoints at every epoch end and every --checkpoint-every steps; after an interruption
run the same command with --resume to continue exactly where the last checkpoint left off.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging

from engine.model.train import CALIBRATIONS, TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--catalog", nargs="+", required=True, help="Parquet file(s) or globs with object_id, mags and z_spec")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--model-id", default=TrainConfig.model_id)
    p.add_argument("--inputs", nargs="+", default=list(TrainConfig.inputs), metavar="MODALITY",
                   help="scalar inputs, colours included (default: r + u-g, g-r, r-i, i-z; e.g. mag_u ... mag_z for magnitudes only)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--dim", type=int, default=TrainConfig.dim)
    p.add_argument("--encoder-depth", type=int, default=TrainConfig.encoder_depth)
    p.add_argument("--decoder-depth", type=int, default=TrainConfig.decoder_depth)
    p.add_argument("--n-bins", type=int, default=TrainConfig.n_bins)
    p.add_argument("--holdout-fraction", type=float, default=TrainConfig.holdout_fraction)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--calibration", choices=CALIBRATIONS, default=TrainConfig.calibration, help="p(z) calibration on the validation split (TrainConfig.calibration)")
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every_steps,
                   help="also checkpoint every N optimizer steps (0: only at epoch ends)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = sorted({f for pattern in a.catalog for f in (glob.glob(pattern) or [pattern])})
    cfg = TrainConfig(model_id=a.model_id, inputs=tuple(a.inputs), epochs=a.epochs, batch_size=a.batch_size, dim=a.dim,
                      encoder_depth=a.encoder_depth, decoder_depth=a.decoder_depth, n_bins=a.n_bins,
                      holdout_fraction=a.holdout_fraction, seed=a.seed, calibration=a.calibration,
                      checkpoint_every_steps=a.checkpoint_every)
    report = train(paths, cfg, a.out, resume=a.resume)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
