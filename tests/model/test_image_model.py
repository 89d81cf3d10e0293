"""The image model: end-to-end training on a real field (tiny), and the shipped model's any-to-any API.

The stamps of tests/data/images/cfht_a370_cutout.fits lie in the region of the CFHT Abell 370 field that the
shipped model (engine/data/image_model) never trained on.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from engine.model.bundle import ModelBundle
from engine.model.image_data import IMAGE_SCALARS, cut_field, measure_stamps
from engine.model.train_image import IMAGE_MODALITY, encode_stamps, image_train_config, train_image

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "engine/data/image_model"
CUTOUT = ROOT / "tests/data/images/cfht_a370_cutout.fits"
COLUMNS = {"mag_aper": "mag_aper", "flux_radius": "flux_radius_arcsec", "ellipticity": "ellipticity"}


@pytest.fixture(scope="module")
def shipped():
    return ModelBundle.load(MODEL)


@pytest.fixture(scope="module")
def held_out(shipped):
    stamps = cut_field(CUTOUT, 96, 0.1)
    props = measure_stamps(stamps, 30.0)
    tokens = encode_stamps(shipped.token_tokenizers[IMAGE_MODALITY], stamps.pixels, "cfht_i", stamps.pixel_scale_arcsec)
    return tokens, {m: props[c] for m, c in COLUMNS.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_training_on_a_real_field_saves_a_model_that_loads_identically(tmp_path, shipped):
    cfg = image_train_config(steps=12, dim=32, encoder_depth=1, decoder_depth=1, batch_size=8)
    bundle, report = train_image(cfg, tmp_path / "m", CUTOUT, MODEL / "tokenizers" / IMAGE_MODALITY)
    assert (report["n_train_stamps"], report["n_train_rows_with_flips"], report["n_holdout"]) == (27, 216, 8)
    loaded = ModelBundle.load(tmp_path / "m")
    vocab = 1000 + 128 + 1  # content codes, flux-scale bins, the missing token
    assert loaded.config.token_modalities == ((IMAGE_MODALITY, 145, vocab),)
    assert loaded.config.input_modalities == IMAGE_SCALARS and loaded.input_columns == COLUMNS
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["training"]
    assert saved["config"]["scalars"] == list(IMAGE_SCALARS) and np.isfinite(saved["loss_per_100_steps"]).all()
    stamps = cut_field(CUTOUT, 96, 0.1).take(np.arange(5))
    tokens = encode_stamps(loaded.token_tokenizers[IMAGE_MODALITY], stamps.pixels, "cfht_i", 0.206)
    np.testing.assert_array_equal(loaded.encode({IMAGE_MODALITY: tokens}), bundle.encode({IMAGE_MODALITY: tokens}))


def test_shipped_model_predicts_held_out_properties_from_the_image(shipped, held_out):
    tokens, truth = held_out
    gen = shipped.generate({IMAGE_MODALITY: tokens}, list(IMAGE_SCALARS), seed=0)
    ok = np.isfinite(truth["mag_aper"])
    err = np.abs(gen["mag_aper"]["median"][ok] - truth["mag_aper"][ok])
    assert np.median(err) < 0.25 and _spearman(gen["mag_aper"]["median"][ok], truth["mag_aper"][ok]) > 0.9
    ok = np.isfinite(truth["flux_radius"])
    assert _spearman(gen["flux_radius"]["median"][ok], truth["flux_radius"][ok]) > 0.3
    # the predicted spread is a real uncertainty: wider for the faintest half than for the brightest
    order = np.argsort(truth["mag_aper"][np.isfinite(truth["mag_aper"])])
    std = gen["mag_aper"]["std"][np.isfinite(truth["mag_aper"])][order]
    assert np.median(std[len(std) // 2 :]) > np.median(std[: len(std) // 2])


def test_shipped_model_generates_valid_images_from_properties(shipped):
    tok = shipped.token_tokenizers[IMAGE_MODALITY]
    given = {"mag_aper": np.array([19.5, 21.5, 23.5]), "flux_radius": np.full(3, 0.6), "ellipticity": np.full(3, 0.2)}
    out = shipped.generate(given, [IMAGE_MODALITY], num_generations=4, steps=8, top_k=1, seed=0)[IMAGE_MODALITY]
    tokens, flux = out["tokens"], out["flux"]
    assert tokens.shape == (3, 4, 145) and flux.shape == (3, 4, 1, 96, 96) and out["pixel_scale_arcsec"] == 0.1
    allowed = tok.allowed_tokens()
    assert allowed[np.arange(145), tokens.reshape(-1, 145)].all()  # a scale id first, content ids after
    assert np.isfinite(flux).all()
    ap = tok.config.aperture()
    central = flux[:, :, 0][:, :, ap].sum(-1).mean(1)  # (3,) mean central flux of the generations
    assert central[0] > central[1] > central[2]  # brighter requested magnitude -> brighter generated source
