import json
import zipfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.errors import ModelError
from engine.model.bundle import ModelBundle
from engine.model.export import export_torchscript, load_exported
from engine.model.redshift import REDSHIFT, redshift_probs, summarize
from engine.sample import holdout_mask
from jobs.export import main as export_main


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pt"
    export_main(["--model", model_dir, "--out", str(out)])
    return load_exported(out)


def _real_rows(bundle: ModelBundle, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """300 held-out galaxies (not the trace batch size of 7), with inputs knocked out on purpose."""
    rows = table.filter(pa.array(holdout_mask(table["object_id"].to_numpy()))).slice(0, 300)
    mags = {m: rows[c].to_numpy().astype(np.float64).copy() for m, c in bundle.input_columns.items()}
    mags["mag_u"][::3] = np.nan  # u missing for a third
    mags["mag_z"][1::5] = 99.0  # sentinel
    for m in mags:
        mags[m][7] = np.nan  # one galaxy with nothing valid
    tokens = bundle.tokenize(mags)
    tok = np.stack([tokens[m] for m in bundle.config.input_modalities], axis=1)
    return tok, tok != bundle.tokenizer.missing_token


def test_exported_matches_eager_on_real_rows_with_missing_inputs(exported, model_dir, sample_table):
    module, meta = exported
    bundle = ModelBundle.load(model_dir)
    tok, valid = _real_rows(bundle, sample_table)
    assert (~valid).any(axis=1).sum() > 100 and not valid[7].any()
    with torch.inference_mode():
        emb, logits = module(torch.from_numpy(tok), torch.from_numpy(valid))
    assert emb.shape == (300, bundle.embedding_dim) and logits.shape == (300, bundle.config.n_bins)
    eager = bundle.predict(tok, valid)
    with torch.inference_mode():
        _, eager_logits = bundle.model(torch.from_numpy(tok), torch.from_numpy(valid), [REDSHIFT])
    np.testing.assert_array_equal(np.isnan(emb.numpy()).all(axis=1), ~valid.any(axis=1))
    ok = valid.any(axis=1)
    assert np.abs(emb.numpy()[ok] - eager["embedding"][ok]).max() < 1e-5
    assert np.abs(logits.numpy() - eager_logits[REDSHIFT].numpy()).max() < 1e-5
    # the meta inside the file turns the logits into the bundle's calibrated summaries
    edges, centres = np.array(meta["redshift_edges"]), np.array(meta["redshift_centres"])
    probs = redshift_probs(logits.numpy().astype(np.float64), meta["temperature"], meta["calibration"])
    assert meta["calibration"]["pit_map"]  # the default model's p(z) goes through a PIT map: the meta carries it
    s = summarize(probs[ok], edges, centres)
    np.testing.assert_allclose(s["z_phot_median"], eager["z_phot_median"][ok], atol=1e-5)
    np.testing.assert_allclose(s["z_phot_u68"], eager["z_phot_u68"][ok], atol=1e-5)


def test_export_meta_and_errors(exported, model_dir, tmp_path):
    _, meta = exported
    bundle = ModelBundle.load(model_dir)
    assert meta["model_id"] == bundle.model_id and meta["token_order"] == list(bundle.config.input_modalities)
    assert len(meta["redshift_edges"]) == bundle.config.n_bins + 1
    assert meta["temperature"] == bundle.meta["temperature"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a TorchScript export"):
        load_exported(bad)
