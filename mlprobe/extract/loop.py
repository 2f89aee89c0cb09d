"""The extraction loop: a frozen backbone over one split, written shard by shard into a store.

Shard i contains the split's samples [i * shard_size, (i + 1) * shard_size), less unreadable
images skipped with ``skip_bad``. Rank r of a torch.distributed run (or of ``world_size``
independent processes) handles the shards with i % world_size == r. A rerun keeps every
shard whose sidecar, checksum, settings and image ids still match and redoes the rest;
rank 0 writes manifest.json last, once every shard is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mlprobe import defaults
from mlprobe.errors import DatasetError, StoreError
from mlprobe.extract.backbones import (
    FeatureExtractor,
    create_backbone,
    data_config,
    resolve_model_name,
    weights_fingerprint,
)
from mlprobe.extract.images import ImageDataset
from mlprobe.features.layout import MANIFEST_NAME, shard_index, store_dir
from mlprobe.features.manifest import build_manifest, write_manifest
from mlprobe.features.writer import (
    ShardWriter,
    array_sha256,
    find_complete_shard,
    read_sidecar,
    remove_shard,
    strings_sha256,
)

logger = logging.getLogger(__name__)

VIEWS = 1  # views per image; every image gets the single deterministic view
MAX_PENDING_WRITES = 4  # batches queued for the writer thread before the loop waits for it


@dataclass
class ShardPlan:
    """One shard: its sample range and the sidecar fields a rerun must find unchanged."""

    index: int
    start: int
    stop: int
    expected: dict[str, Any]


@dataclass
class ShardProgress:
    """A shard being written: its writer, skipped images and row counts."""

    plan: ShardPlan
    writer: ShardWriter
    started: float  # perf_counter seconds when the previous shard was queued for publishing, or the loop began
    skipped: list[dict[str, str]] = field(default_factory=list)
    processed: int = 0


def extract_split(
    split,
    *,
    model_name: str,
    image_size: int | None = None,
    out_root: Path,
    batch_size: int = defaults.EXTRACT_BATCH_SIZE,
    workers: int = defaults.EXTRACT_WORKERS,
    shard_size: int = defaults.SHARD_SIZE,
    device: str | None = None,
    checkpoint: Path | None = None,
    random_weights: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    compression: str | None = defaults.SHARD_COMPRESSION,
) -> Path:
    """Extract pooled stage features of every image of ``split`` into a feature store.

    Args:
        split: ``mlprobe.extract.datasets.Split``; its sample order fixes the row order.
        model_name: short name or timm name.
        image_size: square input size in pixels; None means the model's pretrained size.
        out_root: root folder of the stores; the store goes to ``store_dir(...)`` under it.
        batch_size: images per forward pass.
        workers: DataLoader processes decoding images (0 decodes in this process).
        shard_size: images of the split per HDF5 shard.
        device: torch device; None picks cuda when available, else cpu.
        checkpoint, random_weights: weight source, see ``create_backbone``.
        skip_bad: record unreadable images in the manifest's ``skipped`` and go on,
            instead of raising DatasetError naming the first one.
        progress: show a progress bar with images per second.
        rank, world_size: this process's part of the shards; taken from torch.distributed
            when it is initialised.
        compression: HDF5 filter for the feature datasets ("gzip", "lzf") or None.

    Returns:
        The store folder. It contains manifest.json once rank 0 has merged every shard.

    Raises:
        DatasetError: empty split, labels of the wrong width, or an unreadable image without ``skip_bad``.
        BackboneError: the model or its weights cannot be loaded.
    """
    rank, world_size = _distributed_rank(rank, world_size)
    _check_split(split)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")

    timm_name = resolve_model_name(model_name)
    model = create_backbone(timm_name, checkpoint=checkpoint, random_weights=random_weights, image_size=image_size)
    extractor = FeatureExtractor(model)
    preprocessing = data_config(model, image_size)
    config = _store_config(split, timm_name, model, extractor, preprocessing, shard_size)

    directory = store_dir(out_root, split.dataset, timm_name, preprocessing["image_size"], split.split)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # The store stays visibly incomplete until every shard is written again or kept.
        (directory / MANIFEST_NAME).unlink(missing_ok=True)

    plans = _plan_shards(split, config, shard_size)
    own_plans = [plan for plan in plans if plan.index % world_size == rank]
    todo = [plan for plan in own_plans if find_complete_shard(directory, plan.index, plan.expected) is None]
    logger.info(
        "%s %s: %d images, model %s at %d px, %d shards; rank %d of %d keeps %d complete shards, writes %d into %s",
        split.dataset,
        split.split,
        len(split.samples),
        timm_name,
        preprocessing["image_size"],
        len(plans),
        rank,
        world_size,
        len(own_plans) - len(todo),
        len(todo),
        directory,
    )

    if todo:
        run_device = _pick_device(device)
        _run_shards(
            split, todo, directory, extractor, preprocessing, config, run_device, batch_size, workers, skip_bad,
            progress, compression,
        )

    _barrier()
    if rank == 0:
        _merge_manifest(directory, config, plans)
    return directory


def _distributed_rank(rank: int, world_size: int) -> tuple[int, int]:
    """Return (rank, world size) from torch.distributed when initialised, else the arguments."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


