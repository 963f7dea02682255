"""The mechanisms that make small data work: mean pooling, the probe-fitted head, the step budget
and early stopping."""

import dataclasses
import json

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForSequenceClassification, BertConfig, pipeline

import manual_classification
import trainer_classification
from configs import Config, parse_config
from modeling_mean_pooling import MeanPoolingBertForSequenceClassification
from tests.conftest import tiny_run_args
from utility_functions import (
    DataError,
    build_loss,
    build_model,
    classifier_features,
    planned_epochs,
    predict_logits,
    prepare_run,
    resolve_pooling,
    stopped_early,
)


def test_mean_pooling_ignores_padding_and_matches_a_hand_computation():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = MeanPoolingBertForSequenceClassification(config).eval()
    texts = [torch.tensor([101, 7, 8, 9, 10, 102]), torch.tensor([101, 42, 102])]
    input_ids = torch.zeros(2, 6, dtype=torch.long)
    attention_mask = torch.zeros(2, 6, dtype=torch.long)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    with torch.no_grad():
        batch_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for row, ids in enumerate(texts):
            states = model.bert(input_ids=ids[None]).last_hidden_state[0]  # alone: no padding at all
            by_hand = model.classifier(states.sum(dim=0) / len(ids))
            torch.testing.assert_close(batch_logits[row], by_hand, rtol=1e-5, atol=1e-5)
    assert model.bert.pooler is None


def test_pooling_follows_the_checkpoint(minilm_path, tiny_bert_dir, tmp_path):
    assert resolve_pooling(minilm_path, "auto") == "mean"  # sentence-transformers, 1_Pooling says mean
    assert resolve_pooling(str(tiny_bert_dir), "auto") == "cls"
    assert resolve_pooling(minilm_path, "cls") == "cls"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    with pytest.raises(DataError, match="--pooling mean supports BERT-family"):
        resolve_pooling(str(tmp_path), "mean")


def test_step_budget_raises_epochs_on_small_data():
    config = dataclasses.replace(Config(), batch_size=32, epochs=5, min_steps=600)
    assert planned_epochs(config, 900) == 21  # 29 steps an epoch
    assert planned_epochs(config, 9016) == 5  # 282 steps an epoch: 1,410 already
    assert planned_epochs(dataclasses.replace(config, min_steps=0), 900) == 5
    assert planned_epochs(dataclasses.replace(config, gradient_accumulation_steps=2), 900) == 40  # 15 steps an epoch


def test_stopped_early_counts_validations_after_the_best():
    history = [{"step": 10, "macro_f1": 0.5}, {"step": 20, "macro_f1": 0.7}, {"step": 30, "macro_f1": 0.6}]
    best = history[1]
    assert not stopped_early(history, best, patience=2)
    assert stopped_early([*history, {"step": 40, "macro_f1": 0.7}], best, patience=2)  # a tie is no improvement
    assert not stopped_early([*history, {"step": 40, "macro_f1": 0.7}], best, patience=0)


@pytest.mark.parametrize("script", [manual_classification, trainer_classification])
def test_early_stopping_and_step_budget_in_both_scripts(script, tiny_bert_dir, banking_slice, tmp_path):
    train, test = banking_slice  # 200 rows: 25 batches of 8
    args = [*tiny_run_args(tiny_bert_dir, tmp_path), f"--train_file={train}", f"--test_file={test}",
            "--min_steps=250", "--epochs=1", "--early_stopping_patience=2"]
    result = script.main(args)
    config = json.loads((result["run_dir"] / "config.json").read_text())
    assert config["epochs"] == 11  # ceil(250 / 23): 180 training rows are 23 batches of 8
    history = json.loads((result["run_dir"] / "metrics.json").read_text())["history"]
    scores = [entry["macro_f1"] for entry in history]
    first_best = [i for i, score in enumerate(scores) if score > max(scores[:i], default=-1)]
    stop = next(i for i in range(len(scores)) if i - max(b for b in first_best if b <= i) == 2)
    assert len(history) == stop + 1 < 11, scores  # ends at the second validation without improvement
    assert result["best"]["step"] == history[first_best[-1]]["step"]


def test_probe_head_predicts_like_a_logistic_regression_before_training(minilm_path, banking_slice, tmp_path):
    train, _ = banking_slice
    args = [f"--model_name_or_path={minilm_path}", f"--train_file={train}", "--validation_file=", "--test_file=",
            f"--output_dir={tmp_path}", "--num_threads=2"]
    run = prepare_run(parse_config(args))
    assert run.config.pooling == "mean"
    model = build_model(run, build_loss(run.space, run.train_data.targets, run.config))
    features = classifier_features(model, run.train_set, run.collator, 32, run.device)
    logits = predict_logits(model, run.train_set, run.collator, 32, run.device)
    head = model.classifier
    torch.testing.assert_close(logits, features @ head.weight.T + head.bias, rtol=1e-4, atol=1e-4)

    baseline = LogisticRegression(C=run.config.probe_c, max_iter=5000).fit(features.numpy(), run.train_data.targets)
    ours = (features @ head.weight.T + head.bias).argmax(dim=1).numpy()
    assert (ours == baseline.predict(features.numpy())).mean() >= 0.99


def test_mean_pooling_model_loads_with_plain_transformers(minilm_path, banking_slice, tmp_path):
    train, test = banking_slice
    args = [f"--model_name_or_path={minilm_path}", f"--train_file={train}", f"--test_file={test}", "--validation_file=",
            "--epochs=1", "--min_steps=0", "--reduce_ratio=0.3", f"--output_dir={tmp_path / 'outputs'}",
            f"--logging_dir={tmp_path / 'runs'}", "--run_name=mean", "--num_threads=2"]
    result = manual_classification.main(args)
    best = result["run_dir"] / "best_model"
    assert (best / "modeling_mean_pooling.py").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(best, trust_remote_code=True)
    assert type(model).__name__ == "MeanPoolingBertForSequenceClassification"
    classify = pipeline("text-classification", model=str(best), trust_remote_code=True)
    assert classify("I lost my card")[0]["label"] in model.config.label2id
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(best)  # never silently a [CLS] classifier
