import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.model.config import ModelConfig
from engine.model.transformer import MultimodalTransformer

INPUTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultimodalTransformer(ModelConfig(INPUTS, INPUTS + ("redshift",), n_bins=32, dim=16, encoder_depth=2,
                                          decoder_depth=1, num_heads=2))
    m.tok_emb.bin_values.normal_()
    return m.eval()


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (n, 3), generator=g), torch.ones(n, 3, dtype=torch.bool)


def test_masked_tokens_do_not_change_the_embedding(model):
    tok, valid = _batch()
    valid[:, 1] = False
    other = tok.clone()
    other[:, 1] = (other[:, 1] + 7) % 32  # garbage where the input is missing
    with torch.inference_mode():
        e1, z1 = model(tok, valid, ["redshift"])
        e2, z2 = model(other, valid, ["redshift"])
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(z1["redshift"], z2["redshift"])


def test_pool_averages_valid_tokens_only(model):
    states = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    pooled = model.pool(states, valid)
    torch.testing.assert_close(pooled[0], (states[0, 0] + states[0, 2]) / 2)
    torch.testing.assert_close(pooled[1], torch.zeros(2))


def test_rows_are_independent_of_their_batch(model):
    tok, valid = _batch(7)
    valid[2] = torch.tensor([True, False, False])
    with torch.inference_mode():
        full, zf = model(tok, valid, ["redshift", "a"])
        for i in (0, 2, 6):
            one, zo = model(tok[i : i + 1], valid[i : i + 1], ["redshift", "a"])
            torch.testing.assert_close(one[0], full[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(zo["a"][0], zf["a"][i], atol=1e-5, rtol=1e-5)


def test_all_missing_row_is_finite_and_decoder_targets_are_reused(model):
    tok, valid = _batch(2)
    valid[0] = False
    with torch.inference_mode():
        emb, logits = model(tok, valid, ["redshift", "b"])
    assert torch.isfinite(emb).all() and torch.isfinite(logits["redshift"]).all()
    assert set(logits) == {"redshift", "b"} and logits["b"].shape == (2, 32)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        ModelConfig(INPUTS, INPUTS, dim=10, num_heads=3)
    with pytest.raises(ConfigError, match="input_modalities is empty"):
        ModelConfig((), INPUTS)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['width'\]"):
        ModelConfig.from_dict({"input_modalities": ["a"], "target_modalities": ["a"], "width": 3})
    cfg = ModelConfig(INPUTS, INPUTS + ("redshift",))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.modalities == INPUTS + ("redshift",)
