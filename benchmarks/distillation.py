"""Distilled students against their teacher, all through intel_compressor.py (INC static int8), in one run.

    .venv/bin/python benchmarks/distillation.py --teacher outputs/default/best_model     # BANKING77, ~40 min
    .venv/bin/python benchmarks/distillation.py --data imdb --layers 3                   # trains its teacher
    .venv/bin/python benchmarks/distillation.py --data imdb --layers 3 --student_epochs 6 # students train longer
    .venv/bin/python benchmarks/distillation.py --data imdb --layers 3 --student_epochs 3 --transfer_rows 8000
    .venv/bin/python benchmarks/distillation.py --data nlupp
    .venv/bin/python benchmarks/distillation.py --teacher_model embedded:all-mpnet-base-v2 \
        --student_model embedded:all-MiniLM-L6-v2 --layers 6 3        # 68 min on an Intel Xeon

Rows: the teacher in torch fp32 and INC int8; ONNX Runtime's own `quantize_dynamic` int8 of the
teacher (the outside peer); for each --layers depth, the student distilled from the teacher
(`manual_classification.py --teacher T --student_layers N`, the defaults otherwise) and the same
layer-dropped student fine-tuned on the hard labels alone (`--model_name_or_path T --head_init
checkpoint --student_layers N`: the same start, no teacher), each quantized by intel_compressor.py.
With --student_model S (a stronger teacher of another architecture), the students start from S's own
pretrained layers and a new head (`--teacher T --model_name_or_path S --student_layers N`), and the
hard-label row is S fine-tuned alone (`--model_name_or_path S --student_layers N`).
Columns: test accuracy and macro-F1 (micro-F1 for multi-label) of the int8 model (and the fp32
student's accuracy from its own run), agreement with the teacher fp32's predictions, batch-1 p50/p95,
batch-32 texts/s, size on disk, and the training command's wall time. Speed comes from
intel_compressor.measure_speed over all models on the same test texts.

--data: banking77 (the embedded default data; the full test file), imdb (1,000 training reviews per
label sampled with random_state 0, test 500 per label, max_length 256, 2 epochs: the quantization
benchmark's IMDB model), nlupp (NLU++ banking, multi-label, split by split_csv_script.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import intel_compressor
import manual_classification
from benchmarks.quantization import PEER, target_lines
from benchmarks.small_data import protocol_args
from configs import resolve_embedded
from data_functions import load_data
from intel_compressor_test import HelpFormatter, cpu_description, load_classifier
from utility_functions import compute_metrics

SHARED = REPO.parent / "shared" / "data"
TEACHER_FP32, TEACHER_INT8 = "teacher, torch fp32", "teacher, INC int8"
QUIET_QUANTIZATION = ["--timing_texts=32", "--latency_texts=5"]  # its own speed table is not used here


def transfer_file(data: str, rows: int, directory: Path) -> Path:
    """`rows` unlabelled texts (random_state 0) for the distilled students' --transfer_file: imdb, IMDB
    training reviews outside the preset's labelled 2,000; nlupp, BANKING77 questions (the same banking
    domain, another dataset); banking77, NLU++ banking texts. A text found in the preset's own data is
    left out."""
    if data == "imdb":
        frame = pd.read_csv(SHARED / "imdb" / "train.csv.gz")
        pool = frame.drop(index=frame.groupby("label").sample(1000, random_state=0).index)
    else:
        banking77 = pd.concat([pd.read_csv(SHARED / "banking77" / f"{split}.csv") for split in ("train", "test")])
        nlupp = pd.read_csv(SHARED / "nlupp" / "banking.csv")
        pool, own = (banking77, nlupp) if data == "nlupp" else (nlupp, banking77)
        pool = pool[~pool["text"].str.lower().str.strip().isin(set(own["text"].str.lower().str.strip()))]
    if rows > len(pool):
        raise SystemExit(f"error: --transfer_rows {rows}: --data {data} has {len(pool)} texts to spare")
    path = directory / f"{data}-transfer.csv"
    pool.sample(rows, random_state=0)[["text"]].to_csv(path, index=False)
    return path


def data_args(name: str, directory: Path) -> list[str]:
    """Training options of a --data preset (data files, and what its teacher was trained with)."""
    if name == "banking77":
        return protocol_args("banking77_full", directory)
    if name == "nlupp":
        return protocol_args("nlupp", directory)
    if name == "imdb":
        paths = {}
        for split, per_label in (("train", 1000), ("test", 500)):
            frame = pd.read_csv(SHARED / "imdb" / f"{split}.csv.gz")
            paths[split] = directory / f"imdb-{split}.csv"
            frame.groupby("label").sample(per_label, random_state=0).to_csv(paths[split], index=False)
        return [f"--train_file={paths['train']}", f"--test_file={paths['test']}", "--max_length=256", "--epochs=2"]
    raise SystemExit(f"error: --data: unknown preset {name!r}; known: banking77, imdb, nlupp")


def train(args: list[str], directory: Path, name: str) -> tuple[Path, dict, float]:
    """One manual_classification.py run: its best_model/, its test metrics and its wall time."""
    started = time.perf_counter()
    result = manual_classification.main([*args, f"--output_dir={directory}", f"--logging_dir={directory / 'runs'}",
                                         f"--run_name={name}"])  # fmt: skip
    return result.run_dir / "best_model", result.test, time.perf_counter() - started


def quantized(best_model: Path) -> Path:
    intel_compressor.main([f"--model={best_model}", "--mode=static", *QUIET_QUANTIZATION])
    return best_model.with_name("best_model-int8")


def encoder_depth(model: str) -> int:
    """The encoder layers of a model named as --model_name_or_path takes it (embedded: names too)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_embedded(model), local_files_only=True).num_hidden_layers


