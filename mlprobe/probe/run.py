"""One probe run: open the stores of every model, train the sweep, write the results."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlprobe import defaults
from mlprobe.errors import MlprobeError, StoreError
from mlprobe.features import FeatureStore, check_compatible
from mlprobe.files import write_atomic
from mlprobe.probe.data import StoreSource, split_rows
from mlprobe.probe.results import (
    format_markdown,
    plot_results,
    result_row,
    save_chosen_heads,
    write_csv,
    write_json,
    write_metrics_log,
)
from mlprobe.probe.selection import choose_configs
from mlprobe.probe.sweep import build_grid, stage_indices
from mlprobe.probe.train import resolve_device, train_sweep

logger = logging.getLogger(__name__)


def open_pairs(pairs: list[tuple[Path, Path]]) -> list[tuple[FeatureStore, FeatureStore]]:
    """Open every (train store, test store) pair and check that they can be probed together.

    Train and test stores of one model must match (model, weights, image size,
    classes, features); stores of different models must share the class list.
    Raises StoreError naming both folders otherwise.
    """
    if not pairs:
        raise MlprobeError("no feature stores to probe; give at least one (train store, test store) pair")
    opened = []
    for train_path, test_path in pairs:
        train_store = FeatureStore.open(Path(train_path))
        test_store = FeatureStore.open(Path(test_path))
        check_compatible(train_store, test_store)
        opened.append((train_store, test_store))

    first = opened[0][0]
    for train_store, _ in opened[1:]:
        if train_store.class_names != first.class_names:
            raise StoreError(
                f"stores {first.path} and {train_store.path} have different class lists; "
                "probe models side by side only on stores of the same dataset and classes"
            )
    models = [train_store.model for train_store, _ in opened]
    if len(set(models)) != len(models):
        raise MlprobeError(f"model listed twice among the stores: {models}; give one store pair per model")
    return opened


def run_probe(
    pairs: list[tuple[Path, Path]],
    out_dir: Path,
    *,
    heads: list[str] = defaults.SWEEP_HEADS,
    wheres: list[int] | None = None,
    seeds: list[int] = defaults.SWEEP_SEEDS,
    lrs: list[float] = defaults.SWEEP_LEARNING_RATES,
    weight_decays: list[float] = defaults.SWEEP_WEIGHT_DECAYS,
    normalizations: list[str] = defaults.SWEEP_NORMALIZATIONS,
    epochs: int = defaults.EPOCHS,
    batch_size: int = defaults.BATCH_SIZE,
    val_fraction: float = defaults.VAL_FRACTION,
    split_seed: int = defaults.SPLIT_SEED,
    difficult: str = "positive",
    device: str | None = None,
    max_memory_bytes: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train the sweep on every model's stores and write the results to out_dir.

    pairs: one (train store folder, test store folder) per model. wheres: stages
    for layover and concat heads, default every stage the store holds.
    val_fraction of the training images (drawn with split_seed) choose the
    epoch and settings; with 0 they are chosen on test.

    Writes results.csv (chosen configuration per model, head, stage and seed),
    sweep.csv (every configuration), results.json, results.md, results.png,
    metrics.jsonl (one line per head and epoch) and heads/*.pt. Returns the
    rows of results.csv.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MlprobeError(f"val_fraction={val_fraction} is invalid; use a fraction in [0, 1) such as 0.1")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    opened = open_pairs(pairs)
    target_device = resolve_device(device)

    chosen_rows, sweep_rows, records, runs = [], [], [], []
    for train_store, test_store in opened:
        run = _probe_model(train_store, test_store, out_dir, heads=heads, wheres=wheres, seeds=seeds, lrs=lrs,
                           weight_decays=weight_decays, normalizations=normalizations, epochs=epochs,
                           batch_size=batch_size, val_fraction=val_fraction, split_seed=split_seed,
                           difficult=difficult, device=str(target_device), max_memory_bytes=max_memory_bytes,
                           progress=progress)
        chosen_rows.extend(run.pop("chosen_rows"))
        sweep_rows.extend(run.pop("sweep_rows"))
        records.extend(run.pop("records"))
        runs.append(run)

    settings = {
        "heads": list(heads), "wheres": wheres, "seeds": list(seeds), "lrs": list(lrs),
        "weight_decays": list(weight_decays), "normalizations": list(normalizations), "epochs": epochs,
        "batch_size": batch_size, "val_fraction": val_fraction, "split_seed": split_seed, "difficult": difficult,
        "device": str(target_device), "max_memory_bytes": max_memory_bytes,
    }
    _write_outputs(out_dir, chosen_rows, sweep_rows, records, runs, settings)
    logger.info("probe run finished in %.1f s: %d chosen rows, %d configurations, results in %s",
                time.perf_counter() - started, len(chosen_rows), len(sweep_rows), out_dir)
    return chosen_rows


def _probe_model(train_store, test_store, out_dir, *, heads, wheres, seeds, lrs, weight_decays, normalizations,
                 epochs, batch_size, val_fraction, split_seed, difficult, device, max_memory_bytes, progress) -> dict:
    """Train the sweep on one model's stores; return its rows, epoch records and run summary."""
    model = train_store.model
    configs = build_grid(stages=stage_indices(train_store.feature_names), heads=heads, wheres=wheres, seeds=seeds,
                         lrs=lrs, weight_decays=weight_decays, normalizations=normalizations)

    train_rows, val_rows = split_rows(train_store.num_images, val_fraction, split_seed)
    source = StoreSource(train_store)
    train = source.subset(train_rows)
    val = source.subset(val_rows) if len(val_rows) else None
    test = StoreSource(test_store)
    split = {"train_images": len(train_rows), "val_images": len(val_rows), "test_images": test_store.num_images,
             "split_seed": split_seed, "val_fraction": val_fraction}
    logger.info("probing %s: %d configurations, %d training, %d validation, %d test images", model, len(configs),
                split["train_images"], split["val_images"], split["test_images"])

    records: list[dict] = []

    def keep_records(epoch_records: list[dict]) -> None:
        records.extend({"model": model, **record} for record in epoch_records)

    result = train_sweep(configs, train, test, val=val, class_names=train_store.class_names, epochs=epochs,
                         batch_size=batch_size, difficult=difficult, device=device,
                         max_memory_bytes=max_memory_bytes, progress=progress, on_epoch=keep_records)

    chosen = choose_configs(result.heads)
    backbone = {key: train_store.manifest[key]
                for key in ("model", "weights_fingerprint", "image_size", "mean", "std", "interpolation")}
    save_chosen_heads(out_dir / "heads", model, chosen, feature_dims=train_store.feature_dims,
                      class_names=train_store.class_names, backbone=backbone)
    return {
        "model": model,
        "train_store": str(train_store.path),
        "test_store": str(test_store.path),
        "class_names": train_store.class_names,
        "split": split,
        "memory": result.memory,
        "seconds": result.seconds,
        "chosen_rows": [result_row(model, item, split, epochs) for item in chosen],
        "sweep_rows": [result_row(model, item, split, epochs) for item in result.heads],
        "per_class_AP": {item.config.head_id: item.test_metrics["AP"] for item in chosen},
        "classes_without_positives": chosen[0].test_metrics["classes_without_positives"] if chosen else [],
        "records": records,
    }


def _write_outputs(out_dir: Path, chosen_rows, sweep_rows, records, runs, settings) -> None:
    """Write the CSV, JSON, markdown, plot and epoch log files of a run."""
    write_csv(out_dir / "results.csv", chosen_rows)
    write_csv(out_dir / "sweep.csv", sweep_rows)
    write_json(out_dir / "results.json", {"settings": settings, "runs": runs, "results": chosen_rows})
    write_atomic(out_dir / "results.md", (format_markdown(chosen_rows) + "\n").encode())
    write_metrics_log(out_dir / "metrics.jsonl", records)
    plot_results(out_dir / "results.png", chosen_rows)
