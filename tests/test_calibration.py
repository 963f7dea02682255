"""Calibrated probabilities and the out-of-scope score: the temperature fit recovers a known
temperature, folding it into the head divides the logits exactly, energy and JointEnergy match hand
computations, ECE matches a hand computation, the threshold keeps the configured share of the
validation texts, and ood_score / out_of_scope reach every output (both scripts, the fp32 and the
int8 edge paths)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import intel_compressor_test
from configs import Config
from data_functions import load_data
from intel_compressor_test import ood_scores
from utility_functions import expected_calibration_error, fit_temperature, fold_temperature


@pytest.mark.unit
def test_the_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    calibrated = 2.0 * torch.randn(20_000, 10, generator=generator)  # labels drawn from softmax of these
    labels = torch.multinomial(torch.softmax(calibrated, dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(calibrated * 2.5, labels) == pytest.approx(2.5, rel=0.03)  # overconfident by 2.5
    assert fit_temperature(calibrated * 0.5, labels) == pytest.approx(0.5, rel=0.03)  # underconfident


@pytest.mark.unit
def test_folding_the_temperature_into_the_head_divides_the_logits(tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    input_ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        fold_temperature(model, 1.7)
        after = model(input_ids=input_ids).logits
    torch.testing.assert_close(after, before / 1.7, atol=1e-6, rtol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))


@pytest.mark.unit
def test_energy_and_joint_energy_by_hand():
    logits = np.array([[2.0, 0.0, -1.0], [10.0, 10.0, 10.0]])
    energy = [-math.log(math.exp(2) + 1 + math.exp(-1)), -(10 + math.log(3))]
    np.testing.assert_allclose(ood_scores(logits, multilabel=False), energy, rtol=1e-12)
    # served logits are the model's divided by T: the energy is computed on the model's own
    np.testing.assert_allclose(ood_scores(logits / 2, multilabel=False, temperature=2), energy, rtol=1e-12)
    joint = [-(math.log(1 + math.exp(2)) + math.log(2) + math.log(1 + math.exp(-1))), -3 * math.log(1 + math.exp(10))]
    np.testing.assert_allclose(ood_scores(logits, multilabel=True), joint, rtol=1e-12)
    assert ood_scores(np.array([[900.0, -900.0]]), multilabel=True)[0] == pytest.approx(-900.0)  # no overflow


@pytest.mark.unit
def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    targets = np.array([0, 1, 1, 1])
    # 15 bins: 0.9 -> (13/15, 14/15], 0.8 -> (11/15, 12/15], 0.7 -> (10/15, 11/15], 0.55 -> (8/15, 9/15]
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    same_bin = np.array([[0.9, 0.1], [0.91, 0.09]])
    assert expected_calibration_error(same_bin, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.905))


def test_the_threshold_keeps_the_configured_share_of_validation_texts(banking_runs):
    for run in ("manual", "trainer"):
        run_dir = banking_runs["directory"] / "outputs" / run
        calibration = json.loads((run_dir / "metrics.json").read_text())["calibration"]
        config = Config(**json.loads((run_dir / "config.json").read_text()))
        valid = load_data(config)[2]
        model = intel_compressor_test.load_classifier(run_dir / "best_model")
        scores = model.predictions(valid.texts)[1]
        assert (
            model.ood_threshold == pytest.approx(calibration["ood_threshold"]) and calibration["in_scope_share"] == 0.95
        )
        assert np.mean(scores <= model.ood_threshold) == pytest.approx(0.95, abs=1 / len(valid))
        assert model.temperature == pytest.approx(calibration["temperature"]) and calibration["temperature"] > 0
        assert 0 <= calibration["ece_after"] <= calibration["ece_before"]  # fitted on these rows


def test_ood_columns_reach_both_scripts_and_both_edge_paths(banking_runs, tmp_path):
    texts = pd.read_csv(banking_runs["test"])["text"].tolist()
    for run in ("manual", "trainer"):
        run_dir = banking_runs["directory"] / "outputs" / run
        predictions = pd.read_csv(run_dir / "test_predictions.csv")
        model = intel_compressor_test.load_classifier(run_dir / "best_model")
        probs, scores = model.predictions(texts)
        np.testing.assert_allclose(predictions["ood_score"], scores, atol=1e-3)
        assert (predictions["out_of_scope"] == (scores > model.ood_threshold)).all()
        metrics = json.loads((run_dir / "test_metrics.json").read_text())
        assert metrics["out_of_scope_share"] == pytest.approx(predictions["out_of_scope"].mean())
        assert metrics["ece"] == pytest.approx(
            expected_calibration_error(probs, np.array([model.labels.index(x) for x in predictions["label"]])), abs=1e-4
        )
    edge_config = json.loads((banking_runs["int8"] / "edge_config.json").read_text())
    fp32 = intel_compressor_test.load_classifier(banking_runs["best"])
    assert (edge_config["calibration_temperature"], edge_config["ood_threshold"]) == (
        fp32.temperature,
        fp32.ood_threshold,
    )
    int8 = intel_compressor_test.load_classifier(banking_runs["int8"])
    int8_scores, fp32_scores = int8.predictions(texts)[1], fp32.predictions(texts)[1]
    assert np.corrcoef(int8_scores, fp32_scores)[0, 1] > 0.95  # int8 ranks texts as fp32 does
