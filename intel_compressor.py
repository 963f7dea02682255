"""Quantize a best-model directory to int8 with Intel Neural Compressor (INC 3.x), for CPUs.

    python intel_compressor.py --model outputs/<run>/best_model                 # static int8 (default)
    python intel_compressor.py --model outputs/<run>/best_model --mode auto --tolerance 0.5
    python intel_compressor_test.py --model outputs/<run>/best_model-int8 "my card has not arrived"

Modes (all keep any batch size and any sequence length up to max_length, without re-export):
  static       INC's PT2E static quantization: int8 weights and activations, activation ranges
               calibrated on --calibration_size training texts (stratified by label).
  dynamic      INC's PT2E dynamic quantization: int8 weights, activation ranges computed per batch.
  weight-only  INC's RTN int8 weights (per output channel); activations stay fp32.
  auto         tries the three and keeps the fastest whose validation metric is within --tolerance
               points of fp32; if none is, static with the classifier head kept in fp32.

Every mode also stores the word-embedding table (half of MiniLM's weights) as per-row int8:
the torch quantizers leave embeddings in fp32. The quantized program is then compiled ahead of
time by AOTInductor, with weight freezing, into one shared library (model.so) that the edge
script loads without transformers or a compiler. Without that compile step the int8 graph only
simulates int8 and runs slower than fp32. Inside the program, attention is a plain matmul-softmax-
matmul up to MATH_ATTENTION_MAX_TOKENS tokens and SDPA's flash kernel beyond (one program, both).

The calibration texts and the validation split are the training run's own (best_model/
training_config.json, same split and seed); --train_file / --validation_file override them.
Writes <model>-int8/ (or --output) atomically: model.so, tokenizer.json, edge_config.json and
quantization_report.json, which holds fp32 and int8 figures side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from configs import Config
from intel_compressor_test import EDGE_CONFIG, PROGRAM, EdgeClassifier, load_classifier, pad
from utility_functions import (
    DataError,
    LabeledData,
    compute_metrics,
    encoder_parts,
    held_out_count,
    load_data,
    replace_directory,
    resolve_config,
    run_cli,
    stratify_keys,
    take_per_group,
    write_json,
)

MODES = ("static", "dynamic", "weight-only")
# Architectures whose export, int8 compile and edge run are checked by the tests (BERT covers MiniLM
# and the BERT-base family; RoBERTa derives position ids from the padding); others may work but are
# refused until checked.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert")
MAX_BATCH = 1024  # largest batch the compiled program accepts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="best_model directory written by either training script.")
    parser.add_argument("--output", default="", help="Where to write the int8 model (default: <model>-int8 beside it).")
    parser.add_argument("--mode", default="static", choices=[*MODES, "auto"], help="Quantization mode (default static).")
    parser.add_argument("--tolerance", type=float, default=0.5, help="auto: largest drop of the validation metric, in points (default 0.5).")
    parser.add_argument("--calibration_size", type=int, default=1000, help="Training texts that calibrate activation ranges (default 1000).")
    parser.add_argument("--train_file", default="", help="Calibration data (default: the run's train_file).")
    parser.add_argument("--validation_file", default=None, help="Accuracy-check data (default: the run's validation split).")
    parser.add_argument("--max_validation_rows", type=int, default=0, help="Evaluate on a stratified sample of this many rows; 0 = all (default 0).")
    parser.add_argument("--timing_texts", type=int, default=256, help="Validation texts per batch-32 throughput round (default 256).")
    parser.add_argument("--latency_texts", type=int, default=50, help="Validation texts timed one by one for batch-1 latency (default 50).")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of evaluation and throughput (default 32).")
    parser.add_argument("--num_threads", type=int, default=0, help="CPU threads; 0 keeps torch's default (default 0).")
    return parser


# ---------------------------------------------------------------------------------------
# Inputs: the model directory, the run's data
# ---------------------------------------------------------------------------------------


def quiet_inc() -> None:
    """INC logs every pass at INFO; its logger is set up when INC is first imported."""
    import neural_compressor.torch  # noqa: F401

    logging.getLogger("neural_compressor").setLevel(logging.ERROR)


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
        raise DataError(f"--model {directory}: not a sequence classifier (architectures: {', '.join(architectures) or 'none'})")
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
        raise DataError(f"--model {directory}: no training_config.json; give --train_file (and --validation_file) for calibration")
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
        raise DataError(f"--model {directory}: its labels differ from the data's ({len(model_labels)} vs {len(labels)}); check --train_file")


# ---------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------


class Logits(nn.Module):
    """(input_ids, attention_mask) -> logits: the plain-tensor signature that is exported and compiled."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class Int8Embedding(nn.Module):
    """A word-embedding table stored as int8 with one symmetric scale per row (per token).
    Only the looked-up rows are dequantised, so the cost is a multiply per token."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[input_ids].float() * self.scale[input_ids].unsqueeze(-1)


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer with int8 weights (one scale per output channel) and fp32 activations. The
    per-channel scale is applied to the matmul's output, so no fp32 copy of the weights is kept."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", weight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.reshape(-1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.qweight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias


def load_hf_model(directory: Path, attention: str | None = None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True, attn_implementation=attention).eval()


# Up to this many tokens the compiled program computes attention as matmul, softmax, matmul; beyond
# it, with SDPA's flash-attention kernel. Measured on this machine (32 x 12 heads, compiled): the
# plain form takes a third of the time at 16 tokens and is even at about 128; at 256 it is 2.5x
# slower, as its score matrices no longer fit in cache. On BANKING77 (about 16 tokens) it raised
# int8 throughput by 8% and cut batch-1 latency by 11%; with it alone, IMDB at 256 tokens fell 30%.
MATH_ATTENTION_MAX_TOKENS = 128
LENGTH_SWITCHED_ATTENTION = "length_switched"


def length_switched_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """A transformers attention function whose choice follows the sequence length at run time:
    torch.cond keeps both forms in the one exported program, so it still serves every length."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling

    def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        weights = torch.softmax(scores + mask[0] if mask else scores, dim=-1)
        return torch.matmul(weights, v).transpose(1, 2).contiguous()

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[0] if mask else None, scale=scaling)
        return out.transpose(1, 2).contiguous()  # both branches must return the same memory layout

    operands = (query, key, value) if attention_mask is None else (query, key, value, attention_mask)
    return torch.cond(query.size(2) <= MATH_ATTENTION_MAX_TOKENS, plain, flash, operands), None


