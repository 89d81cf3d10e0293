"""The embed job on real CFHT stamps with the shipped image model (tok_image_cfht_i + mag_aper/flux_radius/ellipticity).

Catalogue: stamps of the sources detected in tests/data/images/cfht_a370_cutout.fits (CFHT I band, Abell 370,
inside the region the model never trained on), as nested-list cutout columns over 3 Parquet files, with rows
lacking the cutout, the scalars or both, stamps of other sizes and pixel scales (a centre crop, a 2x2-binned
stamp) and broken cutouts (all NaN, two bands, ragged rows, a negative pixel scale).
"""

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import ConfigError, UnitsFailedError
from engine.modalities.images import Image
from engine.model.bundle import ModelBundle
from engine.model.image_data import IMAGE_SCALARS, cut_field, measure_stamps
from engine.pipeline.images import (BAD_BANDS, BAD_PIXEL_SCALE, BAD_SHAPE, EMPTY_CUTOUT, check_image_field,
                                    image_columns)
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.pipeline.stages import NO_VALID_INPUT, TokenizeStage, flag_legend

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "engine/data/image_model"
CUTOUT = ROOT / "tests/data/images/cfht_a370_cutout.fits"
IMG = "tok_image_cfht_i"
COLUMNS = {"mag_aper": "mag_aper", "flux_radius": "flux_radius_arcsec", "ellipticity": "ellipticity"}
MAG, RADIUS, ELL, MISSING_IMG = 1, 2, 4, 8  # flag bits in model order: the three scalars, then the image
NO_SCALARS = MAG | RADIUS | ELL
SCALE = 0.206  # CFHT's native pixel scale (the survey's nominal one)

# stamp index (brightest first) -> (what the catalogue row holds, expected flags)
ROWS = {
    0: ("image", NO_SCALARS),
    1: ("image+all", 0),
    2: ("image", NO_SCALARS),
    3: ("image+mag", RADIUS | ELL),
    4: ("crop41", NO_SCALARS),  # a 41x41 centre crop: its own shape group
    5: ("binned", NO_SCALARS),  # 2x2-binned to 24x24 at 0.412"/pix: its own pixel-scale group
    6: ("image", NO_SCALARS),
    7: ("scalars", MISSING_IMG),
    8: ("nothing", NO_SCALARS | MISSING_IMG | NO_VALID_INPUT),
    9: ("all-NaN+mag", RADIUS | ELL | MISSING_IMG | EMPTY_CUTOUT),
    10: ("two bands+all", MISSING_IMG | BAD_BANDS),
    11: ("ragged", NO_SCALARS | MISSING_IMG | NO_VALID_INPUT | BAD_SHAPE),
    12: ("bad scale+mag", RADIUS | ELL | MISSING_IMG | BAD_PIXEL_SCALE),
    13: ("image", NO_SCALARS),
    14: ("image+all", 0),
}
N_EDGE = 2  # plus the first stamps that cross the cutout's edge (NaN-padded pixels are masked, not an error)


@pytest.fixture(scope="module")
def stamps():
    st = cut_field(CUTOUT, 96, 0.1)
    edge = np.flatnonzero(np.isnan(st.pixels).any(axis=(1, 2)))[:N_EDGE]
    inner = np.flatnonzero(~np.isnan(st.pixels).any(axis=(1, 2)))[: len(ROWS)]
    keep = np.concatenate([inner, edge])
    props = measure_stamps(st, 30.0)
    return st.pixels[keep].astype(np.float32), {c: props[c][keep] for c in COLUMNS.values()}


def _kinds() -> dict[int, str]:
    return {**{i: k for i, (k, _) in ROWS.items()}, **{len(ROWS) + j: "edge" for j in range(N_EDGE)}}


def _expected_flags() -> dict[int, int]:
    return {**{i: f for i, (_, f) in ROWS.items()}, **{len(ROWS) + j: NO_SCALARS for j in range(N_EDGE)}}


