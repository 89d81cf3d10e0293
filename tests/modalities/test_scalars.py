import pytest

from engine.errors import ConfigError
from engine.modalities import SCALARS, ScalarSpec, catalogue_inputs, is_derived, scalar_spec

MAGS = tuple(f"mag_{b}" for b in "ugriz")


def test_colours_derive_from_neighbouring_magnitudes():
    colours = [s for s in SCALARS if s.derived_from]
    assert [s.name for s in colours] == ["colour_ug", "colour_gr", "colour_ri", "colour_iz", "colour_zy"]
    for s in colours:
        a, b = s.derived_from
        assert s.name == f"colour_{a[-1]}{b[-1]}" and s.unit == "mag" and not is_derived(a) and not is_derived(b)
    assert not is_derived("mag_r") and not is_derived("no_such_modality")


def test_catalogue_inputs_are_what_a_job_reads():
    # without colours: the inputs as given, in their order (flag bits of earlier models unchanged)
    assert catalogue_inputs(("mag_r", "mag_u")) == ("mag_r", "mag_u")
    # with colours: the magnitudes behind them and the other inputs, in table order, each once
    assert catalogue_inputs(("mag_r", "colour_ug", "colour_gr", "colour_ri", "colour_iz")) == MAGS
    assert catalogue_inputs(("colour_zy", "mag_i")) == ("mag_i", "mag_z", "mag_y")
    with pytest.raises(ConfigError, match="unknown scalar modality 'colour_xx'"):
        catalogue_inputs(("colour_xx",))


def test_a_colour_needs_two_different_sources():
    with pytest.raises(ConfigError, match="derived_from"):
        ScalarSpec("c", "c", "quantile", "mag", "bad", derived_from=("mag_u", "mag_u"))
    assert scalar_spec("colour_ri").derived_from == ("mag_r", "mag_i")
