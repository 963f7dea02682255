import dataclasses
from pathlib import Path

import pytest

from configs import Config, build_parser, parse_config, resolve_embedded

HF_NAMES = [
    "model_name_or_path", "train_file", "validation_file", "test_file", "text_column", "label_column", "task",
    "label_delimiter", "max_length", "batch_size", "epochs", "learning_rate", "weight_decay", "warmup_ratio",
    "lr_scheduler_type", "gradient_accumulation_steps", "max_grad_norm", "freeze_layers", "freeze_epochs",
    "class_weights", "valid_size", "reduce_ratio", "seed", "num_threads", "device", "metric_for_best_model",
    "output_dir", "run_name",
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


@pytest.mark.parametrize("flags", [["--epochs=0"], ["--reduce_ratio=1.5"], ["--valid_size=1"], ["--task=regression"],
                                   ["--pos_weight=maybe"], ["--device=tpu"]])
def test_bad_values_are_refused(flags):
    with pytest.raises(SystemExit):
        parse_config(flags)


def test_embedded_defaults_resolve_to_package_files():
    model = Path(resolve_embedded(Config().model_name_or_path))
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    for name in ("train_file", "validation_file", "test_file"):
        path = Path(resolve_embedded(getattr(Config(), name)))
        assert path.suffix == ".tsv" and path.is_file()
    assert resolve_embedded("my.csv") == "my.csv"
    with pytest.raises(ValueError, match="unknown embedded"):
        resolve_embedded("embedded:nothing")
