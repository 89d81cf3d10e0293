"""ImageTokenizer: survey images -> one flux-scale token + (g, g) FSQ tokens -> images (small conv autoencoder).

Preprocessing (per survey, from :mod:`engine.modalities.images`):
  1. flux-conserving area-overlap resampling to the common ``pixel_scale_arcsec``, on a
     ``crop_size`` grid centred on the image centre pixel (H // 2, W // 2): resampling and centre crop
     in one step; output pixels less than half covered by valid input are masked;
  2. flux scale: the mean flux per pixel within ``scale_aperture_arcsec`` of the centre, in units of the
     survey's per-band softening ``s`` (~ sky sigma, rescaled to the output pixel area), averaged over
     bands and floored at 1; its log10 is binned into ``n_scale_bins`` fixed bins (the scale token) and
     the stamp is normalised by the *quantised* scale ``norm = bin_centre * s``;
  3. network input: the normalised flux ``flux / norm`` (clipped) and the stretch ``asinh(flux / s)``,
     one channel each per band; masked pixels are 0, so their values never reach the tokens.
The autoencoder is trained in the units the flux is judged in: squared error of the normalised flux
weighted by ``norm^2 / (s^2 + (rel_floor * norm)^2)`` (sky-noise units, saturating at a relative
precision ``rel_floor`` for bright stamps) plus ``aperture_weight`` x the squared relative error of
the flux in the central aperture. With ``compress = c`` the decoder's output and the target are both
taken through ``u = c * asinh(y / c)`` first: identical below c, a relative error above it, so a star
thousands of times brighter than the central source is reconstructed to a relative precision instead of
being clipped at c (how well depends on the training data: see the README's image benchmark).
Decoding multiplies by the quantised scale: it returns flux per output pixel in the survey's native unit.

Token layout per stamp (``n_tokens = 1 + g * g``): ``[scale, content row-major]``; content tokens are
``0 .. prod(levels) - 1``, scale tokens follow (``scale_offset + mode * n_scale_bins + bin``), and the last id is
``missing_token``: every token of a stamp that has no usable image (never produced by ``encode``; models never
embed it).

Content modes (``block_mode``): mode 0 is the learned codes. Mode 1 spends the same g * g tokens on block
means: the band-averaged normalised flux of each (S/g)^2 block, as asinh uniformly quantized over
``block_range``, upsampled bilinearly on decode (which keeps the stamp's total exactly: no shape within a block).
``encode`` decodes both and keeps, per stamp, the one with the lower cost: the training objective on the linear,
unclipped flux (pixel loss + aperture loss), with the aperture term weighted by ``mode_aperture_weight``. That
keeps the learned codes for most stamps and takes block means where a star far brighter than the central
source fills the stamp and the learned decoder's relative error on it costs more than the blocks' coarseness
costs the central source (see the README's image benchmark). Running the decoder makes encode ~5x slower on
a CPU. The mode takes one bit of the scale token, so the token budget is the same as without it:
``n_scale_bins`` defaults to 512 (x 2 modes = 1024 values).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

from engine.errors import CodecError, ConfigError, ModalityError
from engine.modalities.images import Image, SurveySpec, survey_for, survey_spec
from engine.optim import one_cycle
from engine.tokenizers.quantizers import FSQ

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
LOG_EVERY = 100
STRETCH_UNIT = 5.0  # the stretch input channel is asinh(flux / s) / STRETCH_UNIT, ~O(1) for bright sources
CONFIG_FILE, WEIGHTS_FILE = "image_tokenizer.json", "image_tokenizer.safetensors"


@dataclass(frozen=True)
class ImageTokenizerConfig:
    surveys: tuple[str, ...] = ("hst_f606w", "hst_f814w", "cfht_i", "muse_white")
    crop_size: int = 96
    pixel_scale_arcsec: float = 0.1
    levels: tuple[int, ...] = (8, 5, 5, 5)
    n_scale_bins: int = 512  # per content mode: the scale token takes n_scale_bins * (2 if block_mode else 1) values
    scale_range_dex: tuple[float, float] = (0.0, 7.0)  # log10(flux scale / softening) covered by the scale bins
    scale_aperture_arcsec: float = 0.5
    rel_floor: float = 0.05  # the loss judges bright stamps at this relative precision, faint ones in sky sigma
    aperture_weight: float = 1.0
    max_input: float = 8.0  # the normalised-flux input channel is clipped to +-max_input
    target_clip: float | None = None  # the training target (normalised flux) is clipped to +-this; None: max_input
    # None: the decoder outputs the normalised flux y, trained on the clipped target. c > 0: it outputs
    # u = c * asinh(y / c) (linear below c, logarithmic above), decode returns c * sinh(u / c), and the
    # pixel loss is the squared error of u against the unclipped target's u: bright neighbours are
    # reconstructed to a relative precision without dominating the gradient (target_clip is unused)
    compress: float | None = 8.0
    # True: per stamp, encode picks the learned codes or block means (module docstring), signalled by the scale token
    block_mode: bool = True
    block_range: tuple[float, float] = (-4.0, 12.0)  # asinh(block mean / norm) covered by the block-mode content tokens
    # weight of the aperture term in the cost that picks the mode: > aperture_weight protects the central source's
    # flux (block means blur it) at some cost in whole-stamp error; chosen on validation (README)
    mode_aperture_weight: float = 30.0
    n_down: int = 3  # latent grid = crop_size / 2**n_down
    width: int = 16  # channels after the first downsampling; doubles per level up to 4x
    steps: int = 600
    train_crop: int = 48  # the conv net trains on random sub-crops (4x cheaper), encodes full crops
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    n_threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "surveys", tuple(self.surveys))
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        object.__setattr__(self, "scale_range_dex", tuple(float(v) for v in self.scale_range_dex))
        object.__setattr__(self, "block_range", tuple(float(v) for v in self.block_range))
        if not self.surveys:
            raise ConfigError("ImageTokenizerConfig.surveys is empty; name at least one survey")
        specs = [survey_spec(s) for s in self.surveys]  # raises ConfigError on unknown names
        if len({s.n_bands for s in specs}) != 1:
            raise ConfigError(
                f"ImageTokenizerConfig.surveys={self.surveys} mix band counts {[s.n_bands for s in specs]}; "
                "expected one band count per tokenizer"
            )
        checks = {
            "crop_size": (self.crop_size >= 8 and self.crop_size % 2**self.n_down == 0, f"a multiple of 2**n_down={2**self.n_down}"),
            "pixel_scale_arcsec": (math.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0, "finite > 0"),
            "levels": (len(self.levels) >= 1 and min(self.levels) >= 2, "integers >= 2"),
            "n_down": (1 <= self.n_down <= 5, "1..5"),
            "width": (self.width >= 4, ">= 4"),
            "train_crop": (self.train_crop % 2**self.n_down == 0 and 2**self.n_down <= self.train_crop <= self.crop_size,
                           f"a multiple of 2**n_down={2**self.n_down} <= crop_size={self.crop_size}"),
            "steps": (self.steps >= 0, ">= 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "n_scale_bins": (2 <= self.n_scale_bins <= 65536, "2..65536"),
            "scale_range_dex": (len(self.scale_range_dex) == 2 and self.scale_range_dex[0] < self.scale_range_dex[1],
                                "(lo, hi) with lo < hi"),
            "scale_aperture_arcsec": (self.pixel_scale_arcsec <= self.scale_aperture_arcsec
                                      <= self.crop_size * self.pixel_scale_arcsec / 2, "within the crop, >= 1 pixel"),
            "rel_floor": (self.rel_floor > 0, "> 0"),
            "aperture_weight": (self.aperture_weight >= 0, ">= 0"),
            "max_input": (self.max_input > 0, "> 0"),
            "target_clip": (self.target_clip is None or self.target_clip > 0, "None or > 0"),
            "compress": (self.compress is None or (math.isfinite(self.compress) and self.compress > 0), "None or finite > 0"),
            "block_range": (len(self.block_range) == 2 and self.block_range[0] < self.block_range[1], "(lo, hi) with lo < hi"),
            "mode_aperture_weight": (self.mode_aperture_weight >= 0, ">= 0"),
            "n_threads": (self.n_threads >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"ImageTokenizerConfig.{name}={getattr(self, name)!r}; expected {allowed}")
        grid = self.crop_size // 2**self.n_down
        for spec in specs:
            if spec.token_grid != grid:
                raise ConfigError(
                    f"ImageTokenizerConfig: survey {spec.name!r} has token_grid={spec.token_grid} but "
                    f"crop_size/2**n_down={grid}; expected them equal"
                )

    @property
    def n_bands(self) -> int:
        return survey_spec(self.surveys[0]).n_bands

    @property
    def token_grid(self) -> int:
        return self.crop_size // 2**self.n_down

    @property
    def n_modes(self) -> int:
        return 2 if self.block_mode else 1

    @property
    def n_tokens(self) -> int:
        """Tokens per stamp: one flux-scale token plus the (g, g) content grid."""
        return 1 + self.token_grid**2

    def aperture(self) -> np.ndarray:
        """(S, S) bool, pixels within ``scale_aperture_arcsec`` of the centre pixel (S // 2, S // 2)."""
        yy, xx = np.mgrid[: self.crop_size, : self.crop_size] - self.crop_size // 2
        return np.hypot(yy, xx) * self.pixel_scale_arcsec <= self.scale_aperture_arcsec


# ---- preprocessing ------------------------------------------------------------------------------
def arcsinh_stretch(flux: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.arcsinh(flux / scale)


def inverse_stretch(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.sinh(x) * scale


def overlap_matrix(n_in: int, scale_in: float, n_out: int, scale_out: float) -> np.ndarray:
    """(n_out, n_in) length of overlap (arcsec) of output and input pixels; centre pixels n // 2 aligned."""
    in_lo = (np.arange(n_in) - n_in // 2 - 0.5) * scale_in
    out_lo = (np.arange(n_out) - n_out // 2 - 0.5) * scale_out
    lo = np.maximum(out_lo[:, None], in_lo[None, :])
    hi = np.minimum(out_lo[:, None] + scale_out, in_lo[None, :] + scale_in)
    return np.clip(hi - lo, 0.0, None)


def resample(flux: np.ndarray, valid: np.ndarray, scale_in: float, scale_out: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flux-conserving resampling of (N, C, H, W) onto a (size, size) grid; returns (flux, valid).

    Output flux is the area-weighted sum of valid input flux, divided by the valid fraction of the
    output pixel; pixels under half covered are invalid (flux 0).
    """
    _, _, h, w = flux.shape
    oy, ox = overlap_matrix(h, scale_in, size, scale_out), overlap_matrix(w, scale_in, size, scale_out)
    v = valid.astype(np.float64)
    f = np.where(valid, flux, 0.0)
    summed = (oy / scale_in) @ f @ (ox / scale_in).T  # (N, C, size, size)
    cover = (oy / scale_out) @ v @ (ox / scale_out).T
    ok = cover >= 0.5
    return np.where(ok, summed / np.where(ok, cover, 1.0), 0.0), ok


@dataclass(frozen=True)
class Prepared:
    x: np.ndarray  # (N, 2C, S, S) float32 network input: normalised flux, then stretch; 0 where invalid
    valid: np.ndarray  # (N, C, S, S) bool
    flux: np.ndarray  # (N, C, S, S) linear flux per output pixel, 0 where invalid
    scale: np.ndarray  # (N, C) stretch softening at the output pixel scale
    scale_bin: np.ndarray  # (N,) int64 flux-scale bin, 0 .. n_scale_bins - 1
    norm: np.ndarray  # (N, C) quantised flux scale per band: flux / norm is what the content tokens encode

    @property
    def target(self) -> np.ndarray:
        """(N, C, S, S) normalised flux, 0 where invalid."""
        return self.flux / self.norm[:, :, None, None]


def scale_bin_centres(cfg: ImageTokenizerConfig) -> np.ndarray:
    """(n_scale_bins,) flux scale in softening units at each bin centre."""
    lo, hi = cfg.scale_range_dex
    return 10.0 ** (lo + (np.arange(cfg.n_scale_bins) + 0.5) * (hi - lo) / cfg.n_scale_bins)


def flux_scale_bins(flux: np.ndarray, valid: np.ndarray, soft: np.ndarray, cfg: ImageTokenizerConfig) -> np.ndarray:
    """(N, C, S, S) flux, (N, C) softening -> (N,) bin of log10(mean aperture flux / softening), floored at 1."""
    ap = cfg.aperture()
    per_band = np.where(valid, flux, 0.0)[:, :, ap].sum(-1) / ap.sum() / soft  # (N, C) softening units
    log_u = np.log10(np.maximum(per_band.mean(1), 1.0))
    lo, hi = cfg.scale_range_dex
    return np.clip(np.floor((log_u - lo) / (hi - lo) * cfg.n_scale_bins), 0, cfg.n_scale_bins - 1).astype(np.int64)


def stretch_scale(spec: SurveySpec, pixel_scale_arcsec: float) -> np.ndarray:
    """(C,) softening per output pixel: the spec's per-native-pixel value times the pixel-area ratio."""
    return np.asarray(spec.stretch_scales) * (pixel_scale_arcsec / spec.pixel_scale_arcsec) ** 2


# ---- model --------------------------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageAutoencoder(nn.Module):
    """Strided-conv encoder -> FSQ -> sub-pixel-conv decoder; channels double per level up to 4x width.

    Full resolution only sees the first and last (cheap) convolutions, so a 96x96 stamp costs a few
    tens of MFLOPs: fast enough to train and run on one CPU core.
    """

    def __init__(self, n_bands: int, width: int, n_down: int, levels: tuple[int, ...], n_in: int | None = None) -> None:
        super().__init__()
        widths = [min(width * 2**i, 4 * width) for i in range(n_down)]  # after each downsampling
        ins = [n_in or n_bands] + widths[:-1]
        self.down = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(ins[i], widths[i], 4, stride=2, padding=1), nn.GELU()) for i in range(n_down)
        ))
        self.mid_enc = _Residual(widths[-1])
        self.to_latent = nn.Conv2d(widths[-1], len(levels), 1)
        self.quantizer = FSQ(levels)
        self.from_latent = nn.Sequential(nn.Conv2d(len(levels), widths[-1], 3, padding=1), nn.GELU(), _Residual(widths[-1]))
        outs = [widths[i - 1] if i > 0 else widths[0] for i in range(n_down)][::-1]
        self.up = nn.Sequential(*(  # sub-pixel upsampling: conv at low resolution, then PixelShuffle
            nn.Sequential(nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2), nn.GELU())
            for c_in, c_out in zip(widths[::-1], outs)
        ))
        self.head = nn.Conv2d(widths[0], n_bands, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mid_enc(self.down(x))  # (B, n_in, S, S) -> (B, w', g, g)
        z = self.to_latent(h).permute(0, 2, 3, 1)  # (B, g, g, d)
        return self.quantizer(z)  # codes (B, g, g, d), indices (B, g, g)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(codes.permute(0, 3, 1, 2))  # (B, w', g, g)
        return self.head(self.up(h))  # (B, C, S, S) normalised flux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, _ = self.encode(x)
        return self.decode_codes(codes)


# ---- tokenizer ----------------------------------------------------------------------------------
class ImageTokenizer:
    Config = ImageTokenizerConfig

    def __init__(self, config: ImageTokenizerConfig, model: ImageAutoencoder | None = None, fitted: bool = False) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.model = model or ImageAutoencoder(config.n_bands, config.width, config.n_down, config.levels, 2 * config.n_bands)
        self.model.eval()
        self.fitted = fitted

    @property
    def content_vocab_size(self) -> int:
        return self.model.quantizer.codebook_size

    @property
    def scale_offset(self) -> int:
        return self.content_vocab_size

    @property
    def missing_token(self) -> int:
        """All tokens of a stamp without a usable image (a null or broken cutout in a catalogue)."""
        return self.scale_offset + self.config.n_modes * self.config.n_scale_bins

    @property
    def vocab_size(self) -> int:
        return self.missing_token + 1

    def allowed_tokens(self) -> np.ndarray:
        """(n_tokens, vocab_size) bool: the ids each position can hold (scale ids first, content ids after)."""
        out = np.zeros((self.config.n_tokens, self.vocab_size), bool)
        out[0, self.scale_offset : self.missing_token] = True
        out[1:, : self.content_vocab_size] = True
        return out

    @property
    def token_grid(self) -> int:
        return self.config.token_grid

    def preprocess(self, images: Sequence[Image]) -> Prepared:
        """Resample + crop + normalise + stretch each image with its survey's spec (grouped, not per object)."""
        if not images:
            raise ModalityError("ImageTokenizer: expected at least one image; got none")
        specs = [survey_for(im) for im in images]
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((specs[i].name, im.flux.shape, float(im.pixel_scale_arcsec)), []).append(i)
        parts = [(np.asarray(idx), np.stack([images[i].flux for i in idx]).astype(np.float64),
                  np.stack([images[i].valid for i in idx]), name, scale_in)
                 for (name, _, scale_in), idx in groups.items()]
        return self._prepare(len(images), parts)

    def preprocess_arrays(self, flux: np.ndarray, survey: str, pixel_scale_arcsec: float) -> Prepared:
        """(N, C, H, W) stamps of one survey and pixel scale (NaN = bad pixel) -> the same as ``preprocess``
        of the equivalent ``Image`` objects, without building them (the embed job's vectorised path)."""
        flux = np.asarray(flux, np.float64)
        if flux.ndim != 4 or not len(flux):
            raise ModalityError(f"ImageTokenizer.preprocess_arrays: expected (N, C, H, W) with N >= 1; got {flux.shape}")
        spec = survey_spec(survey)
        if flux.shape[1] != spec.n_bands:
            raise ModalityError(f"ImageTokenizer: {survey} images have {spec.n_bands} band(s); got {flux.shape[1]}")
        return self._prepare(len(flux), [(np.arange(len(flux)), flux, np.isfinite(flux), survey, float(pixel_scale_arcsec))])

    def _prepare(self, n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, str, float]]) -> Prepared:
        """Groups of (rows, flux (g, C, H, W), valid, survey, native pixel scale) -> one Prepared of n rows."""
        cfg = self.config
        c, s = cfg.n_bands, cfg.crop_size
        flux, valid, scale = np.zeros((n, c, s, s)), np.zeros((n, c, s, s), bool), np.zeros((n, c))
        for idx, stack, ok, name, scale_in in parts:
            if name not in cfg.surveys:
                raise ModalityError(f"ImageTokenizer: expected images of {cfg.surveys}; got a {name!r} image")
            flux[idx], valid[idx] = resample(stack, ok, scale_in, cfg.pixel_scale_arcsec, s)
            scale[idx] = stretch_scale(survey_spec(name), cfg.pixel_scale_arcsec)
        bins = flux_scale_bins(flux, valid, scale, cfg)
        norm = scale_bin_centres(cfg)[bins][:, None] * scale  # (N, C)
        y = np.clip(flux / norm[:, :, None, None], -cfg.max_input, cfg.max_input)
        x = np.where(np.concatenate([valid, valid], 1),
                     np.concatenate([y, arcsinh_stretch(flux, scale[:, :, None, None]) / STRETCH_UNIT], 1), 0.0)
        return Prepared(x.astype(np.float32), valid, flux, scale, bins, norm)

    def fit(self, images: Sequence[Image]) -> "ImageTokenizer":
        """Train the autoencoder on the images (loss in sky-noise units, see the module docstring; flips/rot90)."""
        cfg = self.config
        prep = self.preprocess(images)
        torch.set_num_threads(cfg.n_threads)
        gen = torch.Generator().manual_seed(cfg.seed)
        # without compress the target is clipped (by default like the input): a neighbour far brighter than the
        # central source would otherwise dominate every gradient and collapse the codes (seen on the CFHT/HST fields)
        clip = cfg.max_input if cfg.target_clip is None else cfg.target_clip
        x = torch.from_numpy(prep.x)
        y = torch.from_numpy((prep.target if cfg.compress else np.clip(prep.target, -clip, clip)).astype(np.float32))
        w = torch.from_numpy(prep.valid.astype(np.float32))
        weight = torch.from_numpy(_stamp_weight(prep.scale, prep.norm, cfg.rel_floor).astype(np.float32))
        ap = torch.from_numpy(cfg.aperture().astype(np.float32))
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = one_cycle(opt, cfg.lr, cfg.steps)
        self.model.train()
        for step in range(cfg.steps):
            idx = torch.randint(len(x), (min(cfg.batch_size, len(x)),), generator=gen)
            y0, x0 = _crop_origin(cfg, gen)
            sl = (idx, slice(None), slice(y0, y0 + cfg.train_crop), slice(x0, x0 + cfg.train_crop))
            k = int(torch.randint(8, (1,), generator=gen))
            xb, yb, wb, ab = (_augment(t, k) for t in (x[sl], y[sl], w[sl], ap[sl[2:]]))
            pix, aper = _losses(self.model(xb), yb, wb, ab, cfg.compress)
            loss = (pix * weight[idx]).mean() + cfg.aperture_weight * aper.mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % LOG_EVERY == 0 or step == cfg.steps - 1:
                log.info("image tokenizer step %d/%d loss %.4f (aperture %.4f)", step, cfg.steps, loss.item(), aper.mean().item())
        self.model.eval()
        self.fitted = True
        return self

    @torch.no_grad()
    def encode_prepared(self, prep: Prepared, batch_size: int = 256) -> np.ndarray:
        """Prepared stamps -> (N, 1 + g * g) int32 tokens: scale token, then the content grid row-major."""
        self._require_fitted()
        cfg = self.config
        x = torch.from_numpy(prep.x)
        content, mode = np.zeros((len(x), cfg.token_grid**2), np.int64), np.zeros(len(x), np.int64)
        for i in range(0, len(x), batch_size):
            rows = slice(i, i + batch_size)
            codes, learned = self.model.encode(x[rows])
            content[rows] = learned.reshape(len(learned), -1).numpy()
            if cfg.block_mode:
                blocks = self._block_indices(prep.flux[rows], prep.valid[rows], prep.norm[rows])
                cost = self._mode_costs(prep, rows, _expand(self.model.decode_codes(codes), cfg.compress).double(),
                                        self._block_image(blocks))
                mode[rows] = (cost[1] < cost[0]).numpy()
                content[rows] = np.where(mode[rows, None] == 1, blocks.reshape(len(blocks), -1), content[rows])
        scale = self.scale_offset + mode * cfg.n_scale_bins + prep.scale_bin
        return np.concatenate([scale[:, None], content], 1).astype(np.int32)

    def _block_indices(self, flux: np.ndarray, valid: np.ndarray, norm: np.ndarray) -> np.ndarray:
        """(B, C, S, S) flux, validity, (B, C) norm -> (B, g, g) block-mode content tokens: the mean over bands of
        each block's mean valid normalised flux, as asinh uniformly quantized over ``block_range``."""
        b, c, s, _ = flux.shape
        g = self.token_grid
        y = np.where(valid, flux / norm[:, :, None, None], 0.0).reshape(b, c, g, s // g, g, s // g).sum((3, 5))
        n = valid.reshape(b, c, g, s // g, g, s // g).sum((3, 5))
        mean = np.where(n > 0, y / np.maximum(n, 1), 0.0).mean(1)  # (B, g, g)
        lo, hi = self.config.block_range
        step = (hi - lo) / (self.content_vocab_size - 1)
        return np.round((np.clip(np.arcsinh(mean), lo, hi) - lo) / step).astype(np.int64)

    def _block_image(self, blocks: np.ndarray) -> torch.Tensor:
        """(B, g, g) block-mode content tokens -> (B, C, S, S) float64 normalised flux (bilinear upsampling)."""
        lo, hi = self.config.block_range
        mean = np.sinh(lo + blocks * (hi - lo) / (self.content_vocab_size - 1))
        s = self.config.crop_size
        up = F.interpolate(torch.from_numpy(mean[:, None]), size=(s, s), mode="bilinear", align_corners=False)
        return up.expand(-1, self.config.n_bands, -1, -1)

    def _mode_costs(self, prep: Prepared, rows: slice, *ys: torch.Tensor) -> list[torch.Tensor]:
        """(B,) cost of each reconstruction ``y`` (normalised flux) of the stamps ``rows``, by which ``encode`` picks
        the content mode: the training objective on the linear unclipped flux, aperture term x ``mode_aperture_weight``."""
        cfg = self.config
        target = torch.from_numpy(prep.target[rows])
        valid = torch.from_numpy(prep.valid[rows].astype(np.float64))
        ap = torch.from_numpy(cfg.aperture().astype(np.float64))
        weight = torch.from_numpy(_stamp_weight(prep.scale[rows], prep.norm[rows], cfg.rel_floor))
        costs = []
        for y in ys:
            pix, aper = _losses(y, target, valid, ap)
            costs.append(pix * weight + cfg.mode_aperture_weight * aper)
        return costs

    def encode(self, images: Sequence[Image]) -> np.ndarray:
        """Images -> (N, 1 + g * g) int32 tokens in [0, missing_token)."""
        return self.encode_prepared(self.preprocess(images))

    def _check_tokens(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, n_tokens) -> (tokens, missing (N,) bool: rows of ``missing_token`` only); other rows must
        hold a scale token (any mode) then content tokens."""
        tokens = np.asarray(tokens)
        n = self.config.n_tokens
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ModalityError(f"ImageTokenizer.decode: expected tokens of shape (N, {n}); got {tokens.shape}")
        missing = (tokens == self.missing_token).all(axis=1)
        content, scale = tokens[~missing, 1:], tokens[~missing, 0]
        if content.size and (content.min() < 0 or content.max() >= self.content_vocab_size):
            raise ModalityError(f"ImageTokenizer.decode: expected content tokens in [0, {self.content_vocab_size}); "
                                f"got {content.min()}..{content.max()}")
        if scale.size and (scale.min() < self.scale_offset or scale.max() >= self.missing_token):
            raise ModalityError(f"ImageTokenizer.decode: expected scale tokens in [{self.scale_offset}, {self.missing_token}); "
                                f"got {scale.min()}..{scale.max()}")
        return tokens, missing

    @torch.no_grad()
    def decode_normalised(self, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, 1 + g * g) tokens -> (N, C, S, S) flux / norm (the scale token gives the content mode only); NaN
        for missing rows."""
        self._require_fitted()
        cfg = self.config
        tokens, missing = self._check_tokens(tokens)
        g = self.token_grid
        content = np.where(missing[:, None], 0, tokens[:, 1:]).reshape(-1, g, g).astype(np.int64)
        blocks = ~missing & (self._modes(tokens) == 1)
        flat = np.full((len(tokens), cfg.n_bands, cfg.crop_size, cfg.crop_size), np.nan, np.float32)
        learned = np.flatnonzero(~missing & ~blocks)
        q = self.model.quantizer
        for i in range(0, len(learned), batch_size):
            rows = learned[i : i + batch_size]
            codes = q.indices_to_codes(torch.from_numpy(content[rows]))
            flat[rows] = _expand(self.model.decode_codes(codes), cfg.compress).numpy()
        if blocks.any():
            flat[blocks] = self._block_image(content[blocks]).numpy()
        return flat

    def _modes(self, tokens: np.ndarray) -> np.ndarray:
        """(N,) content mode of each row's scale token (0: learned codes, 1: block means); rows checked already."""
        return (tokens[:, 0].astype(np.int64) - self.scale_offset) // self.config.n_scale_bins

    def decode_scale(self, tokens: np.ndarray, survey: str) -> np.ndarray:
        """(N, 1 + g * g) tokens -> (N, C) quantised flux scale ``norm`` in the survey's native unit per output pixel
        (NaN for missing rows)."""
        if survey not in self.config.surveys:
            raise ModalityError(f"ImageTokenizer.decode: expected a survey in {self.config.surveys}; got {survey!r}")
        tokens, missing = self._check_tokens(tokens)
        bins = np.where(missing, 0, (tokens[:, 0].astype(np.int64) - self.scale_offset) % self.config.n_scale_bins)
        soft = stretch_scale(survey_spec(survey), self.config.pixel_scale_arcsec)
        return np.where(missing[:, None], np.nan, scale_bin_centres(self.config)[bins][:, None] * soft[None, :])

    def decode(self, tokens: np.ndarray, survey: str) -> np.ndarray:
        """Tokens -> (N, C, S, S) flux per output pixel (native unit of ``survey``, common pixel scale)."""
        norm = self.decode_scale(tokens, survey)
        return self.decode_normalised(tokens).astype(np.float64) * norm[:, :, None, None]

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise CodecError("ImageTokenizer is not fitted: call fit() or load() a saved state first")

    # ---- persistence: safetensors weights + JSON config ------------------------------------------
    def save(self, directory: str | Path) -> None:
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        state = {"kind": "image", "format_version": FORMAT_VERSION, "config": cfg}
        (directory / CONFIG_FILE).write_text(json.dumps(state, indent=2))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "ImageTokenizer":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise CodecError(f"no saved image tokenizer in {directory}; expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        state = json.loads((directory / CONFIG_FILE).read_text())
        if state.get("kind") != "image" or state.get("format_version") != FORMAT_VERSION:
            raise CodecError(
                f"{directory}: saved tokenizer has kind={state.get('kind')!r} format_version={state.get('format_version')!r}; "
                f"expected kind='image' format_version={FORMAT_VERSION}"
            )
        # files written before ``compress`` / ``block_mode`` existed (format 2) hold linear-output decoders and one mode
        config = ImageTokenizerConfig(**{"compress": None, "block_mode": False, **state["config"]})
        tok = cls(config, fitted=True)
        tok.model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        tok.model.eval()
        return tok


def _crop_origin(cfg: ImageTokenizerConfig, gen: torch.Generator) -> tuple[int, int]:
    """Top-left corner (multiple of 2**n_down) of a random training crop that contains the whole aperture."""
    step, c, half = 2**cfg.n_down, cfg.train_crop, cfg.crop_size // 2
    r = int(np.ceil(cfg.scale_aperture_arcsec / cfg.pixel_scale_arcsec))
    lo, hi = max(0, -(-(half + r + 1 - c) // step)), min((cfg.crop_size - c) // step, (half - r) // step)
    if lo > hi:  # the crop is too small to hold the aperture: any crop
        lo, hi = 0, (cfg.crop_size - c) // step
    y0, x0 = torch.randint(lo, hi + 1, (2,), generator=gen).tolist()
    return y0 * step, x0 * step


MAX_COMPRESSED = 20.0  # |u| / c at most: c * sinh(20) ~ 2e8 c, beyond any stamp, and finite in float32


def _expand(u: torch.Tensor, compress: float | None) -> torch.Tensor:
    """Decoder output -> normalised flux: the identity, or c * sinh(u / c) for ``compress = c``."""
    if not compress:
        return u
    return compress * torch.sinh((u / compress).clamp(-MAX_COMPRESSED, MAX_COMPRESSED))


def _stamp_weight(scale: np.ndarray, norm: np.ndarray, rel_floor: float) -> np.ndarray:
    """(N, C) softening and norm -> (N,) weight of each stamp's pixel loss: 1 / (sky sigma^2 + (rel_floor norm)^2),
    in units of 1 / (rel_floor norm)^2 (sky-noise units for faint stamps, saturating at 1 for bright ones)."""
    noise = (scale / norm).mean(1)  # sky sigma / norm
    return rel_floor**2 / (noise**2 + rel_floor**2)


def _losses(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ap: torch.Tensor,
            compress: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stamp: squared error summed over valid pixels per aperture pixel (B,), squared relative aperture-flux
    error (B,). Both are ~ (relative error)^2 of the source, whatever the crop size.

    out, y, w: (B, C, s, s) decoder output, target (normalised flux) and validity; ap: (s, s) aperture mask.
    With ``compress = c`` the pixel error is taken on c * asinh(. / c) of both (``out`` is already there).
    """
    target = compress * torch.asinh(y / compress) if compress else y
    pix = (((out - target) ** 2) * w).sum((1, 2, 3)) / ap.sum().clamp_min(1.0)
    out = _expand(out, compress)
    f_out, f_true = ((t * w * ap).sum((1, 2, 3)) for t in (out, y))
    ref = torch.maximum(f_true.abs(), (w * ap).sum((1, 2, 3))).clamp_min(1.0)  # >= the aperture flux of the norm
    return pix, ((f_out - f_true) / ref) ** 2


def _augment(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square stamp."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x
