import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import CatalogError, CodecError, ConfigError
from engine.tokenizers.scalar import BinLookup, Reservoir, ScalarTokenizer, ScalarTokenizerConfig

MAGS = tuple(f"mag_{b}" for b in "ugriz")


@pytest.fixture(scope="module")
def fitted(sample_table):
    return ScalarTokenizer(ScalarTokenizerConfig(columns=MAGS, n_bins=64)).fit([sample_table])


def test_quantile_bins_hold_equal_counts_and_tokens_follow_values(fitted, sample_table):
    r = sample_table["mag_r"].to_numpy()
    tok = fitted.encode({"mag_r": r}).tokens[:, MAGS.index("mag_r")]
    counts = np.bincount(tok, minlength=64)
    assert counts.sum() == len(r)
    assert counts.min() >= 0.8 * len(r) / 64 and counts.max() <= 1.2 * len(r) / 64 + 1
    order = np.argsort(r)
    assert np.all(np.diff(tok[order]) >= 0)  # monotonic in the value


def test_missing_values_get_the_missing_token_never_a_real_bin(fitted):
    vals = np.array([np.nan, np.inf, -np.inf, 99.0, -99.0, -9999.0, 17.0])
    enc = fitted.encode({c: vals for c in MAGS})
    assert enc.missing[:6].all() and not enc.missing[6].any()
    assert (enc.tokens[:6] == fitted.missing_token).all()
    assert (enc.tokens[6] < fitted.n_bins).all()
    decoded = fitted.decode(enc.tokens)
    assert np.isnan(decoded["mag_u"][:6]).all()


def test_absent_column_is_all_missing(fitted):
    enc = fitted.encode({"mag_r": np.array([16.0, 17.0])})
    assert enc.missing[:, MAGS.index("mag_u")].all()
    assert not enc.missing[:, MAGS.index("mag_r")].any()


def test_decode_lands_within_the_bin_and_beyond_range_values_clip(fitted, sample_table):
    r = sample_table["mag_r"].to_numpy()
    j = MAGS.index("mag_r")
    tok = fitted.encode({"mag_r": r}).tokens[:, j]
    back = fitted.decode(fitted.encode({c: sample_table[c].to_numpy() for c in MAGS}).tokens)["mag_r"]
    edges = fitted.edges["mag_r"]
    assert np.all((back >= edges[tok] - 1e-9) & (back <= edges[tok + 1] + 1e-9))
    ext = fitted.encode({"mag_r": np.array([0.0, 40.0])}).tokens[:, j]
    assert ext.tolist() == [0, 63]


@pytest.mark.parametrize("binning", ["linear", "log"])
def test_linear_and_log_binning(sample_table, binning):
    tok = ScalarTokenizer(ScalarTokenizerConfig(columns=("mag_r",), binnings=(binning,), n_bins=10)).fit([sample_table])
    e = tok.edges["mag_r"]
    steps = np.diff(e) if binning == "linear" else np.diff(np.log(e))
    assert np.allclose(steps, steps[0])
    r = sample_table["mag_r"].to_numpy()
    assert e[0] == pytest.approx(r.min()) and e[-1] == pytest.approx(r.max())


def test_streaming_over_files_equals_one_table_and_is_seeded(sample_table, tmp_path):
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(sample_table.num_rows), 4)):
        paths.append(tmp_path / f"p{i}.parquet")
        pq.write_table(sample_table.take(chunk), paths[-1])
    cfg = ScalarTokenizerConfig(columns=MAGS, n_bins=32)
    a = ScalarTokenizer(cfg).fit(paths, batch_rows=700)
    b = ScalarTokenizer(cfg).fit([sample_table])
    for c in MAGS:
        np.testing.assert_allclose(a.edges[c], b.edges[c])
    # a reservoir smaller than the data: bounded, reproducible with the seed, still close to the truth
    small = ScalarTokenizerConfig(columns=MAGS, n_bins=32, max_values_per_col=1000, rng_seed=3)
    s1, s2 = ScalarTokenizer(small).fit(paths, batch_rows=700), ScalarTokenizer(small).fit(paths, batch_rows=700)
    np.testing.assert_array_equal(s1.edges["mag_r"], s2.edges["mag_r"])
    assert np.abs(np.median(s1.centres["mag_r"]) - np.median(b.centres["mag_r"])) < 0.1


