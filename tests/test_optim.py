import pytest
import torch

from engine.optim import one_cycle


def _lrs(make, steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_plain_torch_divides_by_zero_where_one_cycle_does_not():
    torch_sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=20, pct_start=0.05)  # noqa: E731
    with pytest.raises(ZeroDivisionError):
        _lrs(torch_sched, 20)
    lrs = _lrs(lambda opt: one_cycle(opt, 1.0, 20), 20)
    assert max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[0] < 0.1 and lrs[-1] < 1e-3


@pytest.mark.parametrize("steps, pct", [(1, 0.05), (2, 0.05), (7, 0.3), (100, 0.05), (1000, 0.05)])
def test_other_step_counts_get_the_torch_schedule_unchanged(steps, pct):
    ours = _lrs(lambda opt: one_cycle(opt, 1.0, steps, pct), steps)
    ref = _lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=steps, pct_start=pct), steps)
    assert ours == ref
