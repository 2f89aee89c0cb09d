"""Average precision, mAP and the thresholded and top-3 precision, recall and F1."""

import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mlprobe.probe.metrics import average_precision, evaluate, mean_average_precision_batch


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ap_matches_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(200).astype(np.float64) / 7.0  # distinct values, so no ties
    labels = np.where(rng.random(200) < 0.3, 1, -1).astype(np.int8)

    expected = average_precision_score(labels == 1, scores)

    assert average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_ap_ignores_difficult_by_hand():
    # Descending scores: 0.9 (+), 0.8 (difficult), 0.7 (-), 0.6 (+), 0.5 (difficult), 0.4 (+).
    # Without the difficult entries the ranking is + - + +, so precisions at the
    # positives are 1/1, 2/3 and 3/4.
    scores = np.array([0.4, 0.9, 0.5, 0.7, 0.8, 0.6])
    labels = np.array([1, 1, 0, -1, 0, 1], dtype=np.int8)

    expected = (1.0 + 2.0 / 3.0 + 3.0 / 4.0) / 3.0

    assert average_precision(scores, labels) == pytest.approx(expected)


def test_ap_difficult_counted_would_differ():
    # The same case with the difficult entries as negatives gives a lower AP,
    # so the previous test does detect whether they are removed.
    scores = np.array([0.4, 0.9, 0.5, 0.7, 0.8, 0.6])
    labels = np.array([1, 1, -1, -1, -1, 1], dtype=np.int8)

    assert average_precision(scores, labels) < (1.0 + 2.0 / 3.0 + 3.0 / 4.0) / 3.0


def test_ap_without_positive_is_nan():
    assert math.isnan(average_precision(np.array([0.2, 0.1]), np.array([-1, 0], dtype=np.int8)))


def test_thresholded_metrics_by_hand():
    # Logits > 0 mean probability > 0.5, so predicted labels are the positive logits.
    scores = np.array(
        [
            [2.0, -1.0, 1.0],
            [1.0, 1.0, -2.0],
            [-1.0, 2.0, -1.0],
            [-2.0, -1.0, 3.0],
        ]
    )
    labels = np.array(
        [
            [1, -1, -1],
            [-1, 1, 1],
            [-1, 1, -1],
            [-1, 0, 1],  # the difficult class-1 entry is not counted
        ],
        dtype=np.int8,
    )
    # Class 0: predicted rows 0, 1; correct 1; positives 1 -> P 1/2, R 1.
    # Class 1: predicted rows 1, 2 (row 3 is difficult and negative anyway); correct 2; positives 2 -> P 1, R 1.
    # Class 2: predicted rows 0, 3; correct 1; positives 2 -> P 1/2, R 1/2.
    cp = (0.5 + 1.0 + 0.5) / 3
    cr = (1.0 + 1.0 + 0.5) / 3
    op = 4 / 6
    orecall = 4 / 5

    result = evaluate(scores, labels)

    assert result["CP"] == pytest.approx(cp)
    assert result["CR"] == pytest.approx(cr)
    assert result["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert result["OP"] == pytest.approx(op)
    assert result["OR"] == pytest.approx(orecall)
    assert result["OF1"] == pytest.approx(2 * op * orecall / (op + orecall))


def test_probabilities_threshold_at_half():
    probabilities = np.array([[0.7, 0.2], [0.4, 0.6]])
    labels = np.array([[1, -1], [-1, 1]], dtype=np.int8)

    result = evaluate(probabilities, labels, probabilities=True)

    assert result["OP"] == pytest.approx(1.0)
    assert result["OR"] == pytest.approx(1.0)


def test_top3_keeps_three_labels_per_image():
    # Five classes, every logit positive: at 0.5 all five are predicted, with
    # top-3 only the three highest of each image.
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = np.array([[1, 1, -1, -1, 1], [-1, -1, -1, 1, 1]], dtype=np.int8)

    result = evaluate(scores, labels)

    # Top-3 predictions: image 0 -> classes 0, 1, 2; image 1 -> classes 4, 3, 2.
    # Correct: image 0 -> 0, 1; image 1 -> 4, 3. So 4 of 6 predictions, 4 of 5 positives.
    assert result["OP_top3"] == pytest.approx(4 / 6)
    assert result["OR_top3"] == pytest.approx(4 / 5)
    assert result["OP"] == pytest.approx(5 / 10)
    assert result["OR"] == pytest.approx(1.0)


def test_top3_requires_threshold():
    scores = np.array([[2.0, -1.0, -2.0, -3.0]])
    labels = np.array([[1, 1, -1, -1]], dtype=np.int8)

    result = evaluate(scores, labels)

    assert result["OP_top3"] == pytest.approx(1.0)
    assert result["OR_top3"] == pytest.approx(0.5)


def test_class_without_positive_left_out(caplog):
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.7, 0.4], [0.1, 0.8, 0.6]])
    labels = np.array([[1, -1, -1], [-1, 1, 0], [-1, -1, -1]], dtype=np.int8)

    with caplog.at_level(logging.WARNING, logger="mlprobe.probe.metrics"):
        result = evaluate(scores, labels, class_names=["cat", "dog", "bird"])

    assert result["classes_without_positives"] == ["bird"]
    assert result["AP"][2] is None
    assert result["mAP"] == pytest.approx((1.0 + 0.5) / 2)
    assert "bird" in caplog.text


def test_batch_map_equals_loop_with_ties_and_difficult():
    rng = np.random.default_rng(7)
    heads, rows, classes = 4, 120, 6
    scores = np.round(rng.normal(size=(heads, rows, classes)), 1)  # rounding makes ties
    labels = rng.choice(np.array([-1, -1, 0, 1], dtype=np.int8), size=(rows, classes))
    labels[:, 5] = -1  # a class without positives is left out

    expected = []
    for head in range(heads):
        values = [average_precision(scores[head, :, k], labels[:, k]) for k in range(classes)]
        expected.append(np.nanmean(values))

    result = mean_average_precision_batch(torch.from_numpy(scores).float(), torch.from_numpy(labels))

    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)


def test_batch_map_matches_evaluate():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 4))
    labels = np.where(rng.random((50, 4)) < 0.4, 1, -1).astype(np.int8)

    batch = mean_average_precision_batch(torch.from_numpy(scores)[None], torch.from_numpy(labels))

    assert float(batch[0]) == pytest.approx(evaluate(scores, labels)["mAP"])


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="must both be"):
        evaluate(np.zeros((3, 2)), np.zeros((3, 3), dtype=np.int8))
