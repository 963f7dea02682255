"""The mechanisms that make small data work: the probe-fitted head, the step budget and early stopping."""

import dataclasses
import json

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import manual_classification
import trainer_classification
from configs import Config, parse_config
from tests.helpers import tiny_run_args
from utility_functions import (
    build_loss,
    build_model,
    classifier_features,
    planned_epochs,
    predict_logits,
    prepare_run,
    stopped_early,
)


@pytest.mark.unit
def test_step_budget_raises_epochs_on_small_data():
    config = dataclasses.replace(Config(), batch_size=32, epochs=5, min_steps=600)
    assert planned_epochs(config, 900) == 21  # 29 steps an epoch
    assert planned_epochs(config, 9016) == 5  # 282 steps an epoch: 1,410 already
    assert planned_epochs(dataclasses.replace(config, min_steps=0), 900) == 5
    assert planned_epochs(dataclasses.replace(config, gradient_accumulation_steps=2), 900) == 40  # 15 steps an epoch


@pytest.mark.unit
def test_stopped_early_counts_validations_after_the_best():
    history = [{"step": 10, "macro_f1": 0.5}, {"step": 20, "macro_f1": 0.7}, {"step": 30, "macro_f1": 0.6}]
    best = history[1]
    assert not stopped_early(history, best, patience=2)
    assert stopped_early([*history, {"step": 40, "macro_f1": 0.7}], best, patience=2)  # a tie is no improvement
    assert not stopped_early([*history, {"step": 40, "macro_f1": 0.7}], best, patience=0)


@pytest.mark.parametrize("script", [manual_classification, trainer_classification])
def test_early_stopping_and_step_budget_in_both_scripts(script, tiny_bert_dir, banking_slice, tmp_path):
    train, test = banking_slice  # 200 rows: 25 batches of 8
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path),
        f"--train_file={train}",
        f"--test_file={test}",
        "--min_steps=250",
        "--epochs=1",
        "--early_stopping_patience=2",
        "--head_init=probe",  # both scripts through the probe-fitted head
    ]
    result = script.main(args)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["epochs"] == 11  # ceil(250 / 23): 180 training rows are 23 batches of 8
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    scores = [entry["macro_f1"] for entry in history]
    best_so_far = [max(range(i + 1), key=lambda j: (scores[j], -j)) for i in range(len(scores))]  # first best
    stops = [i for i in range(len(scores)) if i - best_so_far[i] >= 2]
    # the run ends at the second validation without improvement, or after its last epoch
    assert len(history) == (stops[0] + 1 if stops else 11), scores
    assert result.best["step"] == history[best_so_far[-1]]["step"]


def test_probe_head_predicts_like_a_logistic_regression_before_training(minilm_path, banking_slice, tmp_path):
    train, _ = banking_slice
    args = [
        f"--model_name_or_path={minilm_path}",
        f"--train_file={train}",
        "--validation_file=",
        "--test_file=",
        f"--output_dir={tmp_path}",
        "--num_threads=2",
    ]
    run = prepare_run(parse_config(args))
    loss_fn = build_loss(run.space, run.train_data.targets, run.config)
    model = build_model(run, loss_fn)
    features = classifier_features(model, run.train_set, run.collator, 32, run.device)
    logits = predict_logits(model, run.train_set, run.collator, 32, run.device)
    head = model.classifier
    torch.testing.assert_close(logits, features @ head.weight.T + head.bias, rtol=1e-4, atol=1e-4)
    # The probe's training loss, pinned (CPU, torch 2.13.0); after an intended change, print it and paste.
    probe_loss = loss_fn(logits, torch.as_tensor(run.train_data.targets))
    torch.testing.assert_close(probe_loss.item(), 0.0728504, rtol=0, atol=1e-4)

    baseline = make_pipeline(StandardScaler(), LogisticRegression(C=run.config.probe_c, max_iter=5000))
    baseline.fit(features.numpy(), run.train_data.targets)
    ours = (features @ head.weight.T + head.bias).argmax(dim=1).numpy()
    assert (ours == baseline.predict(features.numpy())).mean() >= 0.99
