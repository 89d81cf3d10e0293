from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from engine.catalog.join import JoinConfig, join_catalog, match_ids
from engine.errors import CatalogError, ConfigError
from engine.modalities import Z_PHOT_COLUMNS

REPO = Path(__file__).resolve().parents[2]


def join(catalog: str, table: str, out: str, **kwargs):
    return join_catalog(JoinConfig(catalog, table, out, batch_size=700, **kwargs))


def oracle(table_data: pa.Table, ids: np.ndarray, column: str) -> np.ndarray:
    """The table's value of ``column`` for each id (NaN when absent), by a plain dict lookup."""
    by_id = dict(zip(table_data["object_id"].to_pylist(), table_data[column].to_pylist()))
    return np.array([np.nan if by_id.get(i) is None else by_id[i] for i in ids.tolist()])


def assert_same_columns(got: pa.Table, want: pa.Table) -> None:
    """Same schema, and per column the same nulls and values in the same order (NaN equals NaN)."""
    assert got.schema.equals(want.schema, check_metadata=True)
    for name in want.column_names:
        g, w = got[name], want[name]
        assert g.is_null().to_pylist() == w.is_null().to_pylist(), name
        if pa.types.is_floating(w.type):
            np.testing.assert_array_equal(g.to_numpy(), w.to_numpy(), err_msg=name)
        else:
            assert g.to_pylist() == w.to_pylist(), name


def absent(table_data: pa.Table, ids: np.ndarray) -> np.ndarray:
    return ~np.isin(ids, table_data["object_id"].to_numpy())


def test_parquet_join_keeps_every_row_and_column_and_adds_table_values(
    catalog_parquet, catalog_data, table_uri, table_data, sample, tmp_path
):
    out = str(tmp_path / "out.parquet")
    summary = join(catalog_parquet, table_uri, out)
    joined = pq.read_table(out)

    assert joined.column_names == catalog_data.column_names + list(Z_PHOT_COLUMNS)
    assert_same_columns(joined.select(catalog_data.column_names), catalog_data)
    ids = catalog_data["object_id"].to_numpy()
    for name in Z_PHOT_COLUMNS:
        np.testing.assert_array_equal(joined[name].to_numpy(), oracle(table_data, ids, name).astype(np.float32))

    n_absent = int(absent(table_data, ids).sum())
    assert n_absent > 0
    assert summary.to_dict() == {
        "rows": len(ids), "matched": len(ids) - n_absent, "unmatched": n_absent,
        "columns_added": list(Z_PHOT_COLUMNS), "out": out,
    }

    # a few ids checked against the sample's z_spec directly (conftest: u68 = z_spec + 0.01, std = 0.01 + 0.1 z)
    z_spec = dict(zip(sample["object_id"].to_pylist(), sample["z_spec"].to_pylist()))
    rows = joined.to_pylist()
    checked = [r for r in rows if r["z_phot_mean"] is not None and not np.isnan(r["z_phot_mean"])][:3]
    for r in checked:
        z = z_spec[r["object_id"]]
        assert r["z_phot_u68"] == pytest.approx(np.float32(z + 0.01), abs=0)
        assert r["z_phot_std"] == pytest.approx(np.float32(0.01 + 0.1 * z), abs=0)
    assert len(checked) == 3


def test_ids_absent_from_table_get_nulls(catalog_parquet, catalog_data, table_uri, table_data, tmp_path):
    out = str(tmp_path / "out.parquet")
    join(catalog_parquet, table_uri, out)
    joined = pq.read_table(out)
    missing = absent(table_data, catalog_data["object_id"].to_numpy())
    null = joined["z_phot_mean"].is_null().to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(null, missing)  # null in Parquet = "not in the table"
    assert np.isnan(joined["z_phot_u95"].to_numpy()[missing]).all()


def test_table_nan_predictions_stay_nan_and_count_as_matched(catalog_parquet, catalog_data, table_uri, tmp_path):
    summary = join(catalog_parquet, table_uri, str(tmp_path / "out.parquet"))
    joined = pq.read_table(tmp_path / "out.parquet")
    in_table_nan = ~joined["z_phot_mean"].is_null().to_numpy(zero_copy_only=False) & np.isnan(
        joined["z_phot_mean"].to_numpy()
    )
    assert in_table_nan.sum() > 0  # conftest: every 97th object has no valid inputs
    assert summary.matched == (~joined["z_phot_mean"].is_null().to_numpy(zero_copy_only=False)).sum()


