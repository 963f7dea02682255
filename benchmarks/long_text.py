"""Long texts on IMDB: --long_text truncate, head_tail and windows, side by side.

    .venv/bin/python benchmarks/long_text.py                                   # 4,000 reviews, 2 epochs
    .venv/bin/python benchmarks/long_text.py --train_rows 1000 --epochs 1      # what fits in half an hour

42% of IMDB reviews are longer than 256 tokens. Each strategy fine-tunes all-MiniLM-L6-v2 with
manual_classification.py at max_length 256 on the same stratified sample of the training split
(seeded; the script holds 10% out for validation), for the same number of epochs, and is scored
here on the same stratified sample of the test split (default 5,000 reviews) with the edge runner's
fp32 path (the code that serves the model). Reported: test accuracy, inference texts/s at batch 32
and model inputs (windows) per text, training time. The windows model is also scored with its
window logits combined by max instead of the mean, and by its first window alone (= truncation at
inference), from the same forward passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import manual_classification
from data_functions import take_per_group
from intel_compressor_test import HelpFormatter, aggregate_windows, cpu_description, load_classifier

SHARED = REPO.parent / "shared" / "data" / "imdb"
STRATEGIES = {
    "truncate": ["--long_text=truncate"],
    "head_tail": ["--long_text=head_tail"],
    "windows": ["--long_text=windows"],
    "windows_train1": ["--long_text=windows", "--train_windows=1"],  # one seeded window per training text
}


def stratified_sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    keys = frame["label"].to_numpy()
    share = rows / len(frame)
    return frame.iloc[np.sort(take_per_group(keys, lambda n: round(n * share), seed))]


def score(best_model: Path, test: pd.DataFrame, batch_size: int) -> dict[str, float]:
    """Test accuracy (and the other aggregations of the same window logits), texts/s, inputs per text."""
    classifier = load_classifier(best_model)
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    started = time.perf_counter()
    logits, owners = classifier.input_logits(texts, batch_size)
    seconds = time.perf_counter() - started
    names = np.array(classifier.labels)

    def accuracy(combined: np.ndarray) -> float:
        return float((names[combined.argmax(axis=1)] == labels).mean())

    first = np.unique(owners, return_index=True)[1]
    return {
        "accuracy": accuracy(aggregate_windows(logits, owners, len(texts), classifier.long_text.aggregation)),
        "accuracy, max of windows": accuracy(aggregate_windows(logits, owners, len(texts), "max")),
        "accuracy, first window": accuracy(logits[first]),
        "texts/s": len(texts) / seconds,
        "inputs per text": len(owners) / len(texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--train_rows", type=int, default=4000, help="Training reviews (stratified sample).")
    parser.add_argument("--test_rows", type=int, default=5000, help="Test reviews (stratified sample).")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of every strategy.")
    parser.add_argument("--max_length", type=int, default=256, help="Tokens per model input.")
    parser.add_argument(
        "--strategies",
        default="truncate,head_tail,windows",
        help=f"Comma-separated, from: {', '.join(STRATEGIES)}.",
    )
    parser.add_argument("--num_threads", type=int, default=0, help="torch threads; 0: one per core.")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(sorted(unknown))}")
    print(cpu_description())

    directory = Path(tempfile.mkdtemp(prefix="long-text-"))
    train = stratified_sample(pd.read_csv(SHARED / "train.csv.gz"), args.train_rows, seed=42)
    test = stratified_sample(pd.read_csv(SHARED / "test.csv.gz"), args.test_rows, seed=42)
    train[["text", "label"]].to_csv(directory / "train.csv", index=False)
    print(
        f"IMDB: {len(train)} training reviews, {len(test)} test "
        f"reviews, max_length {args.max_length}, {args.epochs} epochs"
    )

    rows = {}
    for name in strategies:
        result = manual_classification.main([
            f"--train_file={directory / 'train.csv'}", "--validation_file=", "--test_file=",
            f"--max_length={args.max_length}", f"--epochs={args.epochs}", "--min_steps=0",
            f"--num_threads={args.num_threads}", f"--output_dir={directory / 'outputs'}",
            f"--logging_dir={directory / 'runs'}", f"--run_name={name}",
            *STRATEGIES[name],
        ])  # fmt: skip
        rows[name] = {**score(result.run_dir / "best_model", test, 32), "train s": result.train_seconds}
        print(f"{name}: {rows[name]}", flush=True)

    columns = list(next(iter(rows.values())))
    print(f"\n{cpu_description()}\n")
    print("| strategy | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(
            f"| {name} | " + " | ".join(f"{row[c]:.4f}" if "accuracy" in c else f"{row[c]:.1f}" for c in columns) + " |"
        )
    if "truncate" in rows:
        best = max(rows, key=lambda n: rows[n]["accuracy"])
        gain = 100 * (rows[best]["accuracy"] - rows["truncate"]["accuracy"])
        print(
            f"\nbest: {best}, {gain:+.2f} points over truncate (target >= +1.5); best accuracy "
            f"{rows[best]['accuracy']:.4f} (target >= 0.91)"
        )


if __name__ == "__main__":
    main()