def load_for_int8_program(directory: Path) -> Logits:
    """The model as it is quantized and compiled: length-switched attention (with the additive
    float mask that both of its forms take) and the int8 word-embedding table."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(LENGTH_SWITCHED_ATTENTION, length_switched_attention)
    AttentionMaskInterface.register(LENGTH_SWITCHED_ATTENTION, eager_mask)
    model = load_hf_model(directory, LENGTH_SWITCHED_ATTENTION)
    model.set_input_embeddings(Int8Embedding(model.get_input_embeddings().weight.detach()))
    return Logits(model).eval()


def head_layer_names(module: Logits) -> list[str]:
    """Linear layers outside the encoder stack (pooler, classifier): the accuracy-sensitive ones."""
    _, layers = encoder_parts(module.model)
    inside = {id(m) for m in layers.modules()}
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]


def dynamic_shapes(max_length: int) -> tuple[dict[int, Any], dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    sequence = torch.export.Dim("sequence", min=2, max=max_length)
    return {0: batch, 1: sequence}, {0: batch, 1: sequence}


def quantize_pt2e(module: Logits, mode: str, batches: list[tuple[torch.Tensor, torch.Tensor]], max_length: int, fp32_layers: list[str]) -> nn.Module:
    """INC 3.x PT2E: export with dynamic batch and sequence dims, insert observers, calibrate, convert."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig, convert, prepare

    config = StaticQuantConfig() if mode == "static" else DynamicQuantConfig()
    for name in fp32_layers:
        config.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    exported = export(module, batches[0], dynamic_shapes=dynamic_shapes(max_length))
    prepared = prepare(exported, config)
    with torch.no_grad():
        for input_ids, mask in batches:  # dynamic mode too: without this pass torchao keeps default ranges
            prepared(input_ids, mask)
    return convert(prepared)


