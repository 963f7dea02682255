"""Both training scripts under torchrun: 2 processes on CPU (gloo), OMP_NUM_THREADS=1, on a small
real BANKING77 slice with an odd number of test rows. Outputs are written once, every test row is
predicted once, every process ends with the same weights, 2 processes of batch 4 take the same
optimizer steps as 1 process of batch 8 on the same rows, and a run cannot be resumed by another
number of processes. A 2-process run interrupted after its first epoch leaves a loadable best
model and, resumed, continues exactly as the straight run (slow)."""

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import manual_classification
from intel_compressor_test import run_cli
from tests.helpers import LOSS_TOLERANCE, REPO, banking77_slice, step_losses, tiny_run_args
from utility_functions import TrainBatchSampler, read_training_state


def torchrun(script: str, args: list[str], digest_prefix, **env: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "tests" / "torchrun_worker.py"), script, str(digest_prefix), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def odd_slice(tmp_path_factory):
    """205 training rows of 5 intents (185 after the validation split: 24 batches of 8, 12 a
    process) and 15 test rows, which do not divide by 2."""
    return banking77_slice(tmp_path_factory.mktemp("odd"), classes=5, train_per_class=41, test_per_class=3)


@pytest.mark.parametrize("script", ["manual", "trainer", "manual, distilled"])
def test_two_processes_write_once_predict_every_row_once_and_agree_on_weights(
    script, tiny_bert_dir, odd_slice, tmp_path, request
):
    train, test = odd_slice
    distilled = script.endswith("distilled")  # a 1-layer student of the tiny teacher, logits and hidden states
    script = script.split(",")[0]
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path, script),
        f"--train_file={train}",
        f"--test_file={test}",
        "--num_threads=1",
    ]
    if distilled:
        teacher = request.getfixturevalue("banking_runs")["best"]
        args += [f"--teacher={teacher}", "--student_layers=1", "--distill_hidden_weight=0.5"]
    result = torchrun(script, args, tmp_path / "digest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 16 (8 per process x 2 processes x 1 accumulation)" in result.stdout
    assert result.stdout.count("test: loss") == 1  # one process reports
    run_dir = tmp_path / "outputs" / script
    predictions, expected = pd.read_csv(run_dir / "test_predictions.csv"), pd.read_csv(test)
    assert len(expected) == 15 and predictions["text"].tolist() == expected["text"].tolist()
    assert json.loads((run_dir / "metrics.json").read_text())["trained_with"] == f"{script}_classification.py"
    assert len(list((tmp_path / "runs" / script).glob("events.out.tfevents.*"))) == 1
    digests = {json.loads((tmp_path / f"digest.rank{rank}.json").read_text())["digest"] for rank in (0, 1)}
    assert len(digests) == 1  # the same weights on both processes
    if script == "manual":
        steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
        assert steps == [12, 24]  # 24 batches an epoch shared by 2 processes: 12 optimizer steps


@pytest.fixture
def tiny_bert_without_dropout(tiny_bert_dir, tmp_path):
    directory = tmp_path / "tiny-bert-no-dropout"
    shutil.copytree(tiny_bert_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# The two runs add the same numbers in another order (two half-batch gradients averaged by gloo
# against one full-batch gradient): float32 rounding, nothing more, after 5 Adam steps at lr 1e-2
# (measured: at most 3e-7 on any weight). Left out: attention key biases, whose gradient is zero
# in exact arithmetic (softmax ignores a shift shared by every key), so Adam, which divides by the
# gradient's own size, turns rounding noise of 1e-9 into steps of 1e-5 in both runs alike.
EQUIVALENCE_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def test_two_processes_of_batch_4_step_like_one_process_of_batch_8_on_the_same_rows(
    tiny_bert_without_dropout, tmp_path, monkeypatch
):
    # 160 training rows, a validation file: every batch full (40 of 4, 20 of 8), so the mean loss of
    # two 4-row halves is the mean loss of their 8 rows
    train, test = banking77_slice(tmp_path, classes=5, train_per_class=32, test_per_class=3)
    data = [
        f"--train_file={train}",
        f"--validation_file={test}",
        f"--test_file={test}",
        "--epochs=1",
        "--num_threads=1",
    ]
    steps = ["--logging_steps=1", "--eval_steps=5", "--save_total_limit=10"]
    two = [*tiny_run_args(tiny_bert_without_dropout, tmp_path, "two"), *data, *steps, "--batch_size=4"]
    result = torchrun("manual", two, tmp_path / "two", RECORD_BATCHES="1")
    assert result.returncode == 0, result.stderr[-3000:]
    halves = [json.loads((tmp_path / f"two.rank{rank}.batches.json").read_text()) for rank in (0, 1)]
    joined = [first + second for first, second in zip(*halves, strict=True)]
    assert len(joined) == 20 and all(len(batch) == 8 for batch in joined)
    monkeypatch.setattr(TrainBatchSampler, "__iter__", lambda sampler: iter(joined))  # the same rows, one process
    monkeypatch.setattr(TrainBatchSampler, "__len__", lambda sampler: len(joined))
    manual_classification.main(
        [*tiny_run_args(tiny_bert_without_dropout, tmp_path, "one"), *data, *steps, "--batch_size=8"]
    )

    first_steps = range(1, 6)
    two_losses, one_losses = step_losses(tmp_path / "runs" / "two"), step_losses(tmp_path / "runs" / "one")
    torch.testing.assert_close(
        [two_losses[s] for s in first_steps], [one_losses[s] for s in first_steps], **EQUIVALENCE_TOLERANCE
    )
    after_two, after_one = (
        read_training_state(tmp_path / "outputs" / name / "checkpoints" / "checkpoint-5")["model"]
        for name in ("two", "one")
    )
    assert after_two.keys() == after_one.keys()
    for name in [name for name in after_two if not name.endswith("key.bias")]:
        torch.testing.assert_close(after_two[name], after_one[name], **EQUIVALENCE_TOLERANCE, msg=name)


def test_resuming_with_another_number_of_processes_is_refused(tiny_bert_dir, odd_slice, tmp_path, capsys, monkeypatch):
    train, test = odd_slice
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path, "two"),
        f"--train_file={train}",
        f"--test_file={test}",
        "--epochs=1",
    ]
    assert torchrun("manual", args, tmp_path / "digest").returncode == 0
    monkeypatch.setattr(sys, "argv", ["manual_classification.py", *args, "--resume"])
    assert run_cli(manual_classification.main) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --resume ") and "saved by 2 process(es), resumed by 1" in error


