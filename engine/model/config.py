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
    # Multi-token modalities, each read by the encoder AND predictable by the decoder (any-to-any):
    # (name, n_tokens, vocab_size), e.g. ("tok_spec_miles", 129, 770). Empty = the scalar-only model.
    token_modalities: tuple[tuple[str, int, int], ...] = ()

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
        self._check_token_modalities()

    def _check_token_modalities(self) -> None:
        seen = set(self.modalities)
        for entry in self.token_modalities:
            ok = isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:]):
                raise ConfigError(
                    f"ModelConfig.token_modalities entry {entry!r}; expected (name, n_tokens, vocab_size) with a "
                    "non-empty name and integer sizes"
                )
            name, n_tokens, vocab_size = entry
            if name in seen:
                raise ConfigError(f"ModelConfig.token_modalities: {name!r} is repeated or also a scalar stream")
            seen.add(name)
            if n_tokens < 1 or vocab_size < 2:
                raise ConfigError(
                    f"ModelConfig.token_modalities {name!r}: n_tokens={n_tokens}, vocab_size={vocab_size}; "
                    "expected n_tokens >= 1 and vocab_size >= 2"
                )

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every stream with its own modality embedding: inputs first, then target-only ones."""
        return self.input_modalities + tuple(m for m in self.target_modalities if m not in self.input_modalities)

    @property
    def token_sizes(self) -> dict[str, tuple[int, int]]:
        """Multi-token modality -> (n_tokens, vocab_size), in config order."""
        return {name: (n, v) for name, n, v in self.token_modalities}

    @property
    def all_targets(self) -> tuple[str, ...]:
        """Everything the decoder can predict: scalar targets, then multi-token modalities."""
        return self.target_modalities + tuple(self.token_sizes)

    def to_dict(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["token_modalities"] = [list(e) for e in self.token_modalities]
        if not self.token_modalities:  # scalar-only configs serialise exactly as before the field existed
            del out["token_modalities"]
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        if "token_modalities" in args:
            args["token_modalities"] = tuple(tuple(e) if isinstance(e, list) else e for e in args["token_modalities"])
        return cls(**args)
