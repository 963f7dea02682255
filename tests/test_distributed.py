"""Both training scripts under torchrun: 2 processes on CPU (gloo), OMP_NUM_THREADS=1, on a small
real BANKING77 slice with an odd number of test rows. Outputs are written once, every test row is
predicted once, every process ends with the same weights, and a run cannot be resumed by another
number of processes. A 2-process run interrupted after its first epoch leaves a loadable best
model and, resumed, continues exactly as the straight run (slow)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from transformers import AutoModelForSequenceClassification

import manual_classification
from tests.conftest import REPO, banking77_slice, tiny_run_args
from tests.test_resume import LOSS_TOLERANCE, step_losses
from utility_functions import run_cli


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


@pytest.mark.parametrize("script", ["manual", "trainer"])
def test_two_processes_write_once_predict_every_row_once_and_agree_on_weights(script, tiny_bert_dir, odd_slice, tmp_path):
    train, test = odd_slice
    args = [*tiny_run_args(tiny_bert_dir, tmp_path, script), f"--train_file={train}", f"--test_file={test}", "--num_threads=1"]
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


def test_resuming_with_another_number_of_processes_is_refused(tiny_bert_dir, odd_slice, tmp_path, capsys, monkeypatch):
    train, test = odd_slice
    args = [*tiny_run_args(tiny_bert_dir, tmp_path, "two"), f"--train_file={train}", f"--test_file={test}", "--epochs=1"]
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
    straight_digest, resumed_digest = (json.loads((tmp_path / f"{name}.rank0.json").read_text()) for name in ("straight", "resumed"))
    assert resumed_digest == straight_digest  # the same final weights
