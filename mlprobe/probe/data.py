"""Rows of cached features for the probe: in-memory arrays or a feature store.

A row source yields features in chunks, float16 or float32 [n, V, D] per feature
name with V views per image, and stores the int8 labels [n, K] of its rows. The
trainer either loads every chunk once (resident) or reads them again every
epoch (streaming).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)

# Rows per chunk when a source is read whole; bounds the float16 read buffer.
READ_CHUNK_ROWS = 4096


class ArraySource:
    """Rows of in-memory feature arrays.

    features: name -> float16 or float32 [N, D] (one view) or [N, V, D].
    labels: int8 [N, K] in -1/0/1. rows: sorted subset of row indices to expose, default all.
    """

    def __init__(self, features: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray | None = None):
        arrays = {name: value if value.ndim == 3 else value[:, None, :] for name, value in features.items()}
        total = len(labels)
        for name, value in arrays.items():
            if value.shape[0] != total:
                raise ValueError(f"feature {name!r} has {value.shape[0]} rows, labels have {total}")
        views = {value.shape[1] for value in arrays.values()}
        if len(views) > 1:
            raise ValueError(f"features disagree on the number of views: {sorted(views)}")

        self._features = arrays
        self._all_labels = np.asarray(labels)
        self._rows = np.arange(total) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = self._all_labels[self._rows]
        self.feature_dims = {name: value.shape[2] for name, value in arrays.items()}
        self.views = views.pop() if views else 1

    @property
    def num_rows(self) -> int:
        """Number of rows exposed."""
        return len(self._rows)

    def subset(self, rows: np.ndarray) -> "ArraySource":
        """Return a source of the given positions of this source's rows."""
        return ArraySource(self._features, self._all_labels, self._rows[np.asarray(rows, dtype=np.int64)])

    def iter_chunks(self, names: list[str], max_rows: int) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """Yield (first position, {name: [n, V, D]}, labels int8 [n, K]) in row order."""
        for start in range(0, self.num_rows, max_rows):
            rows = self._rows[start : start + max_rows]
            yield start, {name: self._features[name][rows] for name in names}, self.labels[start : start + len(rows)]


class StoreSource:
    """Rows of a FeatureStore, optionally a sorted subset of them.

    store: an open mlprobe.features.reader.FeatureStore. rows: sorted row
    indices to expose, default all.
    """

    def __init__(self, store, rows: np.ndarray | None = None):
        self.store = store
        self._rows = np.arange(store.num_images) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = store.read_labels()[self._rows]
        self.feature_dims = store.feature_dims
        self.views = store.views

    @property
    def num_rows(self) -> int:
        """Number of rows exposed."""
        return len(self._rows)

    def subset(self, rows: np.ndarray) -> "StoreSource":
        """Return a source of the given positions of this source's rows."""
        return StoreSource(self.store, self._rows[np.asarray(rows, dtype=np.int64)])

    def iter_chunks(self, names: list[str], max_rows: int) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """Yield (first position, {name: float16 [n, V, D]}, labels int8 [n, K]) in row order.

        Chunks follow the store's pieces (at most max_rows rows, never across a
        shard), keeping only the exposed rows; pieces without one are skipped.
        """
        for start_row, features, labels in self.store.iter_chunks(names, max_rows):
            first = np.searchsorted(self._rows, start_row)
            last = np.searchsorted(self._rows, start_row + len(labels))
            if first == last:
                continue
            local = self._rows[first:last] - start_row
            yield int(first), {name: value[local] for name, value in features.items()}, labels[local]


def split_rows(num_rows: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions into training and validation rows, both sorted int64.

    The validation rows are round(val_fraction * num_rows) positions drawn by
    numpy's default_rng(split_seed), at least one when val_fraction > 0, and
    always leaving at least one training row.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    if num_rows < 2 and val_fraction > 0:
        raise ValueError(f"{num_rows} training row(s) cannot be split into training and validation rows")

    count = int(round(val_fraction * num_rows))
    if val_fraction > 0:
        count = min(max(count, 1), num_rows - 1)
    order = np.random.default_rng(split_seed).permutation(num_rows)
    return np.sort(order[count:]), np.sort(order[:count])


def feature_statistics(source, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Compute the per-dimension mean and standard deviation of each feature over all rows and views.

    Returns float32 arrays [D] per name, accumulated in float64. A standard
    deviation below 1e-6 (a constant dimension) is replaced by 1, as
    scikit-learn's StandardScaler does for zero variance.
    """
    sums = {name: np.zeros(source.feature_dims[name]) for name in names}
    squares = {name: np.zeros(source.feature_dims[name]) for name in names}
    count = 0
    for _, features, _ in source.iter_chunks(names, READ_CHUNK_ROWS):
        for name in names:
            values = features[name].astype(np.float64).reshape(-1, source.feature_dims[name])
            sums[name] += values.sum(axis=0)
            squares[name] += np.square(values).sum(axis=0)
        count += next(iter(features.values())).shape[0] * source.views if features else 0

    means, stds = {}, {}
    for name in names:
        mean = sums[name] / count
        variance = np.maximum(squares[name] / count - np.square(mean), 0.0)
        std = np.sqrt(variance)
        std[std < 1e-6] = 1.0
        means[name] = mean.astype(np.float32)
        stds[name] = std.astype(np.float32)
    return means, stds
