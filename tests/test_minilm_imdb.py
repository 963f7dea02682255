"""Fine-tuning the real all-MiniLM-L6-v2 on a slice of IMDB beats the majority class clearly."""

import pandas as pd
import pytest

import manual_classification
from tests.helpers import shared_file


@pytest.mark.slow
def test_minilm_beats_majority_on_held_out_imdb(minilm_path, tmp_path):
    train = pd.read_csv(shared_file("imdb/train.csv.gz")).sample(n=800, random_state=0)
    held_out = pd.read_csv(shared_file("imdb/test.csv.gz")).sample(n=400, random_state=0)
    train.to_csv(tmp_path / "train.csv", index=False)
    held_out.to_csv(tmp_path / "test.csv", index=False)
    result = manual_classification.main(
        [
            f"--model_name_or_path={minilm_path}",
            f"--train_file={tmp_path / 'train.csv'}",
            f"--test_file={tmp_path / 'test.csv'}",
            "--validation_file=",
            "--valid_size=0.15",
            "--max_length=128",
            "--epochs=2",
            "--min_steps=0",  # two epochs, as before the step budget existed
            "--learning_rate=1e-4",
            f"--output_dir={tmp_path / 'outputs'}",
            f"--logging_dir={tmp_path / 'runs'}",
            "--run_name=imdb",
        ]
    )
    majority = held_out["label"].value_counts(normalize=True).max()
    assert result.test["accuracy"] >= majority + 0.2, (result.test, majority)
    assert result.test["f1"] > 0.7