def quantize_weight_only(module: Logits) -> nn.Module:
    """INC 3.x RTN: int8 per-output-channel weights of every linear layer, then each INC
    WeightOnlyLinear (which unpacks through numpy and cannot be exported) becomes an
    exportable int8 layer holding the same integers and scales."""
    from neural_compressor.torch.algorithms.weight_only.modules import WeightOnlyLinear
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    config = RTNConfig(dtype="int", bits=8, group_size=-1, use_sym=True, use_layer_wise=False)
    quantized = convert(prepare(module, config))
    for name, layer in list(quantized.named_modules()):
        if isinstance(layer, WeightOnlyLinear):
            unpacked = layer.unpack()  # unsigned integers with a zero point of 128 (optimum's layout)
            weight = unpacked["int_weight"].int() - (0 if unpacked.get("zp") is None else unpacked["zp"].int())
            replacement = Int8WeightOnlyLinear(weight, unpacked["scales"], layer.bias)
            parent, _, attribute = name.rpartition(".")
            setattr(quantized.get_submodule(parent), attribute, replacement)
    return quantized


def compile_program(module: nn.Module, example: tuple[torch.Tensor, torch.Tensor], max_length: int, target: Path, freeze: bool) -> None:
    """AOTInductor: one shared library with the int8 weights inside. For the PT2E graphs, freezing
    lets Inductor fold each quantize/dequantize pair into an int8 kernel with pre-packed weights;
    their re-export must run under no_grad, or the weights stay fp32 constants (bigger and no
    faster). The weight-only graph already holds int8 weights, and Inductor cannot lower its
    int8 matmul once frozen."""
    import torch._inductor.config as inductor_config

    with torch.no_grad(), inductor_config.patch(freezing=freeze), tempfile.TemporaryDirectory() as scratch:
        program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(max_length))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(scratch) / "model.pt2"))
        with zipfile.ZipFile(package) as archive:
            (library,) = [name for name in archive.namelist() if name.endswith(".so")]
            with archive.open(library) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


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


