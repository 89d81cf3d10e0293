"""Export a model bundle for serving: TorchScript ``(tokens, valid) -> (embedding, redshift logits)``.

    python jobs/export.py --model engine/data/default_model --out default_model.pt

    module, meta = load_exported("default_model.pt")
    emb, logits = module(tokens, valid)  # (B, T) int64, (B, T) bool -> (B, D) float32, (B, V) float32

The module is traced (``torch.jit.trace``) with the batch dimension free; rows with no valid input
get a NaN embedding, as in ``ModelBundle.predict``. The logits are raw: ``meta`` (a JSON file inside
the .pt archive) holds the token order (``token_order``: the model's inputs, colours formed by the
tokenizer from the catalogue ``inputs``) and what is needed to turn them into the bundle's p(z)
(``engine.model.redshift.redshift_probs(logits, meta["temperature"], meta["calibration"])``: the
softmax at that temperature, then the PIT map if the calibration has one; summarised over
``meta["redshift_edges"]``), the
record of how that temperature was calibrated and the model id.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.errors import ModelError
from engine.model.bundle import ModelBundle
from engine.model.redshift import REDSHIFT
from engine.model.transformer import MultimodalTransformer

log = logging.getLogger(__name__)

META_FILE = "engine_meta.json"
_TRACE_BATCH = 7  # deliberately odd: the traced graph must not bake in a batch size


class ServingModule(nn.Module):
    """The encoder and the redshift head of a MultimodalTransformer as one traceable forward."""

    def __init__(self, model: MultimodalTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens (B, T) int64, valid (B, T) bool
        states = self.model.encode_tokens(tokens, valid)  # (B, L, D): L = T (+ colour streams)
        enc_valid = self.model.input_valid(valid)  # (B, L)
        emb = self.model.pool(states, enc_valid)  # (B, D)
        emb = torch.where(valid.any(dim=1, keepdim=True), emb, torch.full_like(emb, float("nan")))
        logits = self.model.decode_logits(states, enc_valid, [REDSHIFT])[REDSHIFT]  # (B, V)
        return emb, logits


def _example(bundle: ModelBundle, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    T, V = len(bundle.config.input_modalities), bundle.config.n_bins
    valid = rng.random((batch, T)) < 0.8
    valid[0] = False  # one row with nothing valid
    tokens = np.where(valid, rng.integers(0, V, (batch, T)), V)  # missing token = n_bins
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(valid)


def serving_meta(bundle: ModelBundle) -> dict:
    edges, centres = bundle.redshift_bins()
    return {"model_id": bundle.model_id, "inputs": bundle.input_columns,
            "token_order": list(bundle.config.input_modalities), "embedding_dim": bundle.embedding_dim,
            "missing_token": int(bundle.config.n_bins), "calibration": bundle.meta.get("calibration"),
            "temperature": float(bundle.meta.get("temperature", 1.0)),
            "redshift_edges": edges.tolist(), "redshift_centres": centres.tolist(),
            "outputs": ["embedding (B, D) float32, NaN when no input is valid", "redshift logits (B, V) float32"]}


def export_torchscript(bundle: ModelBundle, out_path: str | Path) -> Path:
    """Trace the bundle's encoder + redshift head on CPU and save it with its serving meta (JSON)."""
    module = ServingModule(bundle.model.cpu().eval()).eval()
    example = _example(bundle, _TRACE_BATCH, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        # Attention unpacks k, v from a dimension of constant size 2; that iteration is safe to trace.
        warnings.filterwarnings("ignore", "Iterating over a tensor", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_inputs=[_example(bundle, 33, seed=1)])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out), _extra_files={META_FILE: json.dumps(serving_meta(bundle))})
    log.info("exported %s to %s", bundle.model_id, out)
    return out


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """An exported file -> (TorchScript module in eval mode, its serving meta)."""
    extra = {META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} is not a TorchScript export of this engine ({exc}); "
                         "write one with `python jobs/export.py --model DIR --out FILE.pt`") from exc
    if not extra[META_FILE]:
        raise ModelError(f"{path} lacks {META_FILE}; it was not written by engine.model.export")
    return module.eval(), json.loads(extra[META_FILE])
