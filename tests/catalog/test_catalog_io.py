from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from engine.catalog.io import (
    Catalog,
    OutputColumn,
    catalog_format,
    integer_column,
    open_output,
    read_catalog,
    write_catalog,
)
from engine.errors import CatalogError, ConfigError


@pytest.mark.parametrize(
    "path, fmt",
    [("a.parquet", "parquet"), ("s3://b/a.PQ", "parquet"), ("a.fits", "fits"), ("a.FIT", "fits"),
     ("memory://x/a.fits.gz", "fits")],
)
def test_catalog_format(path, fmt):
    assert catalog_format(path) == fmt


def test_catalog_format_rejects_others_listing_supported():
    supported = r"\['\.fit', '\.fits', '\.fits\.gz', '\.parquet', '\.pq'\]"
    with pytest.raises(ConfigError, match=r"a\.csv: unsupported catalogue extension; expected one of " + supported):
        catalog_format("a.csv")


def test_arrow_types_survive_fits(tmp_path):
    table = pa.table({
        "id": pa.array([5, 6, 7], pa.int64()),
        "band": pa.array(["g", "r", "g"]).dictionary_encode(),
        "label": pa.array(["a", None, "ccc"]),
        "n": pa.array([1, None, 3], pa.int16()),
        "u": pa.array([1, 2, 2**32 - 1], pa.uint32()),
        "ok": pa.array([True, False, True]),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2),
    })
    out = str(tmp_path / "t.fits")
    write_catalog(Catalog("t.parquet", table), out)
    back = Table.read(out, character_as_bytes=False)
    assert back["band"].tolist() == ["g", "r", "g"]
    assert back["label"].tolist() == ["a", "", "ccc"]
    assert back["n"].mask.tolist() == [False, True, False] and back["n"][0] == 1 and back["n"][2] == 3
    assert back["u"].tolist() == [1, 2, 2**32 - 1]
    assert back["ok"].tolist() == [True, False, True]
    np.testing.assert_array_equal(back["vec"], [[0, 1], [2, 3], [4, 5]])


def test_arrow_type_fits_cannot_store_is_named(tmp_path):
    table = pa.table({"id": [1, 2], "tags": pa.array([[1], [2, 3]], pa.list_(pa.int64()))})
    with pytest.raises(CatalogError, match=r"t\.parquet: column 'tags' has Arrow type list<item: int64>.*Parquet"):
        write_catalog(Catalog("t.parquet", table), str(tmp_path / "t.fits"))
    table = pa.table({"id": [1, 2], "name": ["NGC 1", "Caf\u00e9"]})
    with pytest.raises(CatalogError, match=r"t\.parquet: column 'name' has non-ASCII strings"):
        write_catalog(Catalog("t.parquet", table), str(tmp_path / "t.fits"))
    assert list(tmp_path.iterdir()) == []


def test_fits_columns_to_parquet(tmp_path):
    cols = [
        fits.Column(name="id", format="J", array=np.array([1, 2, 3]), null=-1),
        fits.Column(name="flux", format="2E", unit="Jy", array=np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)),
        fits.Column(name="name", format="4A", array=np.array(["ab", "c", "defg"])),
    ]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.data["id"][1] = -1  # TNULL
    hdu.header["TCOMM2"] = "two fluxes"
    src, out = str(tmp_path / "c.fit"), str(tmp_path / "c.parquet")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(src)
    catalog = read_catalog(src)
    assert catalog.table["flux"].description == "two fluxes"  # TCOMMn read as the description
    write_catalog(catalog, out)
    back = pq.read_table(out)
    assert back["id"].to_pylist() == [1, None, 3]
    assert back["flux"].to_pylist() == [[1, 2], [3, 4], [5, 6]]
    assert back["name"].to_pylist() == ["ab", "c", "defg"]
    assert back.schema.field("flux").metadata == {b"unit": b"Jy", b"description": b"two fluxes"}


def test_integer_column_nulls_and_types(tmp_path):
    table = pa.table({"id": pa.array([3, None, 2**40], pa.int64()), "u": pa.array([1, 2, 2**63], pa.uint64()),
                      "f": [1.0, 2.0, 3.0]})
    catalog = Catalog("c.parquet", table)
    ids, valid = integer_column(catalog, "id")
    assert ids.dtype == np.int64 and ids[valid].tolist() == [3, 2**40] and valid.tolist() == [True, False, True]
    with pytest.raises(CatalogError, match=r"c\.parquet: id column 'u' has uint64 values above the int64 range"):
        integer_column(catalog, "u")
    with pytest.raises(CatalogError, match=r"id column 'f' has type double; expected an integer type"):
        integer_column(catalog, "f")
    with pytest.raises(CatalogError, match=r"c\.parquet has no id column 'ID'; columns present: \['id', 'u', 'f'\]"):
        integer_column(catalog, "ID")
    fits_catalog = Catalog("c.fits", Table({"objid": np.array([1.5, 2.0])}))
    with pytest.raises(CatalogError, match=r"c\.fits: id column 'objid' has type float64; expected an integer"):
        integer_column(fits_catalog, "objid")


def test_new_columns_missing_values_per_format(tmp_path):
    catalog = Catalog("c.parquet", pa.table({"id": [1, 2, 3]}))
    valid = np.array([True, False, True])
    new = [OutputColumn("z", np.array([0.1, 0.0, np.nan], np.float32), valid, "", "redshift"),
           OutputColumn("flags", np.array([4, 0, 1], np.int32), valid, None, "bits")]
    write_catalog(catalog, str(tmp_path / "o.parquet"), new)
    back = pq.read_table(tmp_path / "o.parquet")
    assert back["z"].is_null().to_pylist() == [False, True, False] and np.isnan(back["z"][2].as_py())
    assert back["flags"].to_pylist() == [4, None, 1]
    write_catalog(catalog, str(tmp_path / "o.fits"), new)
    back = Table.read(tmp_path / "o.fits")
    np.testing.assert_array_equal(np.ma.filled(back["z"], np.nan), np.array([0.1, np.nan, np.nan], np.float32))
    assert back["flags"].mask.tolist() == [False, True, False] and back["flags"].description == "bits"


def test_read_errors(tmp_path):
    with pytest.raises(CatalogError, match=r"catalogue .*none\.parquet not found"):
        read_catalog(str(tmp_path / "none.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(CatalogError, match=r"cannot read catalogue .*bad\.parquet as parquet"):
        read_catalog(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.fits").write_bytes(b"not fits" * 400)
    with pytest.raises(CatalogError, match=r"cannot read catalogue .*bad\.fits as FITS"):
        read_catalog(str(tmp_path / "bad.fits"))
    fits.PrimaryHDU(np.zeros((2, 2))).writeto(tmp_path / "image.fits")
    with pytest.raises(CatalogError, match=r"image\.fits: no table HDU; HDUs present: \['PrimaryHDU'\]"):
        read_catalog(str(tmp_path / "image.fits"))


def test_open_output_is_atomic(tmp_path):
    out = tmp_path / "sub" / "o.parquet"
    with open_output(str(out)) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError):
        with open_output(str(out)) as f:
            f.write(b"half-written")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"first"
    assert [p.name for p in out.parent.iterdir()] == ["o.parquet"]  # no temporary file left