def test_repeated_catalogue_ids_each_get_their_match(catalog_parquet, catalog_data, table_uri, tmp_path):
    join(catalog_parquet, table_uri, str(tmp_path / "out.parquet"))
    joined = pq.read_table(tmp_path / "out.parquet").to_pylist()
    by_id: dict[int, list] = {}
    for r in joined:
        by_id.setdefault(r["object_id"], []).append(r["z_phot_l95"])
    repeated = {k: v for k, v in by_id.items() if len(v) > 1}
    assert len(repeated) == 10
    for values in repeated.values():
        assert values[0] == values[1] or (values[0] is None and values[1] is None) or np.isnan(values).all()


def test_flags_and_column_subset_in_requested_order(catalog_parquet, catalog_data, table_uri, table_data, tmp_path):
    out = str(tmp_path / "out.parquet")
    summary = join(catalog_parquet, table_uri, out, columns=("z_phot_std", "z_phot_mean"), with_flags=True)
    joined = pq.read_table(out)
    assert joined.column_names[-3:] == ["z_phot_std", "z_phot_mean", "flags"]
    assert summary.columns_added == ("z_phot_std", "z_phot_mean", "flags")
    ids = catalog_data["object_id"].to_numpy()
    flags = joined["flags"]
    assert flags.type == pa.int32()
    expected = oracle(table_data, ids, "flags")
    matched = ~np.isnan(expected)
    np.testing.assert_array_equal(flags.to_numpy(zero_copy_only=False)[matched].astype(int), expected[matched])
    assert flags.null_count == int((~matched).sum())
    assert joined.schema.field("z_phot_std").metadata == {
        b"unit": b"", b"description": Z_PHOT_COLUMNS["z_phot_std"].encode()
    }