def test_reservoir_is_uniform_over_the_stream():
    res = Reservoir(2000, np.random.default_rng(0))
    for start in range(0, 100_000, 7_000):
        res.add(np.arange(start, min(start + 7_000, 100_000), dtype=float))
    s = res.sample()
    assert len(s) == 2000 and len(np.unique(s)) == 2000
    assert abs(s.mean() - 50_000) < 2_000  # a uniform sample of 0..99999 (sd of the mean ~650)
    assert abs(np.mean(s < 50_000) - 0.5) < 0.05


def test_row_filters_shape_the_edges(sample_table):
    base = ScalarTokenizer(ScalarTokenizerConfig(columns=("mag_r",), n_bins=16)).fit([sample_table])
    cut = ScalarTokenizer(ScalarTokenizerConfig(columns=("mag_r",), n_bins=16, mag_filter_col="mag_r",
                                                 mag_min=15.0, mag_max=17.0)).fit([sample_table])
    assert base.edges["mag_r"][0] < 15.0 and cut.edges["mag_r"][0] >= 15.0 and cut.edges["mag_r"][-1] <= 17.0
    err = ScalarTokenizer(ScalarTokenizerConfig(columns=("mag_u",), n_bins=16, magerr_cols=("magerr_u",),
                                                magerr_max=0.05)).fit([sample_table])
    u, eu = sample_table["mag_u"].to_numpy(), sample_table["magerr_u"].to_numpy()
    assert err.edges["mag_u"][-1] == pytest.approx(u[eu <= 0.05].max())


def test_save_load_round_trip_is_exact_json(fitted, tmp_path):
    path = tmp_path / "tok.json"
    fitted.save(path)
    json.loads(path.read_text())  # plain JSON, no pickle
    back = ScalarTokenizer.load(path)
    assert back.config == fitted.config
    for c in MAGS:
        np.testing.assert_array_equal(back.edges[c], fitted.edges[c])
        np.testing.assert_array_equal(back.centres[c], fitted.centres[c])


def test_errors_name_what_is_wrong(sample_table, tmp_path):
    with pytest.raises(CodecError, match="not fitted"):
        ScalarTokenizer(ScalarTokenizerConfig(columns=MAGS)).encode({"mag_r": np.ones(2)})
    path = tmp_path / "nomag.parquet"
    pq.write_table(sample_table.drop_columns(["mag_g"]), path)
    with pytest.raises(CatalogError, match=r"nomag.parquet: missing column\(s\) \['mag_g'\]"):
        ScalarTokenizer(ScalarTokenizerConfig(columns=MAGS)).fit([path])
    with pytest.raises(ConfigError, match="binnings"):
        ScalarTokenizerConfig(columns=("a",), binnings=("cubic",))
    with pytest.raises(ConfigError, match="n_bins"):
        ScalarTokenizerConfig(columns=("a",), n_bins=1)
    bad = tmp_path / "tok.json"
    bad.write_text(json.dumps({"kind": "scalar", "format_version": 99}))
    with pytest.raises(CodecError, match="format_version"):
        ScalarTokenizer.load(bad)
    with pytest.raises(CodecError, match="no valid values"):
        ScalarTokenizer(ScalarTokenizerConfig(columns=("x",), n_bins=4)).fit([pa.table({"x": [np.nan] * 10})])


