"""Multi-label metrics: per-class average precision, mAP and thresholded scores.

Labels use the store encoding: int8, 1 = positive, -1 = negative, 0 = difficult.
Difficult entries are left out of every metric here, as in the VOC 2007
evaluation. Average precision is the non-interpolated mean, over the positives,
of the precision at each positive's rank in the list sorted by descending score.
Equal scores keep their input order (stable sort), so AP is deterministic with ties.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mlprobe import defaults

logger = logging.getLogger(__name__)

# Elements of one [heads, rows, classes] block in mean_average_precision_batch;
# bounds its temporary memory to about 40 bytes per element (about 160 MB).
_BATCH_AP_ELEMENTS = 4_000_000


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Compute the non-interpolated average precision of one class.

    scores: float [N], higher means more likely positive (logits or probabilities).
    labels: int [N] in -1/0/1; difficult (0) entries are removed before ranking.
    Returns NaN when no positive is left.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same length")

    not_difficult = labels != 0
    scores = scores[not_difficult]
    positive = labels[not_difficult] == 1
    if not positive.any():
        return math.nan

    order = np.argsort(-scores, kind="stable")
    ranked_positive = positive[order]
    hits = np.cumsum(ranked_positive)
    ranks = np.arange(1, len(ranked_positive) + 1)
    precision_at_positives = hits[ranked_positive] / ranks[ranked_positive]
    return float(precision_at_positives.mean())


def _count_predictions(predicted: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Compute CP, CR, CF1, OP, OR, OF1 of boolean predictions [N, K].

    Difficult entries (label 0) are not counted. Class-averaged values (CP, CR)
    average over `classes` (bool [K], the classes with a positive); overall
    values (OP, OR) count every class. A class with no predicted label has
    precision 0.
    """
    counted = labels != 0
    truth = labels == 1
    predicted = predicted & counted

    correct = (predicted & truth).sum(axis=0).astype(np.float64)
    predicted_count = predicted.sum(axis=0).astype(np.float64)
    truth_count = truth.sum(axis=0).astype(np.float64)

    class_precision = correct[classes] / np.maximum(predicted_count[classes], 1.0)
    class_recall = correct[classes] / truth_count[classes]
    cp = float(class_precision.mean())
    cr = float(class_recall.mean())
    op = float(correct.sum() / max(predicted_count.sum(), 1.0))
    orecall = float(correct.sum() / truth_count.sum())
    return {
        "CP": cp,
        "CR": cr,
        "CF1": _f1(cp, cr),
        "OP": op,
        "OR": orecall,
        "OF1": _f1(op, orecall),
    }


def _f1(precision: float, recall: float) -> float:
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def evaluate(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: list[str] | None = None,
    probabilities: bool = False,
    threshold: float = defaults.THRESHOLD,
    top_k: int = defaults.TOP_K,
) -> dict:
    """Compute per-class AP, mAP and the thresholded and top-k precision/recall/F1.

    scores: float [N, K], logits by default, or sigmoid probabilities when
    `probabilities` is True. labels: int8 [N, K] in -1/0/1.

    A label counts as predicted when its probability is >= `threshold`. The top-k
    metrics predict the k highest-scoring labels of each image that also pass
    the threshold, as the widely used ML-GCN evaluation code
    (AveragePrecisionMeter.overall_topk) does.

    Classes without any positive are left out of mAP and of the class-averaged
    metrics (CP, CR, CF1) with a warning, and "classes_without_positives" lists
    them. The overall metrics (OP, OR, OF1) count every class.

    Returns a dict with "AP" (list of K floats, None for classes left out), "mAP",
    "CP", "CR", "CF1", "OP", "OR", "OF1", the same six suffixed "_top3" (for
    top_k = 3), "classes_without_positives" (list of names or indices) and
    "num_images".
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, K]")
    num_classes = scores.shape[1]
    names = list(class_names) if class_names is not None else list(range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} score columns")

    per_class = [average_precision(scores[:, k], labels[:, k]) for k in range(num_classes)]
    with_positive = np.array([not math.isnan(ap) for ap in per_class])
    missing = [names[k] for k in range(num_classes) if not with_positive[k]]
    if missing:
        logger.warning("classes without a positive label left out of mAP, CP and CR: %s", missing)
    if not with_positive.any():
        raise ValueError("no class has a positive label, so mAP is undefined")

    probability = scores if probabilities else 1.0 / (1.0 + np.exp(-scores))
    passed = probability >= threshold
    k = min(top_k, num_classes)
    top = np.zeros_like(passed)
    top_index = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(top, top_index, True, axis=1)

    result = {
        "AP": [None if math.isnan(ap) else ap for ap in per_class],
        "mAP": float(np.mean([ap for ap in per_class if not math.isnan(ap)])),
    }
    result.update(_count_predictions(passed, labels, with_positive))
    top_metrics = _count_predictions(passed & top, labels, with_positive)
    result.update({f"{name}_top{top_k}": value for name, value in top_metrics.items()})
    result["classes_without_positives"] = missing
    result["num_images"] = int(scores.shape[0])
    return result


def mean_average_precision_batch(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Compute the mAP of many heads at once, equal to averaging average_precision.

    scores: float [H, N, K] (logits or probabilities) of H heads on the same N images.
    labels: int [N, K] in -1/0/1, on the same device as scores.
    Returns float64 [H], the mean AP over the classes with at least one positive
    (NaN if there is none). One sort per (head, class) column; the heads are
    processed in blocks so that temporary memory stays near 160 MB.
    """
    if scores.dim() != 3 or scores.shape[1:] != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} must be [H, N, K] with labels {tuple(labels.shape)} as [N, K]")
    num_heads, num_rows, num_classes = scores.shape
    labels = labels.to(scores.device)
    positive = labels == 1
    counted = labels != 0
    with_positive = positive.any(dim=0)
    if not with_positive.any():
        return torch.full((num_heads,), math.nan, dtype=torch.float64)

    block = max(1, _BATCH_AP_ELEMENTS // max(1, num_rows * num_classes))
    results = []
    for start in range(0, num_heads, block):
        block_scores = scores[start : start + block]
        results.append(_block_average_precision(block_scores, positive, counted, with_positive))
    return torch.cat(results).cpu()


def _block_average_precision(
    scores: torch.Tensor, positive: torch.Tensor, counted: torch.Tensor, with_positive: torch.Tensor
) -> torch.Tensor:
    """Return the mAP [h] of [h, N, K] scores; difficult entries take no rank."""
    num_heads = scores.shape[0]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices

    ranked_positive = torch.gather(positive.unsqueeze(0).expand(num_heads, -1, -1), 1, order)
    ranked_counted = torch.gather(counted.unsqueeze(0).expand(num_heads, -1, -1), 1, order)
    hits = torch.cumsum(ranked_positive, dim=1, dtype=torch.float64)
    ranks = torch.cumsum(ranked_counted, dim=1, dtype=torch.float64)

    zero = torch.zeros((), dtype=torch.float64, device=scores.device)
    precision = torch.where(ranked_positive, hits / ranks.clamp_min(1.0), zero)
    per_class = precision.sum(dim=1) / positive.sum(dim=0).clamp_min(1).to(torch.float64)
    return per_class[:, with_positive].mean(dim=1)
