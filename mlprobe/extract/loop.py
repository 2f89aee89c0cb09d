"""The extraction loop: a frozen backbone over one split, written shard by shard into a store.

Shard i contains the split's samples [i * shard_size, (i + 1) * shard_size), less unreadable
images skipped with ``skip_bad``. Rank r of a torch.distributed run (or of ``world_size``
independent processes) handles the shards with i % world_size == r. A rerun keeps every
shard whose sidecar, checksum, settings and image ids still match, and redoes the rest.
Rank 0 writes manifest.json last, once every shard is complete.

A training split can contain V augmented views per image (``views``, see
``mlprobe.extract.augment``). Every other split, and every split when views is 1, contains
the single unaugmented view.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mlprobe import defaults
from mlprobe.errors import DatasetError, MlprobeError, StoreError
from mlprobe.extract.augment import ViewAugmenter
from mlprobe.extract.backbones import (
    FeatureExtractor,
    create_backbone,
    data_config,
    resolve_model_name,
    weights_fingerprint,
)
from mlprobe.extract.images import (
    EncodedImageDataset,
    ImageDataset,
    collate_encoded,
    decode_on_device,
    normalize_batch,
)
from mlprobe.extract.shard_router import ShardPlan, ShardRouter
from mlprobe.features.layout import MANIFEST_NAME, shard_index, store_dir
from mlprobe.features.manifest import build_manifest, write_manifest
from mlprobe.features.writer import (
    array_sha256,
    find_complete_shard,
    read_sidecar,
    remove_shard,
    strings_sha256,
)

logger = logging.getLogger(__name__)

COMPRESSIONS = (None, "gzip", "lzf")


@dataclass(frozen=True)
class RunOptions:
    """Settings of one extraction run that the store does not record."""

    device: torch.device
    batch_size: int  # backbone inputs per forward pass (images x views)
    workers: int
    skip_bad: bool
    progress: bool
    compression: str | None
    decode_on_gpu: bool


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
    views: int = defaults.VIEWS,
    view_seed: int = defaults.VIEW_SEED,
    training: bool | None = None,
    decode_on_gpu: bool = False,
    timings: dict | None = None,
) -> Path:
    """Extract pooled stage features of every image of ``split`` into a feature store.

    Args:
        split: ``mlprobe.extract.datasets.Split``; its sample order fixes the row order.
        model_name: short name or timm name.
        image_size: square input size in pixels; None means the model's pretrained size.
        out_root: root folder of the stores; the store goes to ``store_dir(...)`` under it.
        batch_size: backbone inputs per forward pass. With V views a batch contains
            max(1, batch_size // V) images, each with its V views.
        workers: DataLoader processes decoding images (0 decodes in this process).
        shard_size: images of the split per HDF5 shard.
        device: torch device; None picks cuda when available, else cpu. Under torchrun,
            "cuda" and None mean this rank's GPU, cuda:LOCAL_RANK.
        checkpoint, random_weights: weight source, see ``create_backbone``.
        skip_bad: record unreadable images in the manifest's ``skipped`` and go on,
            instead of raising DatasetError naming the first one.
        progress: show a progress bar with images per second (on rank 0 only).
        rank, world_size: this process's part of the shards; taken from torch.distributed
            when it is initialised.
        compression: HDF5 filter for the feature datasets ("gzip", "lzf") or None.
        views: V augmented views per image of a training split; 1 stores the single
            unaugmented view. Features are float16 [n, V, D].
        view_seed: non-negative base seed of the views. View v of sample index i is seeded
            by (view_seed, i, v), so resumed and distributed runs store the same views.
        training: whether the split gets augmented views; None decides by its name
            (``defaults.TRAINING_SPLIT_NAMES``: train, trainval).
        decode_on_gpu: decode JPEG files with torchvision.io.decode_jpeg on the CUDA device
            instead of with Pillow in the loader workers.
        timings: when given, receives wall seconds of this process: ``setup_s`` (model,
            fingerprint, shard plan), ``extract_s`` (decoding, forward passes and shard
            writes), ``merge_s`` (final barrier and manifest), and ``images`` extracted.

    Returns:
        The store folder. It contains manifest.json once rank 0 has merged every shard.

    Raises:
        DatasetError: empty split, labels of the wrong width, or an unreadable image without ``skip_bad``.
        BackboneError: the model or its weights cannot be loaded.
        MlprobeError: ``decode_on_gpu`` without a CUDA device.
    """
    started = time.perf_counter()
    rank, world_size = _distributed_rank(rank, world_size)
    _check_split(split)
    _check_settings(shard_size, batch_size, views, view_seed, compression)
    options = RunOptions(
        device=_pick_device(device),
        batch_size=batch_size,
        workers=workers,
        skip_bad=skip_bad,
        progress=progress and rank == 0,
        compression=compression,
        decode_on_gpu=decode_on_gpu,
    )
    if decode_on_gpu:
        _check_gpu_decoding(options.device)

    timm_name = resolve_model_name(model_name)
    model = create_backbone(timm_name, checkpoint=checkpoint, random_weights=random_weights, image_size=image_size)
    extractor = FeatureExtractor(model)
    preprocessing = data_config(model, image_size)
    augmenter = _make_augmenter(split, preprocessing, views, view_seed, training)
    config = _store_config(split, timm_name, model, extractor, preprocessing, shard_size, augmenter)

    directory = store_dir(out_root, split.dataset, timm_name, preprocessing["image_size"], split.split)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # The store stays visibly incomplete until every shard is written again or kept.
        (directory / MANIFEST_NAME).unlink(missing_ok=True)

    plans = _plan_shards(split, config, shard_size)
    own_plans = [plan for plan in plans if plan.index % world_size == rank]
    todo = [plan for plan in own_plans if find_complete_shard(directory, plan.index, plan.expected) is None]
    logger.info(
        "%s %s: %d images, model %s at %d px, %d views, %d shards; "
        "rank %d of %d keeps %d complete shards, writes %d into %s",
        split.dataset,
        split.split,
        len(split.samples),
        timm_name,
        preprocessing["image_size"],
        config["views"],
        len(plans),
        rank,
        world_size,
        len(own_plans) - len(todo),
        len(todo),
        directory,
    )

    extract_started = time.perf_counter()
    if todo:
        _run_shards(split, todo, directory, extractor, preprocessing, config, augmenter, options)

    merge_started = time.perf_counter()
    _barrier()
    if rank == 0:
        _merge_manifest(directory, config, plans)

    if timings is not None:
        timings.update(
            setup_s=extract_started - started,
            extract_s=merge_started - extract_started,
            merge_s=time.perf_counter() - merge_started,
            images=sum(plan.stop - plan.start for plan in todo),
        )
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


def _check_settings(shard_size: int, batch_size: int, views: int, view_seed: int, compression: str | None) -> None:
    """Raise ValueError for sizes below 1, a negative view seed or an unknown compression."""
    if shard_size < 1 or batch_size < 1 or views < 1:
        raise ValueError(
            f"shard_size, batch_size and views must be at least 1, got {shard_size}, {batch_size} and {views}"
        )
    if view_seed < 0:
        raise ValueError(f"view_seed must be non-negative, got {view_seed}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _pick_device(device: str | None) -> torch.device:
    """Return the requested device, or cuda (this rank's GPU under torchrun) when available, else cpu."""
    if device is not None and device != "cuda":
        return torch.device(device)

    if device == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _check_gpu_decoding(device: torch.device) -> None:
    """Raise MlprobeError unless JPEG decoding can run on a CUDA device."""
    if device.type == "cuda" and torch.cuda.is_available():
        return

    reason = "torch.cuda.is_available() is False" if not torch.cuda.is_available() else f"the device is {device}"
    raise MlprobeError(
        f"--decode-on-gpu needs a CUDA device, but {reason}; "
        f"drop --decode-on-gpu to decode images with Pillow on the CPU"
    )


def _make_augmenter(
    split, preprocessing: dict, views: int, view_seed: int, training: bool | None
) -> ViewAugmenter | None:
    """Return the view augmenter of a training split with views > 1, else None (one unaugmented view)."""
    is_training = split.split in defaults.TRAINING_SPLIT_NAMES if training is None else training
    if views == 1:
        return None

    if not is_training:
        logger.info(
            "%s %s is not a training split, so it gets the single unaugmented view instead of %d views",
            split.dataset,
            split.split,
            views,
        )
        return None
    return ViewAugmenter(preprocessing, views=views, view_seed=view_seed)


def _store_config(
    split,
    timm_name: str,
    model,
    extractor: FeatureExtractor,
    preprocessing: dict,
    shard_size: int,
    augmenter: ViewAugmenter | None,
) -> dict:
    """Return the settings every shard of the store shares: ``manifest.CONFIG_FIELDS`` plus ``augmentation``."""
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
        "views": 1 if augmenter is None else augmenter.views,
        "augmentation": None if augmenter is None else augmenter.settings(),
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
    augmenter: ViewAugmenter | None,
    options: RunOptions,
) -> None:
    """Run the backbone over the samples of ``plans`` and write one shard per plan.

    An exception discards the unfinished shards' temporary files; finished shards and
    their sidecars stay for the next run.
    """
    for plan in plans:
        remove_shard(directory, plan.index)

    device = options.device
    indices = [index for plan in plans for index in range(plan.start, plan.stop)]
    loader = _make_loader(split, indices, preprocessing, augmenter, options)
    extractor.to(device, memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    logger.info(
        "running on %s with %d images x %d views per batch, %d loader workers, decoding JPEGs %s",
        device,
        loader.batch_size,
        config["views"],
        options.workers,
        "on the GPU" if options.decode_on_gpu else "with Pillow",
    )

    router = ShardRouter(split, plans, directory, config, options.skip_bad, options.compression)
    started = time.perf_counter()
    bar = tqdm(total=len(indices), unit="img", desc=f"{split.dataset} {split.split}", disable=not options.progress)
    try:
        with torch.inference_mode(), autocast:
            for sample_indices, images, errors in _batches(loader, split, preprocessing, augmenter, options):
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


def _make_loader(
    split, indices: list[int], preprocessing: dict, augmenter: ViewAugmenter | None, options: RunOptions
) -> DataLoader:
    """Return the DataLoader over ``indices``: decoded images, or file bytes with ``decode_on_gpu``."""
    views = 1 if augmenter is None else augmenter.views
    images_per_batch = max(1, options.batch_size // views)
    if options.decode_on_gpu:
        dataset = EncodedImageDataset(split.samples, preprocessing, indices)
        collate = collate_encoded
    else:
        dataset = ImageDataset(split.samples, preprocessing, indices, augmenter=augmenter, normalize=False)
        collate = None

    return DataLoader(
        dataset,
        batch_size=images_per_batch,
        shuffle=False,
        num_workers=options.workers,
        pin_memory=options.device.type == "cuda" and not options.decode_on_gpu,
        collate_fn=collate,
    )


def _batches(
    loader: DataLoader, split, preprocessing: dict, augmenter: ViewAugmenter | None, options: RunOptions
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Yield (sample indices [B], float32 images [B, V, 3, S, S], B error strings) per loader batch.

    Unaugmented images arrive as uint8 and are normalised on the device; augmented views
    arrive normalised, because Cutout fills its hole after normalisation.
    """
    if not options.decode_on_gpu:
        for batch_indices, images, errors in loader:
            if images.dtype == torch.uint8:
                images = images.to(options.device, non_blocking=True)
                images = normalize_batch(images, preprocessing).unsqueeze(1)
            yield batch_indices.tolist(), images, list(errors)
        return

    # NOTE: this branch has not been run on a GPU. extract_split requires CUDA for it, and
    # the tests run it with device "cpu", where decode_jpeg uses libjpeg instead of nvJPEG.
    for batch_indices, payloads, errors in loader:
        indices = batch_indices.tolist()
        paths = [split.samples[index].path for index in indices]
        images, errors = decode_on_device(payloads, paths, preprocessing, options.device, errors)
        if augmenter is None:
            views = normalize_batch(images, preprocessing).unsqueeze(1)
        else:
            views = torch.stack([augmenter(image, index) for image, index in zip(images, indices)])
        yield indices, views, errors


def _forward_good_rows(
    extractor: FeatureExtractor, images: torch.Tensor, errors: list[str], device: torch.device
) -> dict[str, np.ndarray]:
    """Run the backbone on every view of the readable images of a batch.

    Args:
        images: float32 [B, V, 3, S, S] on any device.
        errors: B strings; rows with a non-empty error are left out.

    Returns:
        name -> float16 [g, V, D] for the g rows whose error is empty, in batch order.
    """
    views = images.shape[1]
    good = torch.tensor([not error for error in errors], dtype=torch.bool)
    if not bool(good.any()):
        return {name: np.zeros((0, views, dim), dtype=np.float16) for name, dim in extractor.feature_dims.items()}

    batch = images[good.to(images.device)] if not bool(good.all()) else images
    rows = batch.shape[0]
    batch = batch.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    outputs = extractor(batch)
    return {
        name: value.float().cpu().numpy().astype(np.float16).reshape(rows, views, -1) for name, value in outputs.items()
    }


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
    # build_manifest keeps the CONFIG_FIELDS only; the augmentation settings (None for a
    # store of unaugmented views) are an extra field that readers may ignore.
    manifest["augmentation"] = config["augmentation"]
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
