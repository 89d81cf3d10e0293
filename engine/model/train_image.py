"""Train an any-to-any image model: CFHT I-band stamps (``tok_image_cfht_i``) <-> properties measured on them.

The stamps are every source detected in the CFHT Abell 370 field; their scalar companions
(``IMAGE_SCALARS``: aperture magnitude, half-light radius, ellipticity) are measured on the native
pixels (``engine.model.image_data``). Training uses the stamps left of ``SPLIT_FRAC`` of the field's
width; the stamps right of it by a whole stamp side are held out (a disjoint region: no shared pixel).
The image tokenizer is fitted on the training stamps (plus the HST F814W Abell 478 stamps, another
field, for the codec only) unless a fitted one is given. Every training stamp is tokenized in its
eight flips/rotations (the properties do not change), then the 4M objective of
``engine.model.train_multimodal`` trains both directions (image -> properties, properties -> image).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from engine.model.bundle import ModelBundle
from engine.model.image_data import (CFHT_A370, HST_A478, IMAGE_SCALARS, SPLIT_FRAC, cut_field, dihedral, measure_stamps,
                                     region_split)
from engine.model.train_multimodal import MultimodalTrainConfig, assemble_bundle, fit_steps, token_data
from engine.modalities import SCALARS_BY_NAME
from engine.modalities.images import Image, survey_spec
from engine.modalities.registry import entry
from engine.tokenizers.image import ImageTokenizer
from engine.tokenizers.stamps import Stamps, first_image_hdu

log = logging.getLogger(__name__)

IMAGE_MODALITY = "tok_image_cfht_i"
# 128 flux-scale bins (0.055 dex each) instead of 1024: each bin's token embedding then sees ~10 training
# stamps instead of ~1; the content codes are unchanged (12 x 12 FSQ tokens of 1000 values). block_mode off:
# every stamp in the learned codes, so each content token means one thing to the model (measured that way)
IMAGE_TOKENIZER = {"n_scale_bins": 128, "steps": 600, "block_mode": False}


def image_train_config(**overrides) -> MultimodalTrainConfig:
    """The image model's training config (``overrides`` win)."""
    base = dict(model_id="cfht-a370-image", scalars=IMAGE_SCALARS, tokenizer=dict(IMAGE_TOKENIZER), steps=600)
    return MultimodalTrainConfig(**{**base, **overrides})


def field_dataset(path: str | Path, crop_size: int, crop_scale_arcsec: float, zero_point_ab: float) -> tuple[Stamps, pa.Table]:
    """Stamps of every source in a field and a table of their ids (detection order), positions and properties."""
    stamps = cut_field(path, crop_size, crop_scale_arcsec, first_image_hdu(path))
    props = measure_stamps(stamps, zero_point_ab)
    cols = {SCALARS_BY_NAME[m].column: props[SCALARS_BY_NAME[m].column] for m in IMAGE_SCALARS}
    return stamps, pa.table({"object_id": np.arange(len(stamps), dtype=np.int64), "x_pix": stamps.x_pix,
                             "y_pix": stamps.y_pix, "ra": stamps.ra_deg, "dec": stamps.dec_deg, **cols})


def field_width(path: str | Path) -> int:
    from astropy.io import fits

    with fits.open(path) as hdul:
        return int(hdul[first_image_hdu(path)].data.shape[1])


def encode_stamps(tok: ImageTokenizer, pixels: np.ndarray, survey: str, pixel_scale_arcsec: float) -> np.ndarray:
    """(N, S, S) single-band stamps -> (N, n_tokens) int64 tokens."""
    return tok.encode_prepared(tok.preprocess_arrays(pixels[:, None], survey, pixel_scale_arcsec)).astype(np.int64)


def fit_image_tokenizer(cfg: MultimodalTrainConfig, fit_stamps: Stamps, extra_field: str | Path | None = HST_A478) -> ImageTokenizer:
    """The registered tok_image_cfht_i codec (``cfg.tokenizer`` overrides), fitted on these stamps (+ another field's)."""
    tok = entry(IMAGE_MODALITY).build(**cfg.tokenizer, seed=cfg.seed, n_threads=cfg.threads)
    bands = survey_spec(entry(IMAGE_MODALITY).survey).bands
    images = [Image(p[None].astype(np.float64), bands, fit_stamps.pixel_scale_arcsec) for p in fit_stamps.pixels]
    if extra_field is not None:
        extra = cut_field(extra_field, tok.config.crop_size, tok.config.pixel_scale_arcsec, first_image_hdu(extra_field))
        images += [Image(p[None].astype(np.float64), survey_spec("hst_f814w").bands, extra.pixel_scale_arcsec)
                   for p in extra.pixels]
    log.info("fitting the image tokenizer on %d stamps", len(images))
    return tok.fit(images)


def train_image(cfg: MultimodalTrainConfig, out_dir: str | Path | None = None, field: str | Path = CFHT_A370,
                tokenizer_dir: str | Path | None = None) -> tuple[ModelBundle, dict]:
    """Train the image model on the training region of ``field``; save it to ``out_dir`` if given."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    survey = entry(IMAGE_MODALITY).survey
    tok = ImageTokenizer.load(tokenizer_dir) if tokenizer_dir else None
    crop = (tok.config.crop_size, tok.config.pixel_scale_arcsec) if tok else (96, 0.1)
    stamps, table = field_dataset(field, *crop, survey_spec(survey).zero_points_ab[0])
    fit, held = region_split(stamps, field_width(field))
    train = stamps.take(np.flatnonzero(fit))
    tok = tok or fit_image_tokenizer(cfg, train)
    t_tok = time.perf_counter() - t0
    scalars = {m: table[SCALARS_BY_NAME[m].column].to_numpy()[fit] for m in cfg.scalars}
    bundle = assemble_bundle(table.filter(pa.array(fit)), {IMAGE_MODALITY: tok}, cfg)
    tokens = np.concatenate([encode_stamps(tok, dihedral(train.pixels, k), survey, train.pixel_scale_arcsec) for k in range(8)])
    data = token_data(bundle, {**{m: np.tile(v, 8) for m, v in scalars.items()}, IMAGE_MODALITY: tokens})
    t1 = time.perf_counter()
    curve = fit_steps(bundle.model, data, cfg)
    report = {"tokenizer_seconds": round(t_tok, 1), "train_seconds": round(time.perf_counter() - t1, 1),
              "n_train_stamps": int(fit.sum()), "n_train_rows_with_flips": int(len(tokens)), "n_holdout": int(held.sum()),
              "split": f"train x < {SPLIT_FRAC} * width, held out x > {SPLIT_FRAC} * width + {stamps.pixels.shape[-1]} px",
              "loss_per_100_steps": curve}
    if out_dir is not None:
        bundle.save(out_dir, extra={"training": {"config": asdict(cfg), "data": str(field), **report}})
    return bundle, report
