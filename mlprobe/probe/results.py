"""Result rows of a probe run and the files that store them.

results.csv contains the configuration chosen on validation mAP for each
model, head, stage and seed. sweep.csv contains every trained configuration. Both have
the columns of COLUMNS. Every file is written to a temporary name in the same
folder and renamed, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path

from mlprobe.files import write_atomic
from mlprobe.probe.heads import save_head
from mlprobe.probe.train import HeadResult

logger = logging.getLogger(__name__)

METRICS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
COLUMNS = (
    "model", "head", "where", "seed", "lr", "weight_decay", "normalization", "selected_on", "val_mAP", "mAP",
    *METRICS, *(f"{name}_top3" for name in METRICS),
    "best_epoch", "ref_mAP", "ref_best_epoch",
    "epochs", "train_images", "val_images", "test_images", "split_seed",
)


def result_row(model: str, result: HeadResult, split: dict, epochs: int) -> dict:
    """Build the CSV row of one head: settings, test metrics at the chosen epoch, reference numbers.

    split: {"train_images", "val_images", "test_images", "split_seed"}.
    where is None for linear and all-stages heads (an empty CSV cell).
    """
    config = result.config
    row = {
        "model": model,
        "head": config.kind,
        "where": config.where,
        "seed": config.seed,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "normalization": config.normalization,
        "selected_on": result.selected_on,
        "val_mAP": result.val_mAP,
        "mAP": result.test_metrics["mAP"],
    }
    for name in METRICS:
        row[name] = result.test_metrics[name]
        row[f"{name}_top3"] = result.test_metrics[f"{name}_top3"]
    row.update({
        "best_epoch": result.best_epoch,
        "ref_mAP": result.ref_mAP,
        "ref_best_epoch": result.ref_best_epoch,
        "epochs": epochs,
        "train_images": split["train_images"],
        "val_images": split["val_images"],
        "test_images": split["test_images"],
        "split_seed": split["split_seed"],
    })
    return row


def csv_text(rows: list[dict]) -> str:
    """Return the rows as CSV text with the COLUMNS header; None becomes an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write rows to a CSV file atomically."""
    write_atomic(path, csv_text(rows).encode())


def write_json(path: Path, payload: dict) -> None:
    """Write a JSON document atomically; NaN and infinity become null."""
    write_atomic(path, (json.dumps(_json_safe(payload), indent=2) + "\n").encode())


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def head_file_name(model: str, result: HeadResult) -> str:
    """Return the weight file name of a chosen head, such as "tf_efficientnet_lite0__layover@2__seed0.pt"."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
    return f"{slug}__{result.config.name}__seed{result.config.seed}.pt"


def save_chosen_heads(folder: Path, model: str, chosen: list[HeadResult], *, feature_dims: dict[str, int],
                      class_names: list[str], backbone: dict | None = None) -> list[Path]:
    """Save the state dict and configuration of every chosen head with torch.save; return the paths.

    backbone: the store's weights fingerprint and preprocessing (image_size, mean,
    std, interpolation), so that mlprobe.probe.classifier can rebuild the live model.
    """
    paths = []
    for result in chosen:
        path = folder / head_file_name(model, result)
        extra = {
            "model": model,
            "config": result.config.to_dict(),
            "class_names": list(class_names),
            "best_epoch": result.best_epoch,
            "selected_on": result.selected_on,
            "val_mAP": result.val_mAP,
            "test_mAP": result.test_metrics["mAP"],
            "backbone": dict(backbone or {}),
        }
        save_head(result.head, path, feature_dims=feature_dims, extra=_json_safe(extra))
        paths.append(path)
    logger.info("saved %d head weight files in %s", len(paths), folder)
    return paths


def stage_label(row: dict) -> str:
    """Return the feature a row's head reads besides the final one: "final", "stage <i>" or "all stages"."""
    if row["head"] == "linear":
        return "final"
    if row["head"] == "all-stages":
        return "all stages"
    return f"stage {row['where']}"


def _score(row: dict) -> float:
    value = row["val_mAP"] if row["selected_on"] == "val" else row["mAP"]
    return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _sort_key(row: dict) -> tuple:
    order = {"linear": (0, -1), "all-stages": (2, 0)}
    group = order.get(row["head"], (1, row["where"] if row["where"] is not None else 0))
    return row["model"], group, row["head"], row["seed"]


