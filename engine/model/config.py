"""Frozen, validated model configuration. Sizes from tiny (tests) to AION-base-like by config alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from engine.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    input_modalities: tuple[str, ...]  # scalar token streams the encoder reads, in flag-bit order
    target_modalities: tuple[str, ...]  # streams the decoder can predict (inputs + e.g. "redshift")
    n_bins: int = 1024  # real bins per scalar stream; token n_bins is "missing"
    dim: int = 96
    encoder_depth: int = 3
    decoder_depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    n_fourier: int = 3  # token embedding: Fourier features of the bin's value, frequencies pi/4 * 2^k (more overfit)

    def __post_init__(self) -> None:
        if not self.input_modalities:
            raise ConfigError("ModelConfig.input_modalities is empty")
        if not self.target_modalities:
            raise ConfigError("ModelConfig.target_modalities is empty")
        for name in ("dim", "encoder_depth", "decoder_depth", "num_heads", "n_bins", "n_fourier"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)}; expected a positive integer")
        if self.dim % self.num_heads:
            raise ConfigError(f"ModelConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout={self.dropout}; expected 0 <= dropout < 1")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every stream with its own modality embedding: inputs first, then target-only ones."""
        return self.input_modalities + tuple(m for m in self.target_modalities if m not in self.input_modalities)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
