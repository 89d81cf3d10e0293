"""AION-1 style inference API over a model bundle: ``tokenize`` -> ``encode`` -> ``generate``.

    bundle = ModelBundle.load(DEFAULT_MODEL_DIR)
    out = bundle.generate({"mag_g": g, "mag_r": r, "mag_i": i, "mag_z": z},  # mag_u absent -> missing token
                          targets=["redshift", "mag_u"], num_generations=8, top_p=0.95, seed=0)
    out["redshift"]["samples"]        # (B, 8) sampled redshifts (bin values)
    out["redshift"]["z_phot_median"]  # (B,) the same p(z) summaries as ModelBundle.predict
    out["mag_u"]["median"]            # (B,) median of the predicted u-magnitude distribution

The encoder runs once per batch and the decoder answers every target from the same encoder
states (one decoder query per target, so a target's answer does not depend on the other targets). To predict a modality from the others, leave it out of ``inputs`` (or pass NaN): a
target that is also given as input is seen by the encoder. Redshift logits are divided by the
bundle's calibrated temperature before the sampling ``temperature`` applies; other targets are
not calibrated. Rows with no valid input get NaN outputs. The functions take the bundle as
their first argument; ``ModelBundle`` exposes them as thin methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from engine.model.redshift import REDSHIFT, summarize

if TYPE_CHECKING:
    from engine.model.bundle import ModelBundle


# ---- sampling ------------------------------------------------------------------------------
def filtered_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p (nucleus) filtering.

    top-k keeps the k most probable bins; top-p keeps the smallest set of most probable bins
    whose total mass is >= top_p (always at least one bin).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}; expected > 0 (top_k=1 gives greedy decoding)")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k={top_k}; expected a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}; expected 0 < top_p <= 1 or None")
    x = logits / temperature  # (B, V)
    if top_k is not None and top_k < x.shape[1]:
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.topk(int(top_k), dim=1).indices, True)
        x = x.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        sorted_x, order = x.sort(dim=1, descending=True)  # (B, V)
        p = sorted_x.softmax(dim=1)
        mass_before = p.cumsum(dim=1) - p  # mass of the more probable bins
        drop_sorted = mass_before >= top_p  # the first bin always has mass_before 0 and stays
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(dim=1)


def sample_with_temperature(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, num_samples) bin indices drawn from the filtered distribution."""
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples, replacement=True, generator=generator)


# ---- tokenize / encode ---------------------------------------------------------------------
def supported_targets(bundle: "ModelBundle") -> tuple[str, ...]:
    return tuple(bundle.config.target_modalities)


def _column(bundle: "ModelBundle", modality: str) -> str:
    return {**bundle.meta["inputs"], **bundle.meta["target_columns"]}[modality]


