"""Edge inference: run a quantized (or fp32) classifier on a CPU.

    python intel_compressor_test.py --model outputs/<run>/best_model-int8 "my card has not arrived" "top up failed"
    python intel_compressor_test.py --model outputs/<run>/best_model-int8 --input new.csv --output preds.csv

An int8 directory written by intel_compressor.py holds the model (model.onnx, int8, run by ONNX
Runtime on any CPU it supports), tokenizer.json and edge_config.json (labels, task, threshold,
max_length, and how texts longer than max_length are read: truncated, head and tail, or
overlapping windows whose logits are combined into one row per text). It needs onnxruntime,
tokenizers and numpy (requirements-edge.txt): no torch, no transformers, nothing compiled. A
best-model directory from a training script (fp32, Hugging Face format) is accepted too, so the
two can be compared; that path imports torch and transformers.

Texts are batched by length (little padding). A CSV is streamed in chunks of --chunk_rows rows,
so memory stays flat however large the file is; the output is written to a temporary file and
renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

EDGE_CONFIG = "edge_config.json"
LONG_TEXT_MODES = ("truncate", "head_tail", "windows")
WINDOW_AGGREGATIONS = ("mean", "max")
MODEL_FILE = "model.onnx"
ONNX_INPUTS = ("input_ids", "attention_mask")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the docstring's layout kept, every option's default shown."""


class DataError(ValueError):
    """Bad input to any script of this project (defined here, in the one module that must run
    without the others, and imported by them): the message is one line that names the option,
    file, row or column."""


