"""Quantize a best-model directory to int8 with Intel Neural Compressor, for CPUs at the edge.

    python intel_compressor.py --model outputs/<run>/best_model                 # static int8 ONNX (default)
    python intel_compressor.py --model outputs/<run>/best_model --mode auto --tolerance 0.5
    python intel_compressor_test.py --model outputs/<run>/best_model-int8 "my card has not arrived"

The default output is one ONNX file (model.onnx) that ONNX Runtime runs on any CPU it supports,
x86 with or without AVX-512/VNNI and ARM alike, choosing its int8 kernels for the CPU at load
time; the edge needs onnxruntime, tokenizers and numpy, not torch. How it is built:
  1. export (input_ids, attention_mask) -> logits with dynamic batch and sequence length;
  2. fuse with ONNX Runtime's transformer optimizer: the embeddings become one
     EmbedLayerNormalization, each layer's attention one Attention op, residual + LayerNorm a
     SkipLayerNormalization, bias + GELU a BiasGelu (report: fusions);
  3. quantize with INC's ONNX Runtime backend (onnx-neural-compressor), mode by mode:
  static       int8 weights and activations (QOperator ops: QAttention, QLinearMatMul, ...), activation
               ranges calibrated on --calibration_size training texts (stratified by label).
  dynamic      int8 weights, activation ranges computed per batch (DynamicQuantizeLinear).
  weight-only  INC's RTN 4-bit weights (groups of 32, MatMulNBits) of the feed-forward and output
               projections; activations and attention weights stay fp32.
  auto         tries the three and keeps the fastest whose validation metric is within --tolerance
               points of fp32; if none is, static with the classifier head kept in fp32.
Every mode also stores the embedding tables (a third of MiniLM's weights) as int8.

The calibration texts and the validation split are the training run's own (best_model/
training_config.json, same split and seed); --train_file / --validation_file override them.
Writes <model>-int8/ (or --output) atomically: the model, tokenizer.json, edge_config.json,
drift_reference.json (the training run's, when there is one) and quantization_report.json, which
holds fp32, ONNX Runtime's own int8 (quantize_dynamic, the tool a user would otherwise pick) and INC
int8 side by side, measured in this process in turns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from configs import Config
from data_functions import (
    LabeledData,
    held_out_count,
    load_data,
    replace_directory,
    stratify_keys,
    take_per_group,
    write_json,
)
from intel_compressor_test import (
    DRIFT_REFERENCE,
    EDGE_CONFIG,
    MODEL_FILE,
    ONNX_INPUTS,
    DataError,
    EdgeClassifier,
    HelpFormatter,
    classifier_settings,
    cpu_description,
    load_classifier,
    onnx_forward,
    pad,
    run_cli,
)
from utility_functions import compute_metrics, encoder_parts, resolve_config

MODES = ("static", "dynamic", "weight-only")
# Architectures whose export, int8 quantization and edge run are checked by the tests (BERT covers
# MiniLM and the BERT-base family; RoBERTa derives position ids from the padding; MPNet, the
# all-mpnet-base-v2 teacher, computes relative position buckets in the graph, and ONNX Runtime's
# fusion leaves its attention unfused); others may work but are refused until checked.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert", "mpnet")
MAX_BATCH = 1024  # the largest batch the default exporter is told to expect (its graph serves any)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="best_model directory written by either training script.")
    parser.add_argument("--output", default="", help="Where to write the int8 model; empty: <model>-int8 beside it.")
    parser.add_argument("--mode", default="static", choices=[*MODES, "auto"], help="Quantization mode.")
    parser.add_argument(
        "--tolerance", type=float, default=0.5, help="auto: largest drop of the validation metric, in points."
    )
    parser.add_argument(
        "--calibration_size", type=int, default=1000, help="Training texts that calibrate activation ranges."
    )
    parser.add_argument("--train_file", default="", help="Calibration data; empty: the run's train_file.")
    parser.add_argument(
        "--validation_file", default=None, help="Accuracy-check data; None: the run's validation split."
    )
    parser.add_argument(
        "--max_validation_rows", type=int, default=0, help="Evaluate on a stratified sample of this many rows; 0 = all."
    )
    parser.add_argument(
        "--timing_texts", type=int, default=1000, help="Validation texts per batch-32 throughput round."
    )
    parser.add_argument(
        "--latency_texts", type=int, default=50, help="Validation texts timed one by one for batch-1 latency."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of evaluation and throughput.")
    parser.add_argument(
        "--num_threads", type=int, default=0, help="CPU threads; 0 keeps the libraries' defaults, one per core."
    )
    return parser


# ---------------------------------------------------------------------------------------
# Inputs: the model directory, the run's data
# ---------------------------------------------------------------------------------------


def quiet_inc() -> None:
    """INC logs every pass at INFO (its loggers are set up when it is first imported); so does ONNX
    Runtime's transformer optimizer."""
    import onnx_neural_compressor.logger  # noqa: F401

    for name in ("onnx_neural_compressor", "onnxruntime.transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_model_directory(directory: Path) -> dict[str, Any]:
    """The model's config.json, after checking that it is a classifier we can quantize."""
    if not directory.is_dir():
        raise DataError(f"--model {directory}: no such directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise DataError(f"--model {directory}: no config.json (expected a best_model directory from a training script)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise DataError(
            f"--model {directory}: not a sequence classifier (architectures: {', '.join(architectures) or 'none'})"
        )
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise DataError(
            f"--model {directory}: architecture {config.get('model_type')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def run_config(directory: Path, args: argparse.Namespace) -> Config:
    """The training run's configuration, with the data overrides of this command."""
    saved = directory / "training_config.json"
    if saved.is_file():
        fields = {f.name for f in dataclasses.fields(Config)}
        config = Config(**{k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k in fields})
    elif args.train_file:
        config = Config(model_name_or_path=str(directory), validation_file="", test_file="")
    else:
        raise DataError(
            f"--model {directory}: no training_config.json; give --train_file (and --validation_file) for calibration"
        )
    overrides = {"test_file": ""}
    if args.train_file:
        overrides["train_file"] = args.train_file
    if args.validation_file is not None:
        overrides["validation_file"] = args.validation_file
    return resolve_config(dataclasses.replace(config, **overrides))


def stratified_sample(data: LabeledData, task: str, size: int, seed: int) -> LabeledData:
    """About `size` rows with every label's share kept (all rows when there are fewer)."""
    if size <= 0 or size >= len(data):
        return data
    return data.subset(take_per_group(stratify_keys(data.targets, task), held_out_count(size / len(data)), seed))


def check_labels(model_config: dict[str, Any], labels: list[str], directory: Path) -> None:
    model_labels = [model_config["id2label"][str(i)] for i in range(len(model_config["id2label"]))]
    if model_labels != labels:
        raise DataError(
            f"--model {directory}: its labels differ from the data's "
            f"({len(model_labels)} vs {len(labels)}); check --train_file"
        )


# ---------------------------------------------------------------------------------------
# ONNX: export, fuse, quantize with onnx-neural-compressor
# ---------------------------------------------------------------------------------------


class Logits(nn.Module):
    """(input_ids, attention_mask) -> logits: the plain-tensor signature that is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_hf_model(directory: Path, attention: str | None = None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        directory, local_files_only=True, attn_implementation=attention
    ).eval()


def export_onnx(source: Path, example: tuple[torch.Tensor, torch.Tensor], target: Path) -> None:
    """fp32 ONNX with dynamic batch and sequence dims. Eager attention through the TorchScript
    exporter gives the MatMul-Softmax-MatMul pattern that ONNX Runtime's optimizer fuses into
    Attention ops; the torch.export-based exporter's graph (SDPA with a where-masked softmax) got
    no Attention fusion here, and the fused graph is 20-30% faster at int8. The example batch must
    hold padding, or tracing drops the mask."""
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter is deprecated (and chatty about tracing), not removed
        torch.onnx.export(
            Logits(load_hf_model(source, "eager")).eval(), example, str(target), input_names=list(ONNX_INPUTS),
            output_names=["logits"], dynamic_axes=axes, dynamo=False,
        )  # fmt: skip


def fuse_transformer_ops(source: Path, target: Path, model_config: dict[str, Any]) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer on the exported graph; the fused-op counts. The embedding
    lookups, their sum and LayerNorm become one EmbedLayerNormalization, its token types read from the
    mask (fold_token_types): at batch 1, with 16 tokens, the 20 small ops that built the token types and
    the sum took 5-16% of the int8 model's time in the runs here (98 ops before, 77 after)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    heads = model_config.get("num_attention_heads") or model_config.get("n_heads") or 0
    hidden = model_config.get("hidden_size") or model_config.get("dim") or 0
    options = FusionOptions("bert")
    # onnx-neural-compressor 1.0's static quantizer of the fused op requires its token-type inputs:
    # a model without token types (DistilBERT) keeps its embeddings unfused
    options.enable_embed_layer_norm = bool(model_config.get("type_vocab_size"))
    fused = optimizer.optimize_model(
        str(source), model_type="bert", num_heads=heads, hidden_size=hidden, optimization_options=options
    )
    fold_token_types(fused.model)
    fused.prune_graph(allow_remove_graph_inputs=False)
    fused.save_model_to_file(str(target))
    return {name: count for name, count in fused.get_fused_operator_statistics().items() if count}


def fold_token_types(model: Any) -> None:
    """The exported signature has no token_type_ids, so every token has type 0, yet the graph builds
    that all-zero tensor from the input's shape in a dozen ops. Feed the EmbedLayerNormalization the
    int32 attention mask it already reads as its token types instead, with a table whose two rows
    are both type 0's (exact: the mask is 0 or 1), and let the caller prune the builder away.
    (Dropping the optional token-type inputs would be simpler, but INC's quantizer requires them.)"""
    from onnx import numpy_helper

    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "EmbedLayerNormalization" or len(node.input) < 8 or not (node.input[4] and node.input[7]):
            continue
        type_zero = numpy_helper.to_array(tables[node.input[4]])[0]
        tables[node.input[4]].CopyFrom(numpy_helper.from_array(np.stack([type_zero, type_zero]), node.input[4]))
        node.input[1] = node.input[7]


def restore_dropped_nodes(fused: Path, quantized: Any) -> None:
    """onnx-neural-compressor 1.0 drops the Cast of input_ids to int32 that feeds EmbedLayerNormalization
    (each of its passes does), leaving an invalid graph: put back, before its first reader, each node
    of the fp32 graph whose output the int8 graph reads but nothing in it makes."""
    import onnx

    graph = quantized.graph
    made = {t.name for t in [*graph.input, *graph.initializer]} | {o for n in graph.node for o in n.output}
    missing = {i for n in graph.node for i in n.input if i and i not in made}
    for node in onnx.load(str(fused), load_external_data=False).graph.node:
        if missing & set(node.output):
            first_reader = next(i for i, reader in enumerate(graph.node) if set(reader.input) & set(node.output))
            graph.node.insert(first_reader, node)


class CalibrationBatches:
    """The calibration texts as ONNX Runtime feeds, batch by batch (INC's CalibrationDataReader protocol)."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]):
        self.feeds = [dict(zip(ONNX_INPUTS, batch)) for batch in batches]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.position += 1
        return self.feeds[self.position - 1] if self.position <= len(self.feeds) else None

    def rewind(self) -> None:
        self.position = 0


def onnx_head_nodes(path: Path, head_layers: list[str]) -> list[str]:
    """ONNX nodes of the head layers: the exporter names a node after its module path."""
    import onnx

    prefixes = tuple("/" + name.replace(".", "/") + "/" for name in head_layers)
    return [
        node.name
        for node in onnx.load(str(path), load_external_data=False).graph.node
        if node.name.startswith(prefixes)
    ]


def quantize_onnx(
    fused: Path, mode: str, batches: list[tuple[np.ndarray, np.ndarray]], fp32_nodes: list[str], target: Path
) -> None:
    """One INC int8 model from the fused fp32 graph, written as a single self-contained file. Weights
    get one scale per output channel: with one per tensor (INC's and ONNX Runtime's default), MiniLM
    on IMDB at 256 tokens lost 3.4 points of test accuracy (static) where per channel lost 1.1."""
    import onnx
    import onnxruntime
    from onnx_neural_compressor.quantization import config as inc
    from onnx_neural_compressor.quantization import quantize
    from onnx_neural_compressor.quantization.algorithm_entry import rtn_quantize_entry

    keep_graph = (
        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )  # already optimized; ORT's passes would undo the fusions
    with (
        tempfile.TemporaryDirectory() as scratch
    ):  # INC writes external-data files beside its output and will not overwrite them
        output = Path(scratch) / "model.onnx"
        if mode == "weight-only":
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress bar
                rtn = rtn_quantize_entry(onnx.load(str(fused)), inc.RTNConfig(weight_bits=4, weight_group_size=32))
            restore_dropped_nodes(fused, rtn)
            onnx.save(
                rtn, str(Path(scratch) / "rtn.onnx")
            )  # ONNX Runtime packs 4 bits natively (MatMulNBits); INC's 8-bit RTN only rounds fp32 weights
            quantize(
                str(Path(scratch) / "rtn.onnx"),
                str(output),
                inc.DynamicQuantConfig(op_types_to_quantize=["EmbedLayerNormalization", "Gather"]),  # the tables
                keep_graph,
            )
        elif mode == "static":
            # MatMul outputs stay fp32 (MatMulIntegerToFloat): re-quantizing them cost accuracy (../shared/notes)
            options = {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
            config = inc.StaticQuantConfig(
                CalibrationBatches(batches), per_channel=True, nodes_to_exclude=fp32_nodes, extra_options=options
            )
            quantize(str(fused), str(output), config, keep_graph)
        else:
            quantize(
                str(fused),
                str(output),
                inc.DynamicQuantConfig(per_channel=True, nodes_to_exclude=fp32_nodes),
                keep_graph,
            )
        quantized = onnx.load(str(output))
        restore_dropped_nodes(fused, quantized)
        onnx.save(quantized, str(target))


def int8_op_counts(path: Path) -> dict[str, int]:
    """How many ops of the int8 graph run quantized (their names say so)."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {
        op: n
        for op, n in sorted(ops.items())
        if op.startswith(("Q", "MatMulInteger", "DynamicQuantize", "MatMulNBits", "Dequantize"))
    }


# ---------------------------------------------------------------------------------------
# The head layers (kept in fp32 by --mode auto when full int8 loses too much)
# ---------------------------------------------------------------------------------------


def head_layer_names(module: Logits) -> list[str]:
    """Linear layers outside the encoder stack (pooler, classifier): the accuracy-sensitive ones."""
    _, layers = encoder_parts(module.model)
    inside = {id(m) for m in layers.modules()}
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]


def dynamic_shapes(max_length: int) -> tuple[dict[int, Any], dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    sequence = torch.export.Dim("sequence", min=2, max=max_length)
    return {0: batch, 1: sequence}, {0: batch, 1: sequence}


@dataclass
class Variant:
    """One quantized candidate: where it was built, and how it did."""

    mode: str
    directory: Path
    fp32_layers: list[str]
    seconds: float
    classifier: EdgeClassifier | None = None
    metrics: dict[str, float] | None = None
    probs: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.mode + (" (fp32 head)" if self.fp32_layers else "")


@dataclass
class Exports:
    """The fp32 ONNX graphs, built once per run: `plain` as a user gets it from torch.onnx.export's
    defaults (ONNX Runtime's own int8, the peer, starts there), `fused` as exported and fused here
    (INC starts there)."""

    plain: Path
    fused: Path
    fusions: dict[str, int]


def export_graphs(source: Path, fp32: EdgeClassifier, model_config: dict[str, Any], scratch: Path) -> Exports:
    example = tuple(
        torch.from_numpy(a)
        for a in pad(fp32.token_ids(["an example", "a slightly longer example text"]), fp32.pad_token_id)
    )
    plain, exported, fused = scratch / "fp32.onnx", scratch / "fp32-eager.onnx", scratch / "fp32-fused.onnx"
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
        torch.onnx.export(
            Logits(load_hf_model(source)).eval(), example, str(plain), input_names=list(ONNX_INPUTS),
            output_names=["logits"], external_data=False, dynamic_shapes=dynamic_shapes(fp32.max_length),
        )  # fmt: skip
    export_onnx(source, example, exported)
    return Exports(plain, fused, fuse_transformer_ops(exported, fused, model_config))


def build_variant(
    source: Path, mode: str, fp32: EdgeClassifier, batches: list[tuple[np.ndarray, np.ndarray]], exports: Exports,
    staging_root: Path, fp32_layers: list[str],
) -> Variant:  # fmt: skip
    """Quantize and write one int8 directory (not yet the final output)."""
    started = time.perf_counter()
    directory = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{mode}-"))
    quantize_onnx(exports.fused, mode, batches, onnx_head_nodes(exports.fused, fp32_layers), directory / MODEL_FILE)
    shutil.copy(source / "tokenizer.json", directory / "tokenizer.json")
    if (source / DRIFT_REFERENCE).is_file():  # what the model predicted on validation, for the server's drift gauges
        shutil.copy(source / DRIFT_REFERENCE, directory / DRIFT_REFERENCE)
    write_json(directory / EDGE_CONFIG, {
        "format": "onnx",
        "mode": mode,
        "fp32_layers": fp32_layers,
        **classifier_settings(fp32),
        "onnxruntime_version": version("onnxruntime"),
        "source": str(source),
    })  # fmt: skip
    return Variant(mode, directory, fp32_layers, time.perf_counter() - started)


def onnxruntime_peers(
    exports: Exports, fp32: EdgeClassifier, source: Path, scratch: Path, threads: int
) -> dict[str, tuple[EdgeClassifier, int]]:
    """What a user gets without INC, with ONNX Runtime's default options: the plain export in fp32,
    and ONNX Runtime's own `quantize_dynamic` int8 of it. Each with its size on disk."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = scratch / "onnxruntime-int8.onnx"
    logging.disable(logging.WARNING)  # it advises pre-processing on the root logger, for every model
    try:
        quantize_dynamic(str(exports.plain), str(int8), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer_size = (source / "tokenizer.json").stat().st_size
    return {
        name: (
            dataclasses.replace(fp32, forward=onnx_forward(path, threads), kind=name),
            path.stat().st_size + tokenizer_size,
        )
        for name, path in [("onnxruntime fp32", exports.plain), ("onnxruntime quantize_dynamic int8", int8)]
    }


# ---------------------------------------------------------------------------------------
# Accuracy and speed, side by side
# ---------------------------------------------------------------------------------------


def validation_metrics(
    classifier: EdgeClassifier, data: LabeledData, task: str, batch_size: int
) -> tuple[dict[str, float], np.ndarray]:
    probs = classifier.probabilities(data.texts, batch_size)
    return compute_metrics(task, probs, data.targets, classifier.threshold), probs


def agreement(classifier: EdgeClassifier, a: np.ndarray, b: np.ndarray) -> float:
    """Share of texts with the same predicted label(s)."""
    if classifier.multilabel:
        return float(np.mean(((a >= classifier.threshold) == (b >= classifier.threshold)).all(axis=1)))
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def measure_speed(
    models: dict[str, EdgeClassifier], texts: list[str], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50, p95) and batch-32 throughput of every model on the same validation texts.
    Each model is timed over a whole block of texts at a time, and the order of the models reverses
    from round to round: machine noise hits all of them alike, and the threads ONNX Runtime keeps
    spinning after a call (its default) cannot slow another model in the middle of its block."""
    for model in models.values():  # warm-up: first calls allocate and page in the weights
        model.probabilities(texts[: args.batch_size], args.batch_size)
    latencies: dict[str, list[float]] = {name: [] for name in models}
    rates: dict[str, list[float]] = {name: [] for name in models}
    timed = texts[: args.timing_texts]
    for round_ in range(3):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            for text in texts[: args.latency_texts]:
                started = time.perf_counter()
                models[name].probabilities([text], 1)
                latencies[name].append(time.perf_counter() - started)
        for name in order:
            started = time.perf_counter()
            models[name].probabilities(timed, args.batch_size)
            rates[name].append(len(timed) / (time.perf_counter() - started))
    return {
        name: {
            "latency_batch1_p50_ms": 1000 * float(np.percentile(latencies[name], 50)),
            "latency_batch1_p95_ms": 1000 * float(np.percentile(latencies[name], 95)),
            f"throughput_batch{args.batch_size}_texts_per_s": statistics.median(rates[name]),
        }
        for name in models
    }


def within_tolerance(variant: Variant, fp32_value: float, metric: str, tolerance: float) -> bool:
    return fp32_value - variant.metrics[metric] <= tolerance / 100 + 1e-9


def throughput_key(figures: dict[str, float]) -> str:
    """The throughput entry of measure_speed's figures (its name carries the batch size)."""
    return next(k for k in figures if k.startswith("throughput"))


def choose(
    variants: list[Variant], speed: dict[str, dict[str, float]], fp32_value: float, metric: str, tolerance: float
) -> Variant | None:
    """The fastest variant (batch-32 throughput) within the tolerance, or None."""
    passing = [v for v in variants if within_tolerance(v, fp32_value, metric, tolerance)]
    return max(passing, key=lambda v: speed[inc_name(v)][throughput_key(speed[inc_name(v)])], default=None)


def inc_name(variant: Variant) -> str:
    return f"INC {variant.name}"


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def comparison_table(rows: dict[str, dict[str, float]], metric: str) -> str:
    """Markdown table, one row per model."""
    figures = ["latency_batch1_p50_ms", "latency_batch1_p95_ms", throughput_key(next(iter(rows.values()))), "size_mb"]
    scores = list(dict.fromkeys(["accuracy", metric, "agreement"]))
    lines = ["| model | " + " | ".join(scores + figures) + " |", "|---" * (len(scores) + len(figures) + 1) + "|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | " + " | ".join([f"{row[c]:.4f}" for c in scores] + [f"{row[c]:.1f}" for c in figures]) + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def evaluate_variant(variant: Variant, valid: LabeledData, task: str, batch_size: int, threads: int) -> None:
    variant.classifier = load_classifier(variant.directory, threads)
    variant.metrics, variant.probs = validation_metrics(variant.classifier, valid, task, batch_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    quiet_inc()
    source = Path(args.model).resolve()
    model_config = check_model_directory(source)
    output = Path(args.output).resolve() if args.output else source.with_name(f"{source.name}-int8")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    config = run_config(source, args)
    space, train, valid, _ = load_data(config)
    check_labels(model_config, space.labels, source)
    calibration = stratified_sample(train, space.task, args.calibration_size, config.seed).texts
    valid = stratified_sample(valid, space.task, args.max_validation_rows, config.seed)
    metric = config.metric_for_best_model if config.metric_for_best_model != "loss" else "macro_f1"

    fp32 = load_classifier(source)
    batches = [pad(fp32.token_ids(calibration[i : i + 32]), fp32.pad_token_id) for i in range(0, len(calibration), 32)]
    fp32_metrics, fp32_probs = validation_metrics(fp32, valid, space.task, args.batch_size)
    print(
        f"fp32: validation {metric} {fp32_metrics[metric]:.4f} on "
        f"{len(valid)} rows; calibrating on {len(calibration)} training texts"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        exports = export_graphs(source, fp32, model_config, staging_root)
        print("fused ops of the fp32 graph: " + (", ".join(f"{n} {op}" for op, n in exports.fusions.items()) or "none"))

        def build(mode: str, fp32_layers: list[str]) -> Variant:
            variant = build_variant(source, mode, fp32, batches, exports, staging_root, fp32_layers)
            evaluate_variant(variant, valid, space.task, args.batch_size, args.num_threads)
            print(
                f"INC {variant.name}: built in {variant.seconds:.0f} "
                f"s, validation {metric} {variant.metrics[metric]:.4f}"
            )
            return variant

        variants = [build(mode, []) for mode in (MODES if args.mode == "auto" else [args.mode])]
        if args.mode == "auto" and not any(
            within_tolerance(v, fp32_metrics[metric], metric, args.tolerance) for v in variants
        ):
            print(
                f"no full-int8 variant within {args.tolerance} points of fp32 {metric}; keeping the head layers in fp32"
            )
            variants.append(build("static", head_layer_names(Logits(load_hf_model(source)))))
        peers = onnxruntime_peers(exports, fp32, source, staging_root, args.num_threads)
        models = {
            "torch fp32 eager": fp32,
            **{name: model for name, (model, _) in peers.items()},
            **{inc_name(v): v.classifier for v in variants},
        }
        speed = measure_speed(models, valid.texts, args)
        if args.mode == "auto":
            chosen = choose(variants, speed, fp32_metrics[metric], metric, args.tolerance)
            if chosen is None:
                raise DataError(
                    f"--mode auto: no int8 variant stays within {args.tolerance} points of fp32 {metric} "
                    f"{fp32_metrics[metric]:.4f} (best: {max(v.metrics[metric] for v in variants):.4f}); "
                    "raise --tolerance or --calibration_size"
                )
        else:
            chosen = variants[0]
        probs = {"torch fp32 eager": fp32_probs, **{inc_name(v): v.probs for v in variants}}
        sizes = {
            "torch fp32 eager": directory_size(source),
            **{name: size for name, (_, size) in peers.items()},
            **{inc_name(v): directory_size(v.directory) for v in variants},
        }
        for name, (model, _) in peers.items():
            probs[name] = validation_metrics(model, valid, space.task, args.batch_size)[1]
        rows = {
            name: {
                **compute_metrics(space.task, probs[name], valid.targets, fp32.threshold),
                "agreement": agreement(fp32, fp32_probs, probs[name]),
                **speed[name],
                "size_mb": sizes[name] / 2**20,
            }
            for name in models
        }
        report = {
            "format": "onnx",
            "mode": chosen.mode,
            "fp32_layers": chosen.fp32_layers,
            "inc_version": version("onnx-neural-compressor"),
            "onnxruntime_version": version("onnxruntime"),
            "torch_version": torch.__version__,
            "source": str(source),
            "metric": metric,
            "tolerance_points": args.tolerance,
            "within_tolerance": within_tolerance(chosen, fp32_metrics[metric], metric, args.tolerance),
            "fp32": rows["torch fp32 eager"],
            "int8": rows[inc_name(chosen)],
            "peers": {name: rows[name] for name in peers},
            "agreement": rows[inc_name(chosen)]["agreement"],
            "size_bytes": {"fp32": sizes["torch fp32 eager"], "int8": sizes[inc_name(chosen)]},
            "size_ratio": sizes[inc_name(chosen)] / sizes["torch fp32 eager"],
            "candidates": {v.name: {**rows[inc_name(v)], "build_seconds": v.seconds} for v in variants},
            "graph_fusions": exports.fusions,
            "calibration_texts": len(calibration),
            "validation_rows": len(valid),
            "num_threads": args.num_threads or os.cpu_count(),
            "cpu": cpu_description(),
        }
        report["int8_ops"] = int8_op_counts(chosen.directory / MODEL_FILE)
        report["seconds"] = time.perf_counter() - started
        write_json(chosen.directory / "quantization_report.json", report)
        os.chmod(chosen.directory, 0o755)
        replace_directory(chosen.directory, output)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    print(f"{len(valid)} validation texts, {report['num_threads']} threads; {report['cpu']}")
    print(comparison_table(rows, metric))
    print(
        f"kept INC onnx {chosen.name}: agreement with fp32 "
        f"{report['agreement']:.4f}, size {report['size_ratio']:.0%} of fp32; wrote {output}"
    )
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
