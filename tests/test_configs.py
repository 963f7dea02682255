import dataclasses
from pathlib import Path

import pytest

from configs import Config, build_parser, parse_config, resolve_embedded
from intel_compressor_test import DataError, run_cli
from utility_functions import load_tokenizer, resolve_config

pytestmark = pytest.mark.unit  # pure: no training, no subprocess

HF_NAMES = [
    "model_name_or_path",
    "train_file",
    "validation_file",
    "test_file",
    "text_column",
    "label_column",
    "task",
    "label_delimiter",
    "max_length",
    "batch_size",
    "epochs",
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "lr_scheduler_type",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "freeze_layers",
    "freeze_epochs",
    "class_weights",
    "valid_size",
    "reduce_ratio",
    "seed",
    "num_threads",
    "device",
    "metric_for_best_model",
    "output_dir",
    "run_name",
]


def test_every_documented_field_exists_with_help():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in HF_NAMES:
        assert name in fields, name
        assert fields[name].metadata["help"], name


def test_both_flag_syntaxes_and_types():
    config = parse_config(["--epochs", "3", "--learning_rate=2e-5", "--pos_weight=false", "--task", "binary"])
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.learning_rate == pytest.approx(2e-5)
    assert config.pos_weight is False
    assert config.task == "binary"
    assert parse_config([]) == Config()


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text
    assert "default: 128" in text  # max_length's default is shown


@pytest.mark.parametrize("flags", [["--task=regression"], ["--pos_weight=maybe"]])
def test_values_argparse_refuses_exit_with_its_usage_error(flags):
    with pytest.raises(SystemExit) as stopped:
        parse_config(flags)
    assert stopped.value.code == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs=0"], "--epochs must be at least 1, got 0"),
        (["--reduce_ratio=1.5"], "--reduce_ratio must be in (0, 1], got 1.5"),
        (["--valid_size=1"], "--valid_size must be in (0, 1), got 1.0"),
        (["--device=tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
        (["--head_share=2"], "--head_share must be in [0, 1], got 2.0"),
        (["--window_stride=500"], "--window_stride must be in [0, max_length - 2], got 500"),
        (["--in_scope_share=0"], "--in_scope_share must be in (0, 1], got 0.0"),
        (["--model_name_or_path=embedded:nothing"], "--model_name_or_path embedded:nothing: unknown embedded resource"),
        (["--resume"], "--resume without a path needs --run_name of the run to resume"),
    ],
)
def test_bad_values_end_in_one_error_line_that_names_the_option(flags, message, capsys):
    assert run_cli(lambda argv: resolve_config(parse_config(flags))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_a_missing_model_directory_is_named_as_such(capsys):
    assert run_cli(lambda argv: load_tokenizer("/nonexistent/dir")) == 2
    assert capsys.readouterr().err.strip() == "error: --model_name_or_path /nonexistent/dir: no such directory"


def test_embedded_defaults_resolve_to_package_files():
    model = Path(resolve_embedded(Config().model_name_or_path))
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    for name in ("train_file", "validation_file", "test_file"):
        path = Path(resolve_embedded(getattr(Config(), name)))
        assert path.suffix == ".tsv" and path.is_file()
    assert resolve_embedded("my.csv") == "my.csv"
    with pytest.raises(DataError, match="unknown embedded"):
        resolve_embedded("embedded:nothing")
