"""The embed job on the held-out MILES stars of test_spectra_pipeline written as FITS binary tables.

Two layouts of the same rows: variable-length array columns (TFORM ``PE()``/``QD()``: a row without a
spectrum has length 0) and fixed-width vector columns (``4300E``: one file per shape; a row without a
spectrum holds NaN flux). Upper-case FITS names are mapped with ``--columns``. Every row must come out
with the flags of test_spectra_pipeline and the embedding and predictions of the Parquet run of the same rows.
"""

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from engine.errors import CatalogError, UnitsFailedError
from engine.pipeline.runner import EmbedConfig, run_embed
from jobs.embed import main as embed_main
from tests.pipeline.test_spectra_pipeline import MODEL, ROWS, SPEC, catalogue_rows, stars  # noqa: F401 (fixture)

PARAMS = ("teff", "logg", "feh")
COLUMNS = {f"{SPEC}.flux": "FLUX", f"{SPEC}.ivar": "IVAR", f"{SPEC}.wavelength_aa": "WAVE",
           **{p: p.upper() for p in PARAMS}}
OUTPUTS = ("embedding", *(f"{p}_pred{s}" for p in PARAMS for s in ("", "_std")))


def _param_columns(table: pa.Table) -> list[fits.Column]:
    ids = fits.Column(name="OBJID", format="K", array=table["object_id"].to_numpy())
    return [ids, *(fits.Column(name=p.upper(), format="D", array=table[p].to_numpy(zero_copy_only=False))
                   for p in PARAMS)]  # null parameters -> NaN


def _write(path: Path, columns: list[fits.Column]) -> None:
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns)]).writeto(path)


def write_variable_length(table: pa.Table, path: Path) -> None:
    """flux/ivar as PE(), wavelength as QD(); a null spectrum becomes a length-0 array."""
    def heap(name, dtype):
        return np.array([np.asarray(v if v is not None else [], dtype) for v in table[name].to_pylist()] + [None],
                        dtype=object)[:-1]  # the trailing None keeps numpy from stacking equal-length rows into 2-D

    _write(path, _param_columns(table) + [fits.Column(name="FLUX", format="PE()", array=heap("flux", np.float32)),
                                          fits.Column(name="IVAR", format="PE()", array=heap("ivar", np.float32)),
                                          fits.Column(name="WAVE", format="QD()", array=heap("wavelength_aa", np.float64))])


def write_fixed_width(table: pa.Table, directory: Path) -> list[Path]:
    """One file per (flux, ivar, wavelength) width; a row without a spectrum gets NaN flux, zero ivar and the grid."""
    grid = next(w for w in table["wavelength_aa"].to_pylist() if w is not None and len(w) == 4300)
    rows = {"flux": [], "ivar": [], "wavelength_aa": []}
    for f, iv, w in zip(*(table[c].to_pylist() for c in rows)):
        empty = f is None
        rows["flux"].append(np.full(len(grid), np.nan, np.float32) if empty else np.asarray(f, np.float32))
        rows["ivar"].append(np.zeros(len(grid), np.float32) if empty else np.asarray(iv, np.float32))
        rows["wavelength_aa"].append(np.asarray(grid if empty else w, np.float64))
    shapes = [tuple(len(rows[c][i]) for c in rows) for i in range(table.num_rows)]
    paths = []
    for k, shape in enumerate(sorted(set(shapes))):
        sel = [i for i, s in enumerate(shapes) if s == shape]
        vectors = [fits.Column(name=name, format=f"{n}{code}", array=np.stack([rows[c][i] for i in sel]))
                   for name, c, code, n in zip(("FLUX", "IVAR", "WAVE"), rows, "EED", shape)]
        paths.append(directory / f"part-{k}.fits")
        _write(paths[-1], _param_columns(table.take(sel)) + vectors)
    return paths


def _by_id(uri: str) -> dict[int, dict]:
    got = lance.dataset(uri).to_table()
    return {r["object_id"]: r for r in got.to_pylist()}


@pytest.fixture(scope="module")
def runs(ray_session, stars, tmp_path_factory):  # noqa: F811 (the imported fixture)
    d = tmp_path_factory.mktemp("spectra_fits")
    table = catalogue_rows(*stars)
    pq.write_table(table, d / "all.parquet")
    parquet = run_embed(EmbedConfig(catalog=(str(d / "all.parquet"),), out=str(d / "pq.lance"), model_dir=str(MODEL),
                                    batch_size=4))
    (d / "vla").mkdir()
    half = table.num_rows // 2
    write_variable_length(table.slice(0, half), d / "vla/a.fits")
    write_variable_length(table.slice(half), d / "vla/b.fits.gz")
    vla = embed_main(["--catalog", str(d / "vla"), "--out", str(d / "vla.lance"), "--model", str(MODEL),
                      "--id-column", "OBJID", "--batch-size", "4", "--columns", *(f"{k}={v}" for k, v in COLUMNS.items())])
    (d / "fixed").mkdir()
    fixed_paths = write_fixed_width(table, d / "fixed")
    fixed = run_embed(EmbedConfig(catalog=(str(d / "fixed/*.fits"),), out=str(d / "fixed.lance"), model_dir=str(MODEL),
                                  id_column="OBJID", columns=COLUMNS, batch_size=4))
    (d / "mixed").mkdir()  # one job over FITS vector columns (4300E) and a Parquet file whose flux is list<double>
    renamed = {"object_id": "OBJID", "flux": "FLUX", "ivar": "IVAR", "wavelength_aa": "WAVE", **COLUMNS}
    part = table.slice(0, half).rename_columns([renamed[c] for c in table.column_names])
    part = part.set_column(1, "FLUX", part["FLUX"].cast(pa.list_(pa.float64())))
    pq.write_table(part, d / "mixed/a.parquet")
    write_fixed_width(table.slice(half), d / "mixed")
    mixed = run_embed(EmbedConfig(catalog=(str(d / "mixed"),), out=str(d / "mixed.lance"), model_dir=str(MODEL),
                                  id_column="OBJID", columns=COLUMNS, batch_size=4))
    return {"parquet": (parquet, _by_id(parquet["out"])), "vla": (vla, _by_id(vla["out"])),
            "fixed": (fixed, _by_id(fixed["out"])), "mixed": (mixed, _by_id(mixed["out"])), "fixed_paths": fixed_paths}


