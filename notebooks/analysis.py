"""Helpers of the analysis notebooks: where runs are, what they wrote, and the tables the plots need.

The notebooks run from this folder (Jupyter's working directory is the notebook's). Paths written by
the training scripts are relative to where those ran: the repository root, as with `make train`.
Every notebook reads its inputs from the environment variables below, so that the tests can point
them at a short run; edit the first code cell of a notebook to point it elsewhere.

    NOTEBOOK_ARGS     training options that name the data (notebook 1), e.g. "--train_file my.csv"
    NOTEBOOK_OUTPUTS  the --output_dir of the runs (default: outputs/ of the repository)
    NOTEBOOK_RUNS     run names to compare (notebook 2), space-separated; default: the newest run
                      of each training script
    NOTEBOOK_RUN      the run whose quantized model notebook 3 reads; default: the newest run with
                      a best_model-int8/ directory
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import TqdmWarning

# tqdm.auto (transformers' progress bars) warns in Jupyter without ipywidgets; text bars are fine
warnings.filterwarnings("ignore", category=TqdmWarning)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository's modules: configs, data_functions, intel_compressor_test

from data_functions import LabeledData, LabelSpace, hard_label_sets
from intel_compressor_test import window_starts


def from_repo(path: str | Path) -> Path:
    """A path as the training scripts saw it: relative ones are relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def outputs_dir() -> Path:
    return from_repo(os.environ.get("NOTEBOOK_OUTPUTS", "outputs"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def finished_runs(outputs: Path) -> list[Path]:
    """Run directories with a best model and test predictions, newest first."""
    runs = [p.parent for p in outputs.glob("*/test_predictions.csv") if (p.parent / "best_model").is_dir()]
    if not runs:
        raise FileNotFoundError(
            f"{outputs}: no finished run (a run directory with best_model/ "
            "and test_predictions.csv); run `make train` first"
        )
    return sorted(runs, key=lambda p: (p / "test_predictions.csv").stat().st_mtime, reverse=True)


def trained_with(run: Path) -> str:
    """The script that trained a run (recorded in its metrics.json)."""
    return read_json(run / "metrics.json").get("trained_with", "unknown")


def runs_to_compare(outputs: Path) -> list[Path]:
    """NOTEBOOK_RUNS, or the newest run of each training script."""
    names = os.environ.get("NOTEBOOK_RUNS", "").split()
    if names:
        return [outputs / name for name in names]
    newest: dict[str, Path] = {}
    for run in finished_runs(outputs):
        newest.setdefault(trained_with(run), run)
    return list(newest.values())


def quantized_run(outputs: Path) -> Path:
    """NOTEBOOK_RUN, or the newest finished run that has been quantized."""
    if os.environ.get("NOTEBOOK_RUN"):
        return outputs / os.environ["NOTEBOOK_RUN"]
    for run in finished_runs(outputs):
        if (run / "best_model-int8" / "quantization_report.json").is_file():
            return run
    raise FileNotFoundError(f"{outputs}: no run with best_model-int8/; run `make quantize` after `make train`")


# ---------------------------------------------------------------------------------------
# Notebook 1: data
# ---------------------------------------------------------------------------------------


def label_counts(data: LabeledData, space: LabelSpace) -> pd.Series:
    """Texts per label (multi-label: a text counts once for each of its labels), in label order."""
    counts = pd.Series(0, index=space.labels, dtype=int)
    for labels in hard_label_sets(data.targets, space):
        counts[labels] += 1
    return counts


def token_lengths(tokenizer: object, texts: list[str]) -> np.ndarray:
    """Tokens per text with the special tokens and without truncation: what max_length cuts."""
    return np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])


def windows_per_text(lengths: np.ndarray, max_length: int, stride: int, special_tokens: int = 2) -> np.ndarray:
    """Model inputs per text with --long_text windows (`lengths` with the special tokens): the
    inference cost of reading every token."""
    room = max_length - special_tokens
    return np.array([len(window_starts(n - special_tokens, room, stride)) for n in lengths])


