import json

import numpy as np
import pytest
import torch

from engine.errors import ConfigError, ModelError
from engine.model.bundle import ModelBundle, resolve_device_dtype
from engine.model.redshift import REDSHIFT, recalibrate, softmax, summarize
from engine.model.train import TrainConfig, split_masks, train
from engine.sample import SAMPLE_PATH, holdout_mask, kfold_index
from engine.tokenizers.scalar import ScalarTokenizer, ScalarTokenizerConfig

TINY = TrainConfig(epochs=2, batch_size=256, dim=16, encoder_depth=1, decoder_depth=1, num_heads=2, n_bins=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    report = train([str(SAMPLE_PATH)], TINY, str(out))
    return out, report


def test_splits_are_disjoint_hash_based_and_cover_everything(sample_table):
    ids = sample_table["object_id"].to_numpy()
    s = split_masks(ids, TINY)
    assert not (s["train"] & s["val"]).any() and not (s["train"] & s["holdout"]).any()
    assert (s["train"] | s["val"] | s["holdout"]).all()
    assert 0.17 < s["holdout"].mean() < 0.23
    # the split of an id does not depend on which other rows are present or their order
    assert np.array_equal(holdout_mask(ids[::-1])[::-1], holdout_mask(ids))
    folds = kfold_index(ids, 5)
    assert set(np.unique(folds)) == set(range(5))


def test_training_never_sees_the_holdout(tiny, sample_table):
    out, report = tiny
    bundle = ModelBundle.load(out)
    ids = sample_table["object_id"].to_numpy()
    train_rows = sample_table.filter(split_masks(ids, TINY)["train"])
    refit_cfg = ScalarTokenizerConfig(columns=bundle.tokenizer.config.columns, n_bins=64, derived=bundle.tokenizer.config.derived)
    refit = ScalarTokenizer(refit_cfg).fit([train_rows])  # colours formed from the magnitude columns
    for c in bundle.tokenizer.config.columns:
        np.testing.assert_array_equal(refit.edges[c], bundle.tokenizer.edges[c])
    assert report["split"]["holdout"] == int(holdout_mask(ids).sum())
    h = report["holdout"]["z_phot_mean"]
    assert h["n"] == report["split"]["holdout"] and 0 < h["sigma_nmad"] < 0.2
    assert report["holdout_knn_baseline"]["sigma_nmad"] < 0.03  # kNN on SDSS MGS colours: ~0.016


def test_model_dir_round_trip_and_version(tiny):
    out, _ = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["version"].startswith("0.1.0+")
    a, b = ModelBundle.load(out), ModelBundle.load(out)
    tok = np.random.default_rng(0).integers(0, 64, size=(9, 5))
    valid = np.ones_like(tok, dtype=bool)
    valid[3, :2] = False
    pa_, pb = a.predict(tok, valid), b.predict(tok, valid)
    for k in pa_:
        np.testing.assert_array_equal(pa_[k], pb[k])


def test_bf16_agrees_with_fp32(model_dir, sample_table):
    bundle = ModelBundle.load(model_dir)
    cols = {c: sample_table[c].to_numpy()[:512] for c in bundle.input_columns.values()}
    enc = bundle.tokenizer.encode(cols)
    n = len(bundle.input_columns)
    tok, valid = enc.tokens[:, :n], ~enc.missing[:, :n]
    fp32 = bundle.predict(tok, valid)
    bf16 = bundle.predict(tok, valid, torch.bfloat16)
    cos = (fp32["embedding"] * bf16["embedding"]).sum(1) / (
        np.linalg.norm(fp32["embedding"], axis=1) * np.linalg.norm(bf16["embedding"], axis=1))
    assert cos.min() >= 0.99
    dz = np.abs(fp32["z_phot_mean"] - bf16["z_phot_mean"]) / (1 + fp32["z_phot_mean"])
    assert np.median(dz) < 0.005 and dz.max() < 0.02


def test_model_dir_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ModelBundle.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"lacks \['model.safetensors', 'tokenizer.json'\]"):
        ModelBundle.load(tmp_path)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_device_dtype("fp16", use_gpu=False)
    assert resolve_device_dtype("auto", use_gpu=False) == (torch.device("cpu"), None)
    with pytest.raises(ConfigError, match="unknown modality 'mag_w1'"):
        TrainConfig(inputs=("mag_w1",))


def test_calibration_is_stored_and_applied_by_predict(tiny, sample_table):
    out, report = tiny
    bundle = ModelBundle.load(out)
    cal = bundle.meta["calibration"]
    assert cal["method"] == "coverage_temperature+pit_map" and cal["n_rows"] == report["split"]["val"]
    assert bundle.meta["temperature"] == report["temperature"] and cal["temperature_nll"] > 0
    assert cal["coverage_fitted"] == pytest.approx([0.6827, 0.95], abs=0.03)  # on the validation split it was fitted on
    enc = bundle.tokenizer.encode({c: sample_table[c].to_numpy()[:200] for c in bundle.input_columns.values()})
    tok, valid = enc.tokens[:, :5], ~enc.missing[:, :5]
    with torch.inference_mode():
        _, lg = bundle.model(torch.from_numpy(tok).long(), torch.from_numpy(valid), [REDSHIFT])
    logits = lg[REDSHIFT].numpy().astype(np.float64)
    edges, centres = bundle.redshift_bins()
    expected = summarize(recalibrate(softmax(logits, bundle.meta["temperature"]), cal["pit_map"]), edges, centres)
    got = bundle.predict(tok, valid)  # predict reads the stored temperature and PIT map
    np.testing.assert_allclose(got["z_phot_u68"], expected["z_phot_u68"], atol=1e-6)
    for other_probs in (softmax(logits, 2 * bundle.meta["temperature"]), softmax(logits, bundle.meta["temperature"])):
        other = summarize(other_probs, edges, centres)  # another temperature; the same one without the map
        assert np.abs(other["z_phot_u95"] - expected["z_phot_u95"]).max() > 1e-3