def _barrier() -> None:
    """Wait for every rank when torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_split(split) -> None:
    """Raise DatasetError for an empty split or labels that do not have one column per class."""
    if not split.samples:
        raise DatasetError(f"split {split.split!r} of {split.dataset} has no images; check the dataset root and split name")

    num_classes = len(split.class_names)
    for sample in split.samples:
        if np.shape(sample.labels) != (num_classes,):
            raise DatasetError(
                f"image {sample.image_id} ({sample.path}) has labels of shape {np.shape(sample.labels)}, "
                f"expected ({num_classes},) for the {num_classes} classes; fix the dataset reader output"
            )


def _pick_device(device: str | None) -> torch.device:
    """Return the requested device, or cuda (this rank's GPU under torchrun) when available, else cpu."""
    if device is not None:
        return torch.device(device)

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _store_config(split, timm_name: str, model, extractor: FeatureExtractor, preprocessing: dict, shard_size: int) -> dict:
    """Return the settings every shard of the store shares (``manifest.CONFIG_FIELDS``)."""
    return {
        "dataset": split.dataset,
        "split": split.split,
        "model": timm_name,
        "weights_fingerprint": weights_fingerprint(model),
        "image_size": preprocessing["image_size"],
        "mean": preprocessing["mean"],
        "std": preprocessing["std"],
        "interpolation": preprocessing["interpolation"],
        "class_names": list(split.class_names),
        "feature_names": list(extractor.feature_names),
        "feature_dims": dict(extractor.feature_dims),
        "views": VIEWS,
        "shard_size": shard_size,
    }


def _plan_shards(split, config: dict, shard_size: int) -> list[ShardPlan]:
    """Cut the split into shards of ``shard_size`` samples with the fields their sidecars must match."""
    plans = []
    for index, start in enumerate(range(0, len(split.samples), shard_size)):
        samples = split.samples[start : start + shard_size]
        labels = np.stack([sample.labels for sample in samples]).astype(np.int8)
        expected = {
            "config": config,
            "sample_start": start,
            "sample_stop": start + len(samples),
            "image_ids_sha256": strings_sha256([sample.image_id for sample in samples]),
            "labels_sha256": array_sha256(labels),
        }
        plans.append(ShardPlan(index, start, start + len(samples), expected))
    return plans


def _run_shards(
    split,
    plans: list[ShardPlan],
    directory: Path,
    extractor: FeatureExtractor,
    preprocessing: dict,
    config: dict,
    device: torch.device,
    batch_size: int,
    workers: int,
    skip_bad: bool,
    progress: bool,
    compression: str | None,
) -> None:
    """Run the backbone over the samples of ``plans`` and write one shard per plan.

    HDF5 writes run on one background thread, so the next batch decodes and runs while
    the previous one is written. An exception discards the unfinished shards' temporary
    files; finished shards and their sidecars stay for the next run.
    """
    for plan in plans:
        remove_shard(directory, plan.index)

    indices = [index for plan in plans for index in range(plan.start, plan.stop)]
    loader = DataLoader(
        ImageDataset(split.samples, preprocessing, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    extractor.to(device, memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    logger.info("running on %s with batch size %d and %d loader workers", device, batch_size, workers)

    router = _ShardRouter(split, plans, directory, config, skip_bad, compression)
    started = time.perf_counter()
    bar = tqdm(total=len(indices), unit="img", desc=f"{split.dataset} {split.split}", disable=not progress)
    try:
        with torch.inference_mode(), autocast:
            for batch_indices, images, errors in loader:
                sample_indices, errors = batch_indices.tolist(), list(errors)
                router.check_errors(sample_indices, errors)

                features = _forward_good_rows(extractor, images, errors, device)
                router.add_batch(sample_indices, features, errors)
                bar.update(len(errors))
        router.wait()
    except BaseException:
        router.abort()
        raise
    finally:
        bar.close()

    elapsed = time.perf_counter() - started
    logger.info("extracted %d images in %.1f s (%.1f images/s)", len(indices), elapsed, len(indices) / max(elapsed, 1e-9))


def _forward_good_rows(
    extractor: FeatureExtractor, images: torch.Tensor, errors: list[str], device: torch.device
) -> dict[str, np.ndarray]:
    """Run the backbone on the readable images of a batch.

    Returns:
        name -> float16 [g, 1, D] for the g rows whose error is empty, in batch order.
    """
    good = torch.tensor([not error for error in errors], dtype=torch.bool)
    if not bool(good.any()):
        return {name: np.zeros((0, VIEWS, dim), dtype=np.float16) for name, dim in extractor.feature_dims.items()}

    batch = images[good] if not bool(good.all()) else images
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    outputs = extractor(batch)
    return {name: value.float().cpu().numpy().astype(np.float16)[:, None, :] for name, value in outputs.items()}


class _ShardRouter:
    """Send each batch's rows to the shards they belong to, on a single writer thread.

    Batches arrive in sample order, so a shard is complete when its last sample has passed.
    """

    def __init__(self, split, plans: list[ShardPlan], directory: Path, config: dict, skip_bad: bool, compression):
        self.split = split
        self.plans = plans
        self.directory = directory
        self.config = config
        self.skip_bad = skip_bad
        self.compression = compression
        self.position = 0  # index in plans of the shard receiving rows
        self.current: ShardProgress | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future] = []
        self.failed = False  # set on the writer thread when a write raised
        self.last_boundary = time.perf_counter()
        self.open_writers: list[ShardWriter] = []

    def add_batch(self, indices: list[int], features: dict[str, np.ndarray], errors: list[str]) -> None:
        """Route one batch: ``indices`` [b] sample indices, ``features`` rows of the readable images, ``errors`` [b]."""
        good_row = 0
        batch_start = 0
        while batch_start < len(indices):
            shard = self._shard_for(indices[batch_start])
            batch_stop = batch_start
            while batch_stop < len(indices) and indices[batch_stop] < shard.plan.stop:
                batch_stop += 1

            rows = range(batch_start, batch_stop)
            good = [row for row in rows if not errors[row]]
            for row in rows:
                if errors[row]:
                    sample = self.split.samples[indices[row]]
                    shard.skipped.append({"image_id": sample.image_id, "path": str(sample.path), "reason": errors[row]})

            self._append(shard, [indices[row] for row in good], features, good_row, good_row + len(good))
            good_row += len(good)
            shard.processed += batch_stop - batch_start
            if shard.processed == shard.plan.stop - shard.plan.start:
                self._finish(shard)
            batch_start = batch_stop

    def check_errors(self, indices: list[int], errors: list[str]) -> None:
        """Raise the first unreadable image's DatasetError, or log each one when skipping."""
        for index, error in zip(indices, errors):
            if not error:
                continue
            if not self.skip_bad:
                raise DatasetError(error)
            logger.warning("skipping image %s: %s", self.split.samples[index].image_id, error)

    def _shard_for(self, index: int) -> ShardProgress:
        """Return the shard receiving sample ``index``, opening its writer on first use."""
        if self.current is not None and index < self.current.plan.stop:
            return self.current

        plan = self.plans[self.position]
        self.position += 1
        if not plan.start <= index < plan.stop:
            raise RuntimeError(f"sample {index} arrived outside shard {plan.index} ({plan.start}..{plan.stop - 1})")

        writer = ShardWriter(
            self.directory,
            plan.index,
            feature_dims=self.config["feature_dims"],
            views=VIEWS,
            num_classes=len(self.config["class_names"]),
            compression=self.compression,
        )
        self.open_writers.append(writer)
        self._submit(writer.open)
        self.current = ShardProgress(plan, writer, started=self.last_boundary)
        return self.current

    def _append(self, shard: ShardProgress, sample_indices: list[int], features: dict, first: int, stop: int) -> None:
        if not sample_indices:
            return

        rows = {name: values[first:stop] for name, values in features.items()}
        samples = [self.split.samples[index] for index in sample_indices]
        labels = np.stack([sample.labels for sample in samples]).astype(np.int8)
        image_ids = [sample.image_id for sample in samples]
        self._submit(shard.writer.append, rows, labels, image_ids)

    def _finish(self, shard: ShardProgress) -> None:
        fields = {**shard.plan.expected, "skipped": shard.skipped}
        self._submit(self._finish_shard, shard, fields)
        self.current = None
        self.last_boundary = time.perf_counter()

    def _finish_shard(self, shard: ShardProgress, fields: dict) -> None:
        """Publish a shard and log its timing; runs on the writer thread."""
        sidecar = shard.writer.finish(fields)
        self.open_writers.remove(shard.writer)
        elapsed = time.perf_counter() - shard.started
        images = shard.plan.stop - shard.plan.start
        logger.info(
            "shard %d (images %d..%d): %d rows, %d skipped, %.1f s, %.1f images/s",
            shard.plan.index,
            shard.plan.start,
            shard.plan.stop - 1,
            sidecar["rows"],
            len(shard.skipped),
            elapsed,
            images / max(elapsed, 1e-9),
        )

    def _submit(self, function, *args) -> None:
        """Queue a call on the writer thread; wait for the oldest when too many are queued."""
        self.pending.append(self.executor.submit(self._run_unless_failed, function, *args))
        while len(self.pending) > MAX_PENDING_WRITES:
            self.pending.pop(0).result()

    def _run_unless_failed(self, function, *args) -> None:
        """Run a queued call unless an earlier one failed, so a shard missing rows is never published."""
        if self.failed:
            return
        try:
            function(*args)
        except BaseException:
            self.failed = True
            raise

    def wait(self) -> None:
        """Wait for every queued write and stop the writer thread; raises the first write error."""
        for future in self.pending:
            future.result()
        self.pending.clear()
        self.executor.shutdown(wait=True)

    def abort(self) -> None:
        """Drop queued writes and delete the temporary files of unfinished shards."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for writer in list(self.open_writers):
            writer.abort()
        self.open_writers.clear()


def _merge_manifest(directory: Path, config: dict, plans: list[ShardPlan]) -> None:
    """Check every shard's sidecar, delete shards beyond the plan, and write manifest.json."""
    shards = []
    skipped = []
    for plan in plans:
        sidecar = read_sidecar(directory, plan.index)
        if sidecar is None or any(sidecar.get(name) != value for name, value in plan.expected.items()):
            raise StoreError(
                f"shard {plan.index} of {directory} is missing or was made with other settings after extraction, "
                f"so a rank did not finish; run the same `mlprobe extract` command again to redo it"
            )
        shards.append({"file": sidecar["file"], "rows": sidecar["rows"], "sha256": sidecar["sha256"]})
        skipped.extend(sidecar.get("skipped", []))

    _remove_extra_shards(directory, len(plans))
    manifest = build_manifest(config, shards, skipped)
    write_manifest(directory, manifest)
    if skipped:
        logger.warning("%d unreadable images were skipped; the manifest lists them under 'skipped'", len(skipped))


def _remove_extra_shards(directory: Path, count: int) -> None:
    """Delete shards with index >= ``count``, left by an earlier run over a larger split or smaller shards."""
    for path in sorted(directory.glob("shard-*.h5")):
        index = shard_index(path.name)
        if index is not None and index >= count:
            logger.info("removing %s, left over from an earlier run", path)
            remove_shard(directory, index)
