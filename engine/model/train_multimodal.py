"""Train an any-to-any model over scalar streams and multi-token modalities with the 4M objective.

Every step, each row gets its own masking: each multi-token modality is either an input (a
random subset of its valid tokens is visible to the encoder) or a target (a random subset of
its tokens is revealed to the decoder as known inputs, MaskGIT / ROAR style, and the loss is on
the rest); scalar streams are mostly targets when a multi-token modality is visible and mostly
inputs when none is, so both directions (spectrum -> parameters, parameters -> spectrum) are
trained. Scalar targets use a cross-entropy against a Gaussian-smoothed one-hot over ordered
bins; token targets a plain cross-entropy.

``train_miles`` builds the shipped stellar model: MILES spectra (``tok_spec_miles``) with Teff,
logg and [Fe/H]; stars are held out by a hash of their MILES number (``engine.sample.holdout_mask``)
and every tokenizer is fitted on the training split only. ``engine.model.train_image`` builds the
image model (``tok_image_cfht_i`` + stamp properties) from the same pieces (``assemble_bundle``,
``token_data``, ``fit_steps``).
"""

from __future__ import annotations

import glob
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from engine.errors import CatalogError, ConfigError
from engine.model.bundle import ModelBundle
from engine.model.config import ModelConfig
from engine.model.generate import stack_multi, stack_tokens
from engine.model.transformer import MultimodalTransformer
from engine.modalities import SCALARS_BY_NAME
from engine.modalities.registry import entry
from engine.modalities.spectra import SpectrumBatch, read_miles
from engine.optim import one_cycle
from engine.sample import holdout_mask
from engine.tokenizers.scalar import ScalarTokenizer, ScalarTokenizerConfig

log = logging.getLogger(__name__)

MILES_DIR = Path("/work/shared/data/mangadap/miles")
MILES_SPECTRUM = "tok_spec_miles"
MILES_SCALARS = ("teff", "logg", "feh")
# 64-pixel patches x 2 residual stages of 256 codes: 129 tokens over 770 ids; on held-out MILES stars
# the tokenizer alone reconstructs the flux to a median 1.5% (1.6 sigma at the assumed S/N 100).
MILES_TOKENIZER = {"patch_length": 64, "codebook_size": 256, "n_stages": 2, "n_scale_bins": 256}