def test_fixed_width_files_have_one_shape_each(runs):
    widths = [tuple(fits.getheader(p, 1)[f"TFORM{i}"] for i in (5, 6, 7)) for p in runs["fixed_paths"]]
    assert sorted(widths) == [("4000E", "4000E", "4000D"), ("4300E", "4293E", "4300D"), ("4300E", "4300E", "4300D")]


@pytest.mark.parametrize("layout", ["vla", "fixed", "mixed"])
def test_every_star_once_with_the_parquet_flags(runs, layout):
    summary, got = runs[layout]
    assert sorted(got) == sorted(ROWS)
    assert {s: got[s]["flags"] for s in ROWS} == {s: f for s, (_, f) in ROWS.items()}
    assert summary["rows_in"] == summary["rows_out"] == len(ROWS) and summary["ids_match"] and not summary["failed_units"]
    assert summary["files"] == {"vla": 2, "fixed": 3, "mixed": 4}[layout]
    assert summary["rows_flagged"] == runs["parquet"][0]["rows_flagged"]
    assert summary["rows_without_valid_input"] == runs["parquet"][0]["rows_without_valid_input"] == 2


@pytest.mark.parametrize("layout", ["vla", "fixed", "mixed"])
def test_embeddings_and_predictions_equal_the_parquet_run(runs, layout):
    _, parquet = runs["parquet"]
    _, got = runs[layout]
    for column in OUTPUTS:
        a = np.array([parquet[s][column] for s in ROWS], np.float64)
        b = np.array([got[s][column] for s in ROWS], np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column  # NaN exactly for the rows without valid input
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=column)
    assert np.isfinite(np.array([got[s]["embedding"] for s in ROWS if s not in (833, 945)])).all()


def test_table_metadata_names_the_fits_columns(runs):
    meta = lance.dataset(runs["fixed"][0]["out"]).schema.metadata[b"engine"].decode()
    assert '"tok_spec_miles": {"flux": "FLUX", "ivar": "IVAR", "wavelength_aa": "WAVE", "redshift": null}' in meta


def _bad_flux(tmp_path, flux: fits.Column) -> str:
    n = flux.array.shape[0]
    cols = [fits.Column(name="OBJID", format="K", array=np.arange(n)),
            *(fits.Column(name=p.upper(), format="D", array=np.ones(n)) for p in PARAMS), flux,
            fits.Column(name="IVAR", format="4E", array=np.ones((n, 4), np.float32)),
            fits.Column(name="WAVE", format="4D", array=np.tile(np.arange(1.0, 5.0), (n, 1)))]
    path = tmp_path / "bad.fits"
    _write(path, cols)
    return str(path)


@pytest.mark.parametrize("flux, got", [
    (fits.Column(name="FLUX", format="E", array=np.ones(2, np.float32)), "type float"),
    (fits.Column(name="FLUX", format="8E", dim="(4,2)", array=np.ones((2, 2, 4), np.float32)),
     r"type fixed_size_list<item: fixed_size_list<item: float>\[4\]>\[2\]"),
    (fits.Column(name="FLUX", format="4A", array=np.array(["abcd", "efgh"])), "type string"),
    (fits.Column(name="FLUX", format="4C", array=np.ones((2, 4), np.complex64)), r"type fixed_size_list<item: null>\[4\]"),
])
def test_a_flux_column_of_the_wrong_shape_or_type_stops_the_job_naming_file_and_column(tmp_path, flux, got):
    path = _bad_flux(tmp_path, flux)
    cfg = EmbedConfig(catalog=(path,), out=str(tmp_path / "out.lance"), model_dir=str(MODEL), id_column="OBJID",
                      columns=COLUMNS)
    with pytest.raises(UnitsFailedError, match=rf"failed before any work.*bad\.fits: column 'FLUX' \({SPEC} flux\) "
                                               rf"has {got}; expected list<float> or fixed_size_list<float>"):
        run_embed(cfg)


def test_reading_a_complex_column_names_file_and_column(tmp_path):
    from engine.pipeline.read import filesystem_for, read_fits

    path = _bad_flux(tmp_path, fits.Column(name="FLUX", format="4C", array=np.ones((2, 4), np.complex64)))
    fs, inner = filesystem_for(path)
    assert read_fits(fs, inner, ["IVAR"])["IVAR"].type == pa.list_(pa.float32(), 4)
    with pytest.raises(CatalogError, match=r"bad\.fits: FITS column 'FLUX' \(TFORM 4C\) has no Arrow type"):
        read_fits(fs, inner, ["OBJID", "FLUX"])
    with pytest.raises(CatalogError, match=r"bad\.fits: FITS table has no column 'flux'; it has \['OBJID'"):
        read_fits(fs, inner, ["flux"])