def run_cli(main: Callable[[list[str] | None], object]) -> int:
    """Run a script's main the way every script of this project ends: bad input (DataError, a
    missing file) prints one `error:` line and exits with 2, Ctrl-C exits with 130, neither with
    a traceback; argparse's own usage errors exit with 2 too."""
    try:
        main(None)
    except (DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------------------
# Texts longer than max_length (shared with the training scripts, which import these)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongText:
    """How a text becomes model inputs of at most `max_length` tokens (special tokens included).
    truncate: its first tokens. head_tail: its first `head_share` and its last tokens (Sun et al.
    2019). windows: overlapping windows, one every `stride` tokens, the last one ending with the
    text, so every token is read; the logits of a text's windows are combined by `aggregation`."""

    mode: str = "truncate"
    max_length: int = 128
    stride: int = 64
    head_share: float = 0.25
    aggregation: str = "mean"

    def pieces(self, body: list[int], room: int) -> list[list[int]]:
        """`body` (token ids without special tokens) cut to fit `room` tokens: one piece, or
        the windows."""
        if len(body) <= room or self.mode == "truncate":
            return [body[:room]]
        if self.mode == "head_tail":
            head = round(room * self.head_share)
            return [body[:head] + body[len(body) - (room - head) :]]
        return [body[start : start + room] for start in window_starts(len(body), room, self.stride)]


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of `size` tokens over `length` tokens: every `stride` tokens, and a last
    one that ends with the text (so no token is left out)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


def model_inputs(
    bodies: list[list[int]], long_text: LongText, prefix: list[int], suffix: list[int]
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids the model reads, with the special tokens around each piece, and for each of them
    the index of the text it comes from."""
    room = long_text.max_length - len(prefix) - len(suffix)
    rows, owners = [], []
    for text, body in enumerate(bodies):
        for piece in long_text.pieces(body, room):
            rows.append([*prefix, *piece, *suffix])
            owners.append(text)
    return rows, np.asarray(owners, dtype=np.int64)


def aggregate_windows(logits: np.ndarray, owners: np.ndarray, texts: int, how: str) -> np.ndarray:
    """One row of logits per text from the rows of its windows (`owners`: the text of each row, in
    text order, every text at least once): their mean, or their maximum (for multi-label, a label
    found in any window counts)."""
    if len(owners) == texts:  # one row per text: nothing to combine
        return logits
    out = np.full((texts, logits.shape[1]), -np.inf if how == "max" else 0.0, dtype=logits.dtype)
    if how == "max":
        np.maximum.at(out, owners, logits)
        return out
    np.add.at(out, owners, logits)
    return out / np.bincount(owners, minlength=texts)[:, None]


def ood_scores(logits: np.ndarray, multilabel: bool, temperature: float = 1.0) -> np.ndarray:
    """How unusual each text is for the model (higher: more unusual), from the logits it serves.
    Single-label: the energy -logsumexp(z) of the logits before temperature scaling, z =
    temperature x served logits (Liu et al. 2020). Multi-label: minus the JointEnergy, the sum over
    labels of log(1 + e^z) (Wang et al. 2021)."""
    if multilabel:
        return -np.logaddexp(0.0, logits).sum(axis=1)
    z = temperature * logits
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] / [SEP], <s> / </s>)."""
    ids = tokenizer.encode("").ids
    return ids[:1], ids[1:]


@dataclass
class EdgeClassifier:
    """A tokenizer, a forward function (token ids, attention mask) -> logits, and the label map."""

    labels: list[str]
    multilabel: bool
    threshold: float
    long_text: LongText
    pad_token_id: int
    tokenizer: Tokenizer
    forward: Callable[[np.ndarray, np.ndarray], np.ndarray]
    kind: str  # "int8" or "fp32"
    temperature: float = 1.0  # folded into the served logits already; the energy score undoes it
    ood_threshold: float = float("inf")  # ood_score above it: out of scope (chosen on validation)

    @property
    def max_length(self) -> int:
        return self.long_text.max_length

    def inputs(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Model inputs for `texts` and the text each comes from (see LongText)."""
        bodies = [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return model_inputs(bodies, self.long_text, *special_tokens(self.tokenizer))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.inputs(texts)[0]

    def input_logits(self, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Logits of every model input (window) of `texts`, and the text each belongs to; batches
        hold inputs of similar length."""
        ids, owners = self.inputs(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        logits = np.empty((len(ids), len(self.labels)), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits[rows] = self.forward(*pad([ids[i] for i in rows], self.pad_token_id))
        return logits, owners

    def text_logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """One row of logits per text, in input order (a text's windows combined)."""
        logits, owners = self.input_logits(texts, batch_size)
        return aggregate_windows(logits, owners, len(texts), self.long_text.aggregation)

    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """One row of label probabilities per text, in input order."""
        return self.to_probabilities(self.text_logits(texts, batch_size))

    def predictions(self, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Label probabilities and the out-of-scope score of every text."""
        logits = self.text_logits(texts, batch_size)
        return self.to_probabilities(logits), ood_scores(logits, self.multilabel, self.temperature)

    def to_probabilities(self, logits: np.ndarray) -> np.ndarray:
        return (sigmoid(logits) if self.multilabel else softmax(logits)).astype(np.float32)

    def predicted_labels(self, probs: np.ndarray) -> list[list[str]]:
        return predicted_label_sets(probs, self.labels, self.multilabel, self.threshold)


def classifier_settings(classifier: EdgeClassifier) -> dict:
    """What an edge_config.json records of a classifier (and serve.py's /info shows)."""
    return {
        "labels": classifier.labels,
        "task": "multilabel" if classifier.multilabel else "single_label",
        "threshold": classifier.threshold,
        "max_length": classifier.max_length,
        **long_text_settings(classifier.long_text),
        "calibration_temperature": classifier.temperature,
        "ood_threshold": classifier.ood_threshold if np.isfinite(classifier.ood_threshold) else None,
        "pad_token_id": classifier.pad_token_id,
    }


def predicted_label_sets(probs: np.ndarray, labels: list[str], multilabel: bool, threshold: float) -> list[list[str]]:
    """The predicted label(s) of each row: multi-label, every label at or above the tuned threshold;
    otherwise the most probable label."""
    if multilabel:
        return [[labels[j] for j in np.flatnonzero(row >= threshold)] for row in probs]
    return [[labels[int(i)]] for i in probs.argmax(axis=1)]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * logits))  # the same function, without overflow for large |logits|


def pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


# ---------------------------------------------------------------------------------------
# The ONNX model, on ONNX Runtime
# ---------------------------------------------------------------------------------------


def onnx_forward(path: Path, threads: int = 0, spin: bool = True) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The forward function of an EdgeClassifier for an ONNX model with inputs (input_ids,
    attention_mask) and logits as its first output. threads 0: ONNX Runtime's default. spin False:
    its threads sleep as soon as a run ends instead of spinning for the next (ONNX Runtime's default,
    fastest for back-to-back runs), leaving the cores to other work of the process (a server's)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
        NoSuchFile,
    )

    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: not a loadable ONNX model ({reason})") from None
    inputs = sorted(i.name for i in session.get_inputs())
    if inputs != sorted(ONNX_INPUTS):
        raise DataError(
            f"{path}: not a model from intel_compressor.py (inputs "
            f"{', '.join(inputs)}; expected {', '.join(ONNX_INPUTS)})"
        )

    def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return forward


# ---------------------------------------------------------------------------------------
# The CPU, as every benchmark reports it
# ---------------------------------------------------------------------------------------

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "neon", "asimd")


def cpu_info() -> tuple[str, int, set[str]]:
    """(model name, CPU count, flags) from /proc/cpuinfo (Linux; elsewhere the platform's name only)."""
    model, flags, cpus = platform.processor() or platform.machine(), set(), 0
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        elif key in ("model name", "Model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.split())
    return model, cpus, flags


def cpu_description() -> str:
    """'AMD EPYC 9R14, 2 CPUs; vector extensions: avx2 avx512f avx512_vnni': printed beside every
    speed figure, since speed and even int8 accuracy depend on it."""
    model, cpus, flags = cpu_info()
    vectors = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + ", ".join(VECTOR_FLAGS)
    return f"{model}, {cpus} CPUs; vector extensions: {vectors}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read ({type(error).__name__})") from None


def tokenizer_from_directory(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{directory}: no tokenizer.json (a fast tokenizer is needed at the edge)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # padding happens per batch, to the longest text in it
    tokenizer.no_truncation()  # LongText cuts the tokens to max_length
    return tokenizer


def long_text_settings(long_text: LongText) -> dict:
    """What edge_config.json records of a LongText (the training config's names)."""
    return {
        "long_text": long_text.mode,
        "window_stride": long_text.stride,
        "head_share": long_text.head_share,
        "window_aggregation": long_text.aggregation,
    }


def long_text_from(settings: dict, max_length: int) -> LongText:
    """The LongText of a training config (training_config.json) or an edge_config.json; files
    written before long texts were handled truncate."""
    return LongText(
        mode=settings.get("long_text", "truncate"),
        max_length=max_length,
        stride=int(settings.get("window_stride") or max_length // 2),
        head_share=float(settings.get("head_share", 0.25)),
        aggregation=settings.get("window_aggregation", "mean"),
    )


def load_int8(directory: Path, threads: int, spin: bool = True) -> EdgeClassifier:
    config = read_json(directory / EDGE_CONFIG)
    if config.get("format") != "onnx":
        raise DataError(
            f"{directory / EDGE_CONFIG}: format {config.get('format')!r} is not served (only onnx); "
            "re-run intel_compressor.py on its best_model"
        )
    if not (directory / MODEL_FILE).is_file():
        raise DataError(f"{directory}: no {MODEL_FILE}")
    return EdgeClassifier(
        labels=config["labels"],
        multilabel=config["task"] == "multilabel",
        threshold=config["threshold"],
        long_text=long_text_from(config, config["max_length"]),
        pad_token_id=config["pad_token_id"],
        tokenizer=tokenizer_from_directory(directory),
        forward=onnx_forward(directory / MODEL_FILE, threads, spin),
        kind="int8",
        **out_of_scope_settings(config),
    )


def out_of_scope_settings(config: dict) -> dict:
    """Temperature and out-of-scope threshold from a model's config.json or an edge_config.json
    (models trained before calibration existed: no temperature, nothing out of scope)."""
    threshold = config.get("ood_threshold")
    temperature = float(config.get("calibration_temperature", 1.0))
    return {"temperature": temperature, "ood_threshold": float("inf") if threshold is None else float(threshold)}


def fp32_long_text(directory: Path, model_config: dict) -> LongText:
    """The training run's max_length and long-text settings when known, else truncation at the
    model's position limit."""
    training = directory / "training_config.json"
    if training.is_file():
        settings = read_json(training)
        return long_text_from(settings, int(settings["max_length"]))
    return LongText(max_length=int(model_config.get("max_position_embeddings", 512)))


def pad_token_id(directory: Path, tokenizer: Tokenizer) -> int:
    token = (
        read_json(directory / "tokenizer_config.json").get("pad_token")
        if (directory / "tokenizer_config.json").is_file()
        else None
    )
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return 0 if token_id is None else token_id


def numpy_forward(model: object) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The forward function of an EdgeClassifier for a torch model that returns `.logits`."""
    import torch

    @torch.inference_mode()
    def forward(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return (
            model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
        )

    return forward


def load_fp32(directory: Path) -> EdgeClassifier:
    from transformers import AutoModelForSequenceClassification

    model_config = read_json(directory / "config.json")
    if not model_config.get("id2label") or not any(
        a.endswith("ForSequenceClassification") for a in model_config.get("architectures", [])
    ):
        raise DataError(
            f"{directory}: not a sequence classifier (config.json has no ...ForSequenceClassification architecture)"
        )
    model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = tokenizer_from_directory(directory)
    return EdgeClassifier(
        labels=[model.config.id2label[i] for i in range(model.config.num_labels)],
        multilabel=model.config.problem_type == "multi_label_classification",
        threshold=float(getattr(model.config, "multilabel_threshold", 0.5)),
        long_text=fp32_long_text(directory, model_config),
        pad_token_id=pad_token_id(directory, tokenizer),
        tokenizer=tokenizer,
        forward=numpy_forward(model),
        kind="fp32",
        **out_of_scope_settings(model_config),
    )


def load_classifier(directory: str | Path, threads: int = 0, spin: bool = True) -> EdgeClassifier:
    """An int8 directory from intel_compressor.py, or an fp32 best-model directory. threads and spin:
    of ONNX Runtime (threads 0: its default, one per core; see onnx_forward); the fp32 path follows
    OMP_NUM_THREADS (set_threads)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--model {directory}: no such directory")
    if (directory / EDGE_CONFIG).is_file():
        return load_int8(directory, threads, spin)
    if (directory / "config.json").is_file():
        return load_fp32(directory)
    raise DataError(f"--model {directory}: not a model directory (no {EDGE_CONFIG} or config.json)")


# ---------------------------------------------------------------------------------------
# Drift: what the model predicts now against what it predicted on validation
# ---------------------------------------------------------------------------------------

DRIFT_REFERENCE = "drift_reference.json"
NO_LABEL = "(no label)"  # multi-label: a text with no label above the threshold
PSI_FLOOR = 1e-4  # shares below it count as it: a label never predicted must not make the PSI infinite


def label_counts(label_sets: list[list[str]], labels: list[str]) -> np.ndarray:
    """How often each label was predicted, and (last) how many texts got none."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros(len(labels) + 1)
    for predicted in label_sets:
        for label in predicted:
            counts[index[label]] += 1
        counts[-1] += not predicted
    return counts


def population_stability_index(expected: np.ndarray, observed: np.ndarray) -> float:
    """PSI = sum (o - e) ln(o / e) over the buckets of two distributions (counts or shares): under
    0.1 the usual reading is no shift, 0.1-0.25 a moderate one, above 0.25 a large one."""
    e = np.maximum(np.asarray(expected, dtype=float) / max(np.sum(expected), 1e-12), PSI_FLOOR)
    o = np.maximum(np.asarray(observed, dtype=float) / max(np.sum(observed), 1e-12), PSI_FLOOR)
    return float(np.sum((o - e) * np.log(o / e)))


def drift_reference(label_sets: list[list[str]], labels: list[str], ood: np.ndarray, ood_threshold: float) -> dict:
    """What the training scripts write with the best model (drift_reference.json): on validation, the
    share of each predicted label, the share out of scope, and quantiles of the ood_score."""
    counts = label_counts(label_sets, labels)
    quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {
        "texts": len(label_sets),
        "labels": [*labels, NO_LABEL],
        "label_shares": (counts / max(counts.sum(), 1)).round(6).tolist(),
        "out_of_scope_share": float(np.mean(ood > ood_threshold)),
        "ood_quantiles": {f"{q:.2f}": float(np.quantile(ood, q)) for q in quantiles},
    }


def read_drift_reference(directory: Path) -> dict | None:
    """The reference of a model directory (fp32 or int8), None for models written before it existed."""
    path = Path(directory) / DRIFT_REFERENCE
    return read_json(path) if path.is_file() else None


class DriftWindow:
    """The last `size` texts scored (all of them when size is 0): their predicted labels and
    out-of-scope flags, summarised against the reference."""

    def __init__(self, reference: dict, size: int = 0):
        self.reference, self.size = reference, size
        self.labels = reference["labels"][:-1]
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.none = len(self.labels)  # the bucket of texts with no label
        self.recent: deque[tuple[list[int], bool]] = deque()
        self.counts, self.texts, self.out_of_scope = np.zeros(len(self.labels) + 1), 0, 0

    def add(self, label_sets: list[list[str]], out_of_scope: list[bool]) -> None:
        for predicted, flagged in zip(label_sets, out_of_scope, strict=True):
            buckets = [self.index[label] for label in predicted] or [self.none]
            self.counts[buckets] += 1
            self.texts += 1
            self.out_of_scope += bool(flagged)
            if self.size:
                self.recent.append((buckets, bool(flagged)))
                if len(self.recent) > self.size:
                    old, old_flag = self.recent.popleft()
                    self.counts[old] -= 1
                    self.texts -= 1
                    self.out_of_scope -= old_flag

    def summary(self) -> dict[str, float]:
        return {
            "texts": self.texts,
            "out_of_scope_share": self.out_of_scope / self.texts if self.texts else 0.0,
            "expected_out_of_scope_share": self.reference["out_of_scope_share"],
            "label_psi": population_stability_index(self.reference["label_shares"], self.counts) if self.texts else 0.0,
        }


def describe_drift(summary: dict[str, float]) -> str:
    psi = summary["label_psi"]
    reading = "no shift" if psi < 0.1 else "a moderate shift" if psi < 0.25 else "a large shift"
    return (
        f"drift over {summary['texts']:,} texts: out of scope {summary['out_of_scope_share']:.1%} "
        f"(validation: {summary['expected_out_of_scope_share']:.1%}); predicted-label PSI against validation "
        f"{psi:.3f} ({reading})"
    )


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("texts", nargs="*", help="Texts to classify (or use --input).")
    parser.add_argument(
        "--model", required=True, help="int8 directory from intel_compressor.py, or an fp32 best_model directory."
    )
    parser.add_argument("--input", default="", help="CSV file to classify, streamed in chunks.")
    parser.add_argument("--text_column", default="text", help="Column of --input holding the texts.")
    parser.add_argument(
        "--output", default="", help="CSV to write (--input only); empty: <input stem>_predictions.csv beside it."
    )
    parser.add_argument("--label_delimiter", default=";", help="Separator of several predicted labels in one cell.")
    parser.add_argument("--batch_size", type=int, default=32, help="Texts per forward pass.")
    parser.add_argument(
        "--chunk_rows", type=int, default=4096, help="CSV rows read, sorted by length and written at a time."
    )
    parser.add_argument(
        "--num_threads", type=int, default=0, help="CPU threads; 0: the runtime's default, one per core."
    )
    return parser


def classify_texts(classifier: EdgeClassifier, texts: list[str], batch_size: int) -> None:
    probs, scores = classifier.predictions(texts, batch_size)
    for text, row, labels, score in zip(texts, probs, classifier.predicted_labels(probs), scores):
        shown = (
            ", ".join(f"{label} {row[classifier.labels.index(label)]:.3f}" for label in labels)
            or "(no label above threshold)"
        )
        scope = "OUT OF SCOPE " if score > classifier.ood_threshold else ""
        print(f"{shown}\t{scope}ood_score {score:.2f}\t{text}")


def csv_chunks(path: Path, column: str, chunk_rows: int) -> Iterator[tuple[list[str], list[dict[str, str]]]]:
    """(header, rows) chunks of a CSV; an empty file, a missing column or an empty text stops with the row number."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{path}: empty file (no header row)")
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
        chunk: list[dict[str, str]] = []
        for row in reader:
            if not (row.get(column) or "").strip():
                raise DataError(f"{path}: row {reader.line_num}: empty text in column {column!r}")
            chunk.append(row)
            if len(chunk) == chunk_rows:
                yield list(header), chunk
                chunk = []
        if chunk:
            yield list(header), chunk
        elif reader.line_num <= 1:
            raise DataError(f"{path}: no rows below the header")


def prediction_columns(
    classifier: EdgeClassifier, probs: np.ndarray, ood: np.ndarray, delimiter: str
) -> dict[str, list]:
    """What the edge runner adds to each row of a file, typed: predicted (the label set, joined by
    `delimiter`), ood_score, out_of_scope, and prob_<label> for every label (batch_inference.py
    writes the same columns)."""
    columns: dict[str, list] = {
        "predicted": [delimiter.join(labels) for labels in classifier.predicted_labels(probs)],
        "ood_score": ood.tolist(),
        "out_of_scope": (ood > classifier.ood_threshold).tolist(),
    }
    columns.update({f"prob_{label}": probs[:, j].tolist() for j, label in enumerate(classifier.labels)})
    return columns


def classify_csv(classifier: EdgeClassifier, args: argparse.Namespace, drift: DriftWindow | None) -> Path:
    """Write the predictions of every row of --input; `drift`, when given, sees every prediction."""
    from tqdm import tqdm

    source = Path(args.input)
    if not source.is_file():
        raise DataError(f"--input {source}: no such file")
    target = Path(args.output) if args.output else source.with_name(f"{source.stem}_predictions.csv")
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(handle, "w", newline="", encoding="utf-8") as out,
            tqdm(desc="classify", unit=" rows", mininterval=1) as bar,
        ):
            writer = None
            for header, rows in csv_chunks(source, args.text_column, args.chunk_rows):
                probs, ood = classifier.predictions([row[args.text_column] for row in rows], args.batch_size)
                columns = prediction_columns(classifier, probs, ood, args.label_delimiter)
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=[*header, *columns])
                    writer.writeheader()
                if drift is not None:
                    drift.add(classifier.predicted_labels(probs), columns["out_of_scope"])
                for i, row in enumerate(rows):
                    row.update({name: values[i] for name, values in columns.items()})
                    row["ood_score"] = f"{row['ood_score']:.4f}"
                    row.update({name: f"{row[name]:.6f}" for name in columns if name.startswith("prob_")})
                    writer.writerow(row)
                bar.update(len(rows))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def set_threads(count: int) -> None:
    """For the fp32 path: OpenMP reads OMP_NUM_THREADS when torch loads; a process that has imported
    torch already is told through torch."""
    os.environ["OMP_NUM_THREADS"] = str(count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if bool(args.texts) == bool(args.input):
        raise DataError("give texts to classify or --input FILE.csv (one of the two)")
    if args.num_threads > 0:
        set_threads(args.num_threads)
    started = time.perf_counter()
    classifier = load_classifier(args.model, args.num_threads)
    print(f"loaded {classifier.kind} model from {args.model} in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    if args.input:
        reference = read_drift_reference(Path(args.model))
        drift = DriftWindow(reference) if reference else None
        target = classify_csv(classifier, args, drift)
        print(f"wrote {target}", file=sys.stderr)
        if drift is not None:
            print(describe_drift(drift.summary()), file=sys.stderr)
    else:
        classify_texts(classifier, args.texts, args.batch_size)


if __name__ == "__main__":
    sys.exit(run_cli(main))
