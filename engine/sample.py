"""The built-in sample: 5,000 real SDSS Main Galaxy Sample galaxies, and the train/holdout split.

The Parquet file ships in ``engine/data`` with its NCSA licence. ``object_id`` is the 1-based
row number of the galaxy in the original ``SDSS_MGS.train`` file plus ``ID_OFFSET``, so ids
are stable across rebuilds. The split is a hash of ``object_id``: it does not depend on row
order, file layout or on which other rows are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_PATH = DATA_DIR / "sdss_mgs.parquet"
DEFAULT_MODEL_DIR = DATA_DIR / "default_model"
ID_OFFSET = 1_000_000_000

# Column order of SDSS_MGS.train (its header names 18 columns; rows have 19; see shared data README).
_MGS_TEXT_COLUMNS = "zs u g r i z u-g g-r r-i i-z eu eg er ei ez eu-g eg-r er-i ei-z".split()


def read_mgs_text(path: str | Path) -> pa.Table:
    """Parse the MLZ ``SDSS_MGS.train`` text file into the sample's Arrow schema."""
    raw = np.loadtxt(path, comments="#", dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(_MGS_TEXT_COLUMNS):
        raise ValueError(f"{path}: expected {len(_MGS_TEXT_COLUMNS)} columns per row, got shape {raw.shape}")
    col = {name: raw[:, i] for i, name in enumerate(_MGS_TEXT_COLUMNS)}
    data = {"object_id": pa.array(ID_OFFSET + np.arange(1, len(raw) + 1), pa.int64())}
    data["z_spec"] = pa.array(col["zs"], pa.float64())
    for b in "ugriz":
        data[f"mag_{b}"] = pa.array(col[b], pa.float64())
    for b in "ugriz":
        data[f"magerr_{b}"] = pa.array(col[f"e{b}"], pa.float64())
    return pa.table(data)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_mask(object_id: np.ndarray, fraction: float = 0.2, salt: int = 0) -> np.ndarray:
    """True for the rows in the held-out split: a fixed hash of ``object_id`` (and ``salt``)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(object_id, dtype=np.int64).view(np.uint64) ^ np.uint64(salt))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def kfold_index(object_id: np.ndarray, n_folds: int, salt: int = 1) -> np.ndarray:
    """Fold number 0..n_folds-1 of each row, from the same id hash."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(object_id, dtype=np.int64).view(np.uint64) ^ np.uint64(salt))
    return (h % np.uint64(n_folds)).astype(np.int64)
