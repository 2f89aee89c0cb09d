"""Choosing one configuration per head from the sweep's learning rates, weight decays and normalisations."""

from __future__ import annotations

import logging
import math

from mlprobe.probe.train import HeadResult

logger = logging.getLogger(__name__)


def selection_score(result: HeadResult) -> float:
    """Return the score a head was chosen on: val mAP at its best epoch, or test mAP without validation."""
    if result.selected_on == "val":
        value = result.val_mAP
    else:
        value = result.test_metrics["mAP"]
    return -math.inf if value is None or math.isnan(value) else value


def choose_configs(results: list[HeadResult]) -> list[HeadResult]:
    """Keep, for every (kind, where, seed), the result with the highest selection score.

    The lr x weight decay x normalisation grid of a head is compared on the
    validation mAP, or on test mAP when there is no validation split. Ties go
    to the first in sweep order. The chosen results keep the order of their
    first appearance.
    """
    chosen: dict[tuple, HeadResult] = {}
    for result in results:
        key = (result.config.kind, result.config.where, result.config.seed)
        if key not in chosen or selection_score(result) > selection_score(chosen[key]):
            chosen[key] = result

    for result in chosen.values():
        logger.info("chose %s on %s mAP %.4f: test mAP %.4f at epoch %d", result.config.head_id, result.selected_on,
                    selection_score(result), result.test_metrics["mAP"], result.best_epoch)
    return list(chosen.values())
