"""Reading a finished feature store, with checks of its manifest and shard checksums."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mlprobe.errors import StoreError
from mlprobe.features.manifest import read_manifest
from mlprobe.features.writer import check_shard_file

logger = logging.getLogger(__name__)

# Fields two stores must share for a head trained on one to be tested on the other.
# views is left out because training stores may hold several augmented views and test stores one.
COMPATIBLE_FIELDS = (
    "model",
    "weights_fingerprint",
    "image_size",
    "mean",
    "std",
    "interpolation",
    "class_names",
    "feature_names",
    "feature_dims",
)


class FeatureStore:
    """A finished store: the manifest and read access to its shards.

    Rows are the split's images in split order, less the images skipped as unreadable.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> "FeatureStore":
        """Open the store in ``path``.

        Raises StoreError when the manifest is missing (extraction unfinished) or invalid, a
        shard file is missing, or, with ``verify``, a shard's sha256 differs from the manifest.
        Verifying reads every shard once.
        """
        path = Path(path)
        manifest = read_manifest(path)
        store = cls(path, manifest)

        started = time.perf_counter()
        for shard in manifest["shards"]:
            shard_path = path / shard["file"]
            if verify:
                check_shard_file(shard_path, shard["sha256"])
            elif not shard_path.is_file():
                raise StoreError(f"shard {shard_path} is missing; run the same `mlprobe extract` command again to redo it")

        logger.info(
            "opened %s: %d images, %d shards, model %s at %d px%s",
            path,
            store.num_images,
            len(manifest["shards"]),
            store.model,
            store.image_size,
            f", checksums verified in {time.perf_counter() - started:.1f} s" if verify else "",
        )
        return store

    @property
    def feature_names(self) -> list[str]:
        """Feature names in store order: ``stage0`` ... ``stage{S-1}``, ``final``."""
        return list(self.manifest["feature_names"])

    @property
    def feature_dims(self) -> dict[str, int]:
        """Feature name -> D."""
        return dict(self.manifest["feature_dims"])

    @property
    def class_names(self) -> list[str]:
        """The K class names in label column order."""
        return list(self.manifest["class_names"])

    @property
    def num_images(self) -> int:
        """N, the rows of the store."""
        return self.manifest["num_images"]

    @property
    def views(self) -> int:
        """V, the views stored per image."""
        return self.manifest["views"]

    @property
    def model(self) -> str:
        """The timm model name."""
        return self.manifest["model"]

    @property
    def image_size(self) -> int:
        """The square input size in pixels."""
        return self.manifest["image_size"]

    @property
    def skipped(self) -> list[dict[str, str]]:
        """{image_id, path, reason} of every image left out as unreadable."""
        return list(self.manifest["skipped"])

    def read_features(self, name: str) -> np.ndarray:
        """Read one feature of every row: float16 [N, V, D]."""
        self._check_feature_names([name])

        result = np.empty((self.num_images, self.views, self.feature_dims[name]), dtype=np.float16)
        for shard, file in self._iter_shard_files():
            first = shard["first_row"]
            result[first : first + shard["rows"]] = self._read_dataset(file, shard, f"features/{name}")
        return result

    def read_labels(self) -> np.ndarray:
        """Read the labels of every row: int8 [N, K] in -1/0/1."""
        result = np.empty((self.num_images, len(self.class_names)), dtype=np.int8)
        for shard, file in self._iter_shard_files():
            first = shard["first_row"]
            result[first : first + shard["rows"]] = self._read_dataset(file, shard, "labels")
        return result

    def read_image_ids(self) -> list[str]:
        """Read the image id of every row, in row order."""
        image_ids: list[str] = []
        for shard, file in self._iter_shard_files():
            self._check_rows(file, shard, "image_ids")
            image_ids.extend(file["image_ids"].asstr()[()].tolist())
        return image_ids

    def iter_chunks(
        self, names: list[str], max_rows: int
    ) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """Yield the rows in order in pieces of at most ``max_rows`` rows.

        A piece never spans two shards, so pieces at the end of a shard can be shorter.

        Yields:
            (start_row, {name: float16 [n, V, D]}, labels int8 [n, K]).
        """
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self._check_feature_names(names)

        for shard, file in self._iter_shard_files():
            for name in names:
                self._check_rows(file, shard, f"features/{name}")
            self._check_rows(file, shard, "labels")

            for offset in range(0, shard["rows"], max_rows):
                stop = min(offset + max_rows, shard["rows"])
                features = {name: file["features"][name][offset:stop] for name in names}
                labels = file["labels"][offset:stop]
                yield shard["first_row"] + offset, features, labels

    def _check_feature_names(self, names: list[str]) -> None:
        for name in names:
            if name not in self.manifest["feature_dims"]:
                raise StoreError(
                    f"feature {name!r} not found in store {self.path}; it contains {', '.join(self.feature_names)}"
                )

    def _iter_shard_files(self) -> Iterator[tuple[dict, h5py.File]]:
        """Yield (manifest shard entry, open HDF5 file) per shard; unreadable files raise StoreError."""
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            try:
                file = h5py.File(path, "r")
            except OSError as error:
                raise StoreError(
                    f"shard {path} cannot be read ({error}); run the same `mlprobe extract` command again to redo it"
                ) from error

            with file:
                yield shard, file

    def _check_rows(self, file: h5py.File, shard: dict, dataset: str) -> None:
        """Raise StoreError when a shard lacks ``dataset`` or its row count differs from the manifest."""
        path = self.path / shard["file"]
        if dataset not in file:
            raise StoreError(f"shard {path} has no dataset {dataset!r}; extract the split again")

        rows = file[dataset].shape[0]
        if rows != shard["rows"]:
            raise StoreError(
                f"shard {path} dataset {dataset!r} has {rows} rows but the manifest lists {shard['rows']}; "
                f"extract the split again"
            )

    def _read_dataset(self, file: h5py.File, shard: dict, dataset: str) -> np.ndarray:
        self._check_rows(file, shard, dataset)
        return file[dataset][()]


def check_compatible(*stores: FeatureStore) -> None:
    """Raise StoreError unless all stores share model, weights, image size, normalisation, classes and features.

    The error names the first field that differs and the two store folders.
    """
    if not stores:
        return

    first = stores[0]
    for other in stores[1:]:
        for field in COMPATIBLE_FIELDS:
            if first.manifest[field] != other.manifest[field]:
                raise StoreError(
                    f"stores {first.path} and {other.path} differ in {field} "
                    f"({_describe(first.manifest[field])} vs {_describe(other.manifest[field])}); "
                    f"extract both splits with the same model, weights, image size and class list"
                )


def _describe(value: Any) -> str:
    """Shorten long values for an error message."""
    text = repr(value)
    if len(text) > 80:
        return text[:77] + "..."
    return text
