"""AION-1 style inference API over a model bundle: ``tokenize`` -> ``encode`` -> ``generate``.

    bundle = ModelBundle.load(DEFAULT_MODEL_DIR)
    out = bundle.generate({"mag_g": g, "mag_r": r, "mag_i": i, "mag_z": z},  # mag_u absent -> missing token
                          targets=["redshift", "mag_u"], num_generations=8, top_p=0.95, seed=0)
    out["redshift"]["samples"]        # (B, 8) sampled redshifts (bin values)
    out["redshift"]["z_phot_median"]  # (B,) the same p(z) summaries as ModelBundle.predict
    out["mag_u"]["median"]            # (B,) median of the predicted u-magnitude distribution

Multi-token modalities (a spectrum: ``cfg.token_modalities``) are given as their tokenizer's
input (a ``SpectrumBatch``) or as tokens (B, N), and generated with an iterative masked schedule
(MaskGIT / ROAR, ``roar_decode``): each of ``steps`` decoder passes samples every unknown token,
commits the most confident ones (a cosine schedule says how many) and feeds them back as decoder
inputs. A spectrum target returns ``tokens`` (B, G, N) and the decoded ``flux`` (B, G, P) on
``wavelength_aa`` (scale token included).

The encoder runs once per batch and the decoder answers every target from the same encoder
states (one decoder query per target, so a target's answer does not depend on the other targets). To predict a modality from the others, leave it out of ``inputs`` (or pass NaN): a
target that is also given as input is seen by the encoder. Redshift logits are divided by the
bundle's calibrated temperature (and p(z) goes through its PIT map, if it has one) before the
sampling ``temperature`` applies; other targets are not calibrated. Rows with no valid input get NaN outputs. The functions take the bundle as
their first argument; ``ModelBundle`` exposes them as thin methods.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from engine.model.redshift import REDSHIFT, recalibrate, redshift_summary, summarize
from engine.model.files import token_column

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
    return tuple(bundle.config.all_targets)


def _missing_ids(tokenizer) -> list[int]:
    """Token ids that mean "missing" for a multi-token tokenizer (a spectrum also has a missing scale token)."""
    return [tokenizer.missing_token] + ([tokenizer.scale_missing_token] if hasattr(tokenizer, "scale_missing_token") else [])


def _tokenize_multi(bundle: "ModelBundle", name: str, value) -> np.ndarray:
    """A token modality's input -> tokens (B, N) int64: already tokens (int array), else its tokenizer's input."""
    n_tokens = bundle.config.token_sizes[name][0]
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        tok = value
    else:
        enc = bundle.token_tokenizers[name].encode(value)  # spectra: an encoding with .tokens; images: the tokens
        tok = getattr(enc, "tokens", enc)
    if tok.ndim != 2 or tok.shape[1] != n_tokens:
        raise ValueError(f"{name}: expected tokens of shape (B, {n_tokens}), got {tok.shape}")
    return tok.astype(np.int64)


def tokenize(bundle: "ModelBundle", modalities: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{input modality: values (B,)} -> {every scalar input: tokens (B,) int64, given token modalities: (B, N)}.

    Scalars are the model's inputs or its catalogue inputs (``bundle.input_columns``): colour inputs are formed
    from the magnitudes given (or given directly). Absent modalities, NaN, +-inf and sentinel values (99, -99, ...)
    become the missing token.
    A token modality (e.g. ``tok_spec_miles``) takes its tokenizer's input (a ``SpectrumBatch``) or tokens (B, N).
    """
    inputs = bundle.config.input_modalities
    readable = list(dict.fromkeys([*bundle.input_columns, *inputs, *bundle.config.token_sizes]))
    unknown = sorted(set(modalities) - set(readable))
    if unknown:
        raise ValueError(f"unknown input modality(ies) {unknown}; this model reads {readable}")
    if not modalities:
        raise ValueError(f"no input given; pass values for some of {readable}")
    multi = {m: _tokenize_multi(bundle, m, v) for m, v in modalities.items() if m in bundle.config.token_sizes}
    scalars = {m: np.atleast_1d(np.asarray(v, np.float64)) for m, v in modalities.items() if m not in multi}
    lengths = {m: len(v) for m, v in {**scalars, **multi}.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"input modalities have different lengths {lengths}; give one value per object for each")
    if not scalars:  # only token modalities given: every scalar stream is missing
        n = next(iter(lengths.values()))
        return {**{m: np.full(n, bundle.tokenizer.missing_token, np.int64) for m in inputs}, **multi}
    enc = bundle.tokenizer.encode({token_column(bundle.meta, m): v for m, v in scalars.items()})
    cols = list(bundle.tokenizer.config.columns)
    return {**{m: enc.tokens[:, cols.index(token_column(bundle.meta, m))].astype(np.int64) for m in inputs}, **multi}