def _pixels(stamp: np.ndarray, kind: str) -> tuple[np.ndarray | None, float | None]:
    """The (bands, H, W) float32 cutout a row holds and its pixel scale column (None: the nominal scale)."""
    if kind in ("scalars", "nothing"):
        return None, None
    if kind == "crop41":
        return stamp[4:45, 4:45][None], None
    if kind == "binned":
        return stamp[:48, :48].reshape(24, 2, 24, 2).sum((1, 3))[None], 2 * SCALE
    if kind.startswith("all-NaN"):
        return np.full((1, 49, 49), np.nan, np.float32), None
    if kind.startswith("two bands"):
        return np.stack([stamp, stamp]), None
    return stamp[None], (-SCALE if kind.startswith("bad scale") else None)


def _catalogue(stamps) -> pa.Table:
    pixels, props = stamps
    cut, scale, scalars = [], [], {c: [] for c in COLUMNS.values()}
    for i, kind in _kinds().items():
        p, s = _pixels(pixels[i], kind)
        rows = None if p is None else [[list(map(float, r)) for r in band] for band in p]
        if kind == "ragged":
            rows[0][7] = rows[0][7][:-3]
        cut.append(rows)
        scale.append(s)
        given = {"image+all": COLUMNS.values(), "two bands+all": COLUMNS.values(), "scalars": COLUMNS.values()}.get(
            kind, ["mag_aper"] if kind.endswith("+mag") else [])
        for c in COLUMNS.values():
            scalars[c].append(float(props[c][i]) if c in given else None)
    return pa.table({
        "object_id": pa.array(5000 + np.arange(len(cut)), pa.int64()),
        "cutout_cfht_i": pa.array(cut, pa.list_(pa.list_(pa.list_(pa.float32())))),
        "pixel_scale_arcsec": pa.array(scale, pa.float64()),
        **{c: pa.array(v, pa.float64()) for c, v in scalars.items()},
    })


