"""Shared fixtures: one local Ray instance per test session, real sample data, the shipped model."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.sample import DEFAULT_MODEL_DIR, SAMPLE_PATH, holdout_mask

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_table() -> pa.Table:
    return pq.read_table(SAMPLE_PATH)


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def holdout_table(sample_table) -> pa.Table:
    """The default model never trained on these rows; photometry only (no spectroscopic redshift)."""
    ids = sample_table["object_id"].to_numpy()
    return sample_table.filter(pa.array(holdout_mask(ids))).drop_columns(["z_spec"])


def write_parts(table: pa.Table, directory, n_parts: int, prefix: str = "part") -> list[str]:
    """Split a table into n roughly equal Parquet files (row order shuffled with a fixed seed)."""
    order = np.random.default_rng(0).permutation(table.num_rows)
    table = table.take(order)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), n_parts)):
        path = os.path.join(directory, f"{prefix}-{i:03d}.parquet")
        pq.write_table(table.take(chunk), path)
        paths.append(path)
    return paths