def test_fits_round_trip_keeps_units_descriptions_headers_and_user_columns(
    catalog_fits, catalog_data, table_uri, table_data, tmp_path
):
    out = str(tmp_path / "out.fits")
    summary = join(catalog_fits, table_uri, out, id_column="objid")
    ids = catalog_data["object_id"].to_numpy()
    assert summary.unmatched == int(absent(table_data, ids).sum())

    with fits.open(out) as hdul:
        primary, header = hdul[0].header, hdul[1].header
        assert primary["TELESCOP"] == "SDSS 2.5m"
        assert header["EXTNAME"] == "GALAXIES" and header["OBSERVER"] == "test-suite"
        assert header["TUNIT3"] == "mag" and header["TCOMM3"] == "SDSS r-band model magnitude"
        for i, name in enumerate(Z_PHOT_COLUMNS, start=10):  # 9 catalogue columns come first
            assert header[f"TTYPE{i}"] == name
            assert header[f"TUNIT{i}"] == ""  # dimensionless
            assert header[f"TCOMM{i}"] == Z_PHOT_COLUMNS[name]

    back = Table.read(out, character_as_bytes=False)
    user_columns = ["objid", "z_spec", "mag_r", "magerr_r", "name", "n_obs", "weight", "is_star", "seq"]
    assert back.colnames == user_columns + list(Z_PHOT_COLUMNS)
    assert str(back["mag_r"].unit) == "mag"
    assert back["z_phot_mean"].unit in (None, "")  # astropy reads TUNIT = '' as no unit
    assert {n: back[n].description for n in Z_PHOT_COLUMNS} == Z_PHOT_COLUMNS
    np.testing.assert_array_equal(back["objid"], ids)
    np.testing.assert_array_equal(back["name"], [s or "" for s in catalog_data["name"].to_pylist()])
    np.testing.assert_array_equal(back["is_star"], catalog_data["is_star"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(back["n_obs"], catalog_data["n_obs"].to_numpy())
    np.testing.assert_array_equal(back["weight"], catalog_data["weight"].to_numpy())  # NaNs included
    for name in ("z_phot_mean", "z_phot_l68"):
        got = np.ma.filled(back[name], np.nan)
        np.testing.assert_array_equal(got, oracle(table_data, ids, name).astype(np.float32))


@pytest.mark.parametrize("out_name", ["out.fits.gz", "out.pq"])
def test_cross_format_output(out_name, catalog_parquet, catalog_fits, catalog_data, table_uri, table_data, tmp_path):
    source = catalog_parquet if out_name.endswith(".gz") else catalog_fits
    id_column = "object_id" if source == catalog_parquet else "objid"
    out = str(tmp_path / out_name)
    join(source, table_uri, out, id_column=id_column, columns=("z_phot_median",))
    if out_name.endswith(".gz"):
        back = Table.read(out, character_as_bytes=False)
        ids, got = np.asarray(back["object_id"]), np.ma.filled(back["z_phot_median"], np.nan)
        assert back["name"].tolist() == [s or "" for s in catalog_data["name"].to_pylist()]  # FITS has no null string
        assert back["is_star"].tolist() == catalog_data["is_star"].to_pylist()
    else:
        back = pq.read_table(out)
        ids, got = back["objid"].to_numpy(), back["z_phot_median"].to_numpy()
        assert back.schema.field("mag_r").metadata[b"unit"] == b"mag"
        assert back.schema.field("mag_r").metadata[b"description"] == b"SDSS r-band model magnitude"
        assert back["name"].to_pylist() == [s or "" for s in catalog_data["name"].to_pylist()]
    np.testing.assert_array_equal(ids, catalog_data["object_id"].to_numpy())
    np.testing.assert_array_equal(got, oracle(table_data, ids, "z_phot_median").astype(np.float32))


def test_catalogue_from_fsspec_uri(catalog_data, table_uri, table_data, tmp_path):
    uri = "memory://join-test/catalog.parquet"
    with fsspec.open(uri, "wb") as f:
        pq.write_table(catalog_data, f)
    out = str(tmp_path / "out.parquet")
    summary = join(uri, table_uri, out, columns=("z_phot_mode",))
    assert summary.rows == catalog_data.num_rows
    ids = catalog_data["object_id"].to_numpy()
    got = pq.read_table(out)["z_phot_mode"].to_numpy()
    np.testing.assert_array_equal(got, oracle(table_data, ids, "z_phot_mode").astype(np.float32))


def test_colliding_column_needs_overwrite_then_is_replaced_in_place(catalog_data, table_uri, table_data, tmp_path):
    cat = catalog_data.add_column(1, "z_phot_mean", pa.array(np.full(catalog_data.num_rows, -1.0)))
    path = str(tmp_path / "cat.parquet")
    pq.write_table(cat, path)
    with pytest.raises(CatalogError, match=r"cat\.parquet already has column\(s\) \['z_phot_mean'\].*overwrite"):
        join(path, table_uri, str(tmp_path / "out.parquet"), columns=("z_phot_mean",))

    join(path, table_uri, str(tmp_path / "out.parquet"), columns=("z_phot_mean",), overwrite=True)
    joined = pq.read_table(tmp_path / "out.parquet")
    assert joined.column_names == cat.column_names
    ids = cat["object_id"].to_numpy()
    expected = oracle(table_data, ids, "z_phot_mean").astype(np.float32)
    np.testing.assert_array_equal(joined["z_phot_mean"].to_numpy(), expected)


def test_fits_collision_ignores_case(catalog_fits, table_uri, tmp_path):
    out = str(tmp_path / "out.fits")
    join(catalog_fits, table_uri, out, id_column="objid", columns=("z_phot_std",))
    with pytest.raises(CatalogError, match=r"already has column\(s\) \['z_phot_std'\]"):
        join(out, table_uri, str(tmp_path / "again.fits"), id_column="objid", columns=("z_phot_std",))


def test_missing_id_column_names_file_column_and_columns_present(catalog_fits, table_uri, tmp_path):
    with pytest.raises(CatalogError, match=r"catalog\.fits has no id column 'object_id'; columns present: \['objid'"):
        join(catalog_fits, table_uri, str(tmp_path / "out.fits"))


def test_non_integer_id_column(catalog_parquet, table_uri, tmp_path):
    with pytest.raises(CatalogError, match=r"id column 'z_spec' has type double; expected an integer type"):
        join(catalog_parquet, table_uri, str(tmp_path / "out.parquet"), id_column="z_spec")


def test_duplicate_ids_in_table_are_named(catalog_parquet, catalog_data, table_data, tmp_path):
    ids = catalog_data["object_id"].to_numpy()
    twice = ids[~absent(table_data, ids)][:2]
    uri = str(tmp_path / "dup.lance")
    dup = table_data.filter(pa.compute.is_in(table_data["object_id"], pa.array(twice)))
    lance.write_dataset(pa.concat_tables([table_data, dup]), uri)
    match = rf"dup\.lance has duplicate object_id values \(e\.g\. \[({twice[0]}|{twice[1]})"
    with pytest.raises(CatalogError, match=match):
        join(catalog_parquet, uri, str(tmp_path / "out.parquet"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"columns": ("z_phot_mean", "z_photo")}, r"unknown \['z_photo'\]; allowed: \['z_phot_mean', 'z_phot_median'"),
        ({"out": "out.csv"}, r"out\.csv: unsupported catalogue extension; expected one of \['\.fit', '\.fits'"),
        ({"catalog": "cat.txt"}, r"cat\.txt: unsupported .*'\.parquet', '\.pq'\]"),
        ({"columns": ()}, r"columns is empty"),
        ({"batch_size": 0}, r"batch_size=0; expected >= 1"),
    ],
)
def test_config_errors(kwargs, match):
    base = {"catalog": "cat.parquet", "table": "t.lance", "out": "out.fits"}
    with pytest.raises(ConfigError, match=match):
        JoinConfig(**{**base, **kwargs})


