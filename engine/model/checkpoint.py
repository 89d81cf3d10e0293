"""Resumable training checkpoints: safetensors for every tensor, JSON for the rest, no pickle.

A checkpoint is a directory ``step-00000042/`` under the run's checkpoint root::

    model.safetensors   model weights (state_dict)
    state.safetensors   optimizer tensors ("optim.<param>.<name>"), the epoch's permutation ("order"),
                        torch RNG states ("rng.torch_global", "rng.torch_hide") as uint8
    tokenizer.json      the fitted tokenizer
    checkpoint.json     format_version, TrainConfig, step, epoch, cursor (rows of ``order`` consumed),
                        epoch loss so far, optimizer param groups and scalar state, LR-scheduler
                        state, numpy Generator bit_generator state

It is written to a temporary sibling directory and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never half of one. ``latest(root)`` is the highest complete step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL, STATE, META, TOKENIZER = "model.safetensors", "state.safetensors", "checkpoint.json", "tokenizer.json"
_PREFIX = "step-"


@dataclass
class TrainState:
    """Everything that, with the data and the config, determines the rest of a training run."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator  # epoch permutations and magnitude noise
    gen: torch.Generator  # input hiding
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch in progress (or the next one when cursor == 0)
    cursor: int = 0  # rows of `order` already trained on in this epoch
    order: np.ndarray | None = None  # (n_train,) this epoch's permutation
    epoch_loss: float = 0.0  # summed loss x rows so far this epoch


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalar_state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save(root: str | Path, st: TrainState, train_config: dict, tokenizer, keep: int = 2) -> Path:
    """Write ``root/step-<step>/`` atomically; keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{st.step:08d}"
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in st.model.state_dict().items()}, str(tmp / MODEL))
    opt_tensors, opt_meta = _split_optimizer(st.opt.state_dict())
    order = np.zeros(0, np.int64) if st.order is None else st.order
    save_file({**opt_tensors, "order": torch.from_numpy(np.ascontiguousarray(order, np.int64)),
               "rng.torch_global": torch.get_rng_state(), "rng.torch_hide": st.gen.get_state()}, str(tmp / STATE))
    tokenizer.save(tmp / TOKENIZER)
    meta = {"format_version": FORMAT_VERSION, "train_config": train_config, "step": st.step, "epoch": st.epoch,
            "cursor": st.cursor, "has_order": st.order is not None, "epoch_loss": st.epoch_loss,
            "optimizer": opt_meta, "scheduler": st.sched.state_dict(), "numpy_rng": st.rng.bit_generator.state}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if final.exists():  # the same step again (a resumed run re-saving it): move the old one aside first
        _discard(final)
    os.rename(tmp, final)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        _discard(old)
    log.info("checkpoint %s (epoch %d, cursor %d)", final, st.epoch, st.cursor)
    return final


def _discard(path: Path) -> None:
    """Rename out of the step-* namespace, then delete: a kill mid-delete never leaves a half checkpoint."""
    gone = path.with_name(f".del-{path.name}")
    os.rename(path, gone)
    shutil.rmtree(gone)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / META).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def read_meta(path: str | Path) -> dict:
    meta = json.loads((Path(path) / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}/{META}: format_version={meta.get('format_version')!r}, this engine reads {FORMAT_VERSION}")
    return meta


def restore(path: str | Path, st: TrainState) -> TrainState:
    """Load a checkpoint into freshly built model/optimizer/scheduler/generators (in place)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        st.model.load_state_dict(load_file(str(path / MODEL)))
    except RuntimeError as exc:
        raise ModelError(f"{path / MODEL} does not match the model built from the config: {exc}") from exc
    tensors = load_file(str(path / STATE))
    st.opt.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    st.sched.load_state_dict(meta["scheduler"])
    st.rng.bit_generator.state = meta["numpy_rng"]
    torch.set_rng_state(tensors["rng.torch_global"])
    st.gen.set_state(tensors["rng.torch_hide"])
    st.step, st.epoch, st.cursor, st.epoch_loss = meta["step"], meta["epoch"], meta["cursor"], meta["epoch_loss"]
    st.order = tensors["order"].numpy().copy() if meta["has_order"] else None
    return st
