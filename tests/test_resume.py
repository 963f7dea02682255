"""Resume, checked like torchtune's recipe tests: train 2 epochs straight; separately train 1
epoch, stop, resume for the second; the second epoch's per-step losses and the final metrics
match. The resumed run logs to its own TensorBoard directory, so a resume that silently started
from scratch (logging steps 1, 2, ... with the same seeded losses) fails. And Ctrl-C in the middle
of an epoch leaves a loadable best model and a resumable state."""

import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
from transformers import AutoModelForSequenceClassification, TrainerCallback

import manual_classification
import trainer_classification
from tests.helpers import LOSS_TOLERANCE, REPO, banking77_slice, interrupt_after_checkpoint, step_losses, tiny_run_args
from utility_functions import RunResult


def resume_args(slice_files) -> list[str]:
    train, test = slice_files
    return [f"--train_file={train}", f"--test_file={test}", "--epochs=2", "--logging_steps=1", "--save_total_limit=3"]


def resume_stopped_run(tmp_path) -> list[str]:
    """Command line that resumes the run named 'stopped' from its newest checkpoint, logging to
    runs-resumed/ (the interrupted run logged to runs/)."""
    return [
        f"--output_dir={tmp_path / 'outputs'}",
        f"--logging_dir={tmp_path / 'runs-resumed'}",
        "--run_name=stopped",
        "--resume",
    ]


def assert_resumed_like_straight(tmp_path, stop: int, straight: RunResult, resumed: RunResult) -> None:
    """The resumed run logged every step after `stop` and nothing before it, with the straight run's
    losses; the best entry and the test metrics match too."""
    expected = {s: v for s, v in step_losses(tmp_path / "runs" / "straight").items() if s > stop}
    got = step_losses(tmp_path / "runs-resumed" / "stopped")
    assert expected and min(got) == stop + 1 and sorted(got) == sorted(expected)
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=LOSS_TOLERANCE), step
    assert resumed.best == pytest.approx(straight.best, abs=LOSS_TOLERANCE)
    assert resumed.test == pytest.approx(straight.test, abs=LOSS_TOLERANCE)


def first_epoch_end(result: RunResult) -> int:
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    return max(h["step"] for h in history if h["epoch"] == 1)


def check_manual_resume(tiny_bert_dir, tmp_path, monkeypatch, common: list[str], stop_step) -> None:
    """Straight run, then the same run stopped after checkpoint `stop_step(straight_result)` and
    resumed: per-step losses after the stop and the final metrics must match."""
    straight = manual_classification.main([*tiny_run_args(tiny_bert_dir, tmp_path, "straight"), *common])
    stop = stop_step(straight)
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, stop)
        with pytest.raises(KeyboardInterrupt):
            manual_classification.main([*tiny_run_args(tiny_bert_dir, tmp_path, "stopped"), *common])
    assert not (tmp_path / "outputs" / "stopped" / "test_metrics.json").exists()
    resumed = manual_classification.main(resume_stopped_run(tmp_path))
    assert_resumed_like_straight(tmp_path, stop, straight, resumed)
    history = json.loads((tmp_path / "outputs" / "stopped" / "metrics.json").read_text())["history"]
    straight_history = json.loads((straight.run_dir / "metrics.json").read_text())["history"]
    assert len(history) == len(straight_history)
    for entry, expected_entry in zip(history, straight_history, strict=True):
        assert entry == pytest.approx(expected_entry, abs=LOSS_TOLERANCE)


def test_manual_loop_resumes_exactly_after_an_epoch(tiny_bert_dir, banking_slice, tmp_path, monkeypatch):
    common = resume_args(banking_slice)

    def end_of_first_epoch(straight):
        steps = sorted(int(p.name.split("-")[1]) for p in (straight.run_dir / "checkpoints").iterdir())
        assert len(steps) == 2 and steps[0] == first_epoch_end(straight)  # one per epoch
        return steps[0]

    check_manual_resume(tiny_bert_dir, tmp_path, monkeypatch, common, end_of_first_epoch)


def test_manual_loop_resumes_exactly_from_a_mid_epoch_checkpoint(tiny_bert_dir, banking_slice, tmp_path, monkeypatch):
    train, test = banking_slice
    common = [
        f"--train_file={train}",
        f"--test_file={test}",
        "--epochs=2",
        "--logging_steps=1",
        "--eval_steps=7",
        "--save_total_limit=20",
        "--gradient_accumulation_steps=2",
    ]

    def inside_second_epoch(straight):
        history = json.loads((straight.run_dir / "metrics.json").read_text())["history"]
        epoch_one_end = first_epoch_end(straight)
        stop = next(h["step"] for h in history if h["epoch"] == 2)  # first mid-epoch evaluation of epoch 2
        assert epoch_one_end < stop < history[-1]["step"] and stop % 7 == 0
        return stop

    check_manual_resume(tiny_bert_dir, tmp_path, monkeypatch, common, inside_second_epoch)


class StopAfterFirstEpoch(TrainerCallback):
    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_trainer_resumes_exactly(tiny_bert_dir, banking_slice, tmp_path):
    common = resume_args(banking_slice)
    straight = trainer_classification.main([*tiny_run_args(tiny_bert_dir, tmp_path, "straight"), *common])
    trainer_classification.main(
        [*tiny_run_args(tiny_bert_dir, tmp_path, "stopped"), *common], callbacks=[StopAfterFirstEpoch()]
    )
    resumed = trainer_classification.main(resume_stopped_run(tmp_path))
    assert_resumed_like_straight(tmp_path, first_epoch_end(straight), straight, resumed)


def test_ctrl_c_in_second_epoch_leaves_best_model_and_resumable_state(tiny_bert_dir, tmp_path):
    train, test = banking77_slice(tmp_path, classes=20, train_per_class=100, test_per_class=5)
    args = [
        *tiny_run_args(tiny_bert_dir, tmp_path, "interrupted"),
        f"--train_file={train}",
        f"--test_file={test}",
        "--epochs=3",
    ]
    process = subprocess.Popen(
        [sys.executable, "-u", "manual_classification.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("epoch 2:"):  # the second epoch has begun
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted; best model in" in stderr and "--resume" in stderr

    run_dir = tmp_path / "outputs" / "interrupted"
    AutoModelForSequenceClassification.from_pretrained(run_dir / "best_model")  # loadable
    first_epoch = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert first_epoch["epoch"] == 1
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"checkpoint-{first_epoch['step']}"]
    assert not (run_dir / "test_metrics.json").exists()

    resumed = manual_classification.main(
        [
            f"--output_dir={tmp_path / 'outputs'}",
            f"--logging_dir={tmp_path / 'runs'}",
            "--run_name=interrupted",
            "--resume",
        ]
    )
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    predictions = pd.read_csv(run_dir / "test_predictions.csv")
    assert resumed.test["accuracy"] == pytest.approx((predictions["label"] == predictions["predicted"]).mean())
    assert resumed.best == max(history, key=lambda h: h["macro_f1"])  # picked over all 3 epochs
