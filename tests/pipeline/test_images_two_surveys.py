"""Two image surveys in one embed job: CFHT I (0.206"/pix, 49 px stamps) and HST F814W (0.1"/pix, 99 px stamps).

A model with two image modalities (tok_image_cfht_i, tok_image_hst_f814w; both read by the shipped image codec,
weights untrained: only the data path is under test) reads one cutout column per survey. Rows hold a CFHT
stamp, an HST stamp, both or neither (tests/data/images: real CFHT Abell 370 and HST Abell 478 cutouts).
"""

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.modalities.images import Image
from engine.model.bundle import ModelBundle
from engine.model.image_data import IMAGE_SCALARS, cut_field, measure_stamps
from engine.model.train_image import image_train_config
from engine.model.train_multimodal import assemble_bundle
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.pipeline.stages import NO_VALID_INPUT

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests/data/images"
CODEC = ROOT / "engine/data/image_model/tokenizers/tok_image_cfht_i"
CFHT, HST = "tok_image_cfht_i", "tok_image_hst_f814w"
NO_SCALARS, MISSING_CFHT, MISSING_HST = 1 | 2 | 4, 8, 16
KINDS = ["cfht", "hst", "both", "cfht", "hst", "both", "neither", "cfht", "hst", "both", "hst", "cfht"]
N = len(KINDS)


@pytest.fixture(scope="module")
def survey_stamps():
    cfht = cut_field(DATA / "cfht_a370_cutout.fits", 96, 0.1)
    hst = cut_field(DATA / "hst_a478_cutout.fits", 96, 0.1)
    return cfht.pixels[:N].astype(np.float32), hst.pixels[:N].astype(np.float32), measure_stamps(cfht, 30.0)


@pytest.fixture(scope="module")
def model_dir(survey_stamps, tmp_path_factory):
    from engine.tokenizers.image import ImageTokenizer

    _, _, props = survey_stamps
    codec = ImageTokenizer.load(CODEC)
    cfg = image_train_config(dim=32, encoder_depth=1, decoder_depth=1, n_bins=16)
    bundle = assemble_bundle(pa.table({c: props[c] for c in ("mag_aper", "flux_radius_arcsec", "ellipticity")}),
                             {CFHT: codec, HST: codec}, cfg)
    return bundle.save(tmp_path_factory.mktemp("two") / "model")


def _catalogue(survey_stamps) -> pa.Table:
    cfht, hst, _ = survey_stamps
    nested = lambda p: [[list(map(float, r)) for r in p]]  # noqa: E731  (1, H, W)
    cols = {"cutout_cfht_i": [nested(cfht[i]) if k in ("cfht", "both") else None for i, k in enumerate(KINDS)],
            "cutout_hst_f814w": [nested(hst[i]) if k in ("hst", "both") else None for i, k in enumerate(KINDS)]}
    t3 = pa.list_(pa.list_(pa.list_(pa.float32())))
    return pa.table({"object_id": pa.array(700 + np.arange(N), pa.int64()), **{c: pa.array(v, t3) for c, v in cols.items()},
                     **{c: pa.array([None] * N, pa.float64()) for c in ("mag_aper", "flux_radius_arcsec", "ellipticity")}})


def test_rows_of_two_surveys_are_embedded_like_the_direct_model(ray_session, survey_stamps, model_dir, tmp_path):
    table = _catalogue(survey_stamps)
    for k, rows in enumerate(np.array_split(np.random.default_rng(1).permutation(N), 3)):
        pq.write_table(table.take(rows), tmp_path / f"part-{k}.parquet")
    out = str(tmp_path / "out.lance")
    summary = run_embed(EmbedConfig(catalog=(str(tmp_path / "part-*.parquet"),), out=out, model_dir=str(model_dir), batch_size=5))
    got = lance.dataset(out).to_table()
    row = {int(i): k for k, i in enumerate(got["object_id"].to_numpy())}
    assert sorted(row) == list(700 + np.arange(N)) and summary["rows_out"] == N
    expected = {"cfht": NO_SCALARS | MISSING_HST, "hst": NO_SCALARS | MISSING_CFHT, "both": NO_SCALARS,
                "neither": NO_SCALARS | MISSING_CFHT | MISSING_HST | NO_VALID_INPUT}
    assert [int(got["flags"][row[700 + i]].as_py()) for i in range(N)] == [expected[k] for k in KINDS]

    bundle = ModelBundle.load(model_dir)
    cfht, hst, _ = survey_stamps
    for kind in ("cfht", "hst", "both"):
        idx = [i for i, k in enumerate(KINDS) if k == kind]
        inputs = {}
        if kind in ("cfht", "both"):
            inputs[CFHT] = [Image(cfht[i][None].astype(np.float64), ("CFHT-I",), 0.206) for i in idx]
        if kind in ("hst", "both"):
            inputs[HST] = [Image(hst[i][None].astype(np.float64), ("HST-F814W",), 0.1) for i in idx]
        direct = bundle.encode(bundle.tokenize(inputs))
        emb = np.stack([np.asarray(got["embedding"][row[700 + i]].as_py()) for i in idx])
        cos = (emb * direct).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(direct, axis=1)
        assert cos.min() > 0.9999, kind
        gen = bundle.generate(inputs, list(IMAGE_SCALARS), seed=0)
        pred = np.array([got["mag_aper_pred"][row[700 + i]].as_py() for i in idx])
        np.testing.assert_allclose(pred, gen["mag_aper"]["median"], rtol=1e-4, atol=1e-4)
    # the same stamp embedded as CFHT alone and with an HST stamp beside it differs: both surveys are read
    both = [i for i, k in enumerate(KINDS) if k == "both"]
    alone = bundle.encode(bundle.tokenize({CFHT: [Image(cfht[i][None].astype(np.float64), ("CFHT-I",), 0.206) for i in both]}))
    with_hst = np.stack([np.asarray(got["embedding"][row[700 + i]].as_py()) for i in both])
    assert np.abs(alone - with_hst).max() > 1e-3
