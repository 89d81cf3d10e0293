"""Which tokenizer (and which config) turns each modality into tokens.

One line per modality: ``_entry(kind, survey, tokenizer, **config overrides)``. Adding a survey is
adding a line here (and, for a new kind, its container in ``engine.modalities``); nothing else
derives from a second list. Tokenizer classes are named as ``"module:Class"`` strings and imported
lazily, so registering e.g. an image tokenizer does not import torch for spectrum users:

    _entry("image", "legacy", IMAGE, bands=("g", "r", "i", "z")),

The token key is ``tok_<prefix>_<survey>`` with the prefix of the kind (``KIND_PREFIX``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from engine.errors import ConfigError

SPECTRUM = "engine.tokenizers.spectrum:SpectrumTokenizer"
SEQUENCE = "engine.tokenizers.sequence:SequenceTokenizer"
IMAGE = "engine.tokenizers.image:ImageTokenizer"
KIND_PREFIX = {"spectrum": "spec", "xp": "xp", "lightcurve": "lc", "image": "image"}


@dataclass(frozen=True)
class ModalityEntry:
    kind: str  # one of KIND_PREFIX
    survey: str  # survey or band, e.g. "manga", "bp", "ztf_g"
    tokenizer: str  # "module:Class"; built from ``Class.Config`` or ``<Class>Config`` in the module
    config: Mapping[str, Any] = field(default_factory=dict)  # overrides of the config defaults

    def __post_init__(self) -> None:
        if self.kind not in KIND_PREFIX:
            raise ConfigError(f"ModalityEntry.kind={self.kind!r}; expected one of {sorted(KIND_PREFIX)}")
        if ":" not in self.tokenizer:
            raise ConfigError(f"ModalityEntry.tokenizer={self.tokenizer!r}; expected 'module:Class'")
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    @property
    def token_key(self) -> str:
        return f"tok_{KIND_PREFIX[self.kind]}_{self.survey}"

    def tokenizer_class(self) -> type:
        module, name = self.tokenizer.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ConfigError(
                f"{self.token_key}: tokenizer {self.tokenizer} is not available ({exc}); "
                "install its optional dependencies or wait for that module to land"
            ) from exc

    def config_class(self) -> type:
        """The tokenizer's ``Config`` attribute, else ``<Class>Config`` from its module."""
        cls = self.tokenizer_class()
        found = getattr(cls, "Config", None) or getattr(importlib.import_module(cls.__module__), f"{cls.__name__}Config", None)
        if found is None:
            raise ConfigError(f"{self.token_key}: {self.tokenizer} has no Config attribute and no {cls.__name__}Config in its module")
        return found

    def tokens_per_object(self) -> int | None:
        """Fixed token count per object (``Config.n_tokens``), or None for ragged modalities."""
        return getattr(self.config_class()(**self.config), "n_tokens", None)

    def build(self, **overrides: Any):
        """An unfitted tokenizer for this modality; ``overrides`` win over the registered config."""
        return self.tokenizer_class()(self.config_class()(**{**self.config, **overrides}))


def _entry(kind: str, survey: str, tokenizer: str, **config: Any) -> ModalityEntry:
    return ModalityEntry(kind, survey, tokenizer, config)


_ENTRIES: tuple[ModalityEntry, ...] = (
    _entry("spectrum", "sdss", SPECTRUM, wave_min_aa=3600.0, wave_max_aa=9000.0),
    _entry("spectrum", "desi", SPECTRUM, wave_min_aa=3600.0, wave_max_aa=9800.0),
    _entry("spectrum", "manga", SPECTRUM, wave_min_aa=3550.0, wave_max_aa=7400.0),
    _entry("spectrum", "miles", SPECTRUM, wave_min_aa=3550.0, wave_max_aa=7400.0, sky_lines_aa=()),
    _entry("image", "legacy", IMAGE, surveys=("legacy",)),
    _entry("image", "hsc", IMAGE, surveys=("hsc",)),
    _entry("image", "hst_f606w", IMAGE, surveys=("hst_f606w", "hst_f814w", "cfht_i")),  # one single-band codec
    _entry("image", "hst_f814w", IMAGE, surveys=("hst_f606w", "hst_f814w", "cfht_i")),
    _entry("image", "cfht_i", IMAGE, surveys=("hst_f606w", "hst_f814w", "cfht_i")),
    _entry("xp", "bp", SEQUENCE, mode="position_bins"),
    _entry("xp", "rp", SEQUENCE, mode="position_bins"),
    _entry("lightcurve", "ztf_g", SEQUENCE, mode="kmeans"),
    _entry("lightcurve", "ztf_r", SEQUENCE, mode="kmeans"),
)

REGISTRY: Mapping[str, ModalityEntry] = MappingProxyType({e.token_key: e for e in _ENTRIES})
if len(REGISTRY) != len(_ENTRIES):
    raise ConfigError(f"duplicate token keys in the modality registry: {[e.token_key for e in _ENTRIES]}")


def entry(token_key: str) -> ModalityEntry:
    try:
        return REGISTRY[token_key]
    except KeyError:
        raise ConfigError(f"unknown modality {token_key!r}; registered: {sorted(REGISTRY)}") from None


def entries(kind: str | None = None) -> tuple[ModalityEntry, ...]:
    return tuple(e for e in _ENTRIES if kind is None or e.kind == kind)
