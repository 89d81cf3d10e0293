"""The no-op model: the default tokenizer and a 64-d embedding that costs nothing.

Used to measure the engine's own overhead (read, tokenize, move, write, check, commit)
apart from the model: ``--model noop``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.model.config import ModelConfig
from engine.model.files import catalogue_columns
from engine.modalities import Z_PHOT_COLUMNS
from engine.tokenizers.scalar import ScalarTokenizer

NOOP = "noop"
NOOP_DIM = 64


@dataclass
class NoOpBundle:
    tokenizer: ScalarTokenizer
    config: ModelConfig
    meta: dict

    @property
    def input_columns(self) -> dict[str, str]:
        """Catalogue modality -> column: what a job reads, in flag-bit order (colours are formed from these)."""
        return catalogue_columns(self.config, self.meta)

    @property
    def embedding_dim(self) -> int:
        return NOOP_DIM

    @property
    def model_id(self) -> str:
        return f"{NOOP}@{self.meta['version']}"

    def to(self, device) -> "NoOpBundle":
        return self

    def predict(self, tokens: np.ndarray, valid: np.ndarray, autocast_dtype=None) -> dict[str, np.ndarray]:
        emb = np.zeros((len(tokens), NOOP_DIM), dtype=np.float32)
        emb[:, : tokens.shape[1]] = tokens  # the tokens themselves: distinct rows stay distinct
        nan = np.full(len(tokens), np.nan, dtype=np.float32)
        return {"embedding": emb, **{c: nan.copy() for c in Z_PHOT_COLUMNS}}


def load_noop() -> NoOpBundle:
    """The shipped model's tokenizer and config with a model that does nothing (no torch, no weights)."""
    from engine.model.files import CONFIG, TOKENIZER, read_config
    from engine.sample import DEFAULT_MODEL_DIR

    config, meta = read_config(DEFAULT_MODEL_DIR, (CONFIG, TOKENIZER))
    return NoOpBundle(tokenizer=ScalarTokenizer.load(DEFAULT_MODEL_DIR / TOKENIZER), config=config,
                      meta={**meta, "model_id": NOOP})
