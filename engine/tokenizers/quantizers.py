"""Codebook-free quantizers for learned tokenizers: FSQ and LFQ (small torch modules).

* :class:`FSQ` (finite scalar quantization, Mentzer et al. 2023): each latent channel is bounded
  and rounded to one of ``levels[i]`` values; the token is the mixed-radix number of the per-channel
  digits, so codes and indices are a bijection over ``prod(levels)`` tokens.
* :class:`LFQ` (lookup-free quantization, Yu et al. 2023): each channel is quantized to its sign,
  the token is the binary number of the signs; an entropy regulariser keeps every code in use.

Both use the straight-through estimator: the forward pass is quantized, the backward pass is the
identity on the (bounded) input. Channels are the LAST axis: inputs are ``(..., d)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import ConfigError

MAX_LFQ_DIM = 16  # the exact entropy term enumerates all 2**dim codes


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantization with ``levels`` values per channel; codebook size ``prod(levels)``."""

    def __init__(self, levels: tuple[int, ...] | list[int] = (8, 5, 5, 5), eps: float = 1e-3) -> None:
        super().__init__()
        levels = tuple(int(v) for v in levels)
        if not levels or any(v < 2 for v in levels):
            raise ConfigError(f"FSQ levels={levels}; expected a non-empty sequence of integers >= 2")
        if not 0.0 <= eps < 0.5:
            raise ConfigError(f"FSQ eps={eps}; expected 0 <= eps < 0.5")
        self.levels = levels
        self.eps = eps
        lv = torch.tensor(levels, dtype=torch.float64)
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("_levels", lv.float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)  # mixed-radix place values

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(torch.tensor(self.levels)).item())

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel into (-(L-1)/2, (L-1)/2), shifted by 1/2 for even L so rounding gives L values."""
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) latents -> (codes in [-1, 1] with straight-through gradient, int64 indices (...))."""
        if z.shape[-1] != self.dim:
            raise ConfigError(f"FSQ expects {self.dim} channels in the last axis; got shape {tuple(z.shape)}")
        codes = _round_ste(self.bound(z)) / (self._levels // 2)
        return codes, self.codes_to_indices(codes)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = torch.round(codes * half + half).long()  # 0 .. L-1 per channel
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.long().unsqueeze(-1)
        digits = (indices // self._basis) % self._levels.long()
        half = self._levels // 2
        return (digits.float() - half) / half


@dataclass(frozen=True)
class LFQOutput:
    codes: torch.Tensor  # (..., d) in {-1, +1}, straight-through gradient
    indices: torch.Tensor  # (...) int64 in [0, 2**d)
    entropy_loss: torch.Tensor  # scalar, entropy_weight * (mean per-sample entropy - codebook entropy)


class LFQ(nn.Module):
    """Lookup-free quantization: sign per channel, codebook {-1, 1}^dim of size 2**dim.

    The entropy term is ``E[H(p(c|z))] - H(E[p(c|z)])`` with ``p(c|z) = softmax(2 z.c / T)`` over all
    codes: low when each input is confidently assigned AND the batch spreads over the codebook.
    """

    def __init__(self, dim: int, entropy_weight: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__()
        if not 1 <= dim <= MAX_LFQ_DIM:
            raise ConfigError(f"LFQ dim={dim}; expected 1..{MAX_LFQ_DIM} (codebook 2**dim)")
        if entropy_weight < 0:
            raise ConfigError(f"LFQ entropy_weight={entropy_weight}; expected >= 0")
        if temperature <= 0:
            raise ConfigError(f"LFQ temperature={temperature}; expected > 0")
        self.dim = dim
        self.entropy_weight = entropy_weight
        self.temperature = temperature
        bits = 2 ** torch.arange(dim, dtype=torch.int64)
        all_codes = ((torch.arange(2**dim)[:, None] & bits) > 0).float() * 2 - 1  # (K, d)
        self.register_buffer("_bits", bits, persistent=False)
        self.register_buffer("_all_codes", all_codes, persistent=False)

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def forward(self, z: torch.Tensor) -> LFQOutput:
        if z.shape[-1] != self.dim:
            raise ConfigError(f"LFQ expects {self.dim} channels in the last axis; got shape {tuple(z.shape)}")
        hard = torch.where(z > 0, 1.0, -1.0)
        codes = z + (hard - z).detach()
        return LFQOutput(codes, self.codes_to_indices(hard), self.entropy_weight * self.entropy_term(z))

    def entropy_term(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.dim)  # (N, d)
        logits = 2 * flat @ self._all_codes.T / self.temperature  # (N, K)
        logp = torch.log_softmax(logits, dim=-1)
        per_sample = -(logp.exp() * logp).sum(-1).mean()
        avg = logp.exp().mean(0)
        codebook = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
        return per_sample - codebook

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes > 0).long() * self._bits).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return ((indices.long().unsqueeze(-1) & self._bits) > 0).float() * 2 - 1