def teacher_peer(teacher: Path, scratch: Path, threads: int):
    """ONNX Runtime's quantize_dynamic int8 of the teacher's plain export, and its size."""
    fp32 = load_classifier(teacher)
    model_config = intel_compressor.check_model_directory(teacher)
    exports = intel_compressor.export_graphs(teacher, fp32, model_config, scratch)
    return intel_compressor.onnxruntime_peers(exports, fp32, teacher, scratch, threads)[PEER]


def distillation_targets(
    rows: dict[str, dict], data: str, metric: str, layers: list[int], throughput: str, student_depth: int
) -> list:
    """The issue's targets, as (name, value, op, bound) for target_lines. student_depth: the layers of
    --student_model (0: the students are cut from the teacher)."""
    teacher, teacher_int8, peer = rows[TEACHER_FP32], rows[TEACHER_INT8], rows[PEER]
    checks = []
    for depth in layers:
        student, hard = rows[f"{depth}-layer distilled, INC int8"], rows[f"{depth}-layer hard labels, INC int8"]
        checks.append((f"{depth} layers: distilled - hard-label {metric} (points)",
                       100 * (student[metric] - hard[metric]), ">=", 1.0))  # fmt: skip
    if student_depth:  # a stronger teacher: its full-depth student against the student model trained alone
        if student_depth in layers:
            student = rows[f"{student_depth}-layer distilled, INC int8"]
            alone = rows[f"{student_depth}-layer hard labels, INC int8"]
            checks += [
                (f"{student_depth} layers: distilled - the student model alone, accuracy (points)",
                 100 * (student["accuracy"] - alone["accuracy"]), ">=", 0.5),
                (f"{student_depth} layers: distilled / alone, batch-32 texts/s",
                 student[throughput] / alone[throughput], ">=", 0.9),
            ]  # fmt: skip
        return checks
    if 3 not in layers:
        return checks
    three = rows["3-layer distilled, INC int8"]
    speedup = three[throughput] / teacher_int8[throughput]
    if data == "banking77":
        checks += [
            ("3 layers int8: accuracy - teacher fp32 (points)", 100 * (three["accuracy"] - teacher["accuracy"]),
             ">=", -1.0),
            ("3 layers int8: batch-1 p50 / teacher int8", three["p50"] / teacher_int8["p50"], "<=", 0.6),
            ("3 layers int8: batch-1 p50 / peer", three["p50"] / peer["p50"], "<=", 0.5),
            ("3 layers int8: batch-32 texts/s / teacher int8", speedup, ">=", 1.7),
        ]  # fmt: skip
    elif data == "imdb":
        checks += [
            ("3 layers int8: accuracy - teacher fp32 (points)", 100 * (three["accuracy"] - teacher["accuracy"]),
             ">=", -1.5),
            ("3 layers int8: batch-32 texts/s / teacher int8", speedup, ">=", 1.8),
        ]  # fmt: skip
    else:
        checks.append(("3 layers int8: micro-F1 - teacher fp32 (points)",
                       100 * (three["micro_f1"] - teacher["micro_f1"]), ">=", -2.0))  # fmt: skip
    return checks


