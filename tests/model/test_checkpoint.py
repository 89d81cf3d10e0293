import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConfigError
from engine.model import checkpoint
from engine.model.train import TrainConfig, train
from engine.sample import SAMPLE_PATH

# ~3.6k training rows / 256 = 15 steps per epoch; every random stream in play (noise, input hiding, dropout)
TINY = TrainConfig(epochs=2, batch_size=256, dim=16, encoder_depth=1, decoder_depth=1, num_heads=2, n_bins=64,
                   noise_augment=True, input_drop_prob=0.25, model={"dropout": 0.1}, checkpoint_every_steps=5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, train([str(SAMPLE_PATH)], TINY, str(out))


def test_resume_mid_epoch_gives_identical_weights_and_metrics(uninterrupted, tmp_path):
    straight_dir, straight = uninterrupted
    stopped = train([str(SAMPLE_PATH)], TINY, str(tmp_path), max_steps=22)  # epoch 1, 7 batches in
    assert stopped["stopped_at_step"] == 22 and stopped["epoch"] == 1 and stopped["cursor"] == 7 * 256
    assert not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000020", "step-00000022"]
    meta = json.loads((tmp_path / "checkpoints" / "step-00000022" / "checkpoint.json").read_text())
    assert meta["format_version"] == 1 and meta["cursor"] == 1792 and meta["train_config"]["epochs"] == 2

    resumed = train([str(SAMPLE_PATH)], TINY, str(tmp_path), resume=True)
    assert resumed["steps"] == straight["steps"] == 30
    a, b = load_file(str(straight_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["holdout"] == straight["holdout"] and resumed["temperature"] == straight["temperature"]


def test_resume_from_an_older_checkpoint_replays_the_same_batches(uninterrupted, tmp_path):
    straight_dir, _ = uninterrupted
    train([str(SAMPLE_PATH)], TINY, str(tmp_path), max_steps=12)  # checkpoints at 10 and 12
    (tmp_path / "checkpoints" / "step-00000012" / "checkpoint.json").unlink()  # a checkpoint cut short
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-00000010"
    train([str(SAMPLE_PATH)], TINY, str(tmp_path), resume=True)
    a, b = load_file(str(straight_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    train([str(SAMPLE_PATH)], TINY, str(tmp_path), max_steps=3)
    with pytest.raises(ConfigError, match=r"TrainConfig differs in \['lr'\]"):
        train([str(SAMPLE_PATH)], replace(TINY, lr=1e-3), str(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="checkpoint_every_steps=-1"):
        replace(TINY, checkpoint_every_steps=-1)


def test_checkpoint_holds_no_pickle(tmp_path):
    train([str(SAMPLE_PATH)], TINY, str(tmp_path), max_steps=5)
    d = tmp_path / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.json", "model.safetensors", "state.safetensors",
                                                    "tokenizer.json"]
    state = load_file(str(d / "state.safetensors"))
    assert state["order"].shape == (3590,) and np.array_equal(np.sort(state["order"].numpy()), np.arange(3590))
    assert any(k.endswith(".exp_avg_sq") for k in state)


def test_cli_killed_mid_run_then_resumed_matches_uninterrupted(tmp_path):
    """SIGKILL `jobs/train.py` once a mid-epoch checkpoint exists, rerun it with --resume."""
    args = [sys.executable, "jobs/train.py", "--catalog", str(SAMPLE_PATH), "--out", str(tmp_path / "m"),
            "--epochs", "2", "--batch-size", "256", "--dim", "16", "--encoder-depth", "1", "--decoder-depth", "1",
            "--n-bins", "64", "--checkpoint-every", "4"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "m" / "checkpoints"
    deadline = time.monotonic() + 600
    while checkpoint.latest(ckpts) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed_at = checkpoint.read_meta(checkpoint.latest(ckpts))
    assert killed_at["step"] < 30 and not (tmp_path / "m" / "model.safetensors").exists()
    subprocess.run(args + ["--resume"], cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = TrainConfig(epochs=2, batch_size=256, dim=16, encoder_depth=1, decoder_depth=1, n_bins=64)
    train([str(SAMPLE_PATH)], cfg, str(tmp_path / "straight"))
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