@pytest.fixture(scope="module")
def embedded(ray_session, stamps, tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    table = _catalogue(stamps)
    for k, rows in enumerate(np.array_split(np.random.default_rng(0).permutation(table.num_rows), 3)):
        pq.write_table(table.take(rows), d / f"part-{k}.parquet")
    out = str(d / "out.lance")
    columns = {f"{IMG}.pixel_scale_arcsec": "pixel_scale_arcsec"}
    summary = run_embed(EmbedConfig(catalog=(str(d / "part-*.parquet"),), out=out, model_dir=str(MODEL), batch_size=4,
                                    columns=columns))
    got = lance.dataset(out).to_table()
    return table, summary, got, {int(i): k for k, i in enumerate(got["object_id"].to_numpy())}


def test_every_stamp_once_with_exact_flags(embedded):
    table, summary, got, row = embedded
    assert sorted(got["object_id"].to_pylist()) == sorted(table["object_id"].to_pylist())
    assert summary["rows_in"] == summary["rows_out"] == table.num_rows == len(ROWS) + N_EDGE and summary["files"] == 3
    flags = got["flags"].to_numpy()
    assert {i: int(flags[row[5000 + i]]) for i in _kinds()} == _expected_flags()
    assert summary["rows_without_valid_input"] == 2
    assert summary["rows_flagged"] == sum(1 for f in _expected_flags().values() if f)


def test_schema_and_legend_follow_the_model(embedded):
    _, summary, got, _ = embedded
    assert got.schema.names == ["object_id", "embedding", "mag_aper_pred", "mag_aper_pred_std", "flux_radius_pred",
                                "flux_radius_pred_std", "ellipticity_pred", "ellipticity_pred_std", "flags"]
    bundle = ModelBundle.load(MODEL)
    assert flag_legend(bundle.config) == {
        "missing_mag_aper": 1, "missing_flux_radius": 2, "missing_ellipticity": 4, "missing_tok_image_cfht_i": 8,
        "no_valid_input": NO_VALID_INPUT, "empty_cutout": EMPTY_CUTOUT, "bad_cutout_bands": BAD_BANDS,
        "bad_cutout_shape": BAD_SHAPE, "bad_cutout_pixel_scale": BAD_PIXEL_SCALE}
    meta = lance.dataset(summary["out"]).schema.metadata[b"engine"].decode()
    assert '"tok_image_cfht_i": {"cutout": "cutout_cfht_i", "pixel_scale_arcsec": "pixel_scale_arcsec"}' in meta


def _direct_scalars(stamps, idx: list[int]) -> dict:
    """The rows' scalar values as the model API takes them (NaN where absent)."""
    table = _catalogue(stamps)
    return {m: np.array([np.nan if (v := table[c][i].as_py()) is None else v for i in idx]) for m, c in COLUMNS.items()}


def _direct_inputs(stamps, idx: list[int]) -> dict:
    """The same rows as the model API takes them: Image objects plus the scalar values."""
    kinds = _kinds()
    images = [Image(p.astype(np.float64), ("CFHT-I",), s or SCALE) for p, s in (_pixels(stamps[0][i], kinds[i]) for i in idx)]
    return {IMG: images, **_direct_scalars(stamps, idx)}


def test_embeddings_and_predictions_equal_the_direct_model(embedded, stamps):
    _, _, got, row = embedded
    bundle = ModelBundle.load(MODEL)
    idx = [i for i, k in _kinds().items() if k.startswith(("image", "crop", "binned", "edge"))]
    inputs = _direct_inputs(stamps, idx)
    direct = bundle.encode(bundle.tokenize(inputs))
    emb = np.stack([np.asarray(got["embedding"][row[5000 + i]].as_py()) for i in idx])
    cos = (emb * direct).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(direct, axis=1)
    assert cos.min() > 0.9999
    gen = bundle.generate(inputs, list(IMAGE_SCALARS), seed=0)
    for m in IMAGE_SCALARS:
        pred = np.array([got[f"{m}_pred"][row[5000 + i]].as_py() for i in idx])
        std = np.array([got[f"{m}_pred_std"][row[5000 + i]].as_py() for i in idx])
        np.testing.assert_allclose(pred, gen[m]["median"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(std, gen[m]["std"], rtol=1e-3, atol=1e-4)


def test_rows_without_a_usable_cutout_are_embedded_from_their_scalars(embedded, stamps):
    _, _, got, row = embedded
    bundle = ModelBundle.load(MODEL)
    for i in (7, 9, 10, 12):  # no cutout / all NaN / two bands / bad pixel scale: the scalars alone
        direct = bundle.encode(bundle.tokenize(_direct_scalars(stamps, [i])))[0]
        emb = np.asarray(got["embedding"][row[5000 + i]].as_py())
        assert emb @ direct / np.linalg.norm(emb) / np.linalg.norm(direct) > 0.9999
    for i in (8, 11):  # nothing valid: NaN embedding and predictions
        assert np.isnan(got["embedding"][row[5000 + i]].as_py()).all() and np.isnan(got["mag_aper_pred"][row[5000 + i]].as_py())


def test_image_only_rows_predict_their_measured_magnitude(embedded, stamps):
    _, _, got, row = embedded
    _, props = stamps
    only = [i for i, k in _kinds().items() if k in ("image", "edge") and np.isfinite(props["mag_aper"][i])]
    pred = np.array([got["mag_aper_pred"][row[5000 + i]].as_py() for i in only])
    err = np.abs(pred - props["mag_aper"][only])
    assert len(only) >= 6 and np.median(err) < 0.5


def _layouts(pixels: np.ndarray) -> dict[str, pa.Array]:
    """One 49x49 single-band stamp per row in every layout the job reads (the module doc of engine.pipeline.images)."""
    n = len(pixels)
    flat = pixels.reshape(n, -1)
    tensor_type = pa.fixed_shape_tensor(pa.float32(), (49, 49))
    return {
        "fixed_size_list": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
        "list": pa.array(list(flat), pa.list_(pa.float32())),
        "nested_hw": pa.array([[list(r) for r in p] for p in pixels], pa.list_(pa.list_(pa.float32()))),
        "tensor": pa.ExtensionArray.from_storage(tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 49 * 49)),
        "binary": pa.array([p.astype("<f4").tobytes() for p in flat], pa.binary()),
    }


def test_every_cutout_layout_gives_the_same_tokens(stamps):
    pixels = stamps[0][:6]
    stage = TokenizeStage(str(MODEL))
    tokens = {}
    for name, col in _layouts(pixels).items():
        table = pa.table({"object_id": pa.array(np.arange(6), pa.int64()), "cutout_cfht_i": col,
                          **{c: pa.array([None] * 6, pa.float64()) for c in COLUMNS.values()}})
        out = stage(table)
        assert out["flags"].to_pylist() == [NO_SCALARS] * 6, name
        tokens[name] = out[IMG]
    tok = ModelBundle.load(MODEL).token_tokenizers[IMG]
    direct = tok.encode([Image(p[None].astype(np.float64), ("CFHT-I",), SCALE) for p in pixels])
    for name, col in tokens.items():
        np.testing.assert_array_equal(np.asarray(col.to_pylist()), direct, err_msg=name)


def test_cutout_columns_are_remappable_and_checked(stamps):
    table = _catalogue(stamps).slice(0, 8)
    renamed = table.rename_columns(["object_id", "STAMP", "PIXSCALE", "mag_aper", "flux_radius_arcsec", "ellipticity"])
    columns = {f"{IMG}.cutout": "STAMP", f"{IMG}.pixel_scale_arcsec": "PIXSCALE"}
    a = TokenizeStage(str(MODEL), columns={f"{IMG}.pixel_scale_arcsec": "pixel_scale_arcsec"})(table)
    b = TokenizeStage(str(MODEL), columns=columns)(renamed)
    assert a[IMG].equals(b[IMG]) and a["flags"].equals(b["flags"])
    with pytest.raises(ConfigError, match=r"tok_image_cfht_i.stamp.*expected \['tok_image_cfht_i.cutout'"):
        image_columns(IMG, "cfht_i", {f"{IMG}.stamp": "S"})
    schema = table.schema.append(pa.field("s", pa.string()))
    assert "has type string; expected list<float>" in check_image_field(schema, "s", "tok_image_cfht_i cutout")
    assert "is missing" in check_image_field(schema, "nope", "tok_image_cfht_i cutout")
    assert check_image_field(table.schema, "cutout_cfht_i", "cutout") is None
    tensors = pa.schema([pa.field("t", pa.fixed_shape_tensor(pa.float32(), (49, 49))),
                         pa.field("p", pa.fixed_shape_tensor(pa.float32(), (49, 49), permutation=[1, 0])),
                         pa.field("b", pa.binary())])
    assert check_image_field(tensors, "t", "cutout") is None and check_image_field(tensors, "b", "cutout") is None
    assert "permutation [1, 0]; expected a row-major numeric tensor" in check_image_field(tensors, "p", "cutout")


def test_broken_binary_and_flat_cutouts_are_flagged_not_fatal(stamps):
    pixels = stamps[0][:4].reshape(4, -1)
    raw = [pixels[0].astype("<f4").tobytes()[:-2], None, pixels[2].astype("<f4").tobytes(), pixels[3][:-7].astype("<f4").tobytes()]
    table = pa.table({"object_id": pa.array(np.arange(4), pa.int64()), "cutout_cfht_i": pa.array(raw, pa.binary()),
                      **{c: pa.array([None] * 4, pa.float64()) for c in COLUMNS.values()}})
    out = TokenizeStage(str(MODEL))(table.slice(0, 4))
    broken = NO_SCALARS | MISSING_IMG | NO_VALID_INPUT
    assert out["flags"].to_pylist() == [broken | BAD_SHAPE, broken, NO_SCALARS, broken | BAD_SHAPE]
    tok = ModelBundle.load(MODEL).token_tokenizers[IMG]
    direct = tok.encode([Image(pixels[2].reshape(1, 49, 49).astype(np.float64), ("CFHT-I",), SCALE)])
    np.testing.assert_array_equal(np.asarray(out[IMG][2].as_py()), direct[0])


def test_a_file_whose_cutout_column_is_not_an_image_fails_before_any_work(stamps, tmp_path):
    table = _catalogue(stamps).slice(0, 4)
    pq.write_table(table, tmp_path / "good.parquet")
    bad = table.set_column(1, "cutout_cfht_i", pa.array(["a", "b", "c", "d"]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    cfg = EmbedConfig(catalog=(str(tmp_path / "*.parquet"),), out=str(tmp_path / "out.lance"), model_dir=str(MODEL))
    with pytest.raises(UnitsFailedError, match=r"bad.parquet: column 'cutout_cfht_i' \(tok_image_cfht_i cutout\) has type "
                                               r"string; expected list<float>"):
        run_embed(cfg)
    assert not (tmp_path / "out.lance").exists()
