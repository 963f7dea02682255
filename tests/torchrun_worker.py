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


def kept_while_running(module, function: str, pick, argv: list[str]) -> torch.nn.Module:
    """Run module.main(argv) with module.<function> wrapped to keep pick(its result, *its arguments):
    the model the script trains, whose final parameters are read after the run."""
    kept = {}
    real = getattr(module, function)

    def keep(*args):
        result = real(*args)
        kept["model"] = pick(result, *args)
        return result

    setattr(module, function, keep)
    module.main(argv)
    return kept["model"]


def main() -> None:
    script, prefix, *argv = sys.argv[1:]
    drawn: list[list[int]] = []
    if os.environ.get("RECORD_BATCHES"):
        record_batches(drawn)
    if "INTERRUPT_AFTER_STEP" in os.environ:
        interrupt_after_checkpoint(pytest.MonkeyPatch(), int(os.environ["INTERRUPT_AFTER_STEP"]))
    if script == "manual":
        # for_training(model, run) wraps the model in DistributedDataParallel: keep the model itself
        model = kept_while_running(manual_classification, "for_training", lambda result, model, run: model, argv)
    else:
        model = kept_while_running(trainer_classification, "build_trainer", lambda trainer, *_: trainer.model, argv)
    Path(f"{prefix}.rank{os.environ['RANK']}.json").write_text(json.dumps({"digest": digest(model)}))
    if drawn:
        Path(f"{prefix}.rank{os.environ['RANK']}.batches.json").write_text(json.dumps(drawn))


if __name__ == "__main__":
    main()
