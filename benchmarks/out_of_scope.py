"""Out-of-scope detection and calibration on BANKING77 with a quarter of its intents held out.

    .venv/bin/python benchmarks/out_of_scope.py            # ~10 minutes on 2 cores

A seeded 25% of the 77 intents (19) is removed from training and validation; manual_classification.py
trains on the rest with its defaults (which fit the temperature and the out-of-scope threshold on its
validation split). On the test split, the held-out intents' texts are the out-of-scope set and the
others the in-scope set. Reported for the energy score (what the scripts write as ood_score) and the
maximum softmax probability baseline (MSP, Hendrycks & Gimpel 2017, on the logits before temperature):
AUROC (out-of-scope as positive), FPR at 95% in-scope recall (share of out-of-scope texts kept when
95% of in-scope test texts are kept), and what the stored threshold does on test; then in-scope
accuracy and ECE (15 bins) before and after the temperature, on the in-scope test texts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import manual_classification
from intel_compressor_test import cpu_description, load_classifier, ood_scores, softmax
from utility_functions import expected_calibration_error

SHARED = REPO.parent / "shared" / "data" / "banking77"


def fpr_at_recall(in_scores: np.ndarray, out_scores: np.ndarray, recall: float = 0.95) -> float:
    """Share of out-of-scope texts kept when the threshold keeps `recall` of the in-scope ones."""
    return float(np.mean(out_scores <= np.quantile(in_scores, recall)))


def detection(
    name: str, in_scores: np.ndarray, out_scores: np.ndarray, threshold: float | None
) -> dict[str, float | str]:
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    row: dict[str, float | str] = {
        "score": name,
        "AUROC": roc_auc_score(labels, np.r_[in_scores, out_scores]),
        "FPR at 95% in-scope recall": fpr_at_recall(in_scores, out_scores),
    }
    if threshold is not None:
        row["stored threshold: in-scope kept"] = float(np.mean(in_scores <= threshold))
        row["stored threshold: out-of-scope flagged"] = float(np.mean(out_scores > threshold))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held_out", type=float, default=0.25, help="Share of intents held out of training.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train_args", default="", help="Extra options for manual_classification.py.")
    args = parser.parse_args()
    print(cpu_description())

    train, test = pd.read_csv(SHARED / "train.csv"), pd.read_csv(SHARED / "test.csv")
    intents = sorted(train["label"].unique())
    held_out = set(np.random.default_rng(args.seed).choice(intents, round(len(intents) * args.held_out), replace=False))
    directory = Path(tempfile.mkdtemp(prefix="out-of-scope-"))
    train[~train["label"].isin(held_out)].to_csv(directory / "train.csv", index=False)
    print(
        f"BANKING77: {len(held_out)} of {len(intents)} intents held out (seed {args.seed}); "
        f"training on {int((~train['label'].isin(held_out)).sum())} rows"
    )

    result = manual_classification.main([
        f"--train_file={directory / 'train.csv'}", "--validation_file=", "--test_file=",
        f"--output_dir={directory / 'outputs'}", f"--logging_dir={directory / 'runs'}", "--run_name=in_scope",
        *args.train_args.split(),
    ])  # fmt: skip
    best = result["run_dir"] / "best_model"
    model = load_classifier(best)
    logits = model.text_logits(test["text"].tolist())  # served: calibrated (divided by the temperature)
    out = test["label"].isin(held_out).to_numpy()
    raw = logits * model.temperature
    energy = ood_scores(logits, multilabel=False, temperature=model.temperature)
    msp = -softmax(raw).max(axis=1)
    rows = [
        detection("energy (ood_score)", energy[~out], energy[out], model.ood_threshold),
        detection("MSP", msp[~out], msp[out], None),
    ]

    targets = np.array([model.labels.index(label) for label in test.loc[~out, "label"]])
    calibrated, uncalibrated = softmax(logits[~out]), softmax(raw[~out])
    summary = {
        "in-scope test texts": int((~out).sum()),
        "out-of-scope test texts": int(out.sum()),
        "in-scope accuracy": float((calibrated.argmax(axis=1) == targets).mean()),
        "temperature": model.temperature,
        "ECE before temperature (in-scope test)": expected_calibration_error(uncalibrated, targets),
        "ECE after temperature (in-scope test)": expected_calibration_error(calibrated, targets),
        "validation calibration": json.loads((result["run_dir"] / "metrics.json").read_text())["calibration"],
    }

    print(f"\n{cpu_description()}\n")
    columns = [c for c in rows[0] if c != "score"]
    print("| score | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for row in rows:
        print(f"| {row['score']} | " + " | ".join(f"{row[c]:.4f}" if c in row else "" for c in columns) + " |")
    print()
    for name, value in summary.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    energy_auroc, msp_auroc = rows[0]["AUROC"], rows[1]["AUROC"]
    print(
        f"\ntargets: energy AUROC {energy_auroc:.4f} >= MSP "
        f"{msp_auroc:.4f} + 0.02: {energy_auroc >= msp_auroc + 0.02}; "
        f">= 0.90: {energy_auroc >= 0.90}; ECE after <= 0.03: "
        f"{summary['ECE after temperature (in-scope test)'] <= 0.03}"
    )


if __name__ == "__main__":
    main()
