import math

import pytest
import torch

from engine.errors import ConfigError
from engine.tokenizers.quantizers import FSQ, LFQ


def test_fsq_indices_and_codes_are_a_bijection_over_the_whole_codebook():
    fsq = FSQ((8, 5, 5, 3))
    assert fsq.codebook_size == 600
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    assert len({tuple(c.tolist()) for c in codes}) == 600  # distinct codes
    # every code is a fixed point of the quantizer's rounding grid: per channel exactly L values in [-1, 1]
    for j, L in enumerate(fsq.levels):
        assert len(torch.unique(codes[:, j])) == L and codes[:, j].abs().max() <= 1.0


def test_fsq_forward_uses_every_level_and_indices_match_codes():
    fsq = FSQ((8, 5))
    z = torch.linspace(-6, 6, 2001)[:, None].repeat(1, 2)
    codes, idx = fsq(z)
    assert [len(torch.unique(codes[:, j])) for j in range(2)] == [8, 5]
    assert torch.equal(fsq.indices_to_codes(idx), codes)


def test_fsq_straight_through_gradient_is_the_bound_derivative_not_zero():
    fsq = FSQ((8, 5, 5, 5))
    z = torch.randn(64, 4, requires_grad=True)
    codes, _ = fsq(z)
    codes.sum().backward()
    zz = z.detach().clone().requires_grad_(True)
    (fsq.bound(zz) / (torch.tensor(fsq.levels) // 2)).sum().backward()
    assert torch.allclose(z.grad, zz.grad) and (z.grad > 0).all()


def test_fsq_rejects_bad_levels_and_wrong_channel_count():
    with pytest.raises(ConfigError, match="levels"):
        FSQ((8, 1))
    with pytest.raises(ConfigError, match="expects 2 channels"):
        FSQ((8, 5))(torch.zeros(3, 4))


def test_lfq_codes_are_signs_and_indices_roundtrip():
    lfq = LFQ(dim=6)
    z = torch.randn(500, 6)
    out = lfq(z)
    assert set(out.codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(out.codes, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(lfq.indices_to_codes(out.indices), out.codes)
    assert torch.equal(lfq.codes_to_indices(lfq.indices_to_codes(torch.arange(64))), torch.arange(64))


def test_lfq_straight_through_gradient_is_identity():
    lfq = LFQ(dim=4, entropy_weight=0.0)
    z = torch.randn(10, 4, requires_grad=True)
    (lfq(z).codes * torch.arange(1.0, 5.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(1.0, 5.0).expand(10, 4))


def test_lfq_entropy_term_rewards_confident_spread_and_penalises_collapse():
    d = 4
    lfq = LFQ(dim=d, entropy_weight=1.0)
    all_codes = lfq.indices_to_codes(torch.arange(2**d))
    spread = float(lfq(10.0 * all_codes.repeat(8, 1)).entropy_loss)  # every code, confidently
    collapsed = float(lfq(10.0 * all_codes[:1].repeat(128, 1)).entropy_loss)  # one code only
    undecided = float(lfq(torch.zeros(128, d)).entropy_loss)  # every input on the fence
    assert spread == pytest.approx(-d * math.log(2), abs=1e-3)  # minimum possible value
    assert collapsed == pytest.approx(0.0, abs=1e-3)
    assert undecided == pytest.approx(0.0, abs=1e-3)
    assert float(LFQ(dim=d, entropy_weight=0.1)(10.0 * all_codes).entropy_loss) == pytest.approx(0.1 * spread, rel=1e-4)


def test_lfq_rejects_bad_config():
    with pytest.raises(ConfigError, match="dim=0"):
        LFQ(dim=0)
    with pytest.raises(ConfigError, match="entropy_weight"):
        LFQ(dim=3, entropy_weight=-1.0)
