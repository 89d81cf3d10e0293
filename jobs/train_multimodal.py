"""Train an any-to-any multimodal model with the 4M objective:

    python jobs/train_multimodal.py --out MODEL_DIR [--miles-dir /work/shared/data/mangadap/miles]
    python jobs/train_multimodal.py --kind image --out MODEL_DIR [--image-field FIELD.fits] [--image-tokenizer DIR]

miles: MILES spectra <-> Teff, logg, [Fe/H]; stars are held out by a hash of their MILES number.
image: CFHT I-band stamps (tok_image_cfht_i) <-> aperture magnitude, half-light radius, ellipticity measured
       on them; the stamps of a disjoint region of the field are held out (engine.model.train_image).
Tokenizers are fitted on the training rows only (``--image-tokenizer`` reuses one fitted that way).
The resolved config is written into MODEL_DIR/config.json (``training.config``).
"""

from __future__ import annotations

import argparse
import json
import logging

from engine.model.image_data import CFHT_A370
from engine.model.train_multimodal import MILES_DIR, MultimodalTrainConfig


def main(argv: list[str] | None = None) -> None:
    d = MultimodalTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("miles", "image"), default="miles")
    p.add_argument("--miles-dir", default=str(MILES_DIR), help="miles: MILES FITS spectra + MILES_params.db")
    p.add_argument("--image-field", default=str(CFHT_A370), help="image: the CFHT I-band FITS field")
    p.add_argument("--image-tokenizer", help="image: a fitted image tokenizer directory (default: fit one)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--model-id")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--encoder-depth", type=int, default=d.encoder_depth)
    p.add_argument("--decoder-depth", type=int, default=d.decoder_depth)
    p.add_argument("--token-weight", type=float, default=d.token_weight)
    p.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction, help="miles: fraction of stars held out")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = dict(batch_size=a.batch_size, lr=a.lr, dim=a.dim, encoder_depth=a.encoder_depth, decoder_depth=a.decoder_depth,
                token_weight=a.token_weight, holdout_fraction=a.holdout_fraction, seed=a.seed, threads=a.threads,
                **{k: v for k, v in (("model_id", a.model_id), ("steps", a.steps)) if v is not None})
    if a.kind == "image":
        from engine.model.train_image import image_train_config, train_image

        _, report = train_image(image_train_config(**args), a.out, a.image_field, a.image_tokenizer)
    else:
        from engine.model.train_multimodal import train_miles

        _, report = train_miles(MultimodalTrainConfig(**args), a.out, a.miles_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
