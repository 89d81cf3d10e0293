"""Image modalities: a generic N-band :class:`Image` and ONE table of per-survey specs.

Each survey is its own modality (own token key), identified by its band names; the image
tokenizer looks the spec up from the bands of the image. A spec carries what survey-specific
preprocessing needs: the nominal pixel scale, AB zero-points of the native flux unit, and the
per-band softening of the arcsinh stretch (native flux per native pixel, ~1-2 sigma of the sky).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, ModalityError


@dataclass(frozen=True)
class Image:
    """Multi-band image: ``flux`` (bands, H, W) in the survey's native unit per pixel.

    ``ivar`` (same shape, >= 0) and ``mask`` (same shape, True = bad pixel) are optional; NaN flux
    pixels count as masked.
    """

    flux: np.ndarray
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    ivar: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        flux = np.asarray(self.flux)
        if flux.ndim != 3 or min(flux.shape) < 1:
            raise ModalityError(f"Image.flux: expected shape (bands, H, W); got {flux.shape}")
        if not np.issubdtype(flux.dtype, np.floating):
            raise ModalityError(f"Image.flux: expected a floating dtype; got {flux.dtype}")
        object.__setattr__(self, "flux", flux)
        object.__setattr__(self, "bands", tuple(self.bands))
        if len(self.bands) != flux.shape[0]:
            raise ModalityError(
                f"Image.bands: expected one name per flux band ({flux.shape[0]}); got {len(self.bands)}: {self.bands}"
            )
        scale = self.pixel_scale_arcsec
        if not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale) or scale <= 0:
            raise ModalityError(f"Image.pixel_scale_arcsec: expected a finite number > 0; got {scale!r}")
        for name in ("ivar", "mask"):
            arr = getattr(self, name)
            if arr is not None and np.shape(arr) != flux.shape:
                raise ModalityError(f"Image.{name}: expected shape {flux.shape} like flux; got {np.shape(arr)}")
        if self.ivar is not None and np.any(np.asarray(self.ivar) < 0):
            raise ModalityError("Image.ivar: expected values >= 0; got negative inverse variances")
        if self.mask is not None:
            object.__setattr__(self, "mask", np.asarray(self.mask, dtype=bool))
        if not self.valid.any():
            raise ModalityError("Image.flux: expected at least one finite, unmasked pixel; got none (all NaN/masked)")

    @property
    def valid(self) -> np.ndarray:
        """(bands, H, W) True where the pixel is finite, unmasked and (if ivar given) ivar > 0."""
        ok = np.isfinite(self.flux)
        if self.mask is not None:
            ok &= ~self.mask
        if self.ivar is not None:
            ok &= np.asarray(self.ivar) > 0
        return ok

    def crop(self, size: int) -> "Image":
        """Centre crop to (size, size); the centre pixel is (H // 2, W // 2)."""
        _, h, w = self.flux.shape
        if not 1 <= size <= min(h, w):
            raise ModalityError(f"Image.crop: expected 1 <= size <= {min(h, w)}; got {size}")
        y0, x0 = h // 2 - size // 2, w // 2 - size // 2
        cut = (slice(None), slice(y0, y0 + size), slice(x0, x0 + size))
        pick = lambda a: None if a is None else np.asarray(a)[cut]  # noqa: E731
        return Image(self.flux[cut], self.bands, self.pixel_scale_arcsec, pick(self.ivar), pick(self.mask))


@dataclass(frozen=True)
class SurveySpec:
    name: str
    token_key: str
    bands: tuple[str, ...]
    pixel_scale_arcsec: float  # nominal native pixel scale
    zero_points_ab: tuple[float, ...]  # AB magnitude of 1 native flux unit, per band
    stretch_scales: tuple[float, ...]  # arcsinh softening per band, native flux per native pixel
    token_grid: int = 12  # tokens per side of a stamp; n_tokens = token_grid**2
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.bands)
        if n == 0 or len(set(self.bands)) != n:
            raise ConfigError(f"SurveySpec {self.name!r}: bands={self.bands}; expected distinct, non-empty")
        for field, vals in (("zero_points_ab", self.zero_points_ab), ("stretch_scales", self.stretch_scales)):
            if len(vals) != n:
                raise ConfigError(f"SurveySpec {self.name!r}: {field} has {len(vals)} values; expected {n} (one per band)")
        if not all(math.isfinite(s) and s > 0 for s in self.stretch_scales):
            raise ConfigError(f"SurveySpec {self.name!r}: stretch_scales={self.stretch_scales}; expected finite > 0")
        if not (math.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0):
            raise ConfigError(f"SurveySpec {self.name!r}: pixel_scale_arcsec={self.pixel_scale_arcsec}; expected > 0")
        if self.token_grid < 1:
            raise ConfigError(f"SurveySpec {self.name!r}: token_grid={self.token_grid}; expected >= 1")

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def n_tokens(self) -> int:
        return self.token_grid**2

    def check(self, image: Image) -> None:
        if image.bands != self.bands:
            raise ModalityError(
                f"{self.name} image: expected {self.n_bands} band(s) {self.bands}; "
                f"got {len(image.bands)} band(s) {image.bands}"
            )


