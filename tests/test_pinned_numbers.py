"""Pinned numbers, as torchtune's recipe tests pin them: the seeded tiny-BERT runs of the session
fixtures (both scripts on the BANKING77 slice, a 1-layer student distilled from the manual run's
model, the manual loop with MiniLM on NLU++) must log these training losses and end with these
validation figures. The resume and parity tests compare the code with
itself; these fail when a change moves every loss.

CPU only, torch 2.13.0. The tolerances absorb float noise between CPUs (AVX2 and AVX-512 kernels sum
in different orders) and nothing more: losses to 1e-3 relative; validation accuracy to one row. To
regenerate after an intended change, run `pytest tests/test_pinned_numbers.py -s` with
PRINT_PINNED=1, paste the printed values here, and say why in the commit message.
"""

import json
import os

import pytest
import torch

from configs import Config
from data_functions import load_data
from tests.helpers import step_losses

LOSS_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}

PINNED = {
    "banking77 manual": {
        "train/loss": {10: 1.615526, 20: 1.615474, 30: 1.627550, 40: 1.430573, 50: 1.156298},
        "valid": {"loss": 0.525476, "accuracy": 1.0, "macro_f1": 1.0},
    },
    "banking77 trainer": {
        "train/loss": {10: 1.612728, 20: 1.642834, 30: 1.616843, 40: 1.499542, 50: 1.135477},
        "valid": {"loss": 0.444749, "accuracy": 1.0, "macro_f1": 1.0},
    },
    "distilled student": {
        "train/loss": {10: 13.082142, 20: 0.198454, 30: 2.355516, 40: 17.766171, 50: 10.092933},
        "valid": {"loss": 0.0, "accuracy": 1.0, "macro_f1": 1.0},
    },
    "nlupp manual": {
        "train/loss": {10: 0.063237, 20: 0.073972, 30: 0.056589, 40: 0.059254, 50: 0.051331},
        "valid": {"loss": 0.055249, "accuracy": 0.425926, "micro_f1": 0.764706},
    },
}


@pytest.mark.parametrize("name", list(PINNED))
def test_logged_losses_and_final_validation_figures_are_the_pinned_ones(name, banking_runs, distilled_run, nlupp_run):
    data, run = name.split()
    directory = {"banking77": banking_runs, "distilled": distilled_run, "nlupp": nlupp_run}[data]["directory"]
    best = json.loads((directory / "outputs" / run / "metrics.json").read_text())["best"]
    metric = "micro_f1" if data == "nlupp" else "macro_f1"
    got = {
        "train/loss": dict(list(step_losses(directory / "runs" / run).items())[:5]),  # the first 5 logged
        "valid": {key: round(best[key], 6) for key in ("loss", "accuracy", metric)},
    }
    if os.environ.get("PRINT_PINNED"):
        print(f'\n"{name}": {got},')
    pinned = PINNED[name]
    assert list(got["train/loss"]) == list(pinned["train/loss"])  # the same logged steps
    torch.testing.assert_close(list(got["train/loss"].values()), list(pinned["train/loss"].values()), **LOSS_TOLERANCE)
    torch.testing.assert_close(got["valid"]["loss"], pinned["valid"]["loss"], **LOSS_TOLERANCE)
    config = Config(**json.loads((directory / "outputs" / run / "config.json").read_text()))
    one_row = 1 / len(load_data(config)[2])  # one validation text predicted otherwise
    assert got["valid"]["accuracy"] == pytest.approx(pinned["valid"]["accuracy"], abs=one_row + 1e-9)
    assert got["valid"][metric] == pytest.approx(pinned["valid"][metric], abs=2 * one_row + 1e-9)
