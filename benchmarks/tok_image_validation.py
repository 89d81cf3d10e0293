"""Choose image-tokenizer settings on a validation split of the bench_tokenizers TRAINING stamps only.

    python benchmarks/tok_image_validation.py [--target-clip 8 | --compress 8] [--levels ...] [--train-crop 48]
                                              [--split core|outskirts] [--steps 600] [--seed 0]

Train on CFHT A370 x < 42% of the width + HST A478 x below its 80th percentile; validate on the
CFHT stamps between 42% (plus one stamp, no shared pixel) and 55% of the width (the cluster core)
and the A478 stamps beyond the 80th percentile (plus one stamp). ``--split outskirts`` validates on the
CFHT stamps left of 15% of the width instead (sky-dominated, like the held-out side) and trains on those
from 15% (plus one stamp) to 55%. The held-out sets of bench_tokenizers (CFHT x > 55%, HDF-S) are never
read. Prints the tok_image metrics of the learned tokenizer and of every same-budget baseline (fitted on
the same training stamps) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tok_image as T  # noqa: E402
from engine.tokenizers.image import ImageTokenizer, ImageTokenizerConfig  # noqa: E402

CFHT_WIDTH, TRAIN_FRAC, A478_QUANTILE = 1909, 0.42, 0.8
OUTSKIRTS_FRAC = 0.15  # --split outskirts: CFHT validation x < 15 % of the width, training from there (+ gap) to 55 %


def run(target_clip: float | None, steps: int, seed: int, compress: float | None = ImageTokenizerConfig.compress,
        levels: tuple[int, ...] = ImageTokenizerConfig.levels, train_crop: int = ImageTokenizerConfig.train_crop,
        split: str = "core") -> dict:
    torch.set_num_threads(1)
    cfg = ImageTokenizerConfig(surveys=("hst_f606w", "hst_f814w", "cfht_i"), steps=steps, seed=seed, n_threads=1,
                               target_clip=target_clip, compress=compress, levels=levels, train_crop=train_crop)
    cfht, cfht_images, cfht_sigma = T._field_stamps("cfht_a370", cfg)
    a478, a478_images, a478_sigma = T._field_stamps("hst_a478", cfg)
    gap = cfht.pixels.shape[-1]  # two half-stamps: no pixel shared between train and validation
    cut = np.quantile(a478.x_pix, A478_QUANTILE)
    if split == "core":  # validation: the cluster core, left of the held-out region
        in_train = cfht.x_pix < TRAIN_FRAC * CFHT_WIDTH
        in_val = (TRAIN_FRAC * CFHT_WIDTH + gap < cfht.x_pix) & (cfht.x_pix < T.SPLIT_FRAC * CFHT_WIDTH)
    else:  # the sky-dominated outskirts at the field's left edge, like the held-out right side
        in_train = (OUTSKIRTS_FRAC * CFHT_WIDTH + gap < cfht.x_pix) & (cfht.x_pix < T.SPLIT_FRAC * CFHT_WIDTH)
        in_val = cfht.x_pix < OUTSKIRTS_FRAC * CFHT_WIDTH
    train = ([im for im, k in zip(cfht_images, in_train) if k] + [im for im, x in zip(a478_images, a478.x_pix) if x < cut])
    val = {
        f"cfht_a370_val_{split}": ([im for im, k in zip(cfht_images, in_val) if k], cfht_sigma, "cfht_i"),
        "hst_a478_val": ([im for im, x in zip(a478_images, a478.x_pix) if x > cut + gap], a478_sigma, "hst_f814w"),
    }
    tok = ImageTokenizer(cfg).fit(train)
    baselines, _ = T._baselines(T.baseline_prep(tok, train), tok.token_grid, tok.content_vocab_size)
    result = {"split": split, "target_clip": target_clip, "compress": compress, "levels": list(levels), "train_crop": train_crop,
              "steps": steps, "seed": seed, "n_train": len(train)}
    for name, (images, sigma, survey) in val.items():
        prep, bprep = tok.preprocess(images), T.baseline_prep(tok, images)
        row = {"n_stamps": len(images), **T.learned_rows(tok, prep, sigma, survey)}
        for bname, b in baselines.items():
            row[f"baseline_{bname}"] = T._metrics(b.reconstruct(bprep), bprep, sigma, cfg.pixel_scale_arcsec)
        result[name] = row
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-clip", type=float, default=None, help="ImageTokenizerConfig.target_clip (default: max_input)")
    p.add_argument("--compress", type=float, default=ImageTokenizerConfig.compress,
                   help="ImageTokenizerConfig.compress (0: None, the linear-output decoder)")
    p.add_argument("--levels", type=int, nargs="+", default=list(ImageTokenizerConfig.levels), help="FSQ levels")
    p.add_argument("--train-crop", type=int, default=ImageTokenizerConfig.train_crop, help="training crop size (pixels)")
    p.add_argument("--split", choices=("core", "outskirts"), default="core",
                   help="CFHT validation stamps: the cluster core (42-55 %% of the width) or the outskirts (< 15 %%)")
    p.add_argument("--steps", type=int, default=T.STEPS_QUICK)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(run(a.target_clip, a.steps, a.seed, a.compress or None, tuple(a.levels), a.train_crop, a.split), indent=2))
