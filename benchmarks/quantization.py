"""fp32 against every int8 option on a real task, side by side in one run: accuracy (and agreement
with fp32) on the test split, batch-1 latency, batch-32 throughput and size on disk; the cold start
of the edge script (intel_compressor_test.py, process start to exit, one text); and the targets.

    .venv/bin/python benchmarks/quantization.py --model outputs/<run>/best_model
    .venv/bin/python benchmarks/quantization.py --model outputs/imdb/best_model --test_rows 1000

Variants, all in this process, with the same threads, on the same texts:
  torch fp32 eager                     transformers, what training evaluates
  onnxruntime fp32                     torch.onnx.export's defaults, on ONNX Runtime
  onnxruntime quantize_dynamic int8    ONNX Runtime's own int8 of that export: the tool a user would
                                       otherwise pick (the peer of the targets)
  onnxruntime quantize_dynamic int8, fused export
                                       the same tool given intel_compressor.py's export and fusions,
                                       to show what INC adds beyond the graph work
  INC onnx static/dynamic/weight-only  the model.onnx files intel_compressor.py writes
The speed figures come from intel_compressor.measure_speed (warm-up, then blocks of texts per model,
the order of the models reversed every round). The test split is the run's own
(training_config.json) unless --test_file is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import intel_compressor
from configs import resolve_embedded
from data_functions import load_data
from intel_compressor_test import EdgeClassifier, HelpFormatter, cpu_description, load_classifier, onnx_forward, pad
from utility_functions import compute_metrics

PEER = "onnxruntime quantize_dynamic int8"
KEPT = "INC onnx static"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="best_model directory of a training run.")
    parser.add_argument("--test_file", default="", help="Test data; empty: the run's test_file.")
    parser.add_argument("--test_rows", type=int, default=0, help="Stratified sample of the test split; 0 = all.")
    parser.add_argument("--calibration_size", type=int, default=1000, help="Calibration texts for INC static.")
    parser.add_argument("--timing_texts", type=int, default=1000, help="Texts per batch-32 throughput round.")
    parser.add_argument("--latency_texts", type=int, default=100, help="Texts timed one by one at batch 1, per round.")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of the throughput figure.")
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads for every variant.")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    return parser


def fused_peer(
    exports: intel_compressor.Exports, fp32: EdgeClassifier, source: Path, scratch: Path, threads: int
) -> tuple[EdgeClassifier, int]:
    """ONNX Runtime's quantize_dynamic on the fused graph (its shape inference cannot type the fused ops:
    default float). Its size counts tokenizer.json, as every other variant's does."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = scratch / "onnxruntime-int8-fused.onnx"
    quantize_dynamic(
        str(exports.fused),
        str(path),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return dataclasses.replace(fp32, forward=onnx_forward(path, threads)), path.stat().st_size + (
        source / "tokenizer.json"
    ).stat().st_size


def cold_start_seconds(directory: Path, repeats: int, threads: int) -> float:
    """Median wall time of a fresh `python intel_compressor_test.py --model DIR "one text"`, from
    process start to exit, with the file cache warm (the first run is not counted)."""
    command = [
        sys.executable,
        str(REPO / "intel_compressor_test.py"),
        f"--model={directory}",
        f"--num_threads={threads}",
        "my card has not arrived yet",
    ]
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def targets(rows: dict[str, dict[str, float]], throughput: str, cold_start: float) -> list[str]:
    kept, peer, eager = rows[KEPT], rows[PEER], rows["torch fp32 eager"]
    checks = [
        (
            "batch-1 p50, INC / ONNX Runtime int8",
            kept["latency_batch1_p50_ms"] / peer["latency_batch1_p50_ms"],
            "<=",
            0.9,
        ),
        (
            "batch-1 p50, INC / torch fp32 eager",
            kept["latency_batch1_p50_ms"] / eager["latency_batch1_p50_ms"],
            "<=",
            0.35,
        ),
        ("batch-32 throughput, INC / torch fp32 eager", kept[throughput] / eager[throughput], ">=", 2.0),
        ("batch-32 throughput, INC / ONNX Runtime int8", kept[throughput] / peer[throughput], ">=", 1.0),
        ("accuracy, INC - fp32 (points)", 100 * (kept["accuracy"] - eager["accuracy"]), ">=", -0.5),
        ("size, INC / fp32", kept["size_mb"] / eager["size_mb"], "<=", 0.30),
        ("cold start of the edge script, INC (s)", cold_start, "<=", 1.0),
    ]
    return target_lines(checks)


def target_lines(checks: list[tuple[str, float, str, float]]) -> list[str]:
    """One line per (name, measured value, "<=" or ">=", bound): the value and whether it is met."""
    met = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
    return [
        f"{name}: {value:.2f} (target {op} {bound}): {'met' if met[op](value, bound) else 'MISSED'}"
        for name, value, op, bound in checks
    ]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    intel_compressor.quiet_inc()
    source = Path(args.model).resolve()
    model_config = intel_compressor.check_model_directory(source)
    options = intel_compressor.build_parser().parse_args(
        [
            f"--model={source}",
            f"--timing_texts={args.timing_texts}",
            f"--latency_texts={args.latency_texts}",
            f"--batch_size={args.batch_size}",
        ]
    )
    config = intel_compressor.run_config(source, options)
    saved_test = json.loads((source / "training_config.json").read_text())["test_file"]
    config = dataclasses.replace(config, test_file=resolve_embedded(args.test_file or saved_test))
    space, train, _, test = load_data(config)
    test = intel_compressor.stratified_sample(test, space.task, args.test_rows, config.seed)
    calibration = intel_compressor.stratified_sample(train, space.task, args.calibration_size, config.seed).texts

    fp32 = load_classifier(source)
    batches = [pad(fp32.token_ids(calibration[i : i + 32]), fp32.pad_token_id) for i in range(0, len(calibration), 32)]
    models, sizes, build_seconds = (
        {"torch fp32 eager": fp32},
        {"torch fp32 eager": intel_compressor.directory_size(source)},
        {},
    )
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        exports = intel_compressor.export_graphs(source, fp32, model_config, scratch)
        for name, (model, size) in intel_compressor.onnxruntime_peers(
            exports, fp32, source, scratch, args.num_threads
        ).items():
            models[name], sizes[name] = model, size
        models[f"{PEER}, fused export"], sizes[f"{PEER}, fused export"] = fused_peer(
            exports, fp32, source, scratch, args.num_threads
        )
        for mode in intel_compressor.MODES:
            variant = intel_compressor.build_variant(source, mode, fp32, batches, exports, scratch, [])
            name = f"INC onnx {mode}"
            models[name], sizes[name] = (
                load_classifier(variant.directory, args.num_threads),
                intel_compressor.directory_size(variant.directory),
            )
            build_seconds[name] = variant.seconds
            if name == KEPT:
                cold_start = cold_start_seconds(variant.directory, 5, args.num_threads)
        fp32_cold_start = cold_start_seconds(source, 5, args.num_threads)
        probs = {name: model.probabilities(test.texts, args.batch_size) for name, model in models.items()}
        speed = intel_compressor.measure_speed(models, test.texts, options)
    rows = {
        name: {
            **compute_metrics(space.task, probs[name], test.targets, fp32.threshold),
            "agreement": intel_compressor.agreement(fp32, probs["torch fp32 eager"], probs[name]),
            **speed[name],
            "size_mb": sizes[name] / 2**20,
        }
        for name in models
    }
    print(f"\n{source}: {len(test)} test texts, max_length {fp32.max_length}, {args.num_threads} threads")
    print(f"CPU: {cpu_description()}")
    print("fused ops of the exported graph: " + ", ".join(f"{n} {op}" for op, n in exports.fusions.items()))
    print(intel_compressor.comparison_table(rows, "macro_f1"))
    throughput = f"throughput_batch{args.batch_size}_texts_per_s"
    checks = targets(rows, throughput, cold_start)
    print("\n".join(checks))
    print(
        "cold start of intel_compressor_test.py with one text (s, median "
        f"of 5): {KEPT} {cold_start:.2f}, torch fp32 {fp32_cold_start:.2f}"
    )
    result = {
        "model": str(source), "test_rows": len(test), "num_threads": args.num_threads, "cpu": cpu_description(),
        "rows": rows, "targets": checks, "cold_start_seconds": {KEPT: cold_start, "torch fp32": fp32_cold_start},
        "build_seconds": build_seconds,
        "graph_fusions": exports.fusions,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