@pytest.mark.slow
def test_a_two_process_run_interrupted_and_resumed_continues_exactly(tiny_bert_dir, odd_slice, tmp_path):
    train, test = odd_slice
    data = [f"--train_file={train}", f"--test_file={test}", "--logging_steps=1", "--save_total_limit=3"]
    straight = torchrun("manual", [*tiny_run_args(tiny_bert_dir, tmp_path, "straight"), *data], tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped_args = [*tiny_run_args(tiny_bert_dir, tmp_path, "stopped"), *data]
    stopped = torchrun("manual", stopped_args, tmp_path / "stopped", INTERRUPT_AFTER_STEP="12")
    assert stopped.returncode != 0 and "interrupted; best model in" in stopped.stderr  # torchrun ended both processes
    best = tmp_path / "outputs" / "stopped" / "best_model"
    assert AutoModelForSequenceClassification.from_pretrained(best).config.num_labels == 5  # loadable
    resumed = torchrun("manual", [*stopped_args, "--resume"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = {s: v for s, v in step_losses(tmp_path / "runs" / "straight").items() if s > 12}
    got = {s: v for s, v in step_losses(tmp_path / "runs" / "stopped").items() if s > 12}
    assert sorted(expected) == list(range(13, 25)) and sorted(got) == sorted(expected)
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=LOSS_TOLERANCE), step
    straight_digest, resumed_digest = (
        json.loads((tmp_path / f"{name}.rank0.json").read_text()) for name in ("straight", "resumed")
    )
    assert resumed_digest == straight_digest  # the same final weights