def test_table_errors(catalog_parquet, table_data, tmp_path):
    with pytest.raises(CatalogError, match=r"cannot open Lance table .*nope\.lance"):
        join(catalog_parquet, str(tmp_path / "nope.lance"), str(tmp_path / "out.parquet"))
    uri = str(tmp_path / "thin.lance")
    lance.write_dataset(table_data.select(["object_id", "z_phot_mean"]), uri)
    with pytest.raises(CatalogError, match=r"thin\.lance lacks column\(s\) \['z_phot_std'\]; columns present"):
        join(catalog_parquet, uri, str(tmp_path / "out.parquet"), columns=("z_phot_mean", "z_phot_std"))
    assert not (tmp_path / "out.parquet").exists()


def test_match_ids_known_answer():
    keys = np.array([3, 7, 2**40, 2**40 + 1], dtype=np.int64)
    rows, pos = match_ids(keys, np.array([7, 1, 2**40 + 1, 99, 3, 2**41], dtype=np.int64))
    np.testing.assert_array_equal(rows, [0, 2, 4])
    np.testing.assert_array_equal(pos, [1, 3, 0])
    rows, pos = match_ids(np.zeros(0, np.int64), np.array([1, 2]))
    assert rows.size == 0 and pos.size == 0


@pytest.mark.parametrize("fixture, id_column, out_name", [("catalog_parquet", "object_id", "o.parquet"),
                                                          ("catalog_fits", "objid", "o.fits")])
def test_job_script(fixture, id_column, out_name, request, catalog_data, table_uri, table_data, tmp_path):
    out = str(tmp_path / out_name)
    cmd = [sys.executable, str(REPO / "jobs" / "join.py"), "--catalog", request.getfixturevalue(fixture),
           "--table", table_uri, "--out", out, "--id-column", id_column, "--columns", "z_phot_mean,z_phot_u68",
           "--with-flags"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    n_absent = int(absent(table_data, catalog_data["object_id"].to_numpy()).sum())
    assert summary == {"rows": catalog_data.num_rows, "matched": catalog_data.num_rows - n_absent,
                       "unmatched": n_absent, "columns_added": ["z_phot_mean", "z_phot_u68", "flags"], "out": out}
    assert f"{n_absent} of {catalog_data.num_rows} catalogue rows have no match" in proc.stderr
    sidecar = json.loads(Path(out + ".join.json").read_text())
    assert sidecar["config"]["columns"] == ["z_phot_mean", "z_phot_u68"] and sidecar["summary"] == summary
    back = Table.read(out) if out.endswith(".fits") else Table(pq.read_table(out).to_pydict())
    assert back.colnames[-3:] == ["z_phot_mean", "z_phot_u68", "flags"] and len(back) == catalog_data.num_rows


def test_job_script_reports_errors(catalog_fits, table_uri, tmp_path):
    cmd = [sys.executable, str(REPO / "jobs" / "join.py"), "--catalog", catalog_fits, "--table", table_uri,
           "--out", str(tmp_path / "o.fits")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "CatalogError" in proc.stderr and "has no id column 'object_id'" in proc.stderr


def test_null_ids_are_unmatched_and_empty_catalogue_joins(catalog_data, table_uri, table_data, tmp_path):
    ids = catalog_data["object_id"].to_pylist()[:5]
    ids[1] = None
    path, out = str(tmp_path / "nulls.parquet"), str(tmp_path / "out.parquet")
    pq.write_table(pa.table({"object_id": pa.array(ids, pa.int64())}), path)
    summary = join(path, table_uri, out, columns=("z_phot_mean",))
    expected_null = [i is None or bool(absent(table_data, np.array([i]))[0]) for i in ids]
    assert summary.unmatched == sum(expected_null)
    assert pq.read_table(out)["z_phot_mean"].is_null().to_pylist() == expected_null

    pq.write_table(pa.table({"object_id": pa.array([], pa.int64())}), path)
    summary = join(path, table_uri, out, columns=("z_phot_mean",))
    assert (summary.rows, summary.matched, summary.unmatched) == (0, 0, 0)
    assert pq.read_table(out).column_names == ["object_id", "z_phot_mean"]
