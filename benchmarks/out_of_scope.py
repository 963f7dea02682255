"""Out-of-scope detection and calibration on BANKING77 with a quarter of its intents held out.

    .venv/bin/python benchmarks/out_of_scope.py            # ~10 minutes on 2 cores

A seeded 25% of the 77 intents (19) is removed from training and validation; manual_classification.py
trains on the rest with its defaults (which fit the temperature and the out-of-scope threshold on its
validation split). On the test split, the held-out intents' texts are the out-of-scope set and the
others the in-scope set. Reported for the energy score (what the scripts write as ood_score), the
maximum softmax probability baseline (MSP, Hendrycks & Gimpel 2017, on the logits before temperature),
and three scores on what the classification layer reads (the pooled features): the Mahalanobis
distance to the nearest class (Lee et al. 2018; class means and one shared covariance from the run's
training rows), the relative Mahalanobis distance (Ren et al. 2021: minus the distance to one
Gaussian of all training rows, meant for near out-of-scope texts), and that plus MSP, each standardised
on the run's validation texts (in scope) and added with equal weights. Then
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
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import manual_classification
from configs import Config
from data_functions import LabeledData, load_data
from intel_compressor_test import HelpFormatter, cpu_description, load_classifier, ood_scores, softmax
from utility_functions import (
    PaddingCollator,
    classifier_features,
    encode,
    expected_calibration_error,
    load_tokenizer,
    long_text_of,
)

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


def precision_matrix(centred: np.ndarray) -> np.ndarray:
    return np.linalg.pinv(centred.T @ centred / len(centred))


def squared_distances(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(rows, len(means)): the squared Mahalanobis distance of every row to every mean."""
    return np.stack([np.einsum("ij,jk,ik->i", features - m, precision, features - m) for m in means], axis=1)


def mahalanobis_scores(
    best: Path, config: Config, train: LabeledData, texts: dict[str, list[str]]
) -> dict[str, dict[str, np.ndarray]]:
    """The Mahalanobis and relative Mahalanobis scores of each list of texts (higher: more
    unusual), from the features the best model's classification layer reads; the Gaussians are
    fitted on the run's training rows `train`."""
    tokenizer = load_tokenizer(str(best))
    model = AutoModelForSequenceClassification.from_pretrained(best, local_files_only=True)
    collator, long_text = PaddingCollator(tokenizer.pad_token_id), long_text_of(config)

    def features(data: LabeledData) -> np.ndarray:
        dataset = encode(tokenizer, data, long_text)  # a text's windows, if any, averaged
        return dataset.combine(classifier_features(model, dataset, collator, 64, torch.device("cpu")).double().numpy())

    x = features(train)
    classes = np.unique(train.targets)
    means = np.stack([x[train.targets == c].mean(axis=0) for c in classes])
    within = precision_matrix(x - means[np.searchsorted(classes, train.targets)])
    overall = x.mean(axis=0, keepdims=True)
    background = precision_matrix(x - overall)
    scores = {}
    for name, split in texts.items():
        f = features(LabeledData(name, split, np.zeros(len(split), dtype=np.int64)))
        to_classes = squared_distances(f, means, within)
        relative = to_classes - squared_distances(f, overall, background)
        scores[name] = {"mahalanobis": to_classes.min(axis=1), "relative": relative.min(axis=1)}
    return scores


def standardised_on(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return (scores - reference.mean()) / reference.std()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    best = result.run_dir / "best_model"
    model = load_classifier(best)
    logits = model.text_logits(test["text"].tolist())  # served: calibrated (divided by the temperature)
    out = test["label"].isin(held_out).to_numpy()
    raw = logits * model.temperature
    energy = ood_scores(logits, multilabel=False, temperature=model.temperature)
    msp = -softmax(raw).max(axis=1)
    config = Config(**json.loads((best / "training_config.json").read_text()))
    _, train_rows, valid, _ = load_data(config)  # the rows the run trained and validated on
    valid_texts = valid.texts
    features = mahalanobis_scores(best, config, train_rows, {"test": test["text"].tolist(), "validation": valid_texts})
    valid_msp = -softmax(model.text_logits(valid_texts) * model.temperature).max(axis=1)
    mahalanobis, relative = features["test"]["mahalanobis"], features["test"]["relative"]
    combined = standardised_on(features["validation"]["relative"], relative) + standardised_on(valid_msp, msp)
    rows = [
        detection("energy (ood_score)", energy[~out], energy[out], model.ood_threshold),
        detection("MSP", msp[~out], msp[out], None),
        detection("Mahalanobis", mahalanobis[~out], mahalanobis[out], None),
        detection("relative Mahalanobis", relative[~out], relative[out], None),
        detection("relative Mahalanobis + MSP", combined[~out], combined[out], None),
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
        "validation calibration": json.loads((result.run_dir / "metrics.json").read_text())["calibration"],
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