def stack_tokens(bundle: "ModelBundle", tokens: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """{modality: (B,) tokens} -> scalar tokens (B, T) int64 in the model's input order, valid (B, T) bool.

    Token modalities in ``tokens`` are skipped here (``stack_multi`` stacks them)."""
    inputs = bundle.config.input_modalities
    readable = list(inputs) + list(bundle.config.token_sizes)
    unknown = sorted(set(tokens) - set(readable))
    if unknown or not tokens:
        raise ValueError(f"tokens for {sorted(tokens)}; expected a non-empty subset of {readable}")
    n = len(next(iter(tokens.values())))
    missing = bundle.tokenizer.missing_token
    tok = np.stack([np.asarray(tokens.get(m, np.full(n, missing)), np.int64) for m in inputs], axis=1)
    return tok, tok != missing


def stack_multi(bundle: "ModelBundle", tokens: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{modality: tokens} -> {given token modality: (tokens (B, N) int64, valid (B, N) bool)}; missing tokens invalid."""
    return {m: (np.asarray(t, np.int64), ~np.isin(t, _missing_ids(bundle.token_tokenizers[m])))
            for m, t in tokens.items() if m in bundle.config.token_sizes}


def _to_torch(multi: Mapping[str, tuple[np.ndarray, np.ndarray]], rows: slice, device) -> dict:
    return {m: (torch.as_tensor(t[rows], dtype=torch.long, device=device), torch.as_tensor(v[rows], dtype=torch.bool, device=device))
            for m, (t, v) in multi.items()}


@torch.inference_mode()
def encode(
    bundle: "ModelBundle", tokens: Mapping[str, np.ndarray], per_token: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Tokens -> pooled embedding (B, D) float32, and the per-token states (B, T, D) if ``per_token``.

    Equal to ``ModelBundle.predict(...)["embedding"]`` for the same tokens; rows with no valid input give NaN.
    """
    tok_np, valid_np = stack_tokens(bundle, tokens)
    multi_np = stack_multi(bundle, tokens)
    device = next(bundle.model.parameters()).device
    tok, valid = torch.from_numpy(tok_np).to(device), torch.from_numpy(valid_np).to(device)
    multi = _to_torch(multi_np, slice(None), device)
    states = bundle.model.encode_tokens(tok, valid, multi)  # (B, L, D)
    valid = bundle.model.input_valid(valid, multi)  # (B, L)
    pooled = bundle.model.pool(states, valid).float().cpu().numpy()  # (B, D)
    pooled[~valid.cpu().numpy().any(axis=1)] = np.nan
    return (pooled, states.float().cpu().numpy()) if per_token else pooled


@torch.inference_mode()
def predict_scalars(
    bundle: "ModelBundle", tokens: np.ndarray, valid: np.ndarray, multi: Mapping[str, tuple[np.ndarray, np.ndarray]],
    targets: Sequence[str], autocast_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """One encoder pass over scalar tokens (B, T) + token modalities (``stack_multi``) -> ``embedding`` (B, D)
    float32 and, per scalar target, the summaries of ``generate`` (no sampling): redshift as ``z_phot_*``,
    others as ``<target>_<summary>`` (``teff_median``, ``teff_std``, ...). Rows with no valid input give NaN."""
    device = next(bundle.model.parameters()).device
    tok = torch.as_tensor(tokens, dtype=torch.long, device=device)
    val = torch.as_tensor(valid, dtype=torch.bool, device=device)
    mb = _to_torch(multi, slice(None), device)
    ctx = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx:
        states = bundle.model.encode_tokens(tok, val, mb)  # (B, L, D)
        val = bundle.model.input_valid(val, mb)  # (B, L)
        out = {"embedding": bundle.model.pool(states, val).float().cpu().numpy()}
        for t in targets:  # one decoder pass per target, as in generate_from_tokens
            lg = bundle.model.decode_logits(states, val, [t])[t].float().cpu().double()  # (B, V)
            column = token_column(bundle.meta, t)
            bins = bundle.tokenizer.edges[column], bundle.tokenizer.centres[column]
            summary = (redshift_summary(lg.numpy(), float(bundle.meta.get("temperature", 1.0)), bundle.meta.get("calibration"), *bins)
                       if t == REDSHIFT else summarize(lg.softmax(dim=1).numpy(), *bins))
            out.update(summary if t == REDSHIFT else {f"{t}_{k.removeprefix('z_phot_')}": v for k, v in summary.items()})
    empty = ~val.cpu().numpy().any(axis=1)
    for v in out.values():
        v[empty] = np.nan
    return out


# ---- iterative masked decoding (MaskGIT / ROAR) -------------------------------------------------
def n_masked_after(step: int, steps: int, n_tokens: int) -> int:
    """Cosine schedule: tokens still masked after 0-based ``step`` of ``steps`` (0 after the last step)."""
    return int(math.floor(n_tokens * math.cos(0.5 * math.pi * (step + 1) / steps)))


def roar_decode(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_rows: int,
    n_tokens: int,
    steps: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    banned: Sequence[int] | torch.Tensor = (),
    history: list | None = None,
) -> torch.Tensor:
    """Decode (n_rows, n_tokens) tokens in ``steps`` passes of ``logits_fn(tokens, known) -> (n_rows, N, V)``.

    Each pass samples every position from the filtered distribution, then commits the unknown
    positions whose sampled token is most probable, as many as the cosine schedule releases;
    committed tokens never change and are fed back as known decoder inputs. ``banned`` token ids
    (the tokenizer's "missing" ids), or a (N, V) bool tensor of ids banned per position, are never
    sampled. ``history`` collects (tokens, known) per pass.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps}; expected a positive integer")
    tokens = torch.zeros(n_rows, n_tokens, dtype=torch.long)
    known = torch.zeros(n_rows, n_tokens, dtype=torch.bool)
    n_known = 0
    for step in range(steps):
        n_commit = n_tokens - n_known - n_masked_after(step, steps, n_tokens)
        if n_commit <= 0:  # more steps than the schedule can use this early
            continue
        logits = logits_fn(tokens, known).float().cpu()  # (b, N, V)
        if isinstance(banned, torch.Tensor):
            logits = logits.masked_fill(banned, float("-inf"))
        elif banned:
            logits[..., list(banned)] = float("-inf")
        probs = filtered_probs(logits.reshape(n_rows * n_tokens, -1), temperature, top_k, top_p)  # (b*N, V)
        draw = torch.multinomial(probs, 1, generator=generator)  # (b*N, 1)
        conf = probs.gather(1, draw).view(n_rows, n_tokens).masked_fill(known, -1.0)  # (b, N)
        pick = conf.topk(n_commit, dim=1).indices  # (b, n_commit) among the unknown positions
        tokens.scatter_(1, pick, draw.view(n_rows, n_tokens).gather(1, pick))
        known.scatter_(1, pick, True)
        n_known += n_commit
        if history is not None:
            history.append((tokens.clone(), known.clone()))
    return tokens


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
    steps: int = 8,
) -> dict[str, dict[str, np.ndarray]]:
    """{input modality: values (B,)} -> {target: {"samples": (B, G) decoded values, summaries (B,)}}.

    Summaries: for "redshift" the eight ``z_phot_*`` columns of ``ModelBundle.predict``; for
    other scalar targets ``mean, median, mode, std, l68, u68, l95, u95`` of the predicted distribution.
    With ``return_probs`` each scalar target also carries ``probs`` (B, V) and ``edges`` (V+1,).
    A multi-token target gives ``tokens`` (B, G, N) decoded in ``steps`` ROAR passes and, for a
    spectrum, ``flux`` (B, G, P) and ``wavelength_aa`` (P,).
    """
    targets = check_targets(bundle, targets)
    tokens = tokenize(bundle, inputs)
    tok, valid = stack_tokens(bundle, tokens)
    return generate_from_tokens(bundle, tok, valid, targets, num_generations, temperature, top_k, top_p, seed,
                                batch_size, return_probs, multi=stack_multi(bundle, tokens), steps=steps)


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
    multi: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    steps: int = 8,
) -> dict[str, dict[str, np.ndarray]]:
    """``generate`` on already stacked tokens (B, T) and validity (B, T), plus token modalities
    ``multi`` = {name: (tokens (B, N), valid (B, N))} (``stack_multi``)."""
    targets = check_targets(bundle, targets)
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}; expected >= 1")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = bundle.model
    device = next(model.parameters()).device
    calibrated = {t: float(bundle.meta.get("temperature", 1.0)) if t == REDSHIFT else 1.0 for t in targets}
    pit_map = bundle.meta.get("calibration", {}).get("pit_map")
    multi = dict(multi or {})
    parts: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in targets}
    empty = ~np.asarray(valid).any(axis=1)
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, start + batch_size)
        tok = torch.as_tensor(tokens[rows], dtype=torch.long, device=device)
        val = torch.as_tensor(valid[rows], dtype=torch.bool, device=device)
        mb = _to_torch(multi, rows, device)
        states = model.encode_tokens(tok, val, mb)  # (b, L, D): once per batch, reused for every target and step
        val = model.input_valid(val, mb)  # (b, L)
        for t in targets:
            if t in bundle.config.token_sizes:
                parts[t].append({"tokens": _roar_target(bundle, states, val, t, num_generations, temperature,
                                                        top_k, top_p, gen, steps)})
                continue
            # One decoder pass per target: decoder queries attend to each other, so decoding targets
            # together would make each answer depend on which others were asked (predict asks redshift alone).
            lg = model.decode_logits(states, val, [t])[t].float().cpu().double() / calibrated[t]  # (b, V), as in ModelBundle.predict
            probs = lg.softmax(dim=1).numpy()  # (b, V) the calibrated p, before sampling filters
            if t == REDSHIFT and pit_map:  # sample from the recalibrated p(z): its log as logits
                probs = recalibrate(probs, pit_map)
                lg = torch.from_numpy(np.log(np.maximum(probs, 1e-300)))
            idx = sample_with_temperature(lg, temperature, top_k, top_p, num_generations, gen)  # (b, G)
            parts[t].append({"idx": idx.numpy(), "probs": probs})
    for m, (_, v) in multi.items():
        empty &= ~np.asarray(v).any(axis=1)
    out = {}
    for t in targets:
        if t in bundle.config.token_sizes:
            out[t] = _decoded(bundle, t, np.concatenate([p["tokens"] for p in parts[t]]), empty)
            continue
        column = token_column(bundle.meta, t)
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


def _roar_target(bundle: "ModelBundle", states: torch.Tensor, valid: torch.Tensor, target: str, num_generations: int,
                 temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator | None,
                 steps: int, chunk_rows: int = 128) -> np.ndarray:
    """ROAR-decode ``num_generations`` samples of a token target from fixed encoder states: (b, G, N) int64."""
    n_tokens = bundle.config.token_sizes[target][0]
    tokenizer = bundle.token_tokenizers[target]
    allowed = getattr(tokenizer, "allowed_tokens", None)  # images: a scale id first, content ids after
    banned = torch.from_numpy(~allowed()) if allowed else _missing_ids(tokenizer)
    states_g = states.repeat_interleave(num_generations, dim=0)  # (b*G, L, D): no new encoder pass
    valid_g = valid.repeat_interleave(num_generations, dim=0)  # (b*G, L)
    out = []
    for s in range(0, len(states_g), chunk_rows):  # bounds the (rows, N, V) logits in memory
        st, va = states_g[s : s + chunk_rows], valid_g[s : s + chunk_rows]

        def logits_fn(tok: torch.Tensor, known: torch.Tensor, st=st, va=va) -> torch.Tensor:
            return bundle.model.decode_tokens(st, va, target, tok.to(st.device), known.to(st.device))

        out.append(roar_decode(logits_fn, len(st), n_tokens, steps, temperature, top_k, top_p, gen, banned).numpy())
    return np.concatenate(out).reshape(len(states), num_generations, n_tokens)


def _decoded(bundle: "ModelBundle", target: str, tokens: np.ndarray, empty: np.ndarray) -> dict[str, np.ndarray]:
    """(B, G, N) tokens -> {"tokens"} plus, for a spectrum, {"flux" (B, G, P), "wavelength_aa" (P,)}, for an
    image {"flux" (B, G, C, S, S) in the survey's native unit, "pixel_scale_arcsec"}; NaN for empty rows."""
    from engine.modalities.registry import entry

    tokenizer = bundle.token_tokenizers[target]
    B, G, N = tokens.shape
    if entry(target).kind == "image":
        flux = tokenizer.decode(tokens.reshape(B * G, N), entry(target).survey)
        flux = flux.reshape(B, G, *flux.shape[1:])
        flux[empty] = np.nan
        return {"tokens": tokens, "flux": flux, "pixel_scale_arcsec": tokenizer.config.pixel_scale_arcsec}
    decoded = tokenizer.decode(tokens.reshape(B * G, N)).reshape(B, G, -1)
    decoded[empty] = np.nan
    if hasattr(tokenizer, "latent_wavelength_aa"):
        return {"tokens": tokens, "flux": decoded, "wavelength_aa": tokenizer.latent_wavelength_aa}
    return {"tokens": tokens, "decoded": decoded}
