"""Fixtures: a Lance predictions table and user catalogues built from the real SDSS sample.

The table holds 90% of the sample (every id with ``row % 10 == 3`` is absent), in shuffled
order over several fragments; its z_phot_* columns are fixed offsets of ``z_spec`` and every
97th object has NaN predictions (no valid inputs). Catalogues are shuffled subsets with user
columns of several types, ids absent from the table and repeated ids.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from engine.sample import SAMPLE_PATH

Z_OFFSETS = {  # z_phot_* = z_spec + offset (std: 0.01 + offset * z_spec)
    "z_phot_mean": 0.0,
    "z_phot_median": 0.001,
    "z_phot_mode": -0.002,
    "z_phot_std": 0.1,
    "z_phot_l68": -0.01,
    "z_phot_u68": 0.01,
    "z_phot_l95": -0.02,
    "z_phot_u95": 0.02,
}
N_CATALOG = 400


@pytest.fixture(scope="session")
def sample() -> pa.Table:
    return pq.read_table(SAMPLE_PATH)


@pytest.fixture(scope="session")
def table_data(sample) -> pa.Table:
    """Exactly what is written to the Lance table (the oracle for joined values)."""
    row = np.arange(sample.num_rows)
    keep = row % 10 != 3
    z = sample["z_spec"].to_numpy()[keep]
    no_input = row[keep] % 97 == 0
    cols = {"object_id": sample["object_id"].to_numpy()[keep]}
    cols["ra"], cols["dec"] = 150.0 + 0.01 * row[keep], 2.0 - 0.01 * row[keep]
    emb = np.stack([z, z**2, np.sin(z), np.cos(z)], axis=1).astype(np.float32)
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4)
    for name, off in Z_OFFSETS.items():
        values = (0.01 + off * z) if name == "z_phot_std" else (z + off)
        cols[name] = np.where(no_input, np.nan, values).astype(np.float32)
    cols["flags"] = np.where(no_input, 63, row[keep] % 4).astype(np.int32)
    order = np.random.default_rng(0).permutation(int(keep.sum()))
    return pa.table(cols).take(order)


@pytest.fixture(scope="session")
def table_uri(table_data, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("lance") / "predictions.lance")
    lance.write_dataset(table_data, uri, max_rows_per_file=1500)
    return uri


@pytest.fixture(scope="session")
def catalog_data(sample) -> pa.Table:
    """Shuffled subset with user columns; includes ids absent from the table and 10 repeated rows."""
    rng = np.random.default_rng(1)
    rows = rng.choice(sample.num_rows, N_CATALOG, replace=False)
    rows = np.concatenate([rows, rows[:10]])
    rng.shuffle(rows)
    n = len(rows)
    names = [f"SDSS-{i:05d}" if i % 7 else None for i in rows]  # some null strings
    weight = (rows % 13 / 13).astype(np.float32)
    weight[::50] = np.nan
    return _append(
        sample.select(["object_id", "z_spec", "mag_r", "magerr_r"]).take(rows),
        name=pa.array(names, pa.string()),
        n_obs=pa.array(rows % 5, pa.int16()),
        weight=pa.array(weight),
        is_star=pa.array(rows % 3 == 0, pa.bool_()),
        seq=pa.array(np.arange(n), pa.int64()),
    )


def _append(table: pa.Table, **columns: pa.Array) -> pa.Table:
    for name, array in columns.items():
        table = table.append_column(name, array)
    return table


@pytest.fixture()
def catalog_parquet(catalog_data, tmp_path) -> str:
    path = str(tmp_path / "catalog.parquet")
    pq.write_table(catalog_data, path)
    return path


@pytest.fixture()
def catalog_fits(catalog_data, tmp_path) -> str:
    """The catalogue as another tool would write it: units, TCOMMn, header keywords; no astropy YAML."""
    d = catalog_data
    names = np.array([s or "" for s in d["name"].to_pylist()])
    cols = [
        fits.Column(name="objid", format="K", array=d["object_id"].to_numpy()),
        fits.Column(name="z_spec", format="D", array=d["z_spec"].to_numpy()),
        fits.Column(name="mag_r", format="D", unit="mag", array=d["mag_r"].to_numpy()),
        fits.Column(name="magerr_r", format="D", unit="mag", array=d["magerr_r"].to_numpy()),
        fits.Column(name="name", format="10A", array=names),
        fits.Column(name="n_obs", format="I", array=d["n_obs"].to_numpy()),
        fits.Column(name="weight", format="E", array=d["weight"].to_numpy()),
        fits.Column(name="is_star", format="L", array=d["is_star"].to_numpy()),
        fits.Column(name="seq", format="K", array=d["seq"].to_numpy()),
    ]
    hdu = fits.BinTableHDU.from_columns(cols, name="GALAXIES")
    hdu.header["TCOMM3"] = "SDSS r-band model magnitude"
    hdu.header["OBSERVER"] = "test-suite"
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "SDSS 2.5m"
    path = str(tmp_path / "catalog.fits")
    fits.HDUList([primary, hdu]).writeto(path)
    return path