def examples_per_label(data: LabeledData, space: LabelSpace, per_label: int, seed: int) -> pd.DataFrame:
    """A few texts of each label, drawn at random (seeded); multi-label texts under their first label."""
    rows = [
        (labels[0] if labels else "(none)", text)
        for text, labels in zip(data.texts, hard_label_sets(data.targets, space), strict=True)
    ]
    shuffled = pd.DataFrame(rows, columns=["label", "text"]).sample(frac=1, random_state=seed)
    return shuffled.groupby("label").head(per_label).sort_values("label", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Notebook 2: training
# ---------------------------------------------------------------------------------------


def log_dir(run: Path) -> Path:
    config = read_json(run / "config.json")
    return from_repo(config["logging_dir"]) / config["run_name"]


def read_scalars(directory: Path) -> pd.DataFrame:
    """Every scalar of a TensorBoard log directory as (tag, step, value), read with tensorboard's own
    event reader. A resumed run appends event files; for a step logged twice the last value counts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no TensorBoard log directory")
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    rows = [(tag, e.step, e.value) for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    frame = pd.DataFrame(rows, columns=["tag", "step", "value"])
    return frame.drop_duplicates(["tag", "step"], keep="last").sort_values(["tag", "step"]).reset_index(drop=True)


def read_predictions(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "test_predictions.csv", keep_default_na=False)


def probability_columns(predictions: pd.DataFrame) -> list[str]:
    return [c for c in predictions.columns if c.startswith("prob_")]


def is_multilabel(run: Path) -> bool:
    return read_json(run / "best_model" / "config.json").get("problem_type") == "multi_label_classification"


def label_names(predictions: pd.DataFrame) -> list[str]:
    return [c.removeprefix("prob_") for c in probability_columns(predictions)]


def label_matrix(column: pd.Series, labels: list[str], delimiter: str) -> np.ndarray:
    """0/1 matrix (texts x labels) of the label(s) in each cell of `label` or `predicted`."""
    position = {label: j for j, label in enumerate(labels)}
    matrix = np.zeros((len(column), len(labels)), dtype=int)
    for i, cell in enumerate(column):
        for label in filter(None, str(cell).split(delimiter)):
            matrix[i, position[label]] = 1
    return matrix


def per_label_scores(predictions: pd.DataFrame, delimiter: str) -> pd.DataFrame:
    """Precision, recall, F1 and support of every label on the test split, worst F1 first."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = label_names(predictions)
    truth = label_matrix(predictions["label"], labels, delimiter)
    predicted = label_matrix(predictions["predicted"], labels, delimiter)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    frame = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support}, index=labels)
    return frame.sort_values(["f1", "support"], ascending=[True, False])


def confusion(predictions: pd.DataFrame) -> pd.DataFrame:
    """Single-label: counts of (true label, predicted label), every label on both axes."""
    labels = label_names(predictions)
    table = pd.crosstab(predictions["label"], predictions["predicted"])
    return table.reindex(index=labels, columns=labels, fill_value=0)


