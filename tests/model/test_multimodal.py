"""Multi-token modalities: config, masking, ROAR decoding, training on real MILES stars, bundles."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.errors import ConfigError
from engine.model.bundle import ModelBundle
from engine.model.config import ModelConfig
from engine.model.generate import n_masked_after, roar_decode
from engine.model.train_multimodal import (
    MILES_SCALARS, MultimodalTrainConfig, build_bundle, fit_steps, read_miles_dataset, subset, token_data,
)
from engine.model.transformer import MultimodalTransformer
from engine.sample import DATA_DIR, holdout_mask

SPEC = "tok_spec_miles"
TINY = MultimodalTrainConfig(steps=300, batch_size=32, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                             n_bins=32, dropout=0.0, lr=3e-3,
                             tokenizer={"patch_length": 128, "codebook_size": 64, "n_stages": 1, "n_scale_bins": 32})


@pytest.fixture(scope="module")
def miles():
    spectra, params = read_miles_dataset()
    hold = holdout_mask(spectra.object_id, TINY.holdout_fraction)
    return spectra, params, np.flatnonzero(~hold), np.flatnonzero(hold)


@pytest.fixture(scope="module")
def tiny(miles):
    """A tiny model trained 300 steps on the MILES training stars."""
    torch.set_num_threads(1)
    spectra, params, tr, _ = miles
    bundle = build_bundle(params.take(pa.array(tr)), subset(spectra, tr), TINY)
    data = token_data(bundle, {**{m: params[m].to_numpy()[tr] for m in MILES_SCALARS}, SPEC: subset(spectra, tr)})
    fit_steps(bundle.model, data, TINY)
    return bundle


def _random_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(("a", "b"), ("a", "b"), n_bins=16, dim=16, encoder_depth=2, decoder_depth=2, num_heads=2,
                      token_modalities=(("spec", 10, 40),))
    m = MultimodalTransformer(cfg)
    m.tok_emb.bin_values.normal_()
    return m.eval()


# ---- config ------------------------------------------------------------------------------
def test_config_validates_token_modalities_and_round_trips():
    base = dict(input_modalities=("a",), target_modalities=("a",))
    with pytest.raises(ConfigError, match=r"entry \('spec', 10\); expected \(name, n_tokens, vocab_size\)"):
        ModelConfig(**base, token_modalities=(("spec", 10),))
    with pytest.raises(ConfigError, match="'a' is repeated or also a scalar stream"):
        ModelConfig(**base, token_modalities=(("a", 10, 40),))
    with pytest.raises(ConfigError, match="'s' is repeated"):
        ModelConfig(**base, token_modalities=(("s", 10, 40), ("s", 3, 5)))
    with pytest.raises(ConfigError, match="n_tokens=0, vocab_size=40; expected n_tokens >= 1"):
        ModelConfig(**base, token_modalities=(("s", 0, 40),))
    cfg = ModelConfig(**base, token_modalities=(("s", 10, 40), ("t", 3, 5)))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.all_targets == ("a", "s", "t") and cfg.token_sizes == {"s": (10, 40), "t": (3, 5)}
    assert "token_modalities" not in ModelConfig(**base).to_dict()  # scalar configs serialise as before


# ---- the shipped scalar model is untouched -------------------------------------------------
def test_default_model_parameters_and_outputs_unchanged(model_dir, sample_table):
    b = ModelBundle.load(model_dir)
    assert not any("token_mods" in k for k in b.model.state_dict())
    inputs = {m: sample_table[c].to_numpy()[:4] for m, c in b.input_columns.items()}
    # values computed when the default model was retrained with colour inputs (r + 4 colours, 15 epochs, PIT map);
    # the model file is the one committed with them, so any change in the code path that reads it shows here
    np.testing.assert_allclose(b.encode(b.tokenize(inputs))[:, :3], [[0.5823332071304321, -0.5281934142112732, 0.9006967544555664],
                               [0.7305218577384949, -1.0106052160263062, -0.0601184144616127],
                               [0.758863091468811, -0.3965131938457489, 1.0294405221939087],
                               [0.7822208404541016, -0.7763214707374573, 0.49989065527915955]], rtol=1e-6)
    out = b.generate(inputs, ["redshift", "colour_ug"], seed=0, num_generations=2)
    np.testing.assert_allclose(out["redshift"]["z_phot_median"],
                               [0.11153480410575867, 0.11851417273283005, 0.10440369695425034, 0.10856224596500397], rtol=1e-6)
    np.testing.assert_allclose(out["colour_ug"]["samples"][:2], [[1.7100970795898418, 1.299415011230471],
                                                                 [1.5453429199218736, 1.1741646757812507]])


# ---- masking -------------------------------------------------------------------------------
def test_masked_tokens_do_not_influence_encoding_or_decoding():
    m = _random_model()
    g = torch.Generator().manual_seed(0)
    tok, valid = torch.randint(0, 16, (5, 2), generator=g), torch.ones(5, 2, dtype=torch.bool)
    spec = torch.randint(0, 40, (5, 10), generator=g)
    sv = torch.rand(5, 10, generator=g) < 0.6
    sv[4] = False  # a row whose spectrum is entirely missing
    other = torch.where(sv, spec, (spec + 13) % 40)  # different values at every masked position
    with torch.inference_mode():
        s1 = m.encode_tokens(tok, valid, {"spec": (spec, sv)})
        s2 = m.encode_tokens(tok, valid, {"spec": (other, sv)})
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        s_absent = m.encode_tokens(tok[4:], valid[4:])  # absent modality = all its tokens masked
        torch.testing.assert_close(s_absent, s1[4:], rtol=1e-5, atol=1e-5)
        v = m.input_valid(valid, {"spec": (spec, sv)})
        known = torch.zeros(5, 10, dtype=torch.bool)
        known[:, :3] = True
        d1 = m.decode_tokens(s1, v, "spec", spec, known)
        d2 = m.decode_tokens(s1, v, "spec", torch.where(known, spec, 0), known)  # unknown target values ignored
        torch.testing.assert_close(d1, d2, rtol=0, atol=0)
        d3 = m.decode_tokens(s1, v, "spec", (spec + 1) % 40, known)
        assert not torch.allclose(d1, d3)  # known decoder inputs do matter
        # and a visible spectrum token changes the encoding
        assert not torch.allclose(s1, m.encode_tokens(tok, valid, {"spec": ((spec + 1) % 40, sv)}))


# ---- ROAR ----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 12, 30])
def test_roar_commits_every_token_and_never_changes_committed_ones(steps):
    N, V, B = 12, 7, 5
    g = torch.Generator().manual_seed(steps)
    calls = []

    def logits_fn(tok, known):
        calls.append(known.sum(dim=1).clone())
        return torch.randn(B, N, V, generator=g) * 3

    history = []
    out = roar_decode(logits_fn, B, N, steps, generator=torch.Generator().manual_seed(0), banned=[6], history=history)
    assert history[-1][1].all() and torch.equal(history[-1][0], out)
    assert not (out == 6).any()  # banned ("missing") ids are never produced
    for (t0, k0), (t1, k1) in zip(history, history[1:]):
        assert (k1 | ~k0).all() and torch.equal(t1[k0], t0[k0])  # committed tokens stay, with their values
    # the cosine schedule: after the pass of step s, n_masked_after(s) tokens are still unknown
    committed = [int(k[0].sum()) for _, k in history]
    expected = [N - n_masked_after(s, steps, N) for s in range(steps)]
    assert committed == sorted(set(expected) - {0}) and len(calls) == len(history) <= min(steps, N)
    assert torch.equal(calls[0], torch.zeros(B, dtype=torch.long))  # first pass: everything masked


def test_generate_spectrum_runs_encoder_once_and_decoder_once_per_step(tiny, miles):
    spectra, params, _, ho = miles
    rows = ho[:10]
    enc, dec = [], []
    h1 = tiny.model.enc_norm.register_forward_hook(lambda *_: enc.append(1))
    h2 = tiny.model.dec_norm.register_forward_hook(lambda *_: dec.append(1))
    try:
        out = tiny.generate({m: params[m].to_numpy()[rows] for m in MILES_SCALARS}, [SPEC, "teff"], steps=5,
                            num_generations=2, seed=0)
    finally:
        h1.remove(), h2.remove()
    n_tokens = tiny.config.token_sizes[SPEC][0]
    assert len(enc) == 1 and len(dec) == 5 + 1  # 5 ROAR passes for the spectrum, 1 pass for teff
    assert out[SPEC]["tokens"].shape == (10, 2, n_tokens)
    tok = tiny.token_tokenizers[SPEC]
    np.testing.assert_array_equal(out[SPEC]["flux"], tok.decode(out[SPEC]["tokens"].reshape(20, -1)).reshape(10, 2, -1))
    assert np.isfinite(out[SPEC]["flux"]).all() and np.isfinite(out["teff"]["median"]).all()


def test_unknown_target_lists_supported_targets(tiny, miles):
    spectra, _, _, ho = miles
    with pytest.raises(ValueError, match=r"unsupported target\(s\) \['redshift'\]; supported targets: "
                                         r"\['teff', 'logg', 'feh', 'tok_spec_miles'\]"):
        tiny.generate({SPEC: subset(spectra, ho[:3])}, ["redshift"])


# ---- training on real MILES stars ----------------------------------------------------------
def test_tiny_model_predicts_held_out_teff_from_spectra(tiny, miles):
    spectra, params, tr, ho = miles
    out = tiny.generate({SPEC: subset(spectra, ho)}, list(MILES_SCALARS), seed=0)
    teff = params["teff"].to_numpy()
    ok = np.isfinite(teff[ho])
    err_model = np.median(np.abs(out["teff"]["median"][ok] - teff[ho][ok]))
    err_median = np.median(np.abs(np.nanmedian(teff[tr]) - teff[ho][ok]))
    assert err_model < 0.6 * err_median, (err_model, err_median)


def test_bundle_round_trip_gives_identical_outputs(tiny, miles, tmp_path):
    spectra, params, _, ho = miles
    tiny.save(tmp_path / "m")
    again = ModelBundle.load(tmp_path / "m")
    inputs = {"teff": params["teff"].to_numpy()[ho[:6]], SPEC: subset(spectra, ho[:6])}
    a = tiny.generate(inputs, ["logg", SPEC], steps=3, seed=1)
    b = again.generate(inputs, ["logg", SPEC], steps=3, seed=1)
    np.testing.assert_array_equal(a["logg"]["samples"], b["logg"]["samples"])
    np.testing.assert_array_equal(a[SPEC]["tokens"], b[SPEC]["tokens"])
    np.testing.assert_array_equal(tiny.encode(tiny.tokenize(inputs)), again.encode(again.tokenize(inputs)))


def test_shipped_miles_model_beats_the_training_median_on_held_out_stars(miles):
    bundle = ModelBundle.load(DATA_DIR / "miles_model")
    spectra, params, tr, ho = miles
    out = bundle.generate({SPEC: subset(spectra, ho)}, list(MILES_SCALARS), seed=0)
    for m, ratio in (("teff", 0.3), ("logg", 0.5), ("feh", 0.7)):
        v = params[m].to_numpy()
        ok = np.isfinite(v[ho])
        err = np.median(np.abs(out[m]["median"][ok] - v[ho][ok]))
        assert err < ratio * np.median(np.abs(np.nanmedian(v[tr]) - v[ho][ok])), m
