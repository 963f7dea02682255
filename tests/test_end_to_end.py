"""Train the tiny BERT with the hand-written loop on slices of the real data, then check every
output: the checkpoint loads with plain transformers, predictions are complete, logs exist."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, pipeline

import manual_classification
import split_csv_script
from intel_compressor_test import DataError
from tests.helpers import run_python, shared_file, tiny_run_args
from utility_functions import save_model_directory


def read_outputs(run_dir: Path) -> dict:
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "test_metrics": json.loads((run_dir / "test_metrics.json").read_text()),
        "config": json.loads((run_dir / "config.json").read_text()),
        "predictions": pd.read_csv(run_dir / "test_predictions.csv", keep_default_na=False),
    }


def test_multiclass_banking77(tiny_bert_dir, banking_slice, tmp_path):
    train, test = banking_slice
    args = [*tiny_run_args(tiny_bert_dir, tmp_path), f"--train_file={train}", f"--test_file={test}", "--epochs=3"]
    result = manual_classification.main(args)
    run_dir = tmp_path / "outputs" / "run"
    out = read_outputs(run_dir)

    labels = sorted(pd.read_csv(train)["label"].unique())
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "best_model")
    assert [model.config.id2label[i] for i in range(5)] == labels
    assert (run_dir / "best_model" / "model.safetensors").is_file()
    assert json.loads((run_dir / "best_model" / "metrics.json").read_text()) == out["metrics"]["best"]

    history = out["metrics"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    best = max(history, key=lambda h: h["macro_f1"])
    assert out["metrics"]["best"] == best == result.best
    assert out["config"]["train_file"] == str(train) and out["config"]["epochs"] == 3

    predictions = out["predictions"]
    prob_columns = [f"prob_{label}" for label in labels]
    assert list(predictions.columns) == ["text", "label", "predicted", "ood_score", "out_of_scope", *prob_columns]
    assert predictions["text"].tolist() == pd.read_csv(test)["text"].tolist()
    probs = predictions[prob_columns].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert (np.array(labels)[probs.argmax(axis=1)] == predictions["predicted"]).all()
    accuracy = (predictions["label"] == predictions["predicted"]).mean()
    assert out["test_metrics"]["accuracy"] == pytest.approx(accuracy)
    assert out["test_metrics"] == result.test

    events = EventAccumulator(str(tmp_path / "runs" / "run"), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/accuracy", "eval/macro_f1"} <= scalars
    assert len(events.Scalars("eval/macro_f1")) == 3
    assert any(tag.startswith("eval/examples") for tag in events.Tags()["tensors"])


def test_multilabel_nlupp(tiny_bert_dir, tmp_path):
    train, test = split_csv_script.main(
        [str(shared_file("nlupp/banking.csv")), "--label_column=labels", "--test-size=0.2", f"--output_dir={tmp_path}"]
    )
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path),
        f"--train_file={train}",
        f"--test_file={test}",
        "--label_column=labels",
    ]
    manual_classification.main(args)
    run_dir = tmp_path / "outputs" / "run"
    out = read_outputs(run_dir)

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "best_model")
    assert model.config.problem_type == "multi_label_classification" and model.config.num_labels == 48
    threshold = model.config.multilabel_threshold
    assert out["metrics"]["best"]["threshold"] == threshold == out["test_metrics"]["threshold"]
    assert {"micro_f1", "macro_f1", "accuracy", "loss"} <= set(out["test_metrics"])

    predictions = out["predictions"]
    assert len(predictions) == len(pd.read_csv(test))
    prob_columns = [c for c in predictions.columns if c.startswith("prob_")]
    assert len(prob_columns) == 48
    source = pd.read_csv(test, keep_default_na=False)["labels"]
    assert [set(c.split(";")) - {""} for c in predictions["label"]] == [set(c.split(";")) - {""} for c in source]
    for row in predictions.head(20).itertuples(index=False):
        above = {c[len("prob_") :] for c in prob_columns if getattr(row, c) >= threshold}
        assert above == set(row.predicted.split(";")) - {""}


def test_binary_imdb_loads_in_a_pipeline_with_both_labels(tiny_bert_dir, tmp_path):
    imdb = pd.read_csv(shared_file("imdb/train.csv.gz"))
    train = pd.concat([imdb[imdb.label == "negative"].head(150), imdb[imdb.label == "positive"].head(50)])
    test = pd.read_csv(shared_file("imdb/test.csv.gz")).groupby("label").head(15)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path),
        f"--train_file={tmp_path / 'train.csv'}",
        f"--test_file={tmp_path / 'test.csv'}",
        "--epochs=1",
        "--freeze_epochs=0",
        "--long_text=truncate",  # as pipeline() reads a long review: its start
    ]
    manual_classification.main(args)
    run_dir = tmp_path / "outputs" / "run"
    out = read_outputs(run_dir)
    assert {"f1", "precision", "recall", "macro_f1", "accuracy"} <= set(out["test_metrics"])

    classify = pipeline("text-classification", model=str(run_dir / "best_model"), top_k=None)
    texts = out["predictions"]["text"].head(4).tolist()
    for text, scores, row in zip(
        texts, classify(texts, truncation=True, max_length=64), out["predictions"].head(4).itertuples()
    ):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == {"negative", "positive"}
        assert by_label["positive"] == pytest.approx(row.prob_positive, abs=1e-4)


def test_bad_input_ends_with_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "nope.csv"
    result = run_python("manual_classification.py", f"--train_file={missing}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing}: file not found"
    assert not (tmp_path / "out").exists()


def test_unseen_test_label_is_refused_before_training(tiny_bert_dir, banking_slice, tmp_path):
    train, _ = banking_slice
    other = pd.read_csv(shared_file("banking77/test.csv"))
    other[other.label == "visa_or_mastercard"].head(3).to_csv(tmp_path / "bad_test.csv", index=False)
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path),
        f"--train_file={train}",
        f"--test_file={tmp_path / 'bad_test.csv'}",
    ]
    with pytest.raises(DataError, match=r"bad_test\.csv, row 1: label 'visa_or_mastercard' does not appear"):
        manual_classification.main(args)
    assert not (tmp_path / "outputs").exists()


class FailingTokenizer:
    def save_pretrained(self, directory):
        raise KeyboardInterrupt  # as if Ctrl-C arrived half-way through a save


@pytest.mark.unit
def test_interrupted_save_keeps_the_previous_best_model(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    target = tmp_path / "best_model"
    save_model_directory(model, tokenizer, target, {"metrics.json": {"epoch": 1}})
    with pytest.raises(KeyboardInterrupt):
        save_model_directory(model, FailingTokenizer(), target, {"metrics.json": {"epoch": 2}})
    assert json.loads((target / "metrics.json").read_text()) == {"epoch": 1}
    AutoModelForSequenceClassification.from_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]  # no staging left behind
