"""The manifest of a feature store: what made it, and which shards hold which rows.

``manifest.json`` is a JSON object with these fields:

- ``schema_version``: int, the store layout version (``defaults.STORE_SCHEMA_VERSION``).
- ``dataset``, ``split``, ``model``: str; ``model`` is the timm name.
- ``weights_fingerprint``: sha256 hex of the backbone state dict.
- ``image_size``: int pixels; ``mean``, ``std``: 3 floats; ``interpolation``: str.
- ``class_names``: list of K str in label column order.
- ``feature_names``: ``stage0`` ... ``stage{S-1}``, ``final``; ``feature_dims``: name -> int D.
- ``views``: int V, the views stored per image.
- ``num_images``: int N, the rows of the store; ``shard_size``: int images of the split per shard.
- ``shards``: list of {file, first_row, rows, sha256} in row order.
- ``skipped``: list of {image_id, path, reason} for images left out with ``skip_bad``.
- ``versions``: python, torch, timm, h5py, numpy, mlprobe; ``created``: UTC ISO 8601 time.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
from pathlib import Path
from typing import Any

from mlprobe import defaults
from mlprobe.errors import StoreError
from mlprobe.files import write_atomic
from mlprobe.features.layout import MANIFEST_NAME

logger = logging.getLogger(__name__)

SCHEMA_VERSION = defaults.STORE_SCHEMA_VERSION

# Settings that every shard of a store shares. Each shard's sidecar stores them, so a
# rerun can tell whether the shard was made with the same settings.
CONFIG_FIELDS = {
    "dataset": str,
    "split": str,
    "model": str,
    "weights_fingerprint": str,
    "image_size": int,
    "mean": list,
    "std": list,
    "interpolation": str,
    "class_names": list,
    "feature_names": list,
    "feature_dims": dict,
    "views": int,
    "shard_size": int,
}

MANIFEST_FIELDS = {
    "schema_version": int,
    **CONFIG_FIELDS,
    "num_images": int,
    "shards": list,
    "skipped": list,
    "versions": dict,
    "created": str,
}

SHARD_FIELDS = {"file": str, "first_row": int, "rows": int, "sha256": str}


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape the stored features."""
    import h5py
    import numpy
    import timm
    import torch

    import mlprobe

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
        "numpy": numpy.__version__,
        "mlprobe": mlprobe.__version__,
    }


def build_manifest(config: dict[str, Any], shards: list[dict], skipped: list[dict]) -> dict[str, Any]:
    """Assemble a manifest from the store settings and the finished shards.

    Args:
        config: the ``CONFIG_FIELDS`` of the store.
        shards: {file, rows, sha256} per shard in shard order; ``first_row`` is computed here.
        skipped: {image_id, path, reason} per image left out, in split order.
    """
    shard_records = []
    first_row = 0
    for shard in shards:
        shard_records.append(
            {"file": shard["file"], "first_row": first_row, "rows": shard["rows"], "sha256": shard["sha256"]}
        )
        first_row += shard["rows"]

    manifest = {
        "schema_version": SCHEMA_VERSION,
        **{name: config[name] for name in CONFIG_FIELDS},
        "num_images": first_row,
        "shards": shard_records,
        "skipped": list(skipped),
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_manifest(manifest, "new manifest")
    return manifest


def validate_manifest(manifest: Any, source: str | Path) -> None:
    """Raise StoreError naming ``source`` when the manifest lacks a field or contradicts itself."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{source}: the manifest is not a JSON object; extract the split again")

    _check_fields(manifest, MANIFEST_FIELDS, source, "manifest")

    if manifest["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{source}: store schema version {manifest['schema_version']} is not the supported version "
            f"{SCHEMA_VERSION}; extract the split again with this version of mlprobe"
        )

    if list(manifest["feature_dims"]) != list(manifest["feature_names"]):
        raise StoreError(
            f"{source}: feature_dims keys {list(manifest['feature_dims'])} do not match feature_names "
            f"{manifest['feature_names']}; extract the split again"
        )

    _check_shards(manifest, source)


def _check_fields(record: dict, fields: dict[str, type], source: str | Path, record_name: str) -> None:
    """Raise StoreError when a field of ``record`` is missing or has the wrong JSON type."""
    for name, expected in fields.items():
        if name not in record:
            raise StoreError(f"{source}: {record_name} field {name!r} is missing; extract the split again")

        value = record[name]
        # bool is a subclass of int, but a bool is never a valid count or size here.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise StoreError(
                f"{source}: {record_name} field {name!r} is {type(value).__name__}, expected {expected.__name__}; "
                f"extract the split again"
            )


def _check_shards(manifest: dict, source: str | Path) -> None:
    """Raise StoreError unless the shards cover rows 0..num_images-1 in order without gaps."""
    next_row = 0
    for position, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise StoreError(f"{source}: shard entry {position} is not a JSON object; extract the split again")

        _check_fields(shard, SHARD_FIELDS, source, f"shard entry {position}")

        if shard["first_row"] != next_row or shard["rows"] < 0:
            raise StoreError(
                f"{source}: shard {shard['file']} starts at row {shard['first_row']} with {shard['rows']} rows, "
                f"expected start {next_row}; extract the split again"
            )
        next_row += shard["rows"]

    if next_row != manifest["num_images"]:
        raise StoreError(
            f"{source}: the shards hold {next_row} rows but num_images is {manifest['num_images']}; "
            f"extract the split again"
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``directory/manifest.json``; StoreError when missing or invalid."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise StoreError(f"feature store {directory} not found; run `mlprobe extract` for this dataset, model and split")

    if not path.is_file():
        raise StoreError(
            f"{path} not found, so the extraction into {directory} did not finish; "
            f"run the same `mlprobe extract` command again to resume it"
        )

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{path}: cannot read the manifest ({error}); extract the split again") from error

    validate_manifest(manifest, path)
    return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, flush it to disk, then rename it."""
    write_atomic(Path(path), (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Validate and write ``directory/manifest.json`` atomically; return its path."""
    path = Path(directory) / MANIFEST_NAME
    validate_manifest(manifest, path)
    write_json_atomic(path, manifest)
    logger.info("wrote %s: %d images in %d shards", path, manifest["num_images"], len(manifest["shards"]))
    return path
