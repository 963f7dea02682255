"""Split one labelled table into train and test files, stratified by label and seeded.

    python split_csv_script.py data.csv --test_size 0.2
    python split_csv_script.py nlu.csv --label_column labels --label_delimiter ";"   # multi-label

Writes <stem>_train.csv and <stem>_test.csv beside the input (or in --output_dir) with the
input's columns, rows in their original order. Every class keeps about --test_size of its rows
on the test side and at least one on each side; a class with a single row cannot be split and
is refused. Multi-label rows are stratified by their rarest label, which spreads rare labels
over both files, and every label of the test file also appears in the train file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from configs import TASKS, Config
from data_functions import (
    LabelSpace,
    detect_label_space,
    encode_targets,
    hard_label_sets,
    held_out_count,
    read_table,
    stratify_keys,
    take_per_group,
    write_csv,
)
from intel_compressor_test import DataError, HelpFormatter, run_cli


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()  # the options shared with the training scripts mean the same and default alike
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("input", help="Table to split: .csv, .tsv, .csv.gz or .parquet.")
    parser.add_argument(
        "--test_size", "--test-size", type=float, default=0.2, help="Fraction of each class for the test file."
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Random seed.")
    parser.add_argument(
        "--label_column", default=defaults.label_column, help="Label column, or comma-separated soft-label columns."
    )
    parser.add_argument(
        "--label_delimiter", default=defaults.label_delimiter, help="Separator of labels in one multi-label cell."
    )
    parser.add_argument(
        "--task",
        default=defaults.task,
        choices=TASKS,
        help="Task; auto detects it.",
    )
    parser.add_argument("--output_dir", default="", help="Where to write the two files; empty: beside the input.")
    return parser


def class_counts(targets: np.ndarray, space: LabelSpace) -> Counter:
    return Counter(label for labels in hard_label_sets(targets, space) for label in labels)


def refuse_unsplittable(counts: Counter, path: str) -> None:
    rare = sorted(label for label, n in counts.items() if n < 2)
    if rare:
        shown = ", ".join(repr(label) for label in rare[:5]) + (" ..." if len(rare) > 5 else "")
        raise DataError(f"{path}: {len(rare)} class(es) have a single row and cannot be split: {shown}")


def split_indices(targets: np.ndarray, task: str, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    test = take_per_group(stratify_keys(targets, task), held_out_count(test_size), seed)
    if task == "multilabel":
        test = test[~orphan_rows(targets, test)]
    return np.setdiff1d(np.arange(len(targets)), test), test


def orphan_rows(targets: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Mask over `test`: rows holding a label that no training row has. Training would refuse
    such a test file, so these rows go to the training side."""
    in_train = np.ones(len(targets), dtype=bool)
    in_train[test] = False
    train_has = (targets[in_train] >= 0.5).any(axis=0)
    return ((targets[test] >= 0.5) & ~train_has).any(axis=1)


def print_distribution(name: str, counts: Counter, rows: int) -> None:
    print(f"{name}: {rows} rows")
    for label, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {n:6d}  {label}")


def output_paths(input_path: Path, output_dir: str) -> tuple[Path, Path]:
    stem = input_path.name.split(".")[0]
    directory = Path(output_dir) if output_dir else input_path.parent
    return directory / f"{stem}_train.csv", directory / f"{stem}_test.csv"


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    if not 0 < args.test_size < 1:
        raise DataError(f"--test_size must be between 0 and 1, got {args.test_size}")
    config = dataclasses.replace(
        Config(), label_column=args.label_column, label_delimiter=args.label_delimiter, task=args.task
    )
    frame = read_table(args.input)
    space = detect_label_space(frame, args.input, config)
    targets = encode_targets(frame, args.input, config, space)
    refuse_unsplittable(class_counts(targets, space), args.input)

    train_rows, test_rows = split_indices(targets, space.task, args.test_size, args.seed)
    train_path, test_path = output_paths(Path(args.input), args.output_dir)
    write_csv(train_path, frame.iloc[train_rows])
    write_csv(test_path, frame.iloc[test_rows])

    print(f"task {space.task}, {space.num_labels} labels, seed {args.seed}, test size {args.test_size}")
    print_distribution(f"train {train_path}", class_counts(targets[train_rows], space), len(train_rows))
    print_distribution(f"test {test_path}", class_counts(targets[test_rows], space), len(test_rows))
    return train_path, test_path


if __name__ == "__main__":
    sys.exit(run_cli(main))