def best_markers(rows: list[dict]) -> dict[int, str]:
    """Mark the best row of every (model, stage) and of every model, judged on the selection score.

    Returns {row index: marker}, marker "best of <stage>" or "best overall".
    """
    markers: dict[int, str] = {}
    best_stage: dict[tuple, int] = {}
    best_model: dict[str, int] = {}
    for index, row in enumerate(rows):
        key = (row["model"], stage_label(row))
        if key not in best_stage or _score(row) > _score(rows[best_stage[key]]):
            best_stage[key] = index
        if row["model"] not in best_model or _score(row) > _score(rows[best_model[row["model"]]]):
            best_model[row["model"]] = index

    for (_, label), index in best_stage.items():
        markers[index] = f"best of {label}"
    for index in best_model.values():
        markers[index] = "best overall"
    return markers


def format_markdown(rows: list[dict]) -> str:
    """Return a markdown table of the chosen rows with the best head per stage in bold.

    The best head of each stage and of each model is judged on the score it was
    chosen on (validation mAP, or test mAP without a validation split).
    """
    if not rows:
        return "(no results)"
    rows = sorted(rows, key=_sort_key)
    markers = best_markers(rows)
    selected_on = sorted({row["selected_on"] for row in rows})

    header = ["model", "head", "stage", "seed", "lr", "wd", "norm", "val mAP", "mAP", "CF1", "OF1", "epoch",
              "ref mAP", "best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in enumerate(rows):
        marker = markers.get(index, "")
        map_text = _number(row["mAP"])
        if marker:
            map_text = f"**{map_text}**"
        cells = [
            row["model"], row["head"], stage_label(row), str(row["seed"]), f"{row['lr']:g}",
            f"{row['weight_decay']:g}", row["normalization"], _number(row["val_mAP"]), map_text,
            _number(row["CF1"]), _number(row["OF1"]), str(row["best_epoch"]), _number(row["ref_mAP"]), marker,
        ]
        lines.append("| " + " | ".join(cells) + " |")

    lines.append("")
    lines.append(
        f"mAP, CF1, OF1: test metrics at the epoch and settings chosen on {' / '.join(selected_on)} mAP. "
        "ref mAP: the best test mAP over the epochs (the reference protocol, optimistic). "
        "Bold: the best head of each stage on the selection score."
    )
    return "\n".join(lines)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def plot_results(path: Path, rows: list[dict]) -> None:
    """Plot test mAP per stage, one line per stage head kind, linear and all-stages as horizontal lines.

    One panel per model; rows of several seeds are averaged. Writes a PNG atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = pyplot.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        _plot_model(axis, [row for row in rows if row["model"] == model])
        axis.set_title(model)
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    write_atomic(path, buffer.getvalue())


def _plot_model(axis, rows: list[dict]) -> None:
    stages = sorted({row["where"] for row in rows if row["where"] is not None})
    styles = {"linear": "--", "all-stages": ":"}
    for kind in dict.fromkeys(row["head"] for row in rows):
        kind_rows = [row for row in rows if row["head"] == kind]
        if kind in styles:
            axis.axhline(_mean(row["mAP"] for row in kind_rows), linestyle=styles[kind], color="gray" if kind == "linear" else "black", label=kind)
            continue
        xs = [stage for stage in stages if any(row["where"] == stage for row in kind_rows)]
        ys = [_mean(row["mAP"] for row in kind_rows if row["where"] == stage) for stage in xs]
        axis.plot(xs, ys, marker="o", label=kind)
    axis.set_xlabel("stage (where)")
    axis.set_ylabel("test mAP")
    if stages:
        axis.set_xticks(stages)
    axis.grid(alpha=0.3)
    axis.legend()


def _mean(values) -> float:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else math.nan


def write_metrics_log(path: Path, records: list[dict]) -> None:
    """Write the per-epoch records as JSON lines atomically."""
    lines = [json.dumps(_json_safe(record)) for record in records]
    write_atomic(path, ("\n".join(lines) + "\n").encode())