@pytest.mark.parametrize("kind", ["quantile_sample", "duplicated_edges", "linear", "single_edge"])
def test_bin_lookup_equals_searchsorted_everywhere(kind):
    rng = np.random.default_rng(3)
    inner = {
        "quantile_sample": np.quantile(rng.normal(20, 2, 3000), np.linspace(0, 1, 1025)[1:-1]),
        "duplicated_edges": np.sort(np.concatenate([np.full(50, 18.0), rng.uniform(15, 25, 300), np.full(7, 25.0)])),
        "linear": np.linspace(-3.0, 7.0, 1023),
        "single_edge": np.array([1.5]),
    }[kind]
    x = np.concatenate([
        rng.normal(inner.mean(), 3 * (inner.std() + 1), 20000),  # beyond both ends too
        inner, np.nextafter(inner, -np.inf), np.nextafter(inner, np.inf),  # on and next to every edge
        [-1e30, 1e30, 0.0],
    ])
    got = BinLookup(inner, cells=257)(x)
    assert np.array_equal(got, np.searchsorted(inner, x, side="right"))


# ---- colours: derived columns ----------------------------------------------------------------
COLOURS = (("colour_ug", "mag_u", "mag_g"), ("colour_gr", "mag_g", "mag_r"))


@pytest.fixture(scope="module")
def with_colours(sample_table):
    cfg = ScalarTokenizerConfig(columns=("mag_r", "colour_ug", "colour_gr"), n_bins=256, derived=COLOURS)
    return ScalarTokenizer(cfg).fit([sample_table])


def test_colours_are_fitted_and_encoded_from_the_magnitude_columns(with_colours, sample_table):
    mags = {c: sample_table[c].to_numpy().astype(np.float64) for c in MAGS}
    ug = mags["mag_u"] - mags["mag_g"]
    # fitted on the colour values themselves: quantile edges of u - g, not of either magnitude
    direct = ScalarTokenizer(ScalarTokenizerConfig(columns=("colour_ug",), n_bins=256)).fit(
        [pa.table({"colour_ug": ug})])
    np.testing.assert_array_equal(with_colours.edges["colour_ug"], direct.edges["colour_ug"])
    enc = with_colours.encode(mags)  # only magnitudes given: the tokenizer forms the colours
    np.testing.assert_array_equal(enc.tokens[:, 1], direct.encode({"colour_ug": ug}).tokens[:, 0])
    # a colour keeps the precision of the catalogue values: its bin holds the true colour
    centre = with_colours.decode(enc.tokens)["colour_ug"]
    assert np.median(np.abs(centre - ug)) < 0.005
    # given directly, a colour wins over the magnitudes
    given = with_colours.encode({**mags, "colour_ug": np.full(len(ug), 1.5)})
    assert (given.tokens[:, 1] == with_colours.encode({"colour_ug": np.array([1.5])}).tokens[0, 1]).all()


def test_a_colour_is_missing_where_either_magnitude_is(with_colours):
    u = np.array([19.0, 99.0, np.nan, 19.0, 19.0])
    g = np.array([18.0, 18.0, 18.0, -99.0, 18.0])
    r = np.array([17.5, 17.5, 17.5, 17.5, np.inf])
    enc = with_colours.encode({"mag_u": u, "mag_g": g, "mag_r": r})
    assert enc.missing[:, 1].tolist() == [False, True, True, True, False]  # u - g
    assert enc.missing[:, 2].tolist() == [False, False, False, True, True]  # g - r
    assert (enc.tokens[enc.missing] == with_colours.missing_token).all()


def test_colour_config_round_trips_and_is_validated(with_colours, tmp_path):
    assert with_colours.config.source_columns == ("mag_r", "mag_u", "mag_g")
    with_colours.save(tmp_path / "tok.json")
    back = ScalarTokenizer.load(tmp_path / "tok.json")
    assert back.config == with_colours.config and back.config.derived == COLOURS
    vals = {c: np.array([19.1, 18.2, 17.6, 17.2, 17.0])[[i]] for i, c in enumerate(MAGS)}
    np.testing.assert_array_equal(back.encode(vals).tokens, with_colours.encode(vals).tokens)
    with pytest.raises(ConfigError, match="derived entry"):
        ScalarTokenizerConfig(columns=("mag_r",), derived=(("colour_ug", "mag_u", "mag_g"),))  # not a tokenized column
    with pytest.raises(ConfigError, match="derived entry"):
        ScalarTokenizerConfig(columns=("c",), derived=(("c", "c", "mag_g"),))
