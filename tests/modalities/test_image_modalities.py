import numpy as np
import pytest

from engine.errors import ConfigError, ModalityError
from engine.modalities.images import SURVEYS, Image, SurveySpec, survey_for, survey_spec


def _img(bands=("CFHT-I",), shape=(1, 8, 8), scale=0.2, **kw):
    return Image(np.ones(shape), bands, scale, **kw)


def test_survey_table_has_unique_keys_and_consistent_specs():
    assert len({s.token_key for s in SURVEYS}) == len({s.name for s in SURVEYS}) == len(SURVEYS)
    assert survey_spec("legacy").bands == ("LS-g", "LS-r", "LS-i", "LS-z")
    assert survey_spec("hsc").n_bands == 5 and survey_spec("hst_f606w").n_bands == 1
    assert all(s.n_tokens == s.token_grid**2 > 0 for s in SURVEYS)
    assert survey_for(_img(("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y"), (5, 4, 4))).name == "hsc"


def test_image_valid_combines_nan_mask_and_ivar_and_crop_keeps_the_centre():
    flux = np.arange(36, dtype=float).reshape(1, 6, 6)
    flux[0, 0, 0] = np.nan
    mask = np.zeros_like(flux, bool)
    mask[0, 1, 1] = True
    ivar = np.ones_like(flux)
    ivar[0, 2, 2] = 0
    im = Image(flux, ("CFHT-I",), 0.2, ivar=ivar, mask=mask)
    assert (~im.valid).sum() == 3 and not im.valid[0, 0, 0] and not im.valid[0, 1, 1] and not im.valid[0, 2, 2]
    c = im.crop(2)
    np.testing.assert_array_equal(c.flux[0], [[14, 15], [20, 21]])  # centre pixel (3, 3) kept at (1, 1)
    assert c.mask.shape == (1, 2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (8, 8)}, r"expected shape \(bands, H, W\); got \(8, 8\)"),
        ({"bands": ("a", "b")}, "expected one name per flux band"),
        ({"scale": float("nan")}, "pixel_scale_arcsec: expected a finite number > 0; got nan"),
        ({"scale": 0.0}, "pixel_scale_arcsec: expected a finite number > 0"),
        ({"ivar": -np.ones((1, 8, 8))}, "negative"),
        ({"mask": np.zeros((1, 4, 4), bool)}, r"Image.mask: expected shape \(1, 8, 8\)"),
    ],
)
def test_bad_images_are_rejected_with_expected_and_got(kwargs, match):
    with pytest.raises(ModalityError, match=match):
        _img(**kwargs)


def test_all_nan_image_and_unknown_bands_are_rejected():
    with pytest.raises(ModalityError, match="all NaN"):
        Image(np.full((1, 4, 4), np.nan), ("CFHT-I",), 0.2)
    with pytest.raises(ModalityError, match="no image survey has bands"):
        survey_for(_img(("V",)))
    with pytest.raises(ModalityError, match=r"expected 4 band\(s\).*got 1 band"):
        survey_spec("legacy").check(_img())


def test_bad_specs_are_rejected():
    with pytest.raises(ConfigError, match="stretch_scales has 1 values; expected 2"):
        SurveySpec("x", "tok_x", ("a", "b"), 0.1, (22.5, 22.5), (1.0,))
    with pytest.raises(ConfigError, match="unknown image survey 'sdss'"):
        survey_spec("sdss")
