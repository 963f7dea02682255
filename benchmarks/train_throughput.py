"""Training throughput, side by side in one run: the hand-written loop, the Trainer variant, and
the hand-written loop with every batch padded to max_length (the naive approach).

    .venv/bin/python benchmarks/train_throughput.py                      # IMDB, max_length 256
    .venv/bin/python benchmarks/train_throughput.py --dataset banking77 --max_length 128 --rows 1024
    .venv/bin/python benchmarks/train_throughput.py --nproc 2    # 1 process x 2 threads against torchrun's 2 x 1

Each variant trains all-MiniLM-L6-v2 for one epoch on the same rows (nothing frozen, so every
step does the full backward pass); the variants take turns for --rounds rounds and the median is
reported. Timed: the training steps only (data loading, forward, backward, optimizer), from the
start to the end of the epoch, without the validation pass and checkpoint writes that follow.
With --nproc N only two variants run: the manual loop in one process with --num_threads threads,
and under `torchrun --nproc_per_node=N` with one thread a process; both timed by the training time
the loop reports (its steps plus the short validation and checkpoint writes), since the steps of a
torchrun run are timed in other processes. Data comes from ../shared/data.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pandas as pd
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import manual_classification
import trainer_classification
from configs import resolve_embedded
from intel_compressor_test import HelpFormatter, cpu_description


class EpochTimer(TrainerCallback):
    """Seconds from Trainer's epoch start to its epoch end (evaluation and saving come after)."""

    def __init__(self):
        self.seconds = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self.started


# What the manual loop does besides training steps between its start and end (validation, the best
# model's and the resumable state's writes, metrics.json); timed by wrapping, and subtracted.
NOT_TRAINING = ("validate", "save_model_directory", "save_training_state", "write_run_metrics")


def run_manual(argv: list[str]) -> float:
    spent = [0.0]

    def timed(function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return call

    with contextlib.ExitStack() as stack:
        for name in NOT_TRAINING:
            real = getattr(manual_classification, name)
            stack.enter_context(mock.patch.object(manual_classification, name, timed(real)))
        result = manual_classification.main(argv)
    return result.train_seconds - spent[0]


def run_trainer(argv: list[str]) -> float:
    timer = EpochTimer()
    trainer_classification.main(argv, callbacks=[timer])
    return timer.seconds


def run_manual_wall(argv: list[str]) -> float:
    return manual_classification.main(argv).train_seconds


def run_torchrun(argv: list[str], nproc: int) -> float:
    """The manual loop under torchrun, nproc processes of one thread each; its reported training time."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "manual_classification.py"), *argv, "--num_threads=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(re.search(r"training took ([\d.]+)s", out).group(1))


DATA = {
    "imdb": ("imdb/train.csv.gz", "imdb/test.csv.gz"),
    "banking77": ("banking77/train.csv", "banking77/test.csv"),
}
VARIANTS = {
    "manual loop (dynamic padding, length-grouped)": (run_manual, []),
    "Trainer (dynamic padding, group_by_length)": (run_trainer, []),
    "manual loop, padded to max_length (naive)": (run_manual, ["--pad_to_max_length=true", "--group_by_length=false"]),
}


def write_slices(dataset: str, rows: int, seed: int, directory: Path) -> tuple[Path, Path]:
    train_name, test_name = DATA[dataset]
    shared = REPO.parent / "shared" / "data"
    train = pd.read_csv(shared / train_name).sample(n=rows, random_state=seed)
    valid = pd.read_csv(shared / test_name)
    valid = valid[valid["label"].isin(train["label"].unique())].sample(n=32, random_state=seed)
    paths = directory / "train.csv", directory / "valid.csv"
    train.to_csv(paths[0], index=False)
    valid.to_csv(paths[1], index=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATA), default="imdb")
    parser.add_argument("--rows", type=int, default=256, help="training rows per epoch")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=0, help="compare 1 process with torchrun's N processes (0: off)")
    args = parser.parse_args()
    variants = VARIANTS
    if args.nproc > 1:
        variants = {
            f"manual loop, 1 process x {args.num_threads} threads": (run_manual_wall, []),
            f"manual loop, {args.nproc} processes x 1 thread (torchrun)": (
                lambda argv: run_torchrun(argv, args.nproc),
                [],
            ),
        }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, valid = write_slices(args.dataset, args.rows, 0, tmp)
        common = [
            f"--model_name_or_path={resolve_embedded('embedded:all-MiniLM-L6-v2')}",
            f"--train_file={train}",
            f"--validation_file={valid}",
            "--test_file=",
            f"--max_length={args.max_length}",
            f"--batch_size={args.batch_size}",
            "--epochs=1",
            "--min_steps=0",
            "--freeze_epochs=0",
            f"--num_threads={args.num_threads}",
            f"--output_dir={tmp / 'outputs'}",
            f"--logging_dir={tmp / 'runs'}",
            "--save_total_limit=1",
        ]
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for i, (name, (run, extra)) in enumerate(variants.items()):
                seconds[name].append(run([*common, *extra, f"--run_name=r{round_}-v{i}"]))

    print(f"\nCPU: {cpu_description()}")
    print(
        f"{args.dataset}: {args.rows} rows, max_length {args.max_length}, batch {args.batch_size}, "
        f"{args.num_threads} threads, median of {args.rounds} interleaved rounds"
    )
    manual = args.rows / statistics.median(seconds[next(iter(variants))])
    print("| variant | examples/s | manual loop / variant |\n|---|---|---|")
    for name, values in seconds.items():
        rate = args.rows / statistics.median(values)
        print(f"| {name} | {rate:.1f} | {manual / rate:.2f}x |")


if __name__ == "__main__":
    main()
