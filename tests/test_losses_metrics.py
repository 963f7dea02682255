"""Losses against hand computations; pos_weight and class weights; metrics; threshold tuning."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from configs import Config
from data_functions import LabelSpace
from utility_functions import build_loss, compute_metrics, predictions_frame, tune_threshold

pytestmark = pytest.mark.unit  # pure: no training, no subprocess


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_binary_loss_is_weighted_bce_on_the_logit_difference():
    space = LabelSpace("binary", ["neg", "pos"])
    train_targets = np.array([0, 0, 0, 1])  # 3 negatives per positive
    loss_fn = build_loss(space, train_targets, Config())
    assert loss_fn.weight.item() == pytest.approx(3.0)
    logits = torch.tensor([[0.2, 1.0], [1.5, -0.5]])
    targets = torch.tensor([1, 0])
    # row 1: positive, margin 0.8, weighted by 3; row 2: negative, margin -2.0
    expected = (-3.0 * math.log(sigmoid(0.8)) - math.log(1 - sigmoid(-2.0))) / 2
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-6)

    unweighted = build_loss(space, train_targets, dataclasses.replace(Config(), pos_weight=False))
    assert unweighted.weight is None
    expected = (-math.log(sigmoid(0.8)) - math.log(1 - sigmoid(-2.0))) / 2
    assert unweighted(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_multiclass_loss_is_cross_entropy_with_optional_balanced_weights():
    space = LabelSpace("multiclass", ["a", "b", "c"])
    train_targets = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2])

    def nll(row, label):
        return -math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))

    plain = build_loss(space, train_targets, Config())
    expected = (nll([2.0, 0.0, -1.0], 0) + nll([0.5, 0.5, 3.0], 2)) / 2
    assert plain(logits, targets).item() == pytest.approx(expected, rel=1e-6)

    balanced = build_loss(space, train_targets, dataclasses.replace(Config(), class_weights="balanced"))
    weights = [8 / (3 * 4), 8 / (3 * 2), 8 / (3 * 2)]  # n / (classes * count)
    np.testing.assert_allclose(balanced.weight.numpy(), weights, rtol=1e-6)
    expected = (weights[0] * nll([2.0, 0.0, -1.0], 0) + weights[2] * nll([0.5, 0.5, 3.0], 2)) / (
        weights[0] + weights[2]
    )
    assert balanced(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_multilabel_loss_is_mean_per_label_bce_on_soft_targets():
    space = LabelSpace("multilabel", ["x", "y"])
    loss_fn = build_loss(space, np.zeros((2, 2), dtype=np.float32), Config())
    logits = torch.tensor([[1.0, -2.0]])
    targets = torch.tensor([[0.7, 0.0]])

    def bce(z, t):
        return -(t * math.log(sigmoid(z)) + (1 - t) * math.log(1 - sigmoid(z)))

    expected = (bce(1.0, 0.7) + bce(-2.0, 0.0)) / 2
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_single_label_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    targets = np.array([0, 1, 0, 1])  # predictions 0, 1, 1, 0: two right
    metrics = compute_metrics("binary", probs, targets)
    assert metrics["accuracy"] == 0.5
    # positive class: tp 1, fp 1, fn 1 -> precision = recall = f1 = 0.5
    assert metrics["f1"] == metrics["precision"] == metrics["recall"] == 0.5
    assert metrics["macro_f1"] == 0.5


def test_multilabel_metrics_and_threshold_tuning():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=np.float32)
    probs = np.array([[0.6, 0.1, 0.35], [0.2, 0.7, 0.1], [0.9, 0.4, 0.2]])
    at_half = compute_metrics("multilabel", probs, targets, 0.5)
    # predicted {0}, {1}, {0}: tp 3, fp 0, fn 2 -> micro-F1 = 6 / 8
    assert at_half["micro_f1"] == pytest.approx(0.75)
    assert at_half["accuracy"] == pytest.approx(1 / 3)
    threshold = tune_threshold(probs, targets)
    assert 0.2 < threshold <= 0.35  # catches 0.35 and 0.4 but not 0.2
    assert compute_metrics("multilabel", probs, targets, threshold)["micro_f1"] == 1.0


def test_predictions_frame_has_labels_the_ood_flag_and_one_probability_column_per_label():
    space = LabelSpace("multilabel", ["x", "y", "z"])
    targets = np.array([[1, 0, 1], [0, 0, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.1, 0.1]])
    frame = predictions_frame(["a", "b"], targets, probs, np.array([-3.5, 1.25]), 0.0, space, 0.5, ";")
    assert list(frame.columns) == [
        "text",
        "label",
        "predicted",
        "ood_score",
        "out_of_scope",
        "prob_x",
        "prob_y",
        "prob_z",
    ]
    assert frame["out_of_scope"].tolist() == [False, True]
    assert frame["label"].tolist() == ["x;z", ""]
    assert frame["predicted"].tolist() == ["x;z", ""]
