"""Fit the tokenizer and train the multimodal model on a catalogue with spectroscopic redshifts.

Split by a hash of ``object_id`` (see ``engine.sample.holdout_mask``): the holdout split is
never used for fitting, early decisions or calibration; a separate validation split (another
hash salt) calibrates the p(z) temperature. Training uses a 4M-style objective: each step
hides a random subset of input streams and asks the decoder for redshift plus the hidden
streams; magnitudes are re-drawn within their errors every step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from engine.errors import CatalogError, ConfigError
from engine.index.knn import knn_regress
from engine.model import checkpoint
from engine.model.bundle import REDSHIFT, ModelBundle
from engine.model.config import ModelConfig
from engine.model.redshift import (coverage, fit_coverage_temperature, fit_pit_map, photoz_metrics, pit, redshift_probs,
                                   softmax, summarize)
from engine.model.transformer import MultimodalTransformer
from engine.modalities import SCALARS_BY_NAME, catalogue_inputs
from engine.optim import one_cycle
from engine.sample import holdout_mask, kfold_index
from engine.tokenizers.scalar import ScalarTokenizer, ScalarTokenizerConfig, missing_mask

log = logging.getLogger(__name__)

# r plus the four SDSS colours, formed by the tokenizer from the ugriz magnitudes. SDSS 5-fold, folds 0-1, 15 epochs:
# holdout sigma_NMAD 0.0141 / 0.0134 against 0.0162 / 0.0150 from the five magnitudes (README).
DEFAULT_INPUTS = ("mag_r", "colour_ug", "colour_gr", "colour_ri", "colour_iz")
CALIBRATIONS = ("pit", "coverage", "nll")


@dataclass(frozen=True)
class TrainConfig:
    model_id: str = "sdss-mgs-photoz"
    inputs: tuple[str, ...] = DEFAULT_INPUTS  # scalar modality names (engine.modalities.SCALARS), colours included
    id_column: str = "object_id"
    z_column: str = "z_spec"
    holdout_fraction: float = 0.2  # never trained on; scored at the end
    # Cross-validation: with n_folds > 0 the holdout is fold `holdout_fold` of kfold_index(id, n_folds)
    # (holdout_fraction is then unused); the validation split is drawn from the other folds as usual.
    n_folds: int = 0
    holdout_fold: int = 0
    val_fraction: float = 0.1  # of the rest; calibrates the p(z) temperature
    # 15, not 60: with colour inputs longer training overfits (SDSS 5-fold sigma_NMAD 0.0142 at 15 epochs,
    # 0.0174 at 60; DC2 0.0188 against 0.0226; README)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    n_bins: int = 1024
    label_sigma_bins: float = 4.0  # Gaussian smoothing of the target bin (in bins)
    # 4M objective: chance to hide each input stream (half the rows hide none). Off by default: on the
    # 3.6k-galaxy sample it cost holdout sigma_NMAD (0.0163 -> 0.022 at p=0.25; see README).
    input_drop_prob: float = 0.0
    recon_weight: float = 0.3
    noise_augment: bool = False  # re-draw magnitudes within their errors each step (doubles the noise: 0.016 -> 0.024)
    dim: int = 96
    encoder_depth: int = 3
    decoder_depth: int = 2
    num_heads: int = 4
    threads: int = 2
    # p(z) calibration on the validation split: "coverage" fits the temperature that makes the 68/95 % intervals
    # cover as often as they claim; "pit" (default) then also reshapes p(z) with a PIT map (redshift.fit_pit_map;
    # SDSS folds 0-1: 95 % intervals cover 95.4 % against 91.9 % with the temperature alone); "nll" fits the
    # temperature by negative log-likelihood
    calibration: str = "pit"
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps (0: only at the end of each epoch)
    keep_checkpoints: int = 2  # newest checkpoint directories kept
    model: dict = field(default_factory=dict)  # extra ModelConfig fields
    # Catalogue columns per catalogue modality (the inputs and the magnitudes behind colours) when they differ
    # from engine.modalities.SCALARS, e.g. {"mag_u": "mag_u_lsst"} and {"mag_u": "mag_err_u_lsst"} for LSST DESC.
    columns: dict = field(default_factory=dict)
    error_columns_by_input: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.inputs:
            if name not in SCALARS_BY_NAME:
                raise ConfigError(f"TrainConfig.inputs: unknown modality {name!r}; known: {sorted(SCALARS_BY_NAME)}")
        for name in ("holdout_fraction", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)}; expected 0 <= value < 1")
        for name in ("columns", "error_columns_by_input"):
            unknown = sorted(set(getattr(self, name)) - set(self.catalogue_inputs))
            if unknown:
                raise ConfigError(f"TrainConfig.{name}: {unknown} are not among the catalogue inputs "
                                  f"{list(self.catalogue_inputs)} of inputs {list(self.inputs)}")
        if self.n_folds < 0 or (self.n_folds and not 0 <= self.holdout_fold < self.n_folds):
            raise ConfigError(
                f"TrainConfig: n_folds={self.n_folds}, holdout_fold={self.holdout_fold}; "
                "expected n_folds=0 (hash holdout) or 0 <= holdout_fold < n_folds"
            )
        if self.checkpoint_every_steps < 0 or self.keep_checkpoints < 1:
            raise ConfigError(
                f"TrainConfig: checkpoint_every_steps={self.checkpoint_every_steps}, keep_checkpoints="
                f"{self.keep_checkpoints}; expected checkpoint_every_steps >= 0 and keep_checkpoints >= 1"
            )
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"TrainConfig.calibration={self.calibration!r}; expected one of {CALIBRATIONS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"TrainConfig: epochs={self.epochs}, batch_size={self.batch_size}; expected >= 1")

    @property
    def catalogue_inputs(self) -> tuple[str, ...]:
        """Modalities read from the catalogue: non-colour inputs and the magnitudes behind colours, table order."""
        return catalogue_inputs(self.inputs)

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        return tuple(self.columns.get(m, SCALARS_BY_NAME[m].column) for m in self.catalogue_inputs)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The tokenizer column of each input: its catalogue column, or a colour's own name."""
        cat = dict(zip(self.catalogue_inputs, self.catalogue_columns))
        return tuple(cat.get(m, m) for m in self.inputs)

    @property
    def derived(self) -> tuple[tuple[str, str, str], ...]:
        """(colour column, catalogue column a, catalogue column b) for the tokenizer, one per colour input."""
        cat = dict(zip(self.catalogue_inputs, self.catalogue_columns))
        return tuple((m, *(cat[s] for s in SCALARS_BY_NAME[m].derived_from)) for m in self.inputs if SCALARS_BY_NAME[m].derived_from)

    @property
    def error_columns(self) -> tuple[str | None, ...]:
        """One per catalogue input (None: no error column)."""
        return tuple(self.error_columns_by_input.get(m, SCALARS_BY_NAME[m].error_column) for m in self.catalogue_inputs)


