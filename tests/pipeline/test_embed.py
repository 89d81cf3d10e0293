"""The embed job on a real Ray instance, real Lance output, real held-out galaxies."""

import json

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import CatalogError, ConfigError, ModelError
from engine.model.bundle import ModelBundle
from engine.pipeline.runner import EmbedConfig, run_embed
from engine.pipeline.stages import NO_VALID_INPUT, TokenizeStage
from engine.modalities import Z_PHOT_COLUMNS
from tests.conftest import write_parts


@pytest.fixture(scope="module")
def embedded(ray_session, holdout_table, model_dir, tmp_path_factory):
    """Held-out photometry in 3 shuffled files, with bad rows, run with a batch size that leaves ragged batches."""
    d = tmp_path_factory.mktemp("embed")
    t = holdout_table
    u = t["mag_u"].to_numpy().copy()
    g = t["mag_g"].to_numpy().copy()
    u[:5] = np.nan  # NaN
    u[5:10] = 99.0  # sentinel
    g[10:12] = -np.inf
    allbad = np.full(t.num_rows, False)
    allbad[12] = True
    t = t.set_column(t.schema.get_field_index("mag_u"), "mag_u", pa.array(u))
    t = t.set_column(t.schema.get_field_index("mag_g"), "mag_g", pa.array(g))
    for c in ("mag_g", "mag_r", "mag_i", "mag_z"):
        v = t[c].to_numpy().copy()
        v[12] = -9999.0
        t = t.set_column(t.schema.get_field_index(c), c, pa.array(v))
    t = t.set_column(t.schema.get_field_index("mag_u"), "mag_u", pa.array(np.where(allbad, np.nan, u)))
    paths = write_parts(t, d, 3)
    out = str(d / "out.lance")
    summary = run_embed(EmbedConfig(catalog=(str(d / "part-*.parquet"),), out=out, model_dir=model_dir, batch_size=97))
    return t, paths, out, summary


def test_one_row_per_input_with_identical_ids(embedded):
    t, _, out, summary = embedded
    got = lance.dataset(out).to_table()
    assert got.num_rows == t.num_rows == summary["rows_in"] == summary["rows_out"]
    assert np.array_equal(np.sort(got["object_id"].to_numpy()), np.sort(t["object_id"].to_numpy()))
    assert summary["files"] == 3 and summary["ids_match"]


def test_schema_and_metadata(embedded, model_dir):
    _, _, out, _ = embedded
    ds = lance.dataset(out)
    s = ds.schema
    bundle = ModelBundle.load(model_dir)
    assert s.field("object_id").type == pa.int64()
    assert s.field("embedding").type == pa.list_(pa.float32(), bundle.embedding_dim)
    assert all(s.field(c).type == pa.float32() for c in Z_PHOT_COLUMNS)
    assert s.field("flags").type == pa.int32()
    meta = json.loads(s.metadata[b"engine"])
    assert meta["model_version"] == bundle.meta["version"] and meta["run_config"]["batch_size"] == 97
    assert meta["flags"]["missing_mag_u"] == 1 and meta["flags"]["no_valid_input"] == NO_VALID_INPUT


def test_outputs_line_up_with_ids_despite_ragged_batches_and_shuffling(embedded, model_dir):
    """Each row's embedding and z_phot equal a direct model call on that object's own photometry."""
    t, _, out, _ = embedded
    got = lance.dataset(out).to_table().sort_by("object_id")
    ref = t.sort_by("object_id")
    bundle = ModelBundle.load(model_dir)
    batch = TokenizeStage(model_dir)(ref)
    tokens = batch["tokens"].combine_chunks().flatten().to_numpy().reshape(ref.num_rows, -1)
    direct = bundle.predict(tokens, tokens != bundle.tokenizer.missing_token)
    emb = got["embedding"].combine_chunks().flatten().to_numpy().reshape(got.num_rows, -1)
    ok = ~np.isnan(direct["embedding"]).any(axis=1)
    np.testing.assert_allclose(emb[ok], direct["embedding"][ok], atol=1e-5)
    np.testing.assert_allclose(got["z_phot_mean"].to_numpy()[ok], direct["z_phot_mean"][ok], atol=1e-6)
    # embeddings differ between objects (nothing collapsed or broadcast)
    assert len(np.unique(emb[ok][:, 0])) > 0.9 * ok.sum()


