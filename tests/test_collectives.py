"""The collective calls of the training code put their tensors on the device the process group's
backend serves: under torchrun on GPUs (nccl) a CPU tensor is refused ("No backend type associated
with device type cpu"). No GPU here: torch.distributed's calls are replaced by recorders, and the
process's device is the meta device, so a tensor left on the CPU is seen."""

import ast
import inspect

import pytest
import torch

import manual_classification
import trainer_classification
import utility_functions
from utility_functions import Processes, mean_across

pytestmark = pytest.mark.unit

# Every torch.distributed function the training code calls, and whether it takes a tensor of ours.
# A new collective must be added here, and to the device check below when it takes a tensor.
DISTRIBUTED_CALLS = {
    "all_gather_object": False,  # picklable objects; torch puts their bytes on the current CUDA device
    "all_reduce": True,
    "barrier": False,
    "destroy_process_group": False,
    "get_rank": False,
    "init_process_group": False,
    "is_initialized": False,
}


class Recorded(Exception):
    """Raised by the recording collective once it has seen its tensor (there is no other process)."""


def distributed_calls(module) -> set[str]:
    """Names of the torch.distributed.<name>(...) calls in a module's source."""
    calls = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if ast.unparse(owner) in ("torch.distributed", "dist"):
                calls.add(node.func.attr)
    return calls


def test_every_collective_of_the_training_code_is_listed():
    modules = (utility_functions, manual_classification, trainer_classification)
    found = set().union(*(distributed_calls(module) for module in modules))
    assert found == set(DISTRIBUTED_CALLS)


def test_mean_across_reduces_a_tensor_on_the_process_device(monkeypatch):
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append((tensor.device, tensor.dtype, tuple(tensor.shape)))
        raise Recorded

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(Recorded):
        mean_across(Processes(rank=0, world_size=2, device=torch.device("meta")), 0.5)
    assert seen == [(torch.device("meta"), torch.float64, (1,))]
    assert [name for name, takes_tensor in DISTRIBUTED_CALLS.items() if takes_tensor] == ["all_reduce"]


def test_a_process_alone_calls_no_collective(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a collective call without torchrun")

    for name in DISTRIBUTED_CALLS:
        monkeypatch.setattr(torch.distributed, name, refuse)
    alone = Processes()
    assert mean_across(alone, 0.25) == 0.25
    assert utility_functions.from_every_process(alone, {"a": 1}) == [{"a": 1}]
    utility_functions.barrier(alone)
    utility_functions.leave_processes(alone)
