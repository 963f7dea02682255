"""What a user's own training file implies: with --train_file alone, validation is split off it and
there is no test split (the embedded validation and test files belong to BANKING77); an explicit
--validation_file or --test_file wins. An --epochs the user typed wins over the default step budget.
Every combination of the three data options, the log line that says what was chosen, and a run of
each script given nothing but a training file."""

import dataclasses
import itertools
import json

import pytest

import manual_classification
import trainer_classification
from configs import Config, parse_config
from tests.helpers import banking77_slice, run_python
from utility_functions import describe_epoch_budget

EMBEDDED = Config()
DATA_OPTIONS = ("train_file", "validation_file", "test_file")


@pytest.mark.unit
@pytest.mark.parametrize("given", list(itertools.product([False, True], repeat=3)), ids=lambda g: str(g))
def test_every_combination_of_the_three_data_options(given):
    typed = {name: f"mine/{name}.csv" for name, on in zip(DATA_OPTIONS, given, strict=True) if on}
    config = parse_config([f"--{name}={value}" for name, value in typed.items()])
    train_given = "train_file" in typed
    for name in DATA_OPTIONS:
        if name in typed:
            expected = typed[name]  # typed wins
        elif train_given and name != "train_file":
            expected = ""  # split off the training file / no test
        else:
            expected = getattr(EMBEDDED, name)  # the embedded BANKING77 default
        assert getattr(config, name) == expected, (name, typed)


@pytest.mark.unit
def test_an_empty_validation_or_test_option_is_kept_as_typed():
    config = parse_config(["--validation_file=", "--test_file="])
    assert (config.train_file, config.validation_file, config.test_file) == (EMBEDDED.train_file, "", "")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "min_steps"),
    [
        ([], 600),  # the default budget
        (["--epochs", "1"], 0),  # typed epochs win
        (["--epochs=1", "--min_steps=600"], 600),  # both typed: the budget applies
        (["--min_steps", "100"], 100),
        (["--epochs", "3", "--min_steps", "0"], 0),
    ],
)
def test_typed_epochs_turn_the_default_step_budget_off(argv, min_steps):
    assert parse_config(argv).min_steps == min_steps


@pytest.mark.unit
def test_the_log_line_says_where_the_epochs_come_from():
    config = dataclasses.replace(Config(), batch_size=32, epochs=5, min_steps=600)
    assert describe_epoch_budget(config, 21, 900, 1) == (
        "21 epochs (--epochs 5 raised to reach --min_steps 600 steps)"
    )  # 29 steps an epoch
    assert describe_epoch_budget(config, 5, 9016, 1) == "5 epochs"  # 282 steps an epoch: the budget is met
    typed = dataclasses.replace(config, epochs=1, min_steps=0)
    assert describe_epoch_budget(typed, 1, 900, 1) == (
        "1 epoch as given (the step budget, --min_steps 600, would choose 21 on this data; "
        "give --min_steps too to use it)"
    )
    assert describe_epoch_budget(dataclasses.replace(typed, epochs=30), 30, 900, 1) == "30 epochs"


def own_file_args(model_dir, tmp_path) -> list[str]:
    """A user's command line with their own model directory and places, and no data option but
    --train_file (the caller adds it)."""
    return [
        f"--model_name_or_path={model_dir}",
        f"--output_dir={tmp_path / 'outputs'}",
        f"--logging_dir={tmp_path / 'runs'}",
        "--run_name=mine",
        "--epochs=1",
        "--max_length=64",
    ]


def test_manual_script_trains_on_a_training_file_alone(tiny_bert_dir, tmp_path):
    train, _ = banking77_slice(tmp_path, classes=6, train_per_class=30, test_per_class=1)
    result = run_python("manual_classification.py", f"--train_file={train}", *own_file_args(tiny_bert_dir, tmp_path))
    assert result.returncode == 0, result.stderr
    assert (
        "rows: train 162, validation 18 (split off the training file: 10%, stratified, seed 42), "
        "no test split (no --test_file); 1 epoch as given (the step budget, --min_steps 600, would choose 100 "
        "on this data; give --min_steps too to use it)"
    ) in result.stdout
    run_dir = tmp_path / "outputs" / "mine"
    assert (run_dir / "best_model" / "model.safetensors").is_file()
    assert not (run_dir / "test_metrics.json").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["validation_file"], config["test_file"], config["epochs"]) == ("", "", 1)
    labels = json.loads((run_dir / "best_model" / "config.json").read_text())["label2id"]
    assert len(labels) == 6  # the user's labels, not BANKING77's 77


@pytest.mark.parametrize("script", [manual_classification, trainer_classification])
def test_an_explicit_test_file_is_used_with_a_training_file(script, tiny_bert_dir, tmp_path, capsys):
    train, test = banking77_slice(tmp_path, classes=6, train_per_class=30, test_per_class=4)
    result = script.main([f"--train_file={train}", f"--test_file={test}", *own_file_args(tiny_bert_dir, tmp_path)])
    assert "validation 18 (split off the training file: 10%, stratified, seed 42), test 24;" in capsys.readouterr().out
    assert result.test is not None and (result.run_dir / "test_predictions.csv").is_file()
