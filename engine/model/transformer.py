"""A small multimodal masked encoder-decoder (4M / AION style) over per-modality scalar token streams.

Read top to bottom: token embedding -> encoder (over valid tokens only) -> pooled embedding;
decoder queries (one per target modality) cross-attend to the encoder -> logits over bins.

Shapes: B batch, T input streams, Q target queries, D model width, V = n_bins.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model.config import ModelConfig


class TokenEmbedding(nn.Module):
    """Per-modality embedding of bin tokens: a learned map of Fourier features of the bin's value.

    Each token is looked up in ``bin_values`` (the tokenizer's bin centres, standardised per
    stream and stored with the weights), so neighbouring bins get neighbouring embeddings and
    differences between streams (colours) are easy to form. A free table of n_bins vectors
    per stream would instead memorise the few objects in each bin (measured on the sample:
    holdout sigma_NMAD 0.034 with a table, against 0.030 for rank features; see README).
    """

    def __init__(self, n_modalities: int, n_bins: int, dim: int, n_fourier: int) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("bin_values", torch.zeros(n_modalities, n_bins + 1))  # (M, V+1), set by training
        self.register_buffer("freqs", (math.pi / 4) * 2.0 ** torch.arange(n_fourier, dtype=torch.float32), persistent=False)
        self.proj = nn.ModuleList(nn.Linear(2 * n_fourier + 1, dim) for _ in range(n_modalities))

    def forward(self, tokens: torch.Tensor, modality_ids: list[int]) -> torch.Tensor:
        # tokens (B, T) int64, the missing token n_bins included; modality_ids: T indices
        value = torch.stack([self.bin_values[m][tokens[:, t]] for t, m in enumerate(modality_ids)], dim=1)  # (B, T)
        ang = value.unsqueeze(-1) * self.freqs  # (B, T, F)
        feats = torch.cat([value.unsqueeze(-1), ang.sin(), ang.cos()], dim=-1)  # (B, T, 2F+1)
        return torch.stack([self.proj[m](feats[:, t]) for t, m in enumerate(modality_ids)], dim=1)  # (B, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        # x (B, Lq, D) queries; context (B, Lk, D); key_valid (B, Lk) bool, True = attend
        B, Lq, D = x.shape
        H = self.num_heads
        q = self.q(x).view(B, Lq, H, D // H).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = self.kv(context).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Lk, Dh)
        mask = key_valid[:, None, None, :]  # (B, 1, 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Lq, D))  # (B, Lq, D)


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.dropout)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, valid)  # self-attention over valid tokens
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.dim) for _ in range(3))
        self.norm_ctx = nn.LayerNorm(cfg.dim)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.dropout)
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.dropout)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio, cfg.dropout)

    def forward(self, q: torch.Tensor, ctx: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
        all_q = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        h = self.norm1(q)
        q = q + self.self_attn(h, h, all_q)
        q = q + self.cross_attn(self.norm2(q), self.norm_ctx(ctx), ctx_valid)
        return q + self.mlp(self.norm3(q))


class MultimodalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = {m: i for i, m in enumerate(cfg.modalities)}
        n_mod = len(cfg.modalities)
        self.tok_emb = TokenEmbedding(n_mod, cfg.n_bins, cfg.dim, cfg.n_fourier)
        self.mod_emb = nn.Parameter(torch.randn(n_mod, cfg.dim) * 0.02)  # which stream a token belongs to
        self.query_emb = nn.Parameter(torch.randn(n_mod, cfg.dim) * 0.02)  # "predict modality m" queries
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_depth))
        self.enc_norm = nn.LayerNorm(cfg.dim)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_depth))
        self.dec_norm = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.dim, cfg.n_bins) for m in cfg.target_modalities})

    # ---- encoder -------------------------------------------------------------------------
    def encode_tokens(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 over cfg.input_modalities; valid (B, T) bool -> states (B, T, D)."""
        ids = list(range(len(self.cfg.input_modalities)))
        x = self.tok_emb(tokens, ids) + self.mod_emb[: len(ids)]  # (B, T, D)
        # A row with no valid token attends to nothing; let it attend to itself so SDPA stays finite.
        attend = valid | ~valid.any(dim=1, keepdim=True)
        for block in self.encoder:
            x = block(x, attend)
        return self.enc_norm(x)  # (B, T, D)

    @staticmethod
    def pool(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean over valid tokens only: (B, T, D), (B, T) -> (B, D); rows with no valid token give 0."""
        w = valid.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
        return (states * w).sum(1) / w.sum(1).clamp(min=1.0)

    def encode(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens + validity -> pooled embedding (B, D)."""
        return self.pool(self.encode_tokens(tokens, valid), valid)

    # ---- decoder -------------------------------------------------------------------------
    def decode_logits(self, states: torch.Tensor, valid: torch.Tensor, targets: list[str]) -> dict[str, torch.Tensor]:
        """Encoder states (B, T, D) -> {target: logits (B, V)}. The encoder output is reused for every target."""
        B = states.shape[0]
        q = self.query_emb[[self.index[t] for t in targets]].expand(B, -1, -1)  # (B, Q, D)
        attend = valid | ~valid.any(dim=1, keepdim=True)
        for block in self.decoder:
            q = block(q, states, attend)
        q = self.dec_norm(q)
        return {t: self.heads[t](q[:, i]) for i, t in enumerate(targets)}  # each (B, V)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, targets: list[str]):
        states = self.encode_tokens(tokens, valid)
        return self.pool(states, valid), self.decode_logits(states, valid, targets)
