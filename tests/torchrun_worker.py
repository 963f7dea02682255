"""Run by tests/test_distributed.py under torchrun: a training script's main(), then a digest of
this process's final parameters written to <digest_prefix>.rank<RANK>.json, so the test can check
that every process ends with the same weights. With INTERRUPT_AFTER_STEP=N in the environment the
manual loop stops as Ctrl-C would, right after the main process has written checkpoint N; with
RECORD_BATCHES=1 the training batches (row indices) this process drew are written to
<digest_prefix>.rank<RANK>.batches.json.

    torchrun --standalone --nproc_per_node=2 tests/torchrun_worker.py manual|trainer DIGEST_PREFIX <script options>
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import manual_classification
import trainer_classification
import utility_functions
from tests.helpers import interrupt_after_checkpoint


def digest(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        hasher.update(name.encode())
        hasher.update(parameter.detach().cpu().numpy().tobytes())
    return hasher.hexdigest()


def record_batches(drawn: list[list[int]]) -> None:
    real = utility_functions.TrainBatchSampler.__iter__

    def recording(sampler):
        for batch in real(sampler):
            drawn.append(batch)
            yield batch

    utility_functions.TrainBatchSampler.__iter__ = recording


def main() -> None:
    script, prefix, *argv = sys.argv[1:]
    drawn: list[list[int]] = []
    if os.environ.get("RECORD_BATCHES"):
        record_batches(drawn)
    if "INTERRUPT_AFTER_STEP" in os.environ:
        interrupt_after_checkpoint(pytest.MonkeyPatch(), int(os.environ["INTERRUPT_AFTER_STEP"]))
    if script == "manual":
        trained = {}
        real = manual_classification.for_training

        def remember(model, run):
            trained["model"] = model
            return real(model, run)

        manual_classification.for_training = remember
        manual_classification.main(argv)
        model = trained["model"]
    else:
        model = trainer_classification.main(argv)["trainer"].model
    Path(f"{prefix}.rank{os.environ['RANK']}.json").write_text(json.dumps({"digest": digest(model)}))
    if drawn:
        Path(f"{prefix}.rank{os.environ['RANK']}.batches.json").write_text(json.dumps(drawn))


if __name__ == "__main__":
    main()