def torch_batch(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, mask = pad(rows, pad_token_id)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def build_variant(source: Path, mode: str, fp32: EdgeClassifier, calibration: list[str], staging_root: Path, fp32_layers: list[str] | None = None) -> Variant:
    """Quantize, compile and write one int8 directory (not yet the final output)."""
    started = time.perf_counter()
    module = load_for_int8_program(source)
    batches = [torch_batch(fp32.token_ids(calibration[i : i + 32]), fp32.pad_token_id) for i in range(0, len(calibration), 32)]
    fp32_layers = head_layer_names(module) if fp32_layers is None else fp32_layers
    if mode == "weight-only":
        quantized = quantize_weight_only(module)
    else:
        quantized = quantize_pt2e(module, mode, batches, fp32.max_length, fp32_layers)
    directory = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{mode}-"))
    compile_program(quantized, batches[0], fp32.max_length, directory / PROGRAM, freeze=mode != "weight-only")
    shutil.copy(source / "tokenizer.json", directory / "tokenizer.json")
    write_json(directory / EDGE_CONFIG, {
        "mode": mode,
        "fp32_layers": fp32_layers,
        "labels": fp32.labels,
        "task": "multilabel" if fp32.multilabel else "single_label",
        "threshold": fp32.threshold,
        "max_length": fp32.max_length,
        "pad_token_id": fp32.pad_token_id,
        "torch_version": version("torch"),  # the edge compares it with its installed wheel, without importing torch
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "source": str(source),
    })
    return Variant(mode, directory, fp32_layers, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------
# Accuracy and speed, fp32 and int8 side by side
# ---------------------------------------------------------------------------------------


def validation_metrics(classifier: EdgeClassifier, data: LabeledData, task: str, batch_size: int) -> tuple[dict[str, float], np.ndarray]:
    probs = classifier.probabilities(data.texts, batch_size)
    return compute_metrics(task, probs, data.targets, classifier.threshold), probs


def agreement(classifier: EdgeClassifier, a: np.ndarray, b: np.ndarray) -> float:
    """Share of texts with the same predicted label(s)."""
    if classifier.multilabel:
        return float(np.mean(((a >= classifier.threshold) == (b >= classifier.threshold)).all(axis=1)))
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def measure_speed(models: dict[str, EdgeClassifier], texts: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50, p95) and batch-32 throughput of every model on the same validation
    texts, interleaved model by model so that machine noise hits all of them alike."""
    for model in models.values():  # warm-up: first calls allocate and page in the weights
        model.probabilities(texts[: args.batch_size], args.batch_size)
    latencies: dict[str, list[float]] = {name: [] for name in models}
    for text in texts[: args.latency_texts]:
        for name, model in models.items():
            started = time.perf_counter()
            model.probabilities([text], 1)
            latencies[name].append(time.perf_counter() - started)
    rates: dict[str, list[float]] = {name: [] for name in models}
    timed = texts[: args.timing_texts]
    for _ in range(3):
        for name, model in models.items():
            started = time.perf_counter()
            model.probabilities(timed, args.batch_size)
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


def choose(variants: list[Variant], speed: dict[str, dict[str, float]], fp32_value: float, metric: str, tolerance: float) -> Variant | None:
    """The fastest variant (batch-32 throughput) within the tolerance, or None."""
    passing = [v for v in variants if within_tolerance(v, fp32_value, metric, tolerance)]
    return max(passing, key=lambda v: speed[v.name][throughput_key(speed[v.name])], default=None)


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def comparison_table(rows: dict[str, dict[str, float]], metric: str) -> str:
    """Markdown table, one row per model."""
    columns = ["accuracy", metric, "latency_batch1_p50_ms", "latency_batch1_p95_ms", throughput_key(next(iter(rows.values()))), "size_mb"]
    columns = list(dict.fromkeys(columns))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" if c in ("accuracy", metric) else f"{row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def evaluate_variant(variant: Variant, valid: LabeledData, task: str, batch_size: int) -> None:
    variant.classifier = load_classifier(variant.directory)
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
    fp32_metrics, fp32_probs = validation_metrics(fp32, valid, space.task, args.batch_size)
    print(f"fp32: validation {metric} {fp32_metrics[metric]:.4f} on {len(valid)} rows; calibrating on {len(calibration)} training texts")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        variants = []
        for mode in MODES if args.mode == "auto" else [args.mode]:
            variant = build_variant(source, mode, fp32, calibration, staging_root, fp32_layers=[])
            evaluate_variant(variant, valid, space.task, args.batch_size)
            print(f"{variant.name}: built in {variant.seconds:.0f} s, validation {metric} {variant.metrics[metric]:.4f}")
            variants.append(variant)
        speed = measure_speed({"fp32": fp32, **{v.name: v.classifier for v in variants}}, valid.texts, args)
        chosen = choose(variants, speed, fp32_metrics[metric], metric, args.tolerance) if args.mode == "auto" else variants[0]
        if chosen is None:
            print(f"no full-int8 variant within {args.tolerance} points of fp32 {metric}; keeping the head layers in fp32")
            fallback = build_variant(source, "static", fp32, calibration, staging_root)
            evaluate_variant(fallback, valid, space.task, args.batch_size)
            variants.append(fallback)
            speed = measure_speed({"fp32": fp32, **{v.name: v.classifier for v in variants}}, valid.texts, args)
            chosen = choose([fallback], speed, fp32_metrics[metric], metric, args.tolerance)
            if chosen is None:
                raise DataError(
                    f"--mode auto: no int8 variant stays within {args.tolerance} points of fp32 {metric} "
                    f"{fp32_metrics[metric]:.4f} (best: {max(v.metrics[metric] for v in variants):.4f}); raise --tolerance or --calibration_size"
                )
        rows = {"fp32": {**fp32_metrics, **speed["fp32"], "size_mb": directory_size(source) / 2**20}}
        for v in variants:
            rows[v.name] = {**v.metrics, **speed[v.name], "size_mb": directory_size(v.directory) / 2**20}
        report = {
            "mode": chosen.mode,
            "fp32_layers": chosen.fp32_layers,
            "inc_version": version("neural-compressor-pt"),
            "torch_version": torch.__version__,
            "source": str(source),
            "metric": metric,
            "tolerance_points": args.tolerance,
            "within_tolerance": within_tolerance(chosen, fp32_metrics[metric], metric, args.tolerance),
            "fp32": rows["fp32"],
            "int8": rows[chosen.name],
            "agreement": agreement(fp32, fp32_probs, chosen.probs),
            "size_bytes": {"fp32": directory_size(source), "int8": directory_size(chosen.directory)},
            "size_ratio": directory_size(chosen.directory) / directory_size(source),
            "candidates": {v.name: {**rows[v.name], "agreement": agreement(fp32, fp32_probs, v.probs), "build_seconds": v.seconds} for v in variants},
            "calibration_texts": len(calibration),
            "validation_rows": len(valid),
            "num_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
        report["seconds"] = time.perf_counter() - started
        write_json(chosen.directory / "quantization_report.json", report)
        os.chmod(chosen.directory, 0o755)
        replace_directory(chosen.directory, output)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    print(comparison_table(rows, metric))
    print(f"kept {chosen.name}: agreement with fp32 {report['agreement']:.4f}, size {report['size_ratio']:.0%} of fp32; wrote {output}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
