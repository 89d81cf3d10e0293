"""Duplicate ``object_id``s across a whole job, in bounded driver memory.

Ids are kept in memory up to ``spill_rows``; past that, every id goes to one of ``n_buckets``
files on local disk by its hash, so all copies of an id land in the same bucket. At the end each
bucket is loaded alone and counted with ``np.unique``: peak memory is about total ids / buckets
(8 bytes each), e.g. 10^9 ids in 256 buckets -> ~31 MB per bucket, 8 GB of temporary disk.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: consecutive ids spread over all buckets


class DuplicateCounter:
    def __init__(self, spill_rows: int = 50_000_000, n_buckets: int = 256, tmp_dir: str | None = None) -> None:
        self.spill_rows, self.n_buckets, self.tmp_dir = spill_rows, n_buckets, tmp_dir
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.dir: Path | None = None  # set once ids spill to disk

    def add(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.dir is None:
            self.buffer.append(ids)
            self.buffered += len(ids)
            if self.buffered > self.spill_rows:
                self.dir = Path(tempfile.mkdtemp(prefix="engine-ids-", dir=self.tmp_dir))
                pending, self.buffer, self.buffered = self.buffer, [], 0
                for chunk in pending:
                    self._spill(chunk)
            return
        self._spill(ids)

    def _bucket_of(self, ids: np.ndarray) -> np.ndarray:
        return ((ids.view(np.uint64) * _MIX) >> np.uint64(40)) % np.uint64(self.n_buckets)

    def _spill(self, ids: np.ndarray) -> None:
        bucket = self._bucket_of(ids)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.n_buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            with open(self.dir / f"{b}.i64", "ab") as f:
                ids[order[bounds[b] : bounds[b + 1]]].tofile(f)

    def duplicates(self, limit: int = 5) -> tuple[int, list[int]]:
        """(number of ids seen more than once, up to ``limit`` of them, smallest first); removes the spill files."""
        try:
            parts = [self.buffer] if self.dir is None else (
                [np.fromfile(p, dtype=np.int64)] for p in sorted(self.dir.glob("*.i64")))
            n, examples = 0, []
            for part in parts:
                ids = np.concatenate(part) if part else np.empty(0, np.int64)
                uniq, counts = np.unique(ids, return_counts=True)
                dups = uniq[counts > 1]
                n += len(dups)
                examples.extend(dups[:limit].tolist())
            return n, sorted(examples)[:limit]
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
