"""Synthetic survey releases resampled from the real sample, for tests and benchmarks.

``make_release`` writes N rows as many Parquet files: each row is a real SDSS galaxy from
the built-in sample (drawn with replacement) whose magnitudes are re-observed with noise at
the galaxy's own errors, given a position uniform on the sphere and a unique int64 id.
With ``healpix_nside`` the files are partitioned by an equal-area sky cell with HEALPix's
cell count (12 nside^2; not the official HEALPix numbering, which needs healpy) in hive-style
directories ``healpix=<cell>/``. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.sample import SAMPLE_PATH

BANDS = "ugriz"


def _sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def healpix_ring_band(dec_deg: np.ndarray, ra_deg: np.ndarray, nside: int) -> np.ndarray:
    """An equal-area sky partition with 12*nside^2 cells (HEALPix-like; not the official pixel numbering)."""
    z = np.sin(np.radians(dec_deg))
    n_bands = 4 * nside
    band = np.clip(((z + 1.0) / 2.0 * n_bands).astype(np.int64), 0, n_bands - 1)
    per_band = 3 * nside
    cell = np.clip((ra_deg / 360.0 * per_band).astype(np.int64), 0, per_band - 1)
    return band * per_band + cell


def release_table(n_rows: int, seed: int = 0, id_offset: int = 10_000_000_000, source: str | Path = SAMPLE_PATH) -> pa.Table:
    rng = np.random.default_rng(seed)
    base = pq.read_table(source)
    pick = rng.integers(0, base.num_rows, n_rows)
    ra, dec = _sky(rng, n_rows)
    cols = {"object_id": pa.array(id_offset + np.arange(n_rows, dtype=np.int64)), "ra": pa.array(ra), "dec": pa.array(dec)}
    for b in BANDS:
        mag = base[f"mag_{b}"].to_numpy()[pick]
        err = base[f"magerr_{b}"].to_numpy()[pick]
        cols[f"mag_{b}"] = pa.array(mag + rng.standard_normal(n_rows) * err)
        cols[f"magerr_{b}"] = pa.array(err)
    cols["z_true"] = pa.array(base["z_spec"].to_numpy()[pick])
    return pa.table(cols)


def make_release(out_dir: str | Path, n_rows: int, n_files: int, seed: int = 0, healpix_nside: int | None = None,
                 rows_per_chunk: int = 1_000_000) -> list[Path]:
    """Write the release in chunks (bounded memory); returns the file paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(np.int64)
    paths: list[Path] = []
    for i in range(n_files):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        parts = []
        for start in range(lo, hi, rows_per_chunk):
            stop = min(hi, start + rows_per_chunk)
            parts.append(release_table(stop - start, seed=seed * 1_000_003 + start, id_offset=10_000_000_000 + start))
        table = pa.concat_tables(parts) if parts else release_table(0, seed)
        if healpix_nside:
            pix = healpix_ring_band(table["dec"].to_numpy(), table["ra"].to_numpy(), healpix_nside)
            for p in np.unique(pix):
                d = out / f"healpix={p}"
                d.mkdir(exist_ok=True)
                paths.append(d / f"part-{i:05d}.parquet")
                pq.write_table(table.filter(pa.array(pix == p)), paths[-1])
        else:
            paths.append(out / f"part-{i:05d}.parquet")
            pq.write_table(table, paths[-1])
    return paths
