"""Modalities the engine knows. Scalars derive from ONE table of scalar specs (below);
spectra, sequences and images are typed dataclasses in sibling modules, and
``registry`` maps each modality kind to its tokenizer.

A scalar modality is a catalogue column with a binning and a unit, or a colour derived from two
of them (``derived_from``: the tokenizer forms a - b from the two columns, so colours keep the
precision of the catalogue values rather than of two magnitude bins). Everything else (the
tokenizer's column list, the model's token streams, the FITS units of joined outputs and
the bit of each input in the ``flags`` column) is derived from :data:`SCALARS`; adding a
column is adding a row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError

BINNINGS = ("quantile", "linear", "log")


@dataclass(frozen=True)
class ScalarSpec:
    name: str  # token key, e.g. "mag_r"
    column: str  # default catalogue column
    binning: str  # one of BINNINGS
    unit: str  # astropy unit string ("mag", "" for dimensionless)
    description: str
    error_column: str | None = None  # 1-sigma error column, used by fit-time row filters
    derived_from: tuple[str, str] | None = None  # (a, b): the value is modality a - modality b (a colour)

    def __post_init__(self) -> None:
        if self.binning not in BINNINGS:
            raise ConfigError(
                f"ScalarSpec {self.name!r}: binning={self.binning!r} is not one of {BINNINGS}"
            )
        if self.derived_from is not None and (len(self.derived_from) != 2 or self.derived_from[0] == self.derived_from[1]):
            raise ConfigError(f"ScalarSpec {self.name!r}: derived_from={self.derived_from!r}; expected two different modalities")


SCALARS: tuple[ScalarSpec, ...] = (
    *(
        ScalarSpec(
            f"mag_{b}", f"mag_{b}", "quantile", "mag", f"SDSS {b}-band model magnitude (AB)", f"magerr_{b}"
        )
        for b in "ugriz"
    ),
    # LSST's sixth band; SDSS has none, so the default model does not read it. LSST catalogues
    # (e.g. mag_y_lsst) map their columns onto these streams with TrainConfig.columns.
    ScalarSpec("mag_y", "mag_y", "quantile", "mag", "y-band magnitude (AB; LSST/HSC)", "magerr_y"),
    # Colours of neighbouring bands, formed by the tokenizer from the two magnitude columns (not read from the catalogue)
    *(
        ScalarSpec(f"colour_{a}{b}", f"colour_{a}{b}", "quantile", "mag", f"{a} - {b} colour", derived_from=(f"mag_{a}", f"mag_{b}"))
        for a, b in zip("ugriz", "grizy")
    ),
    ScalarSpec("redshift", "z_spec", "quantile", "", "spectroscopic redshift"),
    ScalarSpec("teff", "teff", "quantile", "K", "stellar effective temperature"),
    ScalarSpec("logg", "logg", "quantile", "dex(cm / s2)", "stellar surface gravity log10(g / (cm s^-2))"),
    ScalarSpec("feh", "feh", "quantile", "dex", "stellar iron abundance [Fe/H]"),
    # Measured on an image stamp (engine.model.image_data): the image model's scalar companions
    ScalarSpec("mag_aper", "mag_aper", "quantile", "mag", "magnitude within 1 arcsec of the centroid (image's band)"),
    ScalarSpec("flux_radius", "flux_radius_arcsec", "quantile", "arcsec", "half-light radius within 3 arcsec"),
    ScalarSpec("ellipticity", "ellipticity", "quantile", "", "1 - b/a from flux-weighted second moments"),
)

SCALARS_BY_NAME = {spec.name: spec for spec in SCALARS}


def catalogue_inputs(inputs: tuple[str, ...]) -> tuple[str, ...]:
    """The catalogue scalars behind model inputs: the columns a job reads and its ``missing_<modality>`` flag bits.

    Without colours: the inputs, in their order. With colours: every non-colour input and both magnitudes
    behind each colour, in table order (mag_u, mag_g, mag_r, ...)."""
    specs = [scalar_spec(name) for name in inputs]
    if not any(s.derived_from for s in specs):
        return tuple(inputs)
    wanted = {m for s in specs for m in (s.derived_from or (s.name,))}
    return tuple(s.name for s in SCALARS if s.name in wanted)


def is_derived(name: str) -> bool:
    spec = SCALARS_BY_NAME.get(name)
    return spec is not None and spec.derived_from is not None


def scalar_spec(name: str) -> ScalarSpec:
    try:
        return SCALARS_BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown scalar modality {name!r}; known: {sorted(SCALARS_BY_NAME)}") from None


# Redshift summaries written by the embed job, with their units and descriptions (FITS headers).
Z_PHOT_COLUMNS: dict[str, str] = {
    "z_phot_mean": "mean of the predicted redshift distribution p(z)",
    "z_phot_median": "median of p(z)",
    "z_phot_mode": "centre of the most probable redshift bin of p(z)",
    "z_phot_std": "standard deviation of p(z)",
    "z_phot_l68": "lower bound of the central 68% interval of p(z) (16th percentile)",
    "z_phot_u68": "upper bound of the central 68% interval of p(z) (84th percentile)",
    "z_phot_l95": "lower bound of the central 95% interval of p(z) (2.5th percentile)",
    "z_phot_u95": "upper bound of the central 95% interval of p(z) (97.5th percentile)",
}
