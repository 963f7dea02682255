"""fp32 against every int8 option on a real task, side by side in one run: accuracy on the test
split, batch-1 latency, batch-32 throughput and size on disk; and the cold start of the edge script
(intel_compressor_test.py, process start to exit, one text) on fp32 and INC static.

    .venv/bin/pip install -r requirements-bench.txt       # ONNX Runtime, for the comparison
    .venv/bin/python benchmarks/quantization.py --model outputs/<run>/best_model
    .venv/bin/python benchmarks/quantization.py --model outputs/imdb/best_model --test_rows 1000

Variants: fp32 eager (transformers); INC static, dynamic and weight-only (the programs that
intel_compressor.py writes, embedding table in int8 included); torch.ao dynamic int8
(`quantize_dynamic` of the linear layers, eager); ONNX Runtime dynamic int8 (`torch.onnx`
export, `onnxruntime.quantization.quantize_dynamic`), the tool a user would otherwise pick.
All run in this process with the same threads, on the same texts; the speed figures come from
intel_compressor.measure_speed (warm-up, then the variants take turns text by text and round by
round). The test split is the run's own (training_config.json) unless --test_file is given.
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import intel_compressor
from configs import resolve_embedded
from intel_compressor_test import EdgeClassifier, load_classifier, numpy_forward
from utility_functions import compute_metrics, load_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="best_model directory of a training run.")
    parser.add_argument("--test_file", default="", help="Test data (default: the run's test_file).")
    parser.add_argument("--test_rows", type=int, default=0, help="Stratified sample of the test split; 0 = all (default 0).")
    parser.add_argument("--calibration_size", type=int, default=200, help="Calibration texts for INC static (default 200).")
    parser.add_argument("--timing_texts", type=int, default=256, help="Texts per batch-32 throughput round (default 256).")
    parser.add_argument("--latency_texts", type=int, default=50, help="Texts timed one by one at batch 1 (default 50).")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of the throughput figure (default 32).")
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads for every variant (default 2).")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    return parser


def file_size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


def torch_ao_dynamic(source: Path, fp32: EdgeClassifier, scratch: Path) -> tuple[EdgeClassifier, int]:
    """torch.ao's eager dynamic quantization: int8 linear weights, fp32 embeddings."""
    model = torch.ao.quantization.quantize_dynamic(intel_compressor.load_hf_model(source), {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(model.state_dict(), scratch / "torch_ao.pt")

    return dataclasses.replace(fp32, forward=numpy_forward(model), kind="torch.ao"), file_size(scratch / "torch_ao.pt", source / "tokenizer.json")


def onnxruntime_dynamic(source: Path, fp32: EdgeClassifier, scratch: Path, threads: int) -> tuple[EdgeClassifier, int]:
    """ONNX export with dynamic batch and sequence, then ORT's dynamic int8 (embeddings included)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    module = intel_compressor.Logits(intel_compressor.load_hf_model(source)).eval()
    example = intel_compressor.torch_batch(fp32.token_ids(["an example", "a slightly longer example text"]), fp32.pad_token_id)
    fp32_path, int8_path = scratch / "model.onnx", scratch / "model.int8.onnx"
    torch.onnx.export(
        module, example, str(fp32_path), input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamo=True, external_data=False, dynamic_shapes=intel_compressor.dynamic_shapes(fp32.max_length),
    )  # fmt: skip
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's idle threads busy-wait by default, which would steal the cores from the variants timed after it
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])

    def forward(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]

    return dataclasses.replace(fp32, forward=forward, kind="onnxruntime"), file_size(int8_path, source / "tokenizer.json")


def cold_start_seconds(directory: Path, repeats: int, threads: int) -> float:
    """Median wall time of a fresh `python intel_compressor_test.py --model DIR "one text"`, from
    process start to exit, with the file cache warm (the first run is not counted)."""
    command = [sys.executable, str(REPO / "intel_compressor_test.py"), f"--model={directory}", f"--num_threads={threads}", "my card has not arrived yet"]
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    intel_compressor.quiet_inc()
    source = Path(args.model).resolve()
    intel_compressor.check_model_directory(source)
    options = intel_compressor.build_parser().parse_args([f"--model={source}", f"--timing_texts={args.timing_texts}", f"--latency_texts={args.latency_texts}", f"--batch_size={args.batch_size}"])
    config = intel_compressor.run_config(source, options)
    saved_test = json.loads((source / "training_config.json").read_text())["test_file"]
    config = dataclasses.replace(config, test_file=resolve_embedded(args.test_file or saved_test))
    space, train, _, test = load_data(config)
    test = intel_compressor.stratified_sample(test, space.task, args.test_rows, config.seed)
    calibration = intel_compressor.stratified_sample(train, space.task, args.calibration_size, config.seed).texts

    fp32 = load_classifier(source)
    models, sizes, build_seconds, directories = {"fp32 eager": fp32}, {"fp32 eager": intel_compressor.directory_size(source)}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for mode in intel_compressor.MODES:
            variant = intel_compressor.build_variant(source, mode, fp32, calibration, scratch, fp32_layers=[])
            models[f"INC {mode}"], sizes[f"INC {mode}"] = load_classifier(variant.directory), intel_compressor.directory_size(variant.directory)
            build_seconds[f"INC {mode}"] = variant.seconds
            directories[f"INC {mode}"] = variant.directory
        cold_start = {name: cold_start_seconds(path, 5, args.num_threads) for name, path in [("fp32 eager", source), ("INC static", directories["INC static"])]}
        for name, build in [("torch.ao dynamic", lambda: torch_ao_dynamic(source, fp32, scratch)),
                            ("ONNX Runtime dynamic", lambda: onnxruntime_dynamic(source, fp32, scratch, args.num_threads))]:  # fmt: skip
            started = time.perf_counter()
            models[name], sizes[name] = build()
            build_seconds[name] = time.perf_counter() - started
        rows = {}
        for name, model in models.items():
            probs = model.probabilities(test.texts, args.batch_size)
            rows[name] = {**compute_metrics(space.task, probs, test.targets, model.threshold), "size_mb": sizes[name] / 2**20}
        speed = intel_compressor.measure_speed(models, test.texts, options)
    for name, row in rows.items():
        row.update(speed[name])
    metric = "macro_f1"
    print(f"\n{source}: {len(test)} test texts, max_length {fp32.max_length}, {args.num_threads} threads")
    print(intel_compressor.comparison_table(rows, metric))
    throughput = f"throughput_batch{args.batch_size}_texts_per_s"
    base, static, ort = rows["fp32 eager"], rows["INC static"], rows["ONNX Runtime dynamic"]
    ratios = {
        "INC static / fp32 throughput": static[throughput] / base[throughput],
        "INC static / ONNX Runtime batch-1 p50 latency": static["latency_batch1_p50_ms"] / ort["latency_batch1_p50_ms"],
        "INC static - fp32 accuracy (points)": 100 * (static["accuracy"] - base["accuracy"]),
        "INC static / fp32 size": static["size_mb"] / base["size_mb"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print("cold start of intel_compressor_test.py with one text (s, median of 5): " + ", ".join(f"{k} {v:.2f}" for k, v in cold_start.items()))
    result = {
        "model": str(source), "test_rows": len(test), "num_threads": args.num_threads, "rows": rows, "ratios": ratios,
        "cold_start_seconds": cold_start, "build_seconds": build_seconds,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