def test_bad_values_are_flagged_not_dropped(embedded):
    t, _, out, summary = embedded
    got = lance.dataset(out).to_table().sort_by("object_id")
    ids = t["object_id"].to_numpy()
    flags = dict(zip(got["object_id"].to_numpy(), got["flags"].to_numpy()))
    for i in range(12):
        expect = 1 if i < 10 else 2  # bit 0 = mag_u, bit 1 = mag_g
        assert flags[ids[i]] == expect, i
    assert flags[ids[12]] == NO_VALID_INPUT | 0b11111
    assert summary["rows_flagged"] == 13 and summary["rows_without_valid_input"] == 1
    row = got.filter(pa.compute.equal(got["object_id"], ids[12]))
    assert np.isnan(row["z_phot_mean"].to_numpy()).all()
    # a bad u magnitude loses only the u-g colour token: z_phot still comes from r and the other colours
    bad_u = got.filter(pa.compute.equal(got["flags"], 1))["z_phot_median"].to_numpy()
    assert len(bad_u) == 10 and np.isfinite(bad_u).all() and (bad_u > 0).all()
    good = got.filter(pa.compute.equal(got["flags"], 0))
    z = good["z_phot_mean"].to_numpy()
    assert np.isfinite(z).all() and (z > 0).all() and (z < 0.4).all()
    assert (good["z_phot_l68"].to_numpy() <= good["z_phot_u68"].to_numpy()).all()


def test_missing_column_fails_before_any_work(ray_session, holdout_table, model_dir, tmp_path):
    path = tmp_path / "no_r.parquet"
    pq.write_table(holdout_table.drop_columns(["mag_r"]), path)
    out = tmp_path / "o.lance"
    with pytest.raises(CatalogError, match=r"1 of 1 input file\(s\) failed before any work .*no_r.parquet: "
                                           r"required column 'mag_r' \(input mag_r\) is missing"):
        run_embed(EmbedConfig(catalog=(str(path),), out=str(out), model_dir=model_dir))
    assert not out.exists()


def test_column_mapping_and_id_column(ray_session, holdout_table, model_dir, tmp_path):
    t = holdout_table.slice(0, 300).rename_columns(
        ["objid" if c == "object_id" else ("rmag" if c == "mag_r" else c) for c in holdout_table.column_names])
    pq.write_table(t, tmp_path / "c.parquet")
    out = str(tmp_path / "o.lance")
    s = run_embed(EmbedConfig(catalog=(str(tmp_path / "c.parquet"),), out=out, model_dir=model_dir,
                              id_column="objid", columns={"mag_r": "rmag"}))
    assert s["rows_out"] == 300 and s["rows_flagged"] == 0
    assert set(lance.dataset(out).to_table()["object_id"].to_pylist()) == set(t["objid"].to_pylist())
    with pytest.raises(ConfigError, match="already holds a Lance table"):
        run_embed(EmbedConfig(catalog=(str(tmp_path / "c.parquet"),), out=out, model_dir=model_dir,
                              id_column="objid", columns={"mag_r": "rmag"}))


def test_bad_model_dir_and_precision(tmp_path, model_dir):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match=r"lacks \['model.safetensors'"):
        run_embed(EmbedConfig(catalog=("x.parquet",), out=str(tmp_path / "o"), model_dir=str(tmp_path / "m")))
    with pytest.raises(ConfigError, match="--precision 'fp8' is not one of"):
        EmbedConfig(catalog=("x.parquet",), out="o", precision="fp8")


def test_fits_and_parquet_inputs_in_one_job(ray_session, holdout_table, model_dir, tmp_path):
    from astropy.table import Table

    fits_part, pq_part = holdout_table.slice(0, 400), holdout_table.slice(400)
    t = Table({c: fits_part[c].to_numpy() for c in fits_part.column_names})
    t["mag_u"][3] = np.nan
    t.write(tmp_path / "part-a.fits.gz")
    pq.write_table(pq_part, tmp_path / "part-b.parquet")
    out = str(tmp_path / "mixed.lance")
    s = run_embed(EmbedConfig(catalog=(str(tmp_path),), out=out, model_dir=model_dir))
    assert s["files"] == 2 and s["rows_out"] == holdout_table.num_rows
    got = lance.dataset(out).to_table(columns=["object_id", "flags"])
    assert np.array_equal(np.sort(got["object_id"].to_numpy()), np.sort(holdout_table["object_id"].to_numpy()))
    flags = dict(zip(got["object_id"].to_numpy(), got["flags"].to_numpy()))
    assert flags[fits_part["object_id"][3].as_py()] == 1 and s["rows_flagged"] == 1
