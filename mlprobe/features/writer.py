"""Writing shards so that an interrupted run never leaves a partial shard that looks whole.

A shard is written to ``.shard-XXXXX.h5.tmp`` in the store folder, flushed to disk, hashed
and renamed to ``shard-XXXXX.h5``. Only then is its sidecar ``shard-XXXXX.json`` written
(atomically as well). A rerun keeps a shard only when its sidecar exists, the file's sha256
matches the sidecar, and the sidecar's settings and image ids match the new run.

Each shard contains these HDF5 datasets, with n rows:

- ``features/<name>``: float16 [n, V, D] per feature name (V views per image).
- ``labels``: int8 [n, K] in -1/0/1.
- ``image_ids``: variable-length UTF-8 strings [n].
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mlprobe import defaults
from mlprobe.errors import StoreError
from mlprobe.features.layout import shard_name, sidecar_name, temporary_shard_name
from mlprobe.features.manifest import SCHEMA_VERSION, write_json_atomic

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # target size of one HDF5 chunk of a feature dataset


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def strings_sha256(values: list[str]) -> str:
    """Return a sha256 hex digest of a list of strings (NUL separated, UTF-8)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Return a sha256 hex digest of an array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class ShardWriter:
    """Append rows to one shard under a temporary name, then publish it with ``finish``.

    Used as a context manager: leaving the block by an exception before ``finish``
    deletes the temporary file, so no shard and no sidecar appear.

    Args:
        directory: store folder; it must exist.
        index: shard index; the shard contains the split's images
            [index * shard_size, (index + 1) * shard_size) minus skipped ones.
        feature_dims: feature name -> D, in the store's feature order.
        views: V, the views per image.
        num_classes: K, the label columns.
        compression: HDF5 filter for the feature datasets ("gzip", "lzf") or None.
        max_rows: the maximum number of rows the shard will get, if known. It caps the HDF5
            chunk rows, because HDF5 allocates whole chunks and a small shard
            would otherwise take a full chunk of disk per feature.
    """

    def __init__(
        self,
        directory: Path,
        index: int,
        *,
        feature_dims: dict[str, int],
        views: int,
        num_classes: int,
        compression: str | None = defaults.SHARD_COMPRESSION,
        max_rows: int | None = None,
    ):
        self.directory = Path(directory)
        self.index = index
        self.feature_dims = dict(feature_dims)
        self.views = views
        self.num_classes = num_classes
        self.compression = compression
        self.max_rows = max_rows
        self.path = self.directory / shard_name(index)
        self.temporary_path = self.directory / temporary_shard_name(index)
        self.rows = 0
        self._file: h5py.File | None = None

    def __enter__(self) -> "ShardWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._file is not None:
            self.abort()

    def open(self) -> None:
        """Create the temporary HDF5 file with empty, growable datasets."""
        self._file = h5py.File(self.temporary_path, "w")

        group = self._file.create_group("features")
        for name, dim in self.feature_dims.items():
            chunk_rows = max(1, CHUNK_BYTES // (self.views * dim * 2))
            if self.max_rows:
                chunk_rows = min(chunk_rows, self.max_rows)
            group.create_dataset(
                name,
                shape=(0, self.views, dim),
                maxshape=(None, self.views, dim),
                dtype=np.float16,
                chunks=(chunk_rows, self.views, dim),
                compression=self.compression,
            )

        self._file.create_dataset(
            "labels", shape=(0, self.num_classes), maxshape=(None, self.num_classes), dtype=np.int8, chunks=True
        )
        self._file.create_dataset(
            "image_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=True
        )

    def append(self, features: dict[str, np.ndarray], labels: np.ndarray, image_ids: list[str]) -> None:
        """Append n rows.

        Args:
            features: name -> float16 (or castable) [n, V, D] for every name of ``feature_dims``.
            labels: int8 [n, K].
            image_ids: n strings.
        """
        if self._file is None:
            raise RuntimeError(f"shard writer for {self.path} is not open")

        count = len(image_ids)
        if labels.shape != (count, self.num_classes):
            raise ValueError(f"labels shape {labels.shape} does not match ({count}, {self.num_classes})")

        start = self.rows
        stop = start + count
        for name, dim in self.feature_dims.items():
            values = features[name]
            if values.shape != (count, self.views, dim):
                raise ValueError(f"feature {name!r} shape {values.shape} does not match ({count}, {self.views}, {dim})")

            dataset = self._file["features"][name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values.astype(np.float16, copy=False)

        self._file["labels"].resize(stop, axis=0)
        self._file["labels"][start:stop] = labels.astype(np.int8, copy=False)

        self._file["image_ids"].resize(stop, axis=0)
        self._file["image_ids"][start:stop] = image_ids

        self.rows = stop

    def finish(self, sidecar_fields: dict[str, Any]) -> dict[str, Any]:
        """Close, flush, hash and rename the shard, then write its sidecar.

        Args:
            sidecar_fields: extra JSON fields for the sidecar, such as the store settings
                and the image ids hash that a rerun compares.

        Returns:
            The sidecar: ``sidecar_fields`` plus schema_version, index, file, rows, sha256.
        """
        if self._file is None:
            raise RuntimeError(f"shard writer for {self.path} is not open")

        self._file.close()
        self._file = None
        _fsync_file(self.temporary_path)

        sha256 = file_sha256(self.temporary_path)
        os.replace(self.temporary_path, self.path)

        sidecar = {
            **sidecar_fields,
            "schema_version": SCHEMA_VERSION,
            "index": self.index,
            "file": self.path.name,
            "rows": self.rows,
            "sha256": sha256,
        }
        write_json_atomic(self.directory / sidecar_name(self.index), sidecar)
        logger.debug("finished %s: %d rows, sha256 %s", self.path, self.rows, sha256)
        return sidecar

    def abort(self) -> None:
        """Close and delete the temporary file; the final shard name is never touched."""
        if self._file is not None:
            self._file.close()
            self._file = None

        self.temporary_path.unlink(missing_ok=True)
        logger.info("discarded unfinished shard %s", self.temporary_path)


def _fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk so the rename never publishes a file with missing blocks."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_shard(directory: Path, index: int) -> None:
    """Delete a shard, its sidecar and any temporary file of it; the sidecar goes first."""
    directory = Path(directory)
    for name in (sidecar_name(index), shard_name(index), temporary_shard_name(index)):
        (directory / name).unlink(missing_ok=True)


def read_sidecar(directory: Path, index: int) -> dict[str, Any] | None:
    """Return the sidecar of shard ``index``, or None when it is missing or unreadable."""
    path = Path(directory) / sidecar_name(index)
    if not path.is_file():
        return None

    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable sidecar %s: %s", path, error)
        return None

    if not isinstance(sidecar, dict):
        logger.warning("ignoring sidecar %s: not a JSON object", path)
        return None
    return sidecar


def find_complete_shard(directory: Path, index: int, expected: dict[str, Any]) -> dict[str, Any] | None:
    """Return the sidecar of shard ``index`` when the shard can be kept by a rerun, else None.

    A shard is kept when its sidecar exists, every field of ``expected`` is equal in the
    sidecar (settings, sample range, image ids and labels hashes), and the shard file's
    sha256 equals the sidecar's. The reason a shard is redone is logged.
    """
    directory = Path(directory)
    sidecar = read_sidecar(directory, index)
    if sidecar is None:
        return None

    if sidecar.get("schema_version") != SCHEMA_VERSION:
        logger.info("redoing shard %d: made with store schema %s", index, sidecar.get("schema_version"))
        return None

    for name, value in expected.items():
        if sidecar.get(name) != value:
            logger.info("redoing shard %d: %s differs from the earlier run", index, name)
            return None

    path = directory / shard_name(index)
    if not path.is_file():
        logger.info("redoing shard %d: %s is missing", index, path)
        return None

    if file_sha256(path) != sidecar.get("sha256"):
        logger.warning("redoing shard %d: %s does not match the sha256 in its sidecar", index, path)
        return None

    return sidecar


def check_shard_file(path: Path, expected_sha256: str) -> None:
    """Raise StoreError naming the shard when it is missing or its sha256 differs."""
    if not Path(path).is_file():
        raise StoreError(f"shard {path} is missing; run the same `mlprobe extract` command again to redo it")

    actual = file_sha256(path)
    if actual != expected_sha256:
        raise StoreError(
            f"shard {path} is damaged: sha256 {actual} does not match the manifest's {expected_sha256}; "
            f"run the same `mlprobe extract` command again, which redoes damaged shards"
        )