def table(rows: dict[str, dict], metric: str, throughput: str) -> str:
    columns = [("test accuracy", "accuracy", "{:.4f}"), (f"test {metric.replace('_', '-')}", metric, "{:.4f}"),
               ("fp32 accuracy", "fp32_accuracy", "{:.4f}"), ("agreement with teacher", "agreement", "{:.4f}"),
               ("batch-1 p50 ms", "p50", "{:.2f}"), ("batch-1 p95 ms", "p95", "{:.2f}"),
               ("batch-32 texts/s", throughput, "{:,.1f}"), ("MiB on disk", "size_mb", "{:.1f}"),
               ("training s", "train_seconds", "{:,.0f}")]  # fmt: skip
    lines = ["| variant | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="banking77", help="banking77, imdb or nlupp (see above).")
    parser.add_argument("--teacher", default="", help="Teacher best_model/; empty: trained here (defaults).")
    parser.add_argument(
        "--teacher_model", default="", help="The model a teacher trained here starts from; empty: the default."
    )
    parser.add_argument(
        "--student_model", default="", help="The model the students start from; empty: cut from the teacher."
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 2], help="Student depths.")
    parser.add_argument(
        "--student_epochs", type=int, default=0, help="Epochs of every student run; 0: as the teacher's."
    )
    parser.add_argument(
        "--transfer_rows",
        type=int,
        default=0,
        help="Unlabelled texts the distilled students also learn from (--transfer_file; imdb: other training "
        "reviews, nlupp: BANKING77's questions, banking77: NLU++'s texts); 0: none.",
    )
    parser.add_argument("--work_dir", default="", help="Where the runs go; empty: a temporary directory.")
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads for the speed figures.")
    parser.add_argument("--timing_texts", type=int, default=1000, help="Test texts per batch-32 throughput round.")
    parser.add_argument("--latency_texts", type=int, default=100, help="Test texts timed one by one per round.")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.teacher and args.teacher_model:
        parser.error("--teacher_model: only for a teacher trained here (drop --teacher)")
    if args.student_epochs < 0:
        parser.error(f"--student_epochs: {args.student_epochs} is negative")
    if args.transfer_rows < 0:
        parser.error(f"--transfer_rows: {args.transfer_rows} is negative")
    student_depth = encoder_depth(args.student_model) if args.student_model else 0
    intel_compressor.quiet_inc()
    directory = Path(args.work_dir or tempfile.mkdtemp(prefix="distillation-")).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = data_args(args.data, directory)
    transfer = (
        [f"--transfer_file={transfer_file(args.data, args.transfer_rows, directory)}"] if args.transfer_rows else []
    )

    runs: dict[str, dict] = {}
    if args.teacher:
        teacher = Path(args.teacher).resolve()
        teacher_test = json.loads((teacher.parent / "test_metrics.json").read_text())
        runs[TEACHER_FP32] = {"fp32_accuracy": teacher_test["accuracy"], "train_seconds": None}
    else:
        start = [f"--model_name_or_path={args.teacher_model}"] if args.teacher_model else []
        teacher, teacher_test, seconds = train([*data, *start], directory, "teacher")
        runs[TEACHER_FP32] = {"fp32_accuracy": teacher_test["accuracy"], "train_seconds": seconds}
    models = {TEACHER_FP32: teacher, TEACHER_INT8: quantized(teacher)}
    for depth in args.layers:
        cut = [f"--student_layers={depth}", *([f"--epochs={args.student_epochs}"] if args.student_epochs else [])]
        if args.student_model:
            start = [f"--model_name_or_path={args.student_model}", *cut]
            recipes = {
                f"{depth}-layer distilled": [f"--teacher={teacher}", *transfer, *start],
                f"{depth}-layer hard labels": start,
            }
        else:
            recipes = {
                f"{depth}-layer distilled": [f"--teacher={teacher}", *transfer, *cut],
                f"{depth}-layer hard labels": [f"--model_name_or_path={teacher}", "--head_init=checkpoint", *cut],
            }
        for name, recipe in recipes.items():
            best, test, seconds = train([*data, *recipe], directory, name.replace(" ", "-"))
            models[f"{name}, INC int8"] = quantized(best)
            runs[f"{name}, INC int8"] = {"fp32_accuracy": test["accuracy"], "train_seconds": seconds}

    torch.set_num_threads(args.num_threads)
    options = intel_compressor.build_parser().parse_args(
        [f"--model={teacher}", f"--timing_texts={args.timing_texts}", f"--latency_texts={args.latency_texts}"]
    )
    saved_test = json.loads((teacher / "training_config.json").read_text())["test_file"]
    config = dataclasses.replace(intel_compressor.run_config(teacher, options), test_file=saved_test)
    space, _, _, test = load_data(config)
    metric = "micro_f1" if space.task == "multilabel" else "macro_f1"
    classifiers = {name: load_classifier(path, args.num_threads) for name, path in models.items()}
    sizes = {name: intel_compressor.directory_size(path) for name, path in models.items()}
    with tempfile.TemporaryDirectory() as scratch:
        classifiers[PEER], sizes[PEER] = teacher_peer(teacher, Path(scratch), args.num_threads)
        probs = {name: model.probabilities(test.texts, 32) for name, model in classifiers.items()}
        speed = intel_compressor.measure_speed(classifiers, test.texts, options)
    reference = classifiers[TEACHER_FP32]
    throughput = "throughput_batch32_texts_per_s"
    rows = {}
    for name in [TEACHER_FP32, PEER, TEACHER_INT8, *[n for n in models if n not in (TEACHER_FP32, TEACHER_INT8)]]:
        figures = speed[name]
        rows[name] = {
            **compute_metrics(space.task, probs[name], test.targets, reference.threshold),
            "agreement": intel_compressor.agreement(reference, probs[TEACHER_FP32], probs[name]),
            "p50": figures["latency_batch1_p50_ms"],
            "p95": figures["latency_batch1_p95_ms"],
            throughput: figures[throughput],
            "size_mb": sizes[name] / 2**20,
            **runs.get(name, {}),
        }
    print(f"\n{args.data}: teacher {teacher}, {len(test)} test texts, {args.num_threads} threads")
    if args.transfer_rows:
        print(f"the distilled students also learnt from {args.transfer_rows} unlabelled transfer texts")
    print(f"CPU: {cpu_description()}")
    print(table(rows, metric, throughput))
    checks = target_lines(distillation_targets(rows, args.data, metric, args.layers, throughput, student_depth))
    print("\n".join(checks))
    result = {"data": args.data, "teacher": str(teacher), "cpu": cpu_description(), "rows": rows, "targets": checks}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
