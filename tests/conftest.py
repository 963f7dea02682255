"""Shared fixtures: a tiny BERT, slices of real data, runs that several test modules read.
Helpers (functions, constants) are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub (set before transformers is imported)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs import resolve_embedded
from tests.helpers import FAST_TIMING, banking77_slice, shared_file, tiny_run_args


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return resolve_embedded("embedded:all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A randomly initialised 2-layer BERT (hidden 64) with MiniLM's real tokenizer: trains in seconds.
    Seeded, so every test session trains the same tiny model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,  # at 32 a few-epoch run lands anywhere from chance to 0.9, by seed
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def banking_slice(tmp_path: Path) -> tuple[Path, Path]:
    return banking77_slice(tmp_path, classes=5, train_per_class=40, test_per_class=10)


@pytest.fixture(scope="session")
def banking_runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model trained on five BANKING77 intents by both training scripts (runs "manual" and
    "trainer", TensorBoard logs under runs/), and the manual run's static int8 model in its default
    place, best_model-int8/. Shared by the quantization and the notebook tests."""
    import intel_compressor
    import manual_classification
    import trainer_classification

    directory = tmp_path_factory.mktemp("banking")
    train, test = banking77_slice(directory, classes=5, train_per_class=40, test_per_class=10)
    # 6 epochs at 3e-3: both scripts learn the five intents (validation accuracy 1.0, test 0.98 and 1.0)
    data = [f"--train_file={train}", f"--test_file={test}", "--epochs=6", "--learning_rate=3e-3"]
    manual_classification.main([*tiny_run_args(tiny_bert_dir, directory, "manual"), *data])
    trainer_classification.main([*tiny_run_args(tiny_bert_dir, directory, "trainer"), *data])
    best = directory / "outputs" / "manual" / "best_model"
    report = intel_compressor.main([f"--model={best}", *FAST_TIMING])
    return {
        "directory": directory,
        "best": best,
        "int8": best.with_name("best_model-int8"),
        "report": report,
        "train": train,
        "test": test,
    }


@pytest.fixture(scope="session")
def nlupp_run(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real MiniLM fine-tuned by the manual loop on 30% of the real NLU++ banking split (multi-label,
    48 intents): 2 epochs at 32 tokens from the probe-fitted head, validation micro-F1 about 0.77 (a
    random tiny BERT learns next to nothing of 48 intents from 400 texts)."""
    import manual_classification
    import split_csv_script

    directory = tmp_path_factory.mktemp("nlupp")
    train, test = split_csv_script.main(
        [str(shared_file("nlupp/banking.csv")), "--label_column=labels", f"--output_dir={directory}"]
    )
    data = [
        f"--train_file={train}",
        "--validation_file=",
        f"--test_file={test}",
        "--label_column=labels",
        "--reduce_ratio=0.3",
        "--epochs=2",
    ]
    minilm = ["--head_init=probe", "--learning_rate=1e-4", "--max_length=32"]
    manual_classification.main([*tiny_run_args(minilm_path, directory, "manual"), *minilm, *data])
    return {
        "directory": directory,
        "best": directory / "outputs" / "manual" / "best_model",
        "train": train,
        "test": test,
        "data_args": data,
    }


@pytest.fixture(scope="session")
def distilled_run(banking_runs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1-layer student cut from the manual run's 2-layer tiny teacher (its layer 1, embeddings and
    head kept), distilled on the same slice with logits and hidden states (run "student"), and its
    static int8 model."""
    import intel_compressor
    import manual_classification

    directory = tmp_path_factory.mktemp("distilled")  # apart: the notebooks pick the newest run of a directory
    # the student is the teacher's own model (no --model_name_or_path), its head kept (no --head_init)
    options = [
        a
        for a in tiny_run_args(banking_runs["best"], directory, "student")
        if not a.startswith(("--model_name_or_path", "--head_init"))
    ]
    student = [f"--teacher={banking_runs['best']}", "--student_layers=1,", "--distill_hidden_weight=0.5"]
    data = [f"--train_file={banking_runs['train']}", f"--test_file={banking_runs['test']}", "--epochs=6"]
    result = manual_classification.main([*options, *student, *data, "--learning_rate=3e-3"])
    best = result.run_dir / "best_model"
    intel_compressor.main([f"--model={best}", *FAST_TIMING])
    return {"directory": directory, "result": result, "best": best, "int8": best.with_name("best_model-int8")}
