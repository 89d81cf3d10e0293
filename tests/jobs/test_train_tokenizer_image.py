import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.tokenizers.image import ImageTokenizer
from engine.tokenizers.stamps import first_image_hdu, read_field, stamp_images
from jobs.train_tokenizer import main

CUTOUT = Path(__file__).parents[1] / "data" / "images" / "cfht_a370_cutout.fits"


def test_image_kind_trains_on_a_real_field_and_saves_a_loadable_codec(tmp_path):
    out = tmp_path / "tok"
    main(["--kind", "image", "--survey", "cfht_i", "--input", str(CUTOUT), "--out", str(out), "--steps", "3", "--seed", "1"])
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["kind"] == "image" and resolved["inputs"] == [str(CUTOUT)]
    assert resolved["config"]["steps"] == 3 and resolved["config"]["surveys"] == ["hst_f606w", "hst_f814w", "cfht_i"]
    tok = ImageTokenizer.load(out)
    assert tok.config.seed == 1 and tok.config.steps == 3
    field = read_field(CUTOUT, first_image_hdu(CUTOUT))
    stamps, images = stamp_images(field, ("CFHT-I",), 96, 0.1)
    assert stamps.pixels.shape[1:] == (50, 50)  # 96 x 0.1" / 0.206" = 46.6 -> 47 + 2 margin, made even
    tokens = tok.encode(images)
    assert tokens.shape == (len(images), 145)
    # the scale token of the brightest stamp carries its central flux: decode restores it to within half a bin
    prep = tok.preprocess(images)
    i = int(np.argmax(prep.flux[:, 0, 48, 48]))
    ap = tok.config.aperture()
    measured = prep.flux[i, 0][ap].mean()
    half_bin_dex = 0.5 * 7.0 / tok.config.n_scale_bins  # 7 dex of scale bins
    assert abs(np.log10(tok.decode_scale(tokens[i : i + 1], "cfht_i")[0, 0] / measured)) <= half_bin_dex + 1e-9


def test_image_kind_rejects_an_unregistered_survey(tmp_path):
    with pytest.raises(ConfigError, match="unknown modality 'tok_image_manga'"):
        main(["--kind", "image", "--input", str(CUTOUT), "--out", str(tmp_path / "t"), "--steps", "1"])


def test_saturation_option_reaches_the_stamp_cutter(tmp_path):
    from jobs.train_tokenizer import _saturation

    assert _saturation("header") == "header" and _saturation("none") is None and _saturation("2500") == 2500.0
    with pytest.raises(SystemExit, match="--saturation 'max': expected 'header', 'none' or a number"):
        _saturation("max")
    level = 2500.0  # below the cores of the cutout's brightest sources (sky ~1990 ADU, max 2820)
    field = read_field(CUTOUT, first_image_hdu(CUTOUT), _saturation(str(level)))
    stamps, images = stamp_images(field, ("CFHT-I",), 96, 0.1)
    assert stamps.n_saturated.sum() > 0 and sum(int((~im.valid).sum()) for im in images) >= stamps.n_saturated.sum()
    main(["--kind", "image", "--survey", "cfht_i", "--input", str(CUTOUT), "--out", str(tmp_path / "t"), "--steps", "3",
          "--saturation", str(level)])
    assert ImageTokenizer.load(tmp_path / "t").config.steps == 3


def test_no_block_mode_gives_the_mode_bit_to_the_scale(tmp_path):
    main(["--kind", "image", "--survey", "cfht_i", "--input", str(CUTOUT), "--out", str(tmp_path / "t"), "--steps", "3",
          "--no-block-mode"])
    tok = ImageTokenizer.load(tmp_path / "t")
    assert tok.config.block_mode is False and tok.config.n_scale_bins == 1024 and tok.missing_token == 1000 + 1024
    field = read_field(CUTOUT, first_image_hdu(CUTOUT))
    tokens = tok.encode(stamp_images(field, ("CFHT-I",), 96, 0.1)[1])
    assert (tok._modes(tokens) == 0).all() and tokens[:, 0].max() < tok.missing_token