def tokenize(bundle: "ModelBundle", modalities: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{input modality: values (B,)} -> {every input modality: tokens (B,) int64}.

    Absent modalities, NaN, +-inf and sentinel values (99, -99, ...) become the missing token.
    """
    inputs = bundle.config.input_modalities
    unknown = sorted(set(modalities) - set(inputs))
    if unknown:
        raise ValueError(f"unknown input modality(ies) {unknown}; this model reads {list(inputs)}")
    if not modalities:
        raise ValueError(f"no input given; pass values for some of {list(inputs)}")
    lengths = {m: len(np.atleast_1d(v)) for m, v in modalities.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"input modalities have different lengths {lengths}; give one value per object for each")
    enc = bundle.tokenizer.encode({_column(bundle, m): np.atleast_1d(np.asarray(v, np.float64)) for m, v in modalities.items()})
    cols = list(bundle.tokenizer.config.columns)
    return {m: enc.tokens[:, cols.index(_column(bundle, m))].astype(np.int64) for m in inputs}


def stack_tokens(bundle: "ModelBundle", tokens: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """{modality: (B,) tokens} -> tokens (B, T) int64 in the model's input order, valid (B, T) bool."""
    inputs = bundle.config.input_modalities
    unknown = sorted(set(tokens) - set(inputs))
    if unknown or not tokens:
        raise ValueError(f"tokens for {sorted(tokens)}; expected a non-empty subset of {list(inputs)}")
    n = len(next(iter(tokens.values())))
    missing = bundle.tokenizer.missing_token
    tok = np.stack([np.asarray(tokens.get(m, np.full(n, missing)), np.int64) for m in inputs], axis=1)
    return tok, tok != missing


@torch.inference_mode()
def encode(
    bundle: "ModelBundle", tokens: Mapping[str, np.ndarray], per_token: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Tokens -> pooled embedding (B, D) float32, and the per-token states (B, T, D) if ``per_token``.

    Equal to ``ModelBundle.predict(...)["embedding"]`` for the same tokens; rows with no valid input give NaN.
    """
    tok_np, valid_np = stack_tokens(bundle, tokens)
    device = next(bundle.model.parameters()).device
    tok, valid = torch.from_numpy(tok_np).to(device), torch.from_numpy(valid_np).to(device)
    states = bundle.model.encode_tokens(tok, valid)  # (B, T, D)
    pooled = bundle.model.pool(states, valid).float().cpu().numpy()  # (B, D)
    pooled[~valid_np.any(axis=1)] = np.nan
    return (pooled, states.float().cpu().numpy()) if per_token else pooled


# ---- generate ------------------------------------------------------------------------------
def check_targets(bundle: "ModelBundle", targets: Sequence[str]) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    supported = supported_targets(bundle)
    bad = [t for t in targets if t not in supported]
    if bad or not targets:
        raise ValueError(f"unsupported target(s) {bad or targets}; supported targets: {list(supported)}")
    return targets


def generate(
    bundle: "ModelBundle",
    inputs: Mapping[str, np.ndarray],
    targets: Sequence[str],
    num_generations: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 4096,
    return_probs: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """{input modality: values (B,)} -> {target: {"samples": (B, G) decoded values, summaries (B,)}}.

    Summaries: for "redshift" the eight ``z_phot_*`` columns of ``ModelBundle.predict``; for
    other targets ``mean, median, mode, std, l68, u68, l95, u95`` of the predicted distribution.
    With ``return_probs`` each target also carries ``probs`` (B, V) and ``edges`` (V+1,).
    """
    targets = check_targets(bundle, targets)
    tok, valid = stack_tokens(bundle, tokenize(bundle, inputs))
    return generate_from_tokens(bundle, tok, valid, targets, num_generations, temperature, top_k, top_p, seed,
                                batch_size, return_probs)


@torch.inference_mode()
def generate_from_tokens(
    bundle: "ModelBundle",
    tokens: np.ndarray,
    valid: np.ndarray,
    targets: Sequence[str],
    num_generations: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 4096,
    return_probs: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """``generate`` on already stacked tokens (B, T) and validity (B, T)."""
    targets = check_targets(bundle, targets)
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}; expected >= 1")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = bundle.model
    device = next(model.parameters()).device
    calibrated = {t: float(bundle.meta.get("temperature", 1.0)) if t == REDSHIFT else 1.0 for t in targets}
    parts: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in targets}
    for start in range(0, len(tokens), batch_size):
        tok = torch.as_tensor(tokens[start : start + batch_size], dtype=torch.long, device=device)
        val = torch.as_tensor(valid[start : start + batch_size], dtype=torch.bool, device=device)
        states = model.encode_tokens(tok, val)  # (b, T, D): once per batch, reused for every target
        for t in targets:
            # One decoder pass per target: decoder queries attend to each other, so decoding targets
            # together would make each answer depend on which others were asked (predict asks redshift alone).
            lg = model.decode_logits(states, val, [t])[t].float().cpu().double() / calibrated[t]  # (b, V), as in ModelBundle.predict
            idx = sample_with_temperature(lg, temperature, top_k, top_p, num_generations, gen)  # (b, G)
            probs = lg.softmax(dim=1).numpy()  # (b, V) the calibrated p, before sampling filters
            parts[t].append({"idx": idx.numpy(), "probs": probs})
    empty = ~np.asarray(valid).any(axis=1)
    out = {}
    for t in targets:
        column = _column(bundle, t)
        edges, centres = bundle.tokenizer.edges[column], bundle.tokenizer.centres[column]
        probs = np.concatenate([p["probs"] for p in parts[t]])
        summary = summarize(probs, edges, centres)
        if t != REDSHIFT:
            summary = {k.removeprefix("z_phot_"): v for k, v in summary.items()}
        res = {"samples": centres[np.concatenate([p["idx"] for p in parts[t]])], **summary}
        if return_probs:
            res["probs"] = probs
        for v in res.values():
            v[empty] = np.nan
        if return_probs:
            res["edges"] = edges
        out[t] = res
    return out
