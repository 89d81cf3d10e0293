"""A model directory: weights (safetensors) + JSON config + tokenizer state + version string.

``ModelBundle.load(dir)`` is what every stage calls once in its ``__init__``; ``predict``
runs a batch of tokens through the model on the chosen device and precision.

A model with multi-token modalities (``ModelConfig.token_modalities``) also keeps each one's
tokenizer in ``tokenizers/<modality>/`` (its own save/load; the class comes from the modality
registry, ``engine.modalities.registry``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.errors import ConfigError, ModelError
from engine.model.config import ModelConfig
from engine.model import generate as _generate
from engine.model.redshift import REDSHIFT, redshift_summary
from engine.model.transformer import MultimodalTransformer
from engine.tokenizers.scalar import ScalarTokenizer
from engine.model.files import (CONFIG, catalogue_columns, FORMAT_VERSION, TOKEN_TOKENIZERS, TOKENIZER, WEIGHTS, load_token_tokenizers,
                                read_config)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device_dtype(precision: str, use_gpu: bool) -> tuple[torch.device, torch.dtype | None]:
    """Device and autocast dtype (None = plain fp32) for a precision name."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {PRECISIONS}")
    gpu = use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if precision == "auto":
        if not gpu:
            return device, None
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return device, None
    if precision == "fp16" and not gpu:
        raise ConfigError("--precision fp16 needs a GPU (autocast fp16 on CPU is slow and lossy); use bf16 or fp32 on CPU")
    return device, torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class ModelBundle:
    model: MultimodalTransformer
    tokenizer: ScalarTokenizer
    meta: dict  # model_id, version, inputs {modality: column}, temperature, training info
    token_tokenizers: dict = field(default_factory=dict)  # multi-token modality -> its fitted tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def input_columns(self) -> dict[str, str]:
        """Catalogue modality -> column: what a job reads, in flag-bit order (colours are formed from these)."""
        return catalogue_columns(self.config, self.meta)

    @property
    def embedding_dim(self) -> int:
        return self.config.dim

    @property
    def model_id(self) -> str:
        return f"{self.meta['model_id']}@{self.meta['version']}"

    def redshift_bins(self) -> tuple[np.ndarray, np.ndarray]:
        col = self.meta["target_columns"][REDSHIFT]
        return self.tokenizer.edges[col], self.tokenizer.centres[col]

    # ---- inference -----------------------------------------------------------------------
    def to(self, device: torch.device) -> "ModelBundle":
        self.model.to(device).eval()
        return self

    @torch.inference_mode()
    def predict(self, tokens: np.ndarray, valid: np.ndarray, autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
        """(B, T) tokens + validity -> embedding (B, D) float32 and the z_phot_* columns.

        Rows with no valid input get NaN embeddings and NaN redshifts (their flags say why).
        """
        device = next(self.model.parameters()).device
        tok = torch.tensor(tokens, dtype=torch.long, device=device)
        val = torch.tensor(valid, dtype=torch.bool, device=device)
        ctx = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            emb, logits = self.model(tok, val, [REDSHIFT])
        emb = emb.float().cpu().numpy()
        out = {"embedding": emb, **redshift_summary(logits[REDSHIFT].float().cpu().numpy().astype(np.float64),
                                                    self.meta.get("temperature", 1.0), self.meta.get("calibration"),
                                                    *self.redshift_bins())}
        empty = ~np.asarray(valid).any(axis=1)
        if empty.any():
            for v in out.values():
                v[empty] = np.nan
        return out

    # ---- AION-style API (engine.model.generate) -------------------------------------------
    @property
    def supported_targets(self) -> tuple[str, ...]:
        return _generate.supported_targets(self)

    def tokenize(self, modalities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _generate.tokenize(self, modalities)

    def encode(self, tokens: dict[str, np.ndarray], per_token: bool = False):
        return _generate.encode(self, tokens, per_token)

    def generate(self, inputs: dict[str, np.ndarray], targets: list[str], **kwargs) -> dict[str, dict[str, np.ndarray]]:
        """See engine.model.generate.generate (num_generations, temperature, top_k, top_p, seed, ...)."""
        return _generate.generate(self, inputs, targets, **kwargs)

    # ---- persistence ---------------------------------------------------------------------
    def save(self, model_dir: str | Path, extra: dict | None = None) -> Path:
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(d / WEIGHTS))
        digest = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()[:12]
        self.meta = {**self.meta, **(extra or {}), "version": f"{engine.__version__}+{digest}"}
        config = {"format_version": FORMAT_VERSION, "model": self.config.to_dict(), **self.meta}
        (d / CONFIG).write_text(json.dumps(config, indent=2))
        self.tokenizer.save(d / TOKENIZER)
        for name, tok in self.token_tokenizers.items():
            tok.save(d / TOKEN_TOKENIZERS / name)
        return d

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelBundle":
        d = Path(model_dir)
        cfg, meta = read_config(d, (WEIGHTS, CONFIG, TOKENIZER))
        model = MultimodalTransformer(cfg)
        try:
            model.load_state_dict(load_file(str(d / WEIGHTS)))
        except RuntimeError as exc:
            raise ModelError(f"{d / WEIGHTS} does not match the architecture in {d / CONFIG}: {exc}") from exc
        return cls(model=model.eval(), tokenizer=ScalarTokenizer.load(d / TOKENIZER), meta=meta,
                   token_tokenizers=load_token_tokenizers(d, cfg))


def load_bundle(model_dir: str | Path):
    """A model directory, or ``"noop"``: the shipped tokenizer with a model that does nothing."""
    from engine.model.noop import NOOP, load_noop

    return load_noop() if str(model_dir) == NOOP else ModelBundle.load(model_dir)
