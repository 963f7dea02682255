"""Helpers shared by the tests (fixtures live in conftest.py): where the repository and the real
data are, slices of real data, the options of a fast tiny-model run, a script run as a user runs it,
TensorBoard losses, and an interruption of the manual loop as Ctrl-C would cause it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import manual_classification

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FAST_TIMING = ["--num_threads=2", "--timing_texts=64", "--latency_texts=10"]  # intel_compressor.py: short speed checks


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.fail(f"real test data missing: {path} (the repository expects ../shared/data beside it)")
    return path


def banking77_slice(directory: Path, classes: int, train_per_class: int, test_per_class: int) -> tuple[Path, Path]:
    """train.csv and test.csv from the real BANKING77 splits, restricted to the first `classes` labels."""
    train = pd.read_csv(shared_file("banking77/train.csv"))
    test = pd.read_csv(shared_file("banking77/test.csv"))
    kept = sorted(train["label"].unique())[:classes]
    train = train[train["label"].isin(kept)].groupby("label").head(train_per_class)
    test = test[test["label"].isin(kept)].groupby("label").head(test_per_class)
    paths = directory / "train.csv", directory / "test.csv"
    train.to_csv(paths[0], index=False)
    test.to_csv(paths[1], index=False)
    return paths


def banking77_unlabelled(path: Path, classes: int, skip_per_class: int, per_class: int) -> Path:
    """A one-column (text) table of BANKING77 training texts of the first `classes` labels that
    banking77_slice's first `skip_per_class` texts of each label leave out: texts no run has seen."""
    train = pd.read_csv(shared_file("banking77/train.csv"))
    kept = sorted(train["label"].unique())[:classes]
    rows = train[train["label"].isin(kept)].groupby("label").nth(range(skip_per_class, skip_per_class + per_class))
    rows[["text"]].to_csv(path, index=False)
    return path


def tiny_run_args(model_dir: Path, tmp_path: Path, run_name: str = "run") -> list[str]:
    """Command-line options for a fast run of the tiny model that writes only under tmp_path."""
    return [
        f"--model_name_or_path={model_dir}",
        f"--output_dir={tmp_path / 'outputs'}",
        f"--logging_dir={tmp_path / 'runs'}",
        f"--run_name={run_name}",
        "--validation_file=",
        "--epochs=2",
        "--min_steps=0",  # exactly --epochs: the tests' slices are small enough to get more
        "--head_init=random",  # a random tiny BERT's features give a probe nothing; test_small_data checks it on MiniLM
        "--batch_size=8",
        "--learning_rate=1e-2",  # a tiny random model needs a large step to learn in a few dozen
        "--max_length=64",
        "--freeze_layers=1",
        "--freeze_epochs=1",
        "--num_threads=2",
    ]


# On CPU the resumed run repeats the same float operations in the same order: losses agree
# to the last bit in practice; the tolerance only absorbs summation-order noise.
LOSS_TOLERANCE = 1e-6


def run_python(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process in the repository, as a user runs a script (or `-c` code),
    with stdout and stderr captured as text."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=check, timeout=600)


def step_losses(log_dir) -> dict[int, float]:
    events = EventAccumulator(str(log_dir)).Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def interrupt_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the manual loop stop as Ctrl-C would, right after it has written checkpoint `step`."""
    real_save = manual_classification.save_training_state

    def save_then_interrupt(run, progress, *parts):
        path = real_save(run, progress, *parts)
        if path is not None and progress["step"] == step:  # under torchrun: the process that wrote it
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(manual_classification, "save_training_state", save_then_interrupt)


def answered_probabilities(predictions: list[dict], labels: list[str]) -> list[list[float]]:
    """serve.py's /predict answers asked with top_k = every label: each text's probabilities in label order."""
    return [
        [{item["label"]: item["probability"] for item in p["top_k"]}[label] for label in labels] for p in predictions
    ]