def reliability(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """The reliability diagram's points: per confidence bin (equal width, as ECE bins them), the
    mean confidence (top probability), the accuracy and the number of texts."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    bin_of = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": bin_of, "confidence": confidence, "accuracy": correct})
    return frame.groupby("bin").agg(
        confidence=("confidence", "mean"), accuracy=("accuracy", "mean"), texts=("accuracy", "size")
    )


def before_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities the model gave before its temperature was folded in: softmax(T x log p)."""
    sharpened = np.exp(temperature * np.log(np.clip(probs, 1e-12, 1)))
    return sharpened / sharpened.sum(axis=1, keepdims=True)


def worst_errors(predictions: pd.DataFrame, multilabel: bool, delimiter: str, rows: int = 10) -> pd.DataFrame:
    """The most confident wrong predictions. Single-label: wrong texts by the probability given to the
    predicted label. Multi-label: wrong (text, label) decisions by how far the probability was from
    the right side (a false positive near 1, a missed label near 0)."""
    if not multilabel:
        wrong = predictions[predictions["label"] != predictions["predicted"]]
        confidence = [wrong.at[i, f"prob_{p}"] for i, p in zip(wrong.index, wrong["predicted"], strict=True)]
        true_probability = [
            wrong.at[i, f"prob_{t}"] if f"prob_{t}" in wrong else np.nan
            for i, t in zip(wrong.index, wrong["label"], strict=True)
        ]
        table = wrong[["text", "label", "predicted"]].assign(
            confidence=confidence, probability_of_true_label=true_probability
        )
        return table.sort_values("confidence", ascending=False).head(rows).reset_index(drop=True)
    labels = label_names(predictions)
    truth = label_matrix(predictions["label"], labels, delimiter)
    wrong_rows, wrong_labels = np.nonzero(truth != label_matrix(predictions["predicted"], labels, delimiter))
    probability = predictions[probability_columns(predictions)].to_numpy()[wrong_rows, wrong_labels]
    missed = truth[wrong_rows, wrong_labels] == 1
    table = pd.DataFrame(
        {
            "text": predictions["text"].to_numpy()[wrong_rows],
            "label": np.array(labels)[wrong_labels],
            "error": np.where(missed, "missed", "false positive"),
            "probability": probability,
            "confidence": np.where(missed, 1 - probability, probability),
        }
    )
    return table.sort_values("confidence", ascending=False).head(rows).reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Notebook 3: quantization
# ---------------------------------------------------------------------------------------


def report_table(report: dict) -> pd.DataFrame:
    """torch fp32, ONNX Runtime's own fp32 and int8 (the peers) and every INC candidate side by side:
    the validation metric, agreement with fp32, latency, throughput and size. Rows in that order."""
    rows = {"torch fp32 eager": report["fp32"], **report["peers"]}
    rows.update({f"INC {report['format']} {name}": figures for name, figures in report["candidates"].items()})
    return pd.DataFrame(rows).T.rename_axis(f"kept: INC {report['format']} {report['mode']}")


def disagreements(predictions: pd.DataFrame, int8_predicted: list[str], int8_probs: np.ndarray) -> pd.DataFrame:
    """The test texts on which the int8 model predicts other label(s) than the fp32 run did
    (`predicted` and the probability columns of test_predictions.csv)."""
    fp32_probs = predictions[probability_columns(predictions)].to_numpy()
    frame = pd.DataFrame(
        {
            "text": predictions["text"],
            "label": predictions["label"],
            "fp32": predictions["predicted"],
            "int8": int8_predicted,
            "fp32_top_probability": fp32_probs.max(axis=1),
            "int8_top_probability": int8_probs.max(axis=1),
            "max_probability_difference": np.abs(fp32_probs - int8_probs).max(axis=1),
        }
    )
    return (
        frame[frame["fp32"] != frame["int8"]]
        .sort_values("max_probability_difference", ascending=False)
        .reset_index(drop=True)
    )


def teacher_and_student(run: Path) -> pd.DataFrame | None:
    """A run trained with --teacher beside its teacher's run: encoder layers, test accuracy, agreement
    with the teacher's test predictions, and the int8 figures of each quantization report (latency at
    batch 1, throughput at batch 32, size). None for a run without a teacher."""
    teacher = read_json(run / "best_model" / "training_config.json").get("teacher")
    if not teacher:
        return None
    runs = {"teacher": Path(teacher).parent, "student": run}
    teacher_predicted = read_predictions(runs["teacher"])["predicted"]
    rows = {}
    for name, directory in runs.items():
        predicted = read_predictions(directory)["predicted"]
        report = directory / "best_model-int8" / "quantization_report.json"
        int8 = read_json(report)["int8"] if report.is_file() else {}
        rows[name] = {
            "layers": read_json(directory / "best_model" / "config.json")["num_hidden_layers"],
            "test accuracy": read_json(directory / "test_metrics.json")["accuracy"],
            "agreement with teacher": float((predicted == teacher_predicted).mean())
            if len(predicted) == len(teacher_predicted)
            else np.nan,
            "int8 batch-1 p50 ms": int8.get("latency_batch1_p50_ms", np.nan),
            "int8 texts/s, batch 32": int8.get("throughput_batch32_texts_per_s", np.nan),
            "int8 MiB": int8.get("size_mb", np.nan),
        }
    return pd.DataFrame(rows).T