@dataclass(frozen=True)
class MultimodalTrainConfig:
    model_id: str = "miles-stellar"
    scalars: tuple[str, ...] = MILES_SCALARS  # rows of engine.modalities.SCALARS, inputs and targets
    holdout_fraction: float = 0.2
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    n_bins: int = 64  # scalar bins
    label_sigma_bins: float = 1.0
    token_weight: float = 1.0  # weight of the multi-token loss next to the scalar loss
    dim: int = 64
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    threads: int = 1  # on a shared 2-core box, 2 torch threads were 10x slower per step than 1
    tokenizer: dict = field(default_factory=lambda: dict(MILES_TOKENIZER))  # overrides of the registered spectrum config

    def __post_init__(self) -> None:
        unknown = [s for s in self.scalars if s not in SCALARS_BY_NAME]
        if unknown or not self.scalars:
            raise ConfigError(f"MultimodalTrainConfig.scalars={self.scalars}; expected names from {sorted(SCALARS_BY_NAME)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"MultimodalTrainConfig.holdout_fraction={self.holdout_fraction}; expected 0 < value < 1")
        for name in ("steps", "batch_size", "n_bins", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MultimodalTrainConfig.{name}={getattr(self, name)}; expected >= 1")


# ---- data ----------------------------------------------------------------------------------
def read_miles_params(path: str | Path) -> pa.Table:
    """MILES_params.db (``star Teff logg [Fe/H]`` per line, ``#`` comments) -> object_id, teff, logg, feh.

    Unfitted parameters (Teff written 99999; logg and [Fe/H] written 9999) become NaN. Hot stars keep
    their real Teff (10,000-36,000 K): only the exact placeholder means "unfitted"."""
    raw = np.loadtxt(path, comments="#", dtype=np.float64, ndmin=2)
    if raw.shape[1] != 4:
        raise CatalogError(f"{path}: expected 4 columns (star, Teff, logg, [Fe/H]), got {raw.shape[1]}")
    vals = np.where(raw[:, 1:] == np.array([99999.0, 9999.0, 9999.0]), np.nan, raw[:, 1:])
    return pa.table({"object_id": raw[:, 0].astype(np.int64), "teff": vals[:, 0], "logg": vals[:, 1], "feh": vals[:, 2]})


def read_miles_dataset(data_dir: str | Path = MILES_DIR) -> tuple[SpectrumBatch, pa.Table]:
    """All MILES spectra and their parameters matched by star number (same row order; NaN where unknown)."""
    paths = sorted(glob.glob(str(Path(data_dir) / "MILES_res2.50_star_m*V.fits")))
    if not paths:
        raise CatalogError(f"no MILES spectra (MILES_res2.50_star_m*V.fits) in {data_dir}")
    spectra = read_miles(paths)
    params = read_miles_params(Path(data_dir) / "MILES_params.db")
    row = {int(i): k for k, i in enumerate(params["object_id"].to_numpy())}
    take = pa.array([row.get(int(i)) for i in spectra.object_id], pa.int64())  # null -> all-null row
    out = params.take(take).to_pydict()
    cols = {m: np.array([np.nan if v is None else v for v in out[m]]) for m in MILES_SCALARS}
    return spectra, pa.table({"object_id": spectra.object_id, **cols})


def subset(batch: SpectrumBatch, rows: np.ndarray) -> SpectrumBatch:
    return SpectrumBatch(batch.survey, batch.wavelength_aa, batch.flux[rows], batch.ivar[rows],
                         None if batch.mask is None else batch.mask[rows],
                         None if batch.redshift is None else batch.redshift[rows], batch.object_id[rows])


@dataclass
class TokenData:
    """Everything a model reads, tokenized: scalar tokens (N, T) + validity, token modalities (N, Nm) + validity."""

    scalar_tok: np.ndarray
    scalar_valid: np.ndarray
    multi: dict[str, tuple[np.ndarray, np.ndarray]]

    def rows(self, idx: np.ndarray, device: torch.device | None = None):
        t = lambda a, dt: torch.as_tensor(a[idx], dtype=dt, device=device)  # noqa: E731
        return (t(self.scalar_tok, torch.long), t(self.scalar_valid, torch.bool),
                {m: (t(k, torch.long), t(v, torch.bool)) for m, (k, v) in self.multi.items()})


def token_data(bundle: ModelBundle, inputs: dict) -> TokenData:
    tokens = bundle.tokenize(inputs)
    tok, valid = stack_tokens(bundle, tokens)
    return TokenData(tok, valid, stack_multi(bundle, tokens))


# ---- the 4M masking ------------------------------------------------------------------------
@dataclass
class Masks:
    scalar_seen: torch.Tensor  # (B, T) visible to the encoder
    scalar_target: torch.Tensor  # (B, T) loss on these
    multi_seen: dict[str, torch.Tensor]  # (B, N) visible to the encoder
    multi_known: dict[str, torch.Tensor]  # (B, N) revealed to the decoder (target rows only)
    multi_target: dict[str, torch.Tensor]  # (B, N) loss on these
    target_rows: dict[str, torch.Tensor]  # (B,) rows where the modality is a target


def sample_masks(scalar_valid: torch.Tensor, multi: dict, gen: torch.Generator) -> Masks:
    """Per row: each token modality is an input (p=0.5) or a target; scalars are inputs with p=0.25
    when some token modality is an input, else p=0.75. Input token modalities show all their valid
    tokens (p=0.5) or a random fraction U(0.1, 1); targets reveal a fraction 1 - cos(pi u / 2),
    u ~ U(0, 1), to the decoder (the ROAR schedule) and are scored on the rest."""
    B, T = scalar_valid.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    is_target = {m: u(B) < 0.5 for m in multi}
    any_input = torch.zeros(B, dtype=torch.bool)
    seen, known, target = {}, {}, {}
    for m, (_, valid) in multi.items():
        N = valid.shape[1]
        any_input |= ~is_target[m] & valid.any(dim=1)
        keep = torch.where(u(B, 1) < 0.5, torch.ones(B, 1), 0.1 + 0.9 * u(B, 1))  # (B, 1) visible fraction
        seen[m] = valid & (u(B, N) < keep) & ~is_target[m][:, None]
        reveal = 1.0 - torch.cos(0.5 * math.pi * u(B, 1))  # (B, 1)
        known[m] = valid & (u(B, N) < reveal) & is_target[m][:, None]
        target[m] = valid & ~known[m] & is_target[m][:, None]
    p_in = torch.where(any_input, 0.25, 0.75)[:, None]  # (B, 1)
    scalar_seen = scalar_valid & (u(B, T) < p_in)
    return Masks(scalar_seen, scalar_valid & ~scalar_seen, seen, known, target, is_target)


def soft_ce(logits: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean cross-entropy against a Gaussian-smoothed one-hot over ordered bins. logits (N, V), target (N,)."""
    bins = torch.arange(logits.shape[1], dtype=torch.float32, device=logits.device)
    soft = torch.exp(-0.5 * ((bins[None, :] - target[:, None].float()) / sigma) ** 2)  # (N, V)
    return -(soft / soft.sum(1, keepdim=True) * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def step_loss(model: MultimodalTransformer, batch, masks: Masks, cfg: MultimodalTrainConfig) -> torch.Tensor:
    tok, _, multi = batch
    enc_multi = {m: (t, masks.multi_seen[m]) for m, (t, _) in multi.items()}
    states = model.encode_tokens(tok, masks.scalar_seen, enc_multi)  # (B, L, D), once for every target
    valid = model.input_valid(masks.scalar_seen, enc_multi)  # (B, L)
    losses = []
    for j, m in enumerate(model.cfg.input_modalities):
        rows = masks.scalar_target[:, j]
        if rows.any():  # one decoder pass per target, as generate does
            lg = model.decode_logits(states[rows], valid[rows], [m])[m]  # (b, V)
            losses.append(soft_ce(lg, tok[rows, j], cfg.label_sigma_bins))
    scalar = torch.stack(losses).mean() if losses else states.sum() * 0.0
    token_losses = []
    for m, (t, _) in multi.items():
        rows = masks.target_rows[m] & masks.multi_target[m].any(dim=1)
        if rows.any():
            lg = model.decode_tokens(states[rows], valid[rows], m, t[rows], masks.multi_known[m][rows])  # (b, N, V)
            scored = masks.multi_target[m][rows]
            token_losses.append(F.cross_entropy(lg[scored].float(), t[rows][scored]))
    tokens = torch.stack(token_losses).mean() if token_losses else states.sum() * 0.0
    return scalar + cfg.token_weight * tokens


# ---- training ------------------------------------------------------------------------------
def standardised_bin_values(tokenizer: ScalarTokenizer, model_cfg: ModelConfig, columns: dict[str, str]) -> torch.Tensor:
    """(M, V+1) bin centres per scalar stream, standardised over the bins; the missing token maps to 0."""
    out = torch.zeros(len(model_cfg.modalities), model_cfg.n_bins + 1)
    for i, m in enumerate(model_cfg.modalities):
        c = tokenizer.centres[columns[m]]
        out[i, :-1] = torch.from_numpy((c - c.mean()) / max(c.std(), 1e-12)).float()
    return out


def fit_steps(model: MultimodalTransformer, data: TokenData, cfg: MultimodalTrainConfig) -> list[float]:
    """AdamW + one-cycle over ``cfg.steps`` random batches of ``data``; the mean loss of every 100 steps."""
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = one_cycle(opt, cfg.lr, cfg.steps, pct_start=min(0.3, max(0.05, 5 / cfg.steps)))
    n = len(data.scalar_tok)
    curve, running, t0 = [], [], time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        batch = data.rows(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
        loss = step_loss(model, batch, sample_masks(batch[1], batch[2], gen), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            curve.append(round(float(np.mean(running)), 4))
            running = []
            log.info("step %d loss %.4f (%.0fs)", step + 1, curve[-1], time.perf_counter() - t0)
    model.eval()
    return curve


def build_bundle(scalar_table: pa.Table, spectra: SpectrumBatch, cfg: MultimodalTrainConfig) -> ModelBundle:
    """Fit the scalar and spectrum tokenizers on these (training) rows and build an untrained bundle."""
    spec_tok = entry(spectra.token_key).build(**cfg.tokenizer, seed=cfg.seed).fit([spectra])
    return assemble_bundle(scalar_table, {spectra.token_key: spec_tok}, cfg)


def assemble_bundle(scalar_table: pa.Table, token_tokenizers: dict, cfg: MultimodalTrainConfig) -> ModelBundle:
    """Fit the scalar tokenizer on these (training) rows; an untrained bundle over ``cfg.scalars`` and the
    given fitted token tokenizers ({modality: tokenizer}, e.g. a spectrum's or an image's)."""
    columns = {m: SCALARS_BY_NAME[m].column for m in cfg.scalars}
    scalar_tok = ScalarTokenizer(ScalarTokenizerConfig(columns=tuple(columns.values()), n_bins=cfg.n_bins,
                                                       rng_seed=cfg.seed)).fit([scalar_table])
    model_cfg = ModelConfig(
        input_modalities=cfg.scalars, target_modalities=cfg.scalars, n_bins=cfg.n_bins, dim=cfg.dim,
        encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth, num_heads=cfg.num_heads, dropout=cfg.dropout,
        token_modalities=tuple((name, tok.config.n_tokens, tok.vocab_size) for name, tok in token_tokenizers.items()),
    )
    torch.manual_seed(cfg.seed)
    model = MultimodalTransformer(model_cfg)
    model.tok_emb.bin_values.copy_(standardised_bin_values(scalar_tok, model_cfg, columns))
    meta = {"model_id": cfg.model_id, "inputs": columns, "target_columns": {}}
    return ModelBundle(model=model, tokenizer=scalar_tok, meta=meta, token_tokenizers=dict(token_tokenizers))


def train_miles(cfg: MultimodalTrainConfig, out_dir: str | Path | None = None,
                data_dir: str | Path = MILES_DIR) -> tuple[ModelBundle, dict]:
    """Train the MILES stellar model on the non-held-out stars; save it to ``out_dir`` if given."""
    torch.set_num_threads(cfg.threads)
    spectra, params = read_miles_dataset(data_dir)
    hold = holdout_mask(spectra.object_id, cfg.holdout_fraction)
    train_rows = np.flatnonzero(~hold)
    bundle = build_bundle(params.take(pa.array(train_rows)), subset(spectra, train_rows), cfg)
    inputs = {m: params[m].to_numpy()[train_rows] for m in cfg.scalars}
    data = token_data(bundle, {**inputs, spectra.token_key: subset(spectra, train_rows)})
    t0 = time.perf_counter()
    curve = fit_steps(bundle.model, data, cfg)
    bundle.model.eval()
    report = {"train_seconds": round(time.perf_counter() - t0, 1), "n_train": int(len(train_rows)),
              "n_holdout": int(hold.sum()), "loss_per_100_steps": curve}
    if out_dir is not None:
        bundle.save(out_dir, extra={"training": {"config": asdict(cfg), "data": str(data_dir), **report}})
    return bundle, report
