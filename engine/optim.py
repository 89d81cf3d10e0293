"""The one learning-rate schedule every trainer here uses, safe for any number of steps."""

from __future__ import annotations

import torch


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, steps: int, pct_start: float = 0.05) -> torch.optim.lr_scheduler.OneCycleLR:
    """``OneCycleLR`` over ``max(steps, 1)`` steps.

    torch divides by zero when the warm-up ends exactly on step 0 (``pct_start * steps == 1``, e.g. 20 steps
    at 5 %); the warm-up then lasts ``1.5`` steps instead. Other step counts get torch's schedule unchanged.
    """
    steps = max(int(steps), 1)
    if float(pct_start * steps) - 1 == 0:
        pct_start = 1.5 / steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=pct_start)
