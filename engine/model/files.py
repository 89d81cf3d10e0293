"""What a model directory holds and how to read its config and tokenizer without torch.

Tokenizer actors and the job's driver-side checks read a model dir through here, so they never
import torch or load weights; ``engine.model.bundle`` adds the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelError
from engine.modalities import catalogue_inputs, is_derived
from engine.model.config import ModelConfig
from engine.tokenizers.scalar import ScalarTokenizer

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TOKEN_TOKENIZERS = "tokenizers"  # subdirectory: one saved tokenizer per multi-token modality


def read_config(d: Path, required: tuple[str, ...]) -> tuple[ModelConfig, dict]:
    """Check a model dir holds ``required`` files; its model config and the rest of config.json."""
    if not d.is_dir():
        raise ModelError(f"model directory {d} does not exist")
    missing = [f for f in required if not (d / f).is_file()]
    if missing:
        raise ModelError(
            f"model directory {d} lacks {missing}; a model dir holds {WEIGHTS}, {CONFIG} and {TOKENIZER} "
            f"(train one with `python jobs/train.py --catalog ... --out {d}`)"
        )
    raw = json.loads((d / CONFIG).read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{d / CONFIG}: format_version={raw.get('format_version')!r}, this engine reads {FORMAT_VERSION}")
    cfg = ModelConfig.from_dict(raw.pop("model"))
    raw.pop("format_version")
    return cfg, raw


def model_config(model_dir: str | Path) -> tuple[ModelConfig, Path]:
    """A model dir's ModelConfig (``"noop"``: the shipped default model's) and the resolved directory."""
    from engine.model.noop import NOOP
    from engine.sample import DEFAULT_MODEL_DIR

    d = DEFAULT_MODEL_DIR if str(model_dir) == NOOP else Path(model_dir)
    return read_config(d, (CONFIG,))[0], d


def catalogue_columns(cfg: ModelConfig, meta: dict) -> dict[str, str]:
    """Catalogue modality -> column for a model: what a job reads, in flag-bit order (``catalogue_inputs``)."""
    return {m: meta["inputs"][m] for m in catalogue_inputs(cfg.input_modalities)}


def token_column(meta: dict, modality: str) -> str:
    """The tokenizer column of a scalar modality: its catalogue column, or a colour's own name."""
    return modality if is_derived(modality) else {**meta["inputs"], **meta.get("target_columns", {})}[modality]


def load_tokenizer(model_dir: str | Path) -> tuple[ScalarTokenizer, dict[str, str]]:
    """A model dir's tokenizer and its catalogue inputs (``catalogue_columns``), without the weights."""
    from engine.model.noop import NOOP
    from engine.sample import DEFAULT_MODEL_DIR

    d = DEFAULT_MODEL_DIR if str(model_dir) == NOOP else Path(model_dir)
    cfg, meta = read_config(d, (CONFIG, TOKENIZER))
    return ScalarTokenizer.load(d / TOKENIZER), catalogue_columns(cfg, meta)


def load_token_tokenizers(d: Path, cfg: ModelConfig) -> dict:
    """Each multi-token modality's tokenizer, by the class the modality registry names for it."""
    from engine.modalities.registry import entry

    out = {}
    for name, (n_tokens, vocab_size) in cfg.token_sizes.items():
        tok = entry(name).tokenizer_class().load(d / TOKEN_TOKENIZERS / name)
        if (tok.config.n_tokens, tok.vocab_size) != (n_tokens, vocab_size):
            raise ModelError(
                f"{d / TOKEN_TOKENIZERS / name}: tokenizer gives {tok.config.n_tokens} tokens over {tok.vocab_size} ids; "
                f"the model in {d / CONFIG} expects {n_tokens} over {vocab_size}"
            )
        out[name] = tok
    return out