def read_training_table(paths: list[str], cfg: TrainConfig) -> pa.Table:
    want = [cfg.id_column, *cfg.catalogue_columns, cfg.z_column]
    tables = []
    for path in paths:
        schema = pq.read_schema(path)
        missing = [c for c in want if c not in schema.names]
        if missing:
            raise CatalogError(f"{path}: missing column(s) {missing}; training needs {want} (+ optional error columns)")
        errs = [c for c in cfg.error_columns if c and c in schema.names]
        tables.append(pq.read_table(path, columns=want + errs))
    if not tables:
        raise CatalogError("no training catalogue given")
    return pa.concat_tables(tables, promote_options="default")


def split_masks(ids: np.ndarray, cfg: TrainConfig) -> dict[str, np.ndarray]:
    if cfg.n_folds:
        hold = kfold_index(ids, cfg.n_folds) == cfg.holdout_fold
    else:
        hold = holdout_mask(ids, cfg.holdout_fraction, salt=0)
    val = holdout_mask(ids, cfg.val_fraction, salt=7) & ~hold
    return {"train": ~hold & ~val, "val": val, "holdout": hold}


class _Batches:
    """Tokenizes (noisy) catalogue values for a set of rows (colours from the noisy magnitudes); redshift tokens are fixed."""

    def __init__(self, table: pa.Table, rows: np.ndarray, cfg: TrainConfig, tok: ScalarTokenizer) -> None:
        self.cfg, self.tok = cfg, tok
        self.values = np.stack([table[c].to_numpy()[rows] for c in cfg.catalogue_columns], axis=1).astype(np.float64)
        errs = [table[c].to_numpy()[rows] if c and c in table.column_names else np.zeros(len(rows)) for c in cfg.error_columns]
        self.errors = np.nan_to_num(np.stack(errs, axis=1).astype(np.float64), nan=0.0, posinf=0.0)
        self.errors[missing_mask(self.errors, tok.config.sentinels)] = 0.0
        self.z = table[cfg.z_column].to_numpy()[rows].astype(np.float64)
        z_tok = tok.encode({cfg.z_column: self.z})
        self.z_tokens = z_tok.tokens[:, list(tok.config.columns).index(cfg.z_column)]

    def tokens(self, idx: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        vals = self.values[idx]
        if rng is not None:
            vals = vals + rng.standard_normal(vals.shape) * self.errors[idx]
        enc = self.tok.encode({c: vals[:, j] for j, c in enumerate(self.cfg.catalogue_columns)})
        n_in = len(self.cfg.inputs)
        return enc.tokens[:, :n_in], ~enc.missing[:, :n_in]


def _soft_ce(logits: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy against a Gaussian-smoothed one-hot over ordered bins. logits (N, V), target (N,)."""
    bins = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    soft = torch.exp(-0.5 * ((bins[None, :] - target[:, None].float()) / sigma) ** 2)
    soft = soft / soft.sum(dim=1, keepdim=True)
    return -(soft * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _hide_inputs(valid: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """4M input masking: half the rows keep all inputs; the rest hide each with prob p (one always stays)."""
    B, T = valid.shape
    hide = (torch.rand(B, T, generator=gen) < p) & (torch.rand(B, 1, generator=gen) < 0.5)
    keep = valid & ~hide
    lost = ~keep.any(dim=1) & valid.any(dim=1)
    if lost.any():  # restore the first valid input of rows that lost all
        first = valid.float().argmax(dim=1)
        keep[lost, first[lost]] = True
    return keep


def train(paths: list[str], cfg: TrainConfig, out_dir: str, resume: bool = False,
          checkpoint_dir: str | None = None, max_steps: int | None = None) -> dict:
    """Train, calibrate and write a model dir; checkpoints go to ``checkpoint_dir`` (default out_dir/checkpoints).

    ``resume`` continues from the newest checkpoint there (same config required). ``max_steps`` stops
    after that many optimizer steps in total, right after writing a checkpoint (an interruption on purpose):
    the report then only says where it stopped and no model dir is written.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    table = read_training_table(paths, cfg)
    ids = table[cfg.id_column].to_numpy()
    z_all = table[cfg.z_column].to_numpy().astype(np.float64)
    split = split_masks(ids, cfg)
    split["train"] &= np.isfinite(z_all)
    rows = {k: np.flatnonzero(v & np.isfinite(z_all)) for k, v in split.items()}
    log.info("split: %s", {k: len(v) for k, v in rows.items()})

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else Path(out_dir) / "checkpoints"
    last = checkpoint.latest(ckpt_root) if resume else None
    if last is not None:
        _check_resumable(checkpoint.read_meta(last), cfg, last)
        tokenizer = ScalarTokenizer.load(last / checkpoint.TOKENIZER)
    else:
        tok_cfg = ScalarTokenizerConfig(columns=cfg.input_columns + (cfg.z_column,), n_bins=cfg.n_bins, rng_seed=cfg.seed,
                                        derived=cfg.derived)
        tokenizer = ScalarTokenizer(tok_cfg).fit([table.take(rows["train"])])
    model_cfg = ModelConfig(
        input_modalities=cfg.inputs, target_modalities=cfg.inputs + (REDSHIFT,), n_bins=cfg.n_bins, dim=cfg.dim,
        encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth, num_heads=cfg.num_heads, **cfg.model,
    )
    model = MultimodalTransformer(model_cfg)
    model.tok_emb.bin_values.copy_(standardised_bin_values(tokenizer, model_cfg, cfg))
    data = {k: _Batches(table, v, cfg, tokenizer) for k, v in rows.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(rows["train"]) // cfg.batch_size))
    sched = one_cycle(opt, cfg.lr, steps)
    st = checkpoint.TrainState(model, opt, sched, np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed))
    if last is not None:
        checkpoint.restore(last, st)
        log.info("resumed from %s: epoch %d, row %d of its permutation, step %d", last, st.epoch, st.cursor, st.step)
    elif resume:
        log.info("resume: no checkpoint under %s; training from the start", ckpt_root)
    elif checkpoint.latest(ckpt_root) is not None:
        log.warning("%s holds checkpoints of an earlier run; starting afresh (pass resume=True to continue)", ckpt_root)

    def save_checkpoint() -> Path:
        return checkpoint.save(ckpt_root, st, _config_json(cfg), tokenizer, cfg.keep_checkpoints)

    t0 = time.perf_counter()
    if _fit(st, data["train"], cfg, save_checkpoint, max_steps):
        return {"stopped_at_step": st.step, "epoch": st.epoch, "cursor": st.cursor,
                "checkpoint": str(checkpoint.latest(ckpt_root))}
    model.eval()

    edges, centres = tokenizer.edges[cfg.z_column], tokenizer.centres[cfg.z_column]

    def logits_of(split_name: str) -> np.ndarray:
        tok_np, valid_np = data[split_name].tokens(np.arange(len(rows[split_name])), None)
        with torch.inference_mode():
            _, lg = model(torch.from_numpy(tok_np).long(), torch.from_numpy(valid_np), [REDSHIFT])
        return lg[REDSHIFT].numpy().astype(np.float64)

    temperature, calibration = calibrate(logits_of("val"), edges, data["val"].z, cfg.calibration)
    bundle = ModelBundle(
        model=model, tokenizer=tokenizer,
        meta={"model_id": cfg.model_id, "inputs": dict(zip(cfg.catalogue_inputs, cfg.catalogue_columns)),
              "target_columns": {REDSHIFT: cfg.z_column}, "temperature": temperature, "calibration": calibration},
    )
    report = {"train_seconds": round(time.perf_counter() - t0, 1), "split": {k: len(v) for k, v in rows.items()},
              "temperature": temperature, "calibration": calibration, "steps": st.step}
    if len(rows["holdout"]):
        report["holdout"] = evaluate(logits_of("holdout"), temperature, edges, centres, data["holdout"].z, calibration)
        report["holdout_knn_baseline"] = knn_baseline(table, rows, cfg)
    bundle.save(out_dir, extra={"training": {"config": asdict(cfg), "catalogs": [str(p) for p in paths], **report}})
    return report


def _fit(st: checkpoint.TrainState, batches: _Batches, cfg: TrainConfig, save_checkpoint, max_steps: int | None) -> bool:
    """Run the remaining optimizer steps from ``st``; True when stopped by ``max_steps``.

    The epoch's permutation and the position in it travel in ``st``, so a run resumed from a
    checkpoint trains on exactly the batches the uninterrupted run would have, in the same order.
    """
    n_train = len(batches.z)
    t0 = time.perf_counter()
    while st.epoch < cfg.epochs:
        if st.order is None:
            st.order, st.cursor, st.epoch_loss = st.rng.permutation(n_train), 0, 0.0
        st.model.train()
        while st.order is not None:  # set to None when the epoch ends
            idx = st.order[st.cursor : st.cursor + cfg.batch_size]
            st.epoch_loss += _train_step(st, batches, idx, cfg) * len(idx)
            st.cursor += len(idx)
            st.step += 1
            epoch_done = st.cursor >= n_train
            if epoch_done:
                if st.epoch % 10 == 0 or st.epoch == cfg.epochs - 1:
                    log.info("epoch %d loss %.4f (%.0fs)", st.epoch, st.epoch_loss / n_train, time.perf_counter() - t0)
                st.epoch, st.order, st.cursor = st.epoch + 1, None, 0
            stop = max_steps is not None and st.step >= max_steps
            if epoch_done or stop or (cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0):
                save_checkpoint()
            if stop:
                return True
    return False


def _train_step(st: checkpoint.TrainState, batches: _Batches, idx: np.ndarray, cfg: TrainConfig) -> float:
    """One optimizer step on rows ``idx`` of the training split; returns the batch loss."""
    tok_np, valid_np = batches.tokens(idx, st.rng if cfg.noise_augment else None)
    tok, valid = torch.from_numpy(tok_np).long(), torch.from_numpy(valid_np)
    seen = _hide_inputs(valid, cfg.input_drop_prob, st.gen)
    _, logits = st.model(tok, seen, [REDSHIFT, *cfg.inputs])
    loss = _soft_ce(logits[REDSHIFT], torch.from_numpy(batches.z_tokens[idx]), cfg.label_sigma_bins)
    hidden = valid & ~seen  # reconstruct streams the encoder did not see
    if hidden.any():
        recon = [_soft_ce(logits[m][hidden[:, j]], tok[hidden[:, j], j], cfg.label_sigma_bins)
                 for j, m in enumerate(cfg.inputs) if hidden[:, j].any()]
        loss = loss + cfg.recon_weight * torch.stack(recon).mean()
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    st.opt.step()
    st.sched.step()
    return float(loss.detach())


_RUN_ONLY = ("threads", "checkpoint_every_steps", "keep_checkpoints")  # may change between a run and its resume


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _check_resumable(meta: dict, cfg: TrainConfig, path: Path) -> None:
    saved, now = meta["train_config"], _config_json(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in _RUN_ONLY and saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(
            f"cannot resume from {path}: TrainConfig differs in {diff} "
            f"(checkpoint: {[saved.get(k) for k in diff]}, now: {[now.get(k) for k in diff]}); "
            "resume with the same config or train afresh without resume"
        )


def standardised_bin_values(tokenizer: ScalarTokenizer, model_cfg: ModelConfig, cfg: TrainConfig) -> torch.Tensor:
    """(M, V+1) bin centres per stream, standardised over the bins; the missing token maps to 0."""
    columns = dict(zip(cfg.inputs, cfg.input_columns)) | {REDSHIFT: cfg.z_column}
    out = torch.zeros(len(model_cfg.modalities), model_cfg.n_bins + 1)
    for i, m in enumerate(model_cfg.modalities):
        c = tokenizer.centres[columns[m]]
        out[i, :-1] = torch.from_numpy((c - c.mean()) / max(c.std(), 1e-12)).float()
    return out


def calibrate(val_logits: np.ndarray, edges: np.ndarray, z: np.ndarray, method: str) -> tuple[float, dict]:
    """The p(z) temperature from the validation split, and a record of the fit for the model meta."""
    if not len(z):
        return 1.0, {"method": "none", "n_rows": 0}
    t_nll = calibrate_temperature(val_logits, edges, z)
    if method == "nll":
        return t_nll, {"method": "nll_temperature", "n_rows": int(len(z))}
    t, record = fit_coverage_temperature(val_logits, edges, z)
    if method == "pit":
        u = pit(softmax(val_logits, t), edges, z)
        record = {**record, "method": "coverage_temperature+pit_map", "pit_map": fit_pit_map(u)}
    return t, {**record, "temperature_nll": t_nll}


def calibrate_temperature(logits: np.ndarray, edges: np.ndarray, z: np.ndarray) -> float:
    """Temperature minimising the validation negative log-likelihood of the true redshift."""
    k = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, logits.shape[1] - 1)
    width = edges[1:] - edges[:-1]
    best_t, best_nll = 1.0, np.inf
    for t in np.geomspace(0.25, 8.0, 61):
        p = softmax(logits, t)[np.arange(len(z)), k]
        nll = -np.mean(np.log(np.maximum(p / np.maximum(width[k], 1e-12), 1e-300)))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def evaluate(logits: np.ndarray, temperature: float, edges: np.ndarray, centres: np.ndarray, z: np.ndarray,
             calibration: dict | None = None) -> dict:
    probs = redshift_probs(logits, temperature, calibration)
    s = summarize(probs, edges, centres)
    out = {name: photoz_metrics(s[name], z) for name in ("z_phot_mean", "z_phot_median", "z_phot_mode")}
    out["coverage_68"] = coverage(s["z_phot_l68"], s["z_phot_u68"], z)
    out["coverage_95"] = coverage(s["z_phot_l95"], s["z_phot_u95"], z)
    u = pit(probs, edges, z)
    out["pit_hist10"] = np.histogram(u, bins=10, range=(0, 1))[0].tolist()
    return out


def knn_baseline(table: pa.Table, rows: dict[str, np.ndarray], cfg: TrainConfig, k: int = 10) -> dict:
    """kNN (k=10) on standardised r + colours, trained on train+val, scored on the holdout."""
    mags = np.stack([table[c].to_numpy() for c in cfg.catalogue_columns], axis=1).astype(np.float64)
    feats = np.concatenate([mags[:, [mags.shape[1] // 2]], -np.diff(mags, axis=1)], axis=1)
    fit_rows = np.concatenate([rows["train"], rows["val"]])
    z = table[cfg.z_column].to_numpy().astype(np.float64)
    pred = knn_regress(feats[fit_rows], z[fit_rows], feats[rows["holdout"]], k=k)
    return {"method": f"kNN k={k} on standardised r + colours", **photoz_metrics(pred, z[rows["holdout"]])}