# Zero-points of the HST fields come from their PHOTFLAM/PHOTPLAM headers; the CFHT and MUSE files
# carry no photometric calibration, so theirs are nominal. Stretch softenings are ~1-2x the sky sigma
# measured on the fields in /work/shared/data/mpdaf (LS/HSC: typical coadd sky noise).
SURVEYS: tuple[SurveySpec, ...] = (
    SurveySpec("legacy", "tok_image_legacy", ("LS-g", "LS-r", "LS-i", "LS-z"), 0.262,
               (22.5,) * 4, (0.01, 0.015, 0.02, 0.03), description="DESI Legacy Surveys griz, nanomaggies"),
    SurveySpec("hsc", "tok_image_hsc", ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y"), 0.168,
               (27.0,) * 5, (0.04, 0.05, 0.06, 0.1, 0.15), description="Subaru HSC grizy coadd (zp 27)"),
    SurveySpec("hst_f606w", "tok_image_hst_f606w", ("HST-F606W",), 0.04,
               (23.0,), (6e-5,), description="HST WFPC2 F606W (HDF-S)"),
    SurveySpec("hst_f814w", "tok_image_hst_f814w", ("HST-F814W",), 0.10,
               (22.1,), (4e-3,), description="HST WFPC2 F814W counts/s (Abell 478)"),
    SurveySpec("cfht_i", "tok_image_cfht_i", ("CFHT-I",), 0.206,
               (30.0,), (15.0,), description="CFHT I band ADU (Abell 370), nominal zero-point"),
    SurveySpec("muse_white", "tok_image_muse_white", ("MUSE-WHITE",), 0.2,
               (30.0,), (0.05,), description="MUSE white-light image (HDF-S), nominal zero-point"),
    SurveySpec("generic", "tok_image_generic", ("GENERIC",), 0.1,
               (22.5,), (1.0,), description="any single-band image in nanomaggies"),
)

SURVEYS_BY_NAME = {s.name: s for s in SURVEYS}
_SURVEYS_BY_BANDS = {s.bands: s for s in SURVEYS}
assert len(_SURVEYS_BY_BANDS) == len(SURVEYS) and len({s.token_key for s in SURVEYS}) == len(SURVEYS)


def survey_spec(name: str) -> SurveySpec:
    try:
        return SURVEYS_BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown image survey {name!r}; known: {sorted(SURVEYS_BY_NAME)}") from None


def survey_for(image: Image) -> SurveySpec:
    """The survey whose band names are exactly the image's."""
    try:
        return _SURVEYS_BY_BANDS[image.bands]
    except KeyError:
        known = {s.name: s.bands for s in SURVEYS}
        raise ModalityError(f"no image survey has bands {image.bands}; expected one of {known}") from None
