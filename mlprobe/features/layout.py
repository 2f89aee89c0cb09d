"""File names inside a feature store and the folder of each store.

A store is one folder per (dataset, model, image size, split)::

    <root>/<dataset>/<model slug>-<image size>/<split>/
        manifest.json          written last; its presence marks a complete store
        shard-00000.h5         features, labels and image ids of images [0, shard_size)
        shard-00000.json       sidecar of a finished shard: checksum and the settings it was made with
        ...
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-*.h5"

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def model_slug(model: str) -> str:
    """Turn a timm model name into a folder name, for example ``hf-hub:timm/x`` -> ``hf-hub_timm_x``."""
    return _UNSAFE_CHARACTERS.sub("_", model)


def store_dir(root: Path, dataset: str, model: str, image_size: int | None, split: str) -> Path:
    """Return the folder of the store for one split.

    Args:
        root: root folder of all feature stores.
        dataset: dataset name, for example ``voc2007``.
        model: timm model name as resolved by ``resolve_model_name``.
        image_size: square input size in pixels; None means the model's pretrained input size.
        split: split name, for example ``trainval``.
    """
    if image_size is None:
        from mlprobe.extract.backbones import default_image_size

        image_size = default_image_size(model)

    return Path(root) / dataset / f"{model_slug(model)}-{image_size}" / split


def shard_name(index: int) -> str:
    """Return the HDF5 file name of shard ``index``, for example ``shard-00003.h5``."""
    return f"shard-{index:05d}.h5"


def sidecar_name(index: int) -> str:
    """Return the sidecar file name of shard ``index``, for example ``shard-00003.json``."""
    return f"shard-{index:05d}.json"


def temporary_shard_name(index: int) -> str:
    """Return the name a shard has while it is being written; it matches no ``shard-*.h5`` pattern."""
    return f".{shard_name(index)}.tmp"


def shard_index(file_name: str) -> int | None:
    """Return the index in a name like ``shard-00003.h5``, or None for other names."""
    match = re.fullmatch(r"shard-(\d+)\.h5", file_name)
    if match is None:
        return None
    return int(match.group(1))
