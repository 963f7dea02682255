"""Reusable pieces shared by both training scripts (torch and transformers; the torch-free data
pieces they build on are in data_functions.py).

Sections, top to bottom: tokenising and batching, several processes (torchrun), devices, seeds,
model loading and layer freezing, losses, metrics, evaluation and prediction, the head fitted as a
linear probe (LP-FT), calibration and the out-of-scope score, the training budget and early
stopping, run set-up and the end-of-run test, checkpoints (the best model and the training state).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from torch import nn

from configs import Config, checkpoint_step, resolve_embedded, run_directory
from data_functions import (
    LabeledData,
    LabelSpace,
    hard_label_sets,
    load_data,
    load_transfer_texts,
    staged_directory,
    write_csv,
    write_json,
)
from intel_compressor_test import (
    DRIFT_REFERENCE,
    DataError,
    LongText,
    aggregate_windows,
    drift_reference,
    long_text_from,
    model_inputs,
    ood_scores,
    predicted_label_sets,
    special_tokens,
)

# ---------------------------------------------------------------------------------------
# Tokenising and batching
# ---------------------------------------------------------------------------------------


class EncodedDataset(torch.utils.data.Dataset):
    """Model inputs (token ids, unpadded: padding happens per batch) and the targets of the texts
    they come from. One input per text, or with --long_text windows several: `owners[i]` is the
    text of input i, and predictions combine a text's inputs by `aggregation` (see LongText)."""

    def __init__(
        self,
        input_ids: list[list[int]],
        targets: np.ndarray,
        owners: np.ndarray | None = None,
        aggregation: str = "mean",
    ):
        self.input_ids = input_ids
        self.targets = targets
        self.owners = np.arange(len(input_ids)) if owners is None else owners
        self.aggregation = aggregation
        self.teacher_logits: np.ndarray | None = None  # one row per input when distilling (distillation.py)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "labels": self.targets[self.owners[i]]}
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def texts(self) -> int:
        return len(self.targets)

    @property
    def input_targets(self) -> np.ndarray:
        """The target of every input (a window has its text's)."""
        return self.targets[self.owners]

    def combine(self, logits: np.ndarray) -> np.ndarray:
        """One row of logits per text from one row per input."""
        return aggregate_windows(logits, self.owners, self.texts, self.aggregation)


def long_text_of(config: Config) -> LongText:
    return long_text_from(dataclasses.asdict(config), config.max_length)


def encode(
    tokenizer: Any, data: LabeledData, long_text: LongText, keep_windows: int = 0, seed: int = 0
) -> EncodedDataset:
    """Token ids of every text as the model reads them (truncated, head and tail, or windows), with
    the special tokens; with `keep_windows`, at most that many windows of a text, a seeded sample.
    Tokenised by the tokenizer's own fast backend, exactly as the edge runner does."""
    backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()  # LongText does the cutting
    backend.no_padding()
    bodies = [encoding.ids for encoding in backend.encode_batch(data.texts, add_special_tokens=False)]
    rows, owners = model_inputs(bodies, long_text, *special_tokens(backend))
    if keep_windows:
        kept = sampled_windows(owners, keep_windows, seed)
        rows, owners = [rows[i] for i in kept], owners[kept]
    return EncodedDataset(rows, data.targets, owners, long_text.aggregation)


def sampled_windows(owners: np.ndarray, most: int, seed: int) -> np.ndarray:
    """Indices of at most `most` windows of each text (a seeded sample, kept in order)."""
    generator = np.random.default_rng(seed)
    kept = []
    for text in np.unique(owners):
        windows = np.flatnonzero(owners == text)
        kept.extend(sorted(generator.choice(windows, most, replace=False)) if len(windows) > most else windows)
    return np.asarray(kept, dtype=np.int64)


class PaddingCollator:
    """Pad a batch to its longest member (or to `pad_to`), build the attention mask, stack targets
    (and the teacher's logits, when distilling)."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = feature["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": stacked(features, "labels")}
        if "teacher_logits" in features[0]:
            batch["teacher_logits"] = stacked(features, "teacher_logits")
        return batch


def stacked(features: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.as_tensor(np.stack([f[key] for f in features]))


class TrainBatchSampler(torch.utils.data.Sampler):
    """Shuffled training batches, reproducible per epoch (seed + epoch), so a resumed run sees
    the same order. With `group_by_length`, each chunk of 50 batches is sorted by length before
    it is cut into batches: little padding, and still random which texts meet. Under torchrun every
    process draws the same order and takes every world_size-th batch of it, all processes the
    same count (the last world_size - 1 batches of an epoch may go unused), so none waits for
    another at the last step."""

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool, processes: Processes | None = None
    ):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.processes = processes or Processes()
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of `epoch`; the first `skip` batches are left out (resuming mid-epoch)."""
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size) // self.processes.world_size

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_length:
            chunk = self.batch_size * 50
            order = [
                i
                for start in range(0, len(order), chunk)
                for i in sorted(order[start : start + chunk], key=lambda j: -self.lengths[j])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        mine = shuffled[self.processes.rank :: self.processes.world_size][: len(self)]
        for b in mine[self.skip :]:
            yield batches[b]


def train_loader(run: PreparedRun) -> torch.utils.data.DataLoader:
    config = run.config
    sampler = TrainBatchSampler(
        run.train_set.lengths, config.batch_size, config.seed, config.group_by_length, run.processes
    )
    # Its own generator: otherwise every new iterator draws a seed from the global RNG, and a run
    # resumed mid-epoch (new iterator there) would see different dropout masks than a straight run.
    return torch.utils.data.DataLoader(
        run.train_set, batch_sampler=sampler, collate_fn=train_collator(run), generator=torch.Generator()
    )


def train_collator(run: PreparedRun) -> PaddingCollator:
    """Batches padded to their longest text, or to max_length with --pad_to_max_length (naive)."""
    pad_to = run.config.max_length if run.config.pad_to_max_length else None
    return PaddingCollator(run.tokenizer.pad_token_id, pad_to)


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): who this process is, waiting for the others, gathering rows
# ---------------------------------------------------------------------------------------

# torchrun stops every process when one fails or is interrupted; this bounds how long a collective
# call waits for a process that will not come (the default is 30 minutes).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Processes:
    """This process among those torchrun started; alone (no torchrun) it is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    # where this process's collective tensors live: the backend's device (nccl serves only CUDA
    # tensors and refuses CPU ones; gloo, on CPU, serves CPU tensors)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs, checkpoints and TensorBoard logs and shows progress."""
        return self.rank == 0


def join_processes(device: torch.device) -> tuple[Processes, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): join its process group (nccl on CUDA, gloo on CPU) and,
    on CUDA, take this process's GPU (LOCAL_RANK). Without torchrun nothing changes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Processes(torch.distributed.get_rank(), world_size, device), device


def leave_processes(processes: Processes) -> None:
    """End of a run under torchrun: wait for every process, then leave the process group."""
    if processes.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.world_size > 1:
        torch.distributed.barrier()


def mean_across(processes: Processes, value: float) -> float:
    """The mean of a number over the processes (the value itself when alone)."""
    if processes.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=processes.device)
    torch.distributed.all_reduce(total)
    return float(total) / processes.world_size


def from_every_process(processes: Processes, value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process (picklable values)."""
    if processes.world_size == 1:
        return [value]
    values = [None] * processes.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def gather_rows(processes: Processes, indices: list[int], rows: torch.Tensor | None, total: int) -> torch.Tensor:
    """Rows computed by each process for its `indices`, put back in dataset order (all `total` of
    them, on every process). A process with no rows passes None."""
    parts = from_every_process(processes, (indices, rows))
    shape = next(r.shape[1:] for _, r in parts if r is not None)
    restored = torch.empty((total, *shape))
    for part_indices, part_rows in parts:
        if part_rows is not None:
            restored[torch.tensor(part_indices, dtype=torch.long)] = part_rows
    return restored


# ---------------------------------------------------------------------------------------
# Devices, seeds, model loading and layer freezing
# ---------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones are skipped while they have no gradient), no weight
    decay on biases and LayerNorm weights. The fused kernel makes the step several times faster
    on CPU, where the optimizer otherwise costs as much as a third of a training step."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type in ("cpu", "cuda"))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = round(config.warmup_ratio * total_steps)
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def progress_bar(iterable: Any, description: str, done: int = 0, show: bool = True) -> Any:
    """tqdm that refreshes live in a terminal and every 30 s in a log file (CI, nohup); `done`
    items are already behind (an epoch resumed in the middle); show=False: iterates silently."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=description,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 30,
        initial=done,
        disable=not show,
    )


def gpu_utilization(device: torch.device) -> dict[str, str]:
    """{'gpu': '87%'} on CUDA when the driver reports it (needs pynvml), else nothing."""
    if device.type != "cuda":
        return {}
    try:
        return {"gpu": f"{torch.cuda.utilization(device)}%"}
    except (ImportError, RuntimeError):  # pynvml missing or the driver refuses: the bar omits it
        return {}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16); full fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> Any:
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def is_local_path(name: str) -> bool:
    return Path(name).exists()


def looks_like_a_path(name: str) -> bool:
    """A path, not a hub id: absolute, relative to here or home (hub ids are `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    if looks_like_a_path(name) and not Path(name).expanduser().exists():
        raise DataError(f"--model_name_or_path {name}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=is_local_path(name))
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--model_name_or_path {name}: cannot load a tokenizer ({reason})") from None


def load_model_for_training(name: str, space: LabelSpace) -> nn.Module:
    """A sequence classifier with our label map. Binary models keep two logits so that
    `pipeline("text-classification")` reports both labels (softmax of two logits equals the
    sigmoid of their difference, which is what the binary loss trains)."""
    from transformers import AutoModelForSequenceClassification

    problem = "multi_label_classification" if space.task == "multilabel" else "single_label_classification"
    return AutoModelForSequenceClassification.from_pretrained(
        name,
        num_labels=space.num_labels,
        id2label=dict(enumerate(space.labels)),
        label2id=space.label2id,
        problem_type=problem,
        ignore_mismatched_sizes=True,  # a checkpoint trained on other labels gets a new head
        local_files_only=is_local_path(name),
    )


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(embeddings, encoder layers) for BERT-family models (BERT, RoBERTa, MiniLM, ELECTRA,
    XLM-R, DeBERTa: `encoder.layer`; DistilBERT: `transformer.layer`)."""
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    container = getattr(base, "encoder", None) or getattr(base, "transformer", None)
    layers = getattr(container, "layer", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        raise DataError(
            f"layer freezing cannot map the {type(model).__name__} architecture "
            "(needs base_model.embeddings and encoder.layer); run with --freeze_epochs 0"
        )
    return embeddings, layers


def student_layer_indices(spec: str, available: int) -> list[int]:
    """The encoder layers a student keeps, from --student_layers: empty, all of them; one number, that
    many spread evenly from the bottom layer to the top one (3 of 6: 0, 2, 5); a comma-separated list,
    those indices (a single index: "4,")."""
    if not spec.strip():
        return list(range(available))
    option = f"--student_layers {spec}"
    try:
        numbers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise DataError(f"{option}: expected a layer count or comma-separated layer indices") from None
    if "," not in spec:
        count = numbers[0]
        if not 1 <= count <= available:
            raise DataError(f"{option}: a count must be in 1..{available} (the model's encoder layers)")
        return [0] if count == 1 else [round(i * (available - 1) / (count - 1)) for i in range(count)]
    if not numbers:
        raise DataError(f"{option}: no layer index given")
    outside = [i for i in numbers if not 0 <= i < available]
    if outside:
        raise DataError(f"{option}: layer {outside[0]} is out of range; the model has layers 0..{available - 1}")
    if len(set(numbers)) != len(numbers):
        raise DataError(f"{option}: layer {next(i for i in numbers if numbers.count(i) > 1)} is repeated")
    if numbers != sorted(numbers):
        raise DataError(f"{option}: list the layers from the bottom up, e.g. {','.join(map(str, sorted(numbers)))}")
    return numbers


def kept_layers(config: Config) -> list[int]:
    """The encoder layers of --model_name_or_path that --student_layers keeps (all when empty)."""
    from transformers import AutoConfig

    name = config.model_name_or_path
    available = AutoConfig.from_pretrained(name, local_files_only=is_local_path(name)).num_hidden_layers
    return student_layer_indices(config.student_layers, available)


def keep_layers(model: nn.Module, indices: list[int]) -> None:
    """Cut the encoder down to the layers at `indices` (their weights untouched), so the model saves
    and loads as an ordinary Hugging Face model with `num_hidden_layers = len(indices)`."""
    _, layers = encoder_parts(model)
    kept = [layers[i] for i in indices]
    for position, layer in enumerate(kept):
        for module in layer.modules():  # attention's cache slot, where the architecture keeps one
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    del layers[:]  # in place: the encoder keeps its own ModuleList
    layers.extend(kept)
    model.config.num_hidden_layers = len(indices)


def set_lower_layers_trainable(model: nn.Module, num_layers: int, trainable: bool) -> None:
    """Freeze (or unfreeze) the embeddings and the lowest `num_layers` encoder layers."""
    embeddings, layers = encoder_parts(model)
    if num_layers > len(layers):
        raise DataError(f"--freeze_layers {num_layers} exceeds the model's {len(layers)} encoder layers")
    for module in [embeddings, *layers[:num_layers]]:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)


def frozen_for_epoch(config: Config, epoch: int) -> bool:
    return epoch < config.freeze_epochs


def apply_freeze_schedule(model: nn.Module, config: Config, epoch: int) -> str:
    """Set which parameters train in `epoch` (0-based); return a one-line description."""
    if config.freeze_epochs == 0:
        return describe_trainable(model)
    set_lower_layers_trainable(model, config.freeze_layers, trainable=not frozen_for_epoch(config, epoch))
    return describe_trainable(model)


def describe_trainable(model: nn.Module) -> str:
    """Which parameter groups train, e.g. 'training 17.0M of 22.7M parameters; frozen: bert.embeddings,
    bert.encoder.layer.0'."""
    total = trainable = 0
    frozen_groups: list[str] = []
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            group = _parameter_group(name)
            if group not in frozen_groups:
                frozen_groups.append(group)
    frozen = ", ".join(frozen_groups) or "nothing"
    return f"training {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters; frozen: {frozen}"


def _parameter_group(name: str) -> str:
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        return ".".join(parts[: i + 2])
    return ".".join(parts[:2])


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


class ClassificationLoss(nn.Module):
    """binary: BCE with logits on (logit1 - logit0), `pos_weight` = negatives / positives;
    multiclass: cross-entropy, optionally class-weighted; multilabel: per-label BCE with logits
    on hard or soft targets."""

    def __init__(self, task: str, weight: torch.Tensor | None = None):
        super().__init__()
        self.task = task
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weight = None if self.weight is None else self.weight.to(logits.device)
        if self.task == "binary":
            margin = logits[:, 1] - logits[:, 0]
            return nn.functional.binary_cross_entropy_with_logits(margin, targets.float(), pos_weight=weight)
        if self.task == "multiclass":
            return nn.functional.cross_entropy(logits, targets.long(), weight=weight)
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.float())


def build_loss(space: LabelSpace, train_targets: np.ndarray, config: Config) -> ClassificationLoss:
    """The loss for the task, its weights computed from the training targets."""
    weight = None
    if space.task == "binary" and config.pos_weight:
        positives = float((train_targets == 1).sum())
        weight = torch.tensor((len(train_targets) - positives) / positives)
    elif space.task == "multiclass" and config.class_weights == "balanced":
        counts = np.bincount(train_targets, minlength=space.num_labels).astype(np.float64)
        weight = torch.tensor(len(train_targets) / (space.num_labels * np.maximum(counts, 1)), dtype=torch.float32)
    return ClassificationLoss(space.task, weight)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    logits = logits.float()
    scores = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)
    return scores.numpy()


def compute_metrics(task: str, probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy and macro-F1 for every task; binary adds F1/precision/recall of the positive class
    (label id 1); multilabel adds micro-F1, with `accuracy` the exact-match ratio."""
    if task == "multilabel":
        predicted = probs >= threshold
        truth = targets >= 0.5
        return {
            "accuracy": float(accuracy_score(truth, predicted)),
            "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "threshold": float(threshold),
        }
    predicted = probs.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(targets, predicted)),
        "macro_f1": float(f1_score(targets, predicted, average="macro", labels=range(probs.shape[1]), zero_division=0)),
    }
    if task == "binary":
        metrics["f1"] = float(f1_score(targets, predicted, pos_label=1, zero_division=0))
        metrics["precision"] = float(precision_score(targets, predicted, pos_label=1, zero_division=0))
        metrics["recall"] = float(recall_score(targets, predicted, pos_label=1, zero_division=0))
    return metrics


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE of single-label predictions: texts binned by confidence (the top probability) into
    `bins` equal-width bins, the mean |accuracy - confidence| of the bins, weighted by their size."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    bin_of = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (k/bins, (k+1)/bins]
    gaps = [
        abs(correct[bin_of == k].mean() - confidence[bin_of == k].mean()) * np.mean(bin_of == k)
        for k in np.unique(bin_of)
    ]
    return float(sum(gaps))


THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)


def tune_threshold(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label decision threshold with the best micro-F1 on these (validation) rows."""
    truth = targets >= 0.5
    scores = [f1_score(truth, probs >= t, average="micro", zero_division=0) for t in THRESHOLD_GRID]
    return float(THRESHOLD_GRID[int(np.argmax(scores))])


def metric_names(task: str) -> list[str]:
    """Validation metrics a task reports (candidates for metric_for_best_model)."""
    extra = {"binary": ["f1", "precision", "recall"], "multiclass": [], "multilabel": ["micro_f1"]}[task]
    return ["loss", "accuracy", "macro_f1", *extra]


def is_improvement(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


# ---------------------------------------------------------------------------------------
# Evaluation and prediction
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def run_in_length_order(
    model: nn.Module,
    dataset: EncodedDataset,
    collator: PaddingCollator,
    batch_size: int,
    device: torch.device,
    read: Callable[[Any], torch.Tensor],
    processes: Processes | None = None,
) -> torch.Tensor:
    """`read(model output)` for every row, in dataset order. Batches are formed from length-sorted
    rows (little padding); the model runs in eval mode (no dropout). Under torchrun each process
    runs every world_size-th row of that order and every process gets all rows back, each once."""
    model.eval()
    processes = processes or Processes()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))[processes.rank :: processes.world_size]
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = collator([dataset[i] for i in order[start : start + batch_size]])
        with autocast(device):
            output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        chunks.append(read(output).float().cpu())
    return gather_rows(processes, order, torch.cat(chunks) if chunks else None, len(dataset))


def predict_logits(
    model: nn.Module,
    dataset: EncodedDataset,
    collator: PaddingCollator,
    batch_size: int,
    device: torch.device,
    processes: Processes | None = None,
) -> torch.Tensor:
    """Logits of every text, in dataset order (a text's windows combined)."""
    logits = run_in_length_order(model, dataset, collator, batch_size, device, lambda output: output.logits, processes)
    return torch.from_numpy(dataset.combine(logits.numpy()))


def evaluate(
    model: nn.Module,
    dataset: EncodedDataset,
    collator: PaddingCollator,
    loss_fn: ClassificationLoss,
    space: LabelSpace,
    batch_size: int,
    device: torch.device,
    threshold: float | None = None,
    processes: Processes | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Loss and metrics on a split, and the probabilities. Multi-label: the threshold is tuned
    on these rows when none is given (validation), and reused as given (test). Under torchrun the
    rows are shared out and gathered: every process computes the same metrics from all rows.
    Returns the metrics and the logits of every text."""
    logits = predict_logits(model, dataset, collator, batch_size, device, processes)
    targets = torch.as_tensor(dataset.targets)
    loss = float(loss_fn(logits, targets))
    probs = probabilities(logits, space.task)
    if space.task == "multilabel" and threshold is None:
        threshold = tune_threshold(probs, dataset.targets)
    metrics = {"loss": loss, **compute_metrics(space.task, probs, dataset.targets, threshold or 0.5)}
    return metrics, logits


def predictions_frame(
    texts: list[str],
    targets: np.ndarray,
    probs: np.ndarray,
    ood: np.ndarray,
    ood_threshold: float,
    space: LabelSpace,
    threshold: float,
    delimiter: str,
) -> pd.DataFrame:
    """text, true label, predicted label(s), the out-of-scope score and flag, then one probability
    column per label."""
    predicted = predicted_label_sets(probs, space.labels, space.task == "multilabel", threshold)
    frame = pd.DataFrame(
        {
            "text": texts,
            "label": [delimiter.join(s) for s in hard_label_sets(targets, space)],
            "predicted": [delimiter.join(s) for s in predicted],
            "ood_score": ood.round(4),
            "out_of_scope": ood > ood_threshold,
        }
    )
    scores = pd.DataFrame(probs, columns=[f"prob_{label}" for label in space.labels])
    return pd.concat([frame, scores.round(6)], axis=1)


def top_k_summary(
    texts: list[str], targets: np.ndarray, probs: np.ndarray, space: LabelSpace, k: int = 5, rows: int = 8
) -> str:
    """Markdown for TensorBoard: a few validation texts, their true labels and top-k predictions."""
    lines = ["| text | true | top predictions |", "|---|---|---|"]
    truths = hard_label_sets(targets, space)
    for i in range(min(rows, len(texts))):
        top = np.argsort(-probs[i])[:k]
        predicted = ", ".join(f"{space.labels[j]} ({probs[i, j]:.2f})" for j in top)
        text = texts[i].replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {text} | {', '.join(truths[i])} | {predicted} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The classification layer fitted as a linear probe before fine-tuning (LP-FT)
# ---------------------------------------------------------------------------------------


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The linear layer that turns features into logits: `classifier` (BERT, DistilBERT) or
    `classifier.out_proj` (RoBERTa's two-layer head)."""
    head = getattr(model, "classifier", None)
    head = getattr(head, "out_proj", head)
    if not isinstance(head, nn.Linear):
        name = type(model).__name__
        raise DataError(f"--head_init probe cannot find the classification layer of {name}; use --head_init random")
    return head


def classifier_features(
    model: nn.Module, dataset: EncodedDataset, collator: PaddingCollator, batch_size: int, device: torch.device
) -> torch.Tensor:
    """What the classification layer reads for each row (eval mode), in dataset order."""
    captured: list[torch.Tensor] = []
    hook = classifier_layer(model).register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        return run_in_length_order(model, dataset, collator, batch_size, device, read=lambda output: captured.pop())
    finally:
        hook.remove()


def fit_linear_probe(
    features: torch.Tensor, targets: torch.Tensor, loss_fn: ClassificationLoss, num_labels: int, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear layer on `features` minimising the task's own loss plus an L2
    penalty: logistic regression (softmax, per-label or binary, with the loss's class or positive
    weights) solved with L-BFGS from zero, deterministic. It is fitted on standardised features
    (zero mean, unit variance per dimension, so `c` means the same for every model's feature scale)
    and folded back into a layer on the raw features. `c` is scikit-learn's C: the penalty is
    1 / (c * loss terms) on the mean loss, as C weighs the summed loss there."""
    mean, std = features.mean(dim=0), features.std(dim=0, correction=0).clamp(min=1e-6)  # as StandardScaler
    standardised = (features - mean) / std
    weight = torch.zeros(num_labels, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=True)
    penalty = 1.0 / (c * targets.numel())
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=1000, tolerance_grad=1e-6, history_size=20, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(standardised @ weight.T + bias, targets) + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    weight, bias = weight.detach() / std, bias.detach()
    return weight, bias - weight @ mean


@torch.no_grad()
def initialize_head_from_probe(model: nn.Module, run: PreparedRun, loss_fn: ClassificationLoss) -> str:
    """Replace the random classification layer by a linear probe fitted on the frozen model's
    features of the training texts, so fine-tuning starts from the probe's predictions instead of
    pulling the encoder towards a random head. Returns a one-line description."""
    head = classifier_layer(model)
    features = classifier_features(model, run.train_set, run.collator, run.config.batch_size, run.device)
    targets = torch.as_tensor(run.train_set.input_targets)
    loss_fn = copy.deepcopy(loss_fn).cpu()
    before = float(loss_fn(features @ head.weight.cpu().T + head.bias.cpu(), targets))
    with torch.enable_grad():
        weight, bias = fit_linear_probe(features, targets, loss_fn, run.space.num_labels, run.config.probe_c)
    after = float(loss_fn(features @ weight.T + bias, targets))
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    return f"head fitted as a linear probe on {len(features)} training texts: training loss {before:.4f} -> {after:.4f}"


# ---------------------------------------------------------------------------------------
# Calibrated probabilities (temperature scaling) and the out-of-scope score
# ---------------------------------------------------------------------------------------


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T) on these rows
    (Guo et al. 2017): one parameter, fitted as log T by L-BFGS from T = 1, deterministic."""
    logits, log_t = logits.detach().double().cpu(), torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets.long())
        loss.backward()
        return loss

    optimizer.step(objective)
    return float(log_t.detach().exp())


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the classification layer's weight and bias by T: the model then computes logits / T
    itself (exact), for every consumer of its directory (pipeline, the edge, the int8 export)."""
    head = classifier_layer(model)
    head.weight.div_(temperature)
    head.bias.div_(temperature)


def validation_drift_reference(
    run: PreparedRun, served_logits: torch.Tensor, ood: np.ndarray, ood_threshold: float, model_config: Any
) -> dict:
    """drift_reference.json of best_model/: what the calibrated best model predicts on validation (the
    predicted-label shares, the share out of scope, ood_score quantiles), which a server compares its
    traffic with."""
    probs = probabilities(served_logits, run.space.task)
    multilabel = run.space.task == "multilabel"
    threshold = float(getattr(model_config, "multilabel_threshold", 0.5))
    label_sets = predicted_label_sets(probs, run.space.labels, multilabel, threshold)
    return drift_reference(label_sets, run.space.labels, ood, ood_threshold)


def calibrate_best_model(run: PreparedRun, best_dir: Path) -> dict[str, float | str]:
    """After training, on the validation split: fit the temperature (single-label) and fold it into
    best_model/, and choose the out-of-scope threshold that keeps --in_scope_share of the validation
    texts in scope. Both are stored in best_model/config.json (calibration_temperature, ood_threshold). Returns
    metrics.json's calibration entry (with the validation ECE before and after)."""
    from transformers import AutoModelForSequenceClassification

    barrier(run.processes)  # the main process has written best_model/
    model = AutoModelForSequenceClassification.from_pretrained(best_dir, local_files_only=True).to(run.device)
    logits = predict_logits(model, run.valid_set, run.collator, run.config.batch_size, run.device, run.processes)
    multilabel, targets = run.space.task == "multilabel", run.valid_data.targets
    earlier = float(
        getattr(model.config, "calibration_temperature", 1.0)
    )  # a resumed run's best model may hold one already
    entry: dict[str, float | str] = {}
    temperature = 1.0
    if not multilabel:
        temperature = fit_temperature(logits, torch.as_tensor(targets))
        entry["ece_before"] = expected_calibration_error(probabilities(logits, run.space.task), targets)
        entry["ece_after"] = expected_calibration_error(probabilities(logits / temperature, run.space.task), targets)
        fold_temperature(model, temperature)
    total = earlier * temperature
    scores = ood_scores(logits.numpy() / temperature, multilabel, total)
    share = run.config.in_scope_share
    threshold = float(np.quantile(scores, share))
    # not `temperature`: transformers reserves that name for text generation
    model.config.calibration_temperature, model.config.ood_threshold = total, threshold
    entry = {
        "temperature": total,
        **entry,
        "ood_score": "joint_energy" if multilabel else "energy",
        "ood_threshold": threshold,
        "in_scope_share": share,
    }
    if run.processes.is_main:
        kept = {name: json.loads((best_dir / name).read_text()) for name in ("metrics.json", "training_config.json")}
        kept[DRIFT_REFERENCE] = validation_drift_reference(run, logits / temperature, scores, threshold, model.config)
        save_model_directory(model, run.tokenizer, best_dir, kept)
        ece = f" (validation ECE {entry['ece_before']:.4f} -> {entry['ece_after']:.4f})" if not multilabel else ""
        print(
            f"temperature {total:.3f} folded into the head{ece}; out of scope above ood_score {threshold:.3f} "
            f"({share:.0%} of validation texts in scope)"
        )
    return entry


# ---------------------------------------------------------------------------------------
# Training budget: epochs from --min_steps, early stopping
# ---------------------------------------------------------------------------------------


def planned_epochs(config: Config, train_rows: int, world_size: int = 1) -> int:
    """--epochs, or more when that many epochs of `train_rows` are fewer than --min_steps optimizer
    steps (under torchrun each step takes one batch from each of `world_size` processes)."""
    batches = math.ceil(train_rows / config.batch_size) // world_size
    steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
    return max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))


def stopped_early(history: list[dict[str, float]], best: dict[str, float] | None, patience: int) -> bool:
    """True once `patience` validations in a row came after the best one without beating it."""
    if patience == 0 or best is None:
        return False
    return sum(1 for entry in history if entry["step"] > best["step"]) >= patience


# ---------------------------------------------------------------------------------------
# Run set-up (shared by both training scripts) and the end-of-run test
# ---------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """Everything a training script needs before it builds its model."""

    config: Config
    space: LabelSpace
    tokenizer: Any
    train_data: LabeledData
    valid_data: LabeledData
    test_data: LabeledData | None
    train_set: EncodedDataset
    valid_set: EncodedDataset
    test_set: EncodedDataset | None
    collator: PaddingCollator
    device: torch.device
    run_dir: Path
    log_dir: Path
    processes: Processes
    epoch_budget: str  # how --epochs and --min_steps gave config.epochs, for the log line
    transfer_data: LabeledData | None = None  # --transfer_file's texts; the teacher labels them (distillation.py)
    transfer_set: EncodedDataset | None = None


def resolve_config(config: Config) -> Config:
    """Fill in embedded paths, a timestamp run name and the window stride, so config.json records
    what ran."""
    return dataclasses.replace(
        config,
        window_stride=config.window_stride or config.max_length // 2,
        model_name_or_path=resolve_embedded(config.model_name_or_path, "model_name_or_path"),
        train_file=resolve_embedded(config.train_file, "train_file"),
        validation_file=resolve_embedded(config.validation_file, "validation_file"),
        test_file=resolve_embedded(config.test_file, "test_file"),
        run_name=config.run_name or time.strftime("%Y%m%d-%H%M%S"),
    )


def prepare_run(config: Config) -> PreparedRun:
    config = resolve_config(config)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    processes, device = join_processes(resolve_device(config.device))
    space, train, valid, test = load_data(config)
    if config.window_aggregation == "auto":  # a label found in any window counts for multi-label
        config = dataclasses.replace(config, window_aggregation="max" if space.task == "multilabel" else "mean")
    if config.metric_for_best_model not in metric_names(space.task):
        choices = ", ".join(metric_names(space.task))
        raise DataError(
            f"--metric_for_best_model {config.metric_for_best_model}: a {space.task} task reports {choices}"
        )
    transfer = load_transfer_texts(config) if config.transfer_file else None
    tokenizer = load_tokenizer(config.model_name_or_path)
    long_text = long_text_of(config)
    train_set = encode(tokenizer, train, long_text, config.train_windows, config.seed)
    transfer_set = encode(tokenizer, transfer, long_text, config.train_windows, config.seed) if transfer else None
    inputs = len(train_set) + (len(transfer_set) if transfer_set else 0)  # the transfer texts train the student too
    if math.ceil(inputs / config.batch_size) < processes.world_size:
        raise DataError(
            f"--batch_size {config.batch_size}: {inputs} training inputs "
            f"make fewer batches than the {processes.world_size} processes"
        )
    planned = planned_epochs(config, inputs, processes.world_size)
    epoch_budget = describe_epoch_budget(config, planned, inputs, processes.world_size)
    config = dataclasses.replace(config, epochs=planned)  # config.json records what ran
    run_dir = run_directory(config)
    if (run_dir / "config.json").exists() and not config.resume:
        raise DataError(f"{run_dir} already holds a run; choose another --run_name, or add --resume")
    barrier(processes)  # every process has checked before the main one writes config.json
    return PreparedRun(
        config=config,
        space=space,
        tokenizer=tokenizer,
        train_data=train,
        valid_data=valid,
        test_data=test,
        train_set=train_set,
        valid_set=encode(tokenizer, valid, long_text),
        test_set=encode(tokenizer, test, long_text) if test is not None else None,
        collator=PaddingCollator(tokenizer.pad_token_id),
        device=device,
        run_dir=run_dir,
        log_dir=Path(config.logging_dir) / config.run_name,
        processes=processes,
        epoch_budget=epoch_budget,
        transfer_data=transfer,
        transfer_set=transfer_set,
    )


def build_model(run: PreparedRun, loss_fn: ClassificationLoss) -> nn.Module:
    """The model to fine-tune, on the run's device: the checkpoint with the run's label map, cut to
    --student_layers, its classification layer fitted as a linear probe (--head_init probe; not when
    resuming, where the checkpoint's weights replace it) or kept (--head_init checkpoint)."""
    config = run.config
    if config.teacher:
        require_labels_of(run, config.teacher, "--teacher")
    if config.head_init == "checkpoint":
        require_labels_of(run, config.model_name_or_path, "--head_init checkpoint: --model_name_or_path")
    kept = kept_layers(config)  # checked before the weights load
    model = load_model_for_training(config.model_name_or_path, run.space)
    if config.student_layers:
        keep_layers(model, kept)
        print(f"kept encoder layers {', '.join(map(str, kept))} of {config.model_name_or_path}")
    model = model.to(run.device)
    if config.head_init == "probe" and not config.resume:
        print(initialize_head_from_probe(model, run, loss_fn))
    return model


def require_labels_of(run: PreparedRun, directory: str, option: str) -> None:
    """Refuse a classifier trained on other labels (or listing them in another order) than the run's."""
    from transformers import AutoConfig

    own = AutoConfig.from_pretrained(directory, local_files_only=is_local_path(directory))
    labels = [own.id2label[i] for i in range(own.num_labels)]
    if labels != run.space.labels:
        ours, theirs = run.space.labels, labels
        odd = sorted(set(ours) ^ set(theirs))
        detail = f"has {odd[0]!r} in one and not the other" if odd else "lists them in another order"
        raise DataError(f"{option} {directory}: its label map {detail}; it must hold the training data's labels")


def describe_data(run: PreparedRun) -> str:
    counts = Counter(label for labels in hard_label_sets(run.train_data.targets, run.space) for label in labels)
    rarest, most = min(counts.values(), default=0), max(counts.values(), default=0)
    return (
        f"task {run.space.task}, {run.space.num_labels} labels ({rarest} to {most} training rows each); "
        f"rows: {describe_splits(run)}; {run.epoch_budget}, head {run.config.head_init}{describe_long_text(run)}"
    )


def describe_splits(run: PreparedRun) -> str:
    """Rows of each split and where validation and test come from (split off, or no test at all)."""
    config = run.config
    valid = f"validation {len(run.valid_data)}"
    if not config.validation_file:
        valid += f" (split off the training file: {config.valid_size:.0%}, stratified, seed {config.seed})"
    test = f"test {len(run.test_data)}" if run.test_data is not None else "no test split (no --test_file)"
    transfer = f" (+ {len(run.transfer_data)} unlabelled transfer texts)" if run.transfer_data else ""
    return f"train {len(run.train_data)}{transfer}, {valid}, {test}"


def describe_epoch_budget(config: Config, planned: int, train_rows: int, world_size: int) -> str:
    """'21 epochs (--epochs 5 raised to reach --min_steps 600 optimizer steps)', or, when --epochs was
    given alone, what the default step budget would have chosen."""
    epochs = f"{planned} epoch{'s' if planned != 1 else ''}"
    if planned > config.epochs:
        return f"{epochs} (--epochs {config.epochs} raised to reach --min_steps {config.min_steps} steps)"
    default_steps = Config().min_steps
    by_budget = planned_epochs(dataclasses.replace(config, min_steps=default_steps), train_rows, world_size)
    if config.min_steps == 0 and by_budget > config.epochs:
        return (
            f"{epochs} as given (the step budget, --min_steps {default_steps}, would choose {by_budget} "
            "on this data; give --min_steps too to use it)"
        )
    return epochs


def describe_long_text(run: PreparedRun) -> str:
    """How texts longer than max_length are read, and the cost of windows: model inputs per text."""
    config, sets = run.config, [run.train_set, run.valid_set, run.test_set]
    if config.long_text != "windows":
        return f"; {config.long_text} at {config.max_length} tokens"
    per_text = {name: len(s) / s.texts for name, s in zip(("train", "validation", "test"), sets) if s is not None}
    shown = ", ".join(f"{name} {value:.2f}" for name, value in per_text.items())
    return f"; windows of {config.max_length} tokens every {config.window_stride}, inputs per text: {shown}"


def describe_processes(run: PreparedRun) -> str:
    """Under torchrun: the effective batch size, and that the learning rate is used as given."""
    config, count = run.config, run.processes.world_size
    effective = config.batch_size * count * config.gradient_accumulation_steps
    return (
        f"{count} processes: effective batch {effective} ({config.batch_size} per process x {count} processes x "
        f"{config.gradient_accumulation_steps} accumulation); "
        f"--learning_rate {config.learning_rate} as given, not rescaled"
    )


def write_run_metrics(
    run: PreparedRun,
    script: str,
    best: dict[str, float] | None,
    history: list[dict[str, float]],
    calibration: dict | None = None,
) -> None:
    """metrics.json: the script that trained the run, the metric that picked the best model, the
    best validation entry, every validation entry so far (the notebooks read it) and, once
    training has ended, the calibration entry (calibrate_best_model)."""
    content = {
        "trained_with": script,
        "metric_for_best_model": run.config.metric_for_best_model,
        "best": best,
        "history": history,
    }
    if calibration is not None:
        content["calibration"] = calibration
    if run.processes.is_main:
        write_json(run.run_dir / "metrics.json", content)


def test_best_model(run: PreparedRun, best_dir: Path, loss_fn: ClassificationLoss) -> dict[str, float] | None:
    """Reload the best checkpoint from disk, evaluate it on the test split, write
    test_metrics.json and test_predictions.csv. Returns the metrics (None without a test file).
    Under torchrun every process waits until the main one has written the best model, evaluates
    its share of the test rows, and the main one writes the files."""
    if run.test_set is None:
        return None
    from transformers import AutoModelForSequenceClassification

    barrier(run.processes)
    model = AutoModelForSequenceClassification.from_pretrained(best_dir, local_files_only=True).to(run.device)
    threshold = getattr(model.config, "multilabel_threshold", 0.5)
    metrics, logits = evaluate(
        model,
        run.test_set,
        run.collator,
        loss_fn,
        run.space,
        run.config.batch_size,
        run.device,
        threshold,
        run.processes,
    )
    probs, multilabel = probabilities(logits, run.space.task), run.space.task == "multilabel"
    temperature = float(getattr(model.config, "calibration_temperature", 1.0))
    ood = ood_scores(logits.numpy(), multilabel, temperature)
    ood_threshold = float(getattr(model.config, "ood_threshold", np.inf))
    if not multilabel:
        metrics["ece"] = expected_calibration_error(probs, run.test_data.targets)
        metrics["ece_before_temperature"] = expected_calibration_error(
            probabilities(logits * temperature, run.space.task), run.test_data.targets
        )
    metrics["out_of_scope_share"] = float(np.mean(ood > ood_threshold))
    if run.processes.is_main:
        frame = predictions_frame(
            run.test_data.texts,
            run.test_data.targets,
            probs,
            ood,
            ood_threshold,
            run.space,
            threshold,
            run.config.label_delimiter,
        )
        write_json(run.run_dir / "test_metrics.json", metrics)
        write_csv(run.run_dir / "test_predictions.csv", frame)
    return metrics


@dataclass(frozen=True)
class RunResult:
    """What a training script's main() returns to a caller (a benchmark, a notebook, a test)."""

    run_dir: Path  # outputs/<run_name>: best_model/, metrics.json, test_predictions.csv, ...
    best: dict[str, float]  # the validation entry that picked best_model/
    test: dict[str, float] | None  # the best model's test metrics; None without a test file
    train_seconds: float  # the training loop (the probe-fitted head before it and the test after it excluded)


def finish_run(
    run: PreparedRun,
    script: str,
    best: dict[str, float],
    history: list[dict[str, float]],
    loss_fn: ClassificationLoss,
    train_seconds: float,
) -> RunResult:
    """The end of both training scripts, once best_model/ is written: report the best validation
    entry, calibrate the best model (metrics.json gets the calibration), test it from disk, and
    leave the process group."""
    say = print if run.processes.is_main else lambda *args, **kwargs: None
    metric, best_dir = run.config.metric_for_best_model, run.run_dir / "best_model"
    say(
        f"training took {train_seconds:.1f}s; best {metric} "
        f"{best[metric]:.4f} at epoch {best['epoch']} step {best['step']}"
    )
    write_run_metrics(run, script, best, history, calibrate_best_model(run, best_dir))
    test_metrics = test_best_model(run, best_dir, loss_fn)
    if test_metrics is not None:
        say(f"test: {format_metrics(test_metrics)}")
    say(f"outputs in {run.run_dir}")
    leave_processes(run.processes)
    return RunResult(run.run_dir, best, test_metrics, train_seconds)


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


# ---------------------------------------------------------------------------------------
# Checkpoints: the best model (a Hugging Face directory) and the manual loop's training state
# (what a resumed run restores to continue exactly), each written aside and renamed into place
# ---------------------------------------------------------------------------------------


def save_model_directory(model: nn.Module, tokenizer: Any, target: Path, extra_json: dict[str, Any]) -> None:
    """Save a Hugging Face directory (safetensors, tokenizer, label map) plus JSON side files, atomically."""
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, data in extra_json.items():
            write_json(staging / name, data)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    run: PreparedRun,
    progress: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> Path | None:
    """Write <run>/checkpoints/checkpoint-<step>/training_state.pt and delete all but the newest
    --save_total_limit states. It holds the model, optimizer, scheduler and loss scaler, the loop's
    `progress` (position in the epoch, validation history), every process's RNG state (each draws
    its own dropout masks; gathering them is a collective, so every process calls this) and the
    process count. The processes hold the same weights, so only the main one writes; it returns the
    checkpoint's path, the others None."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": from_every_process(run.processes, _rng_state()),
        "progress": progress,
        "world_size": run.processes.world_size,
    }
    if not run.processes.is_main:
        return None
    checkpoints = run.run_dir / "checkpoints"
    target = checkpoints / f"checkpoint-{progress['step']}"
    with staged_directory(target) as staging:
        torch.save(state, staging / "training_state.pt")
    for old in sorted(checkpoints.glob("checkpoint-*"), key=checkpoint_step)[: -run.config.save_total_limit]:
        shutil.rmtree(old)
    return target


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """The saved training state as a dict (see save_training_state)."""
    path = Path(checkpoint) / "training_state.pt"
    if not path.is_file():
        raise DataError(f"{checkpoint}: no training_state.pt (not a checkpoint of manual_classification.py)")
    return torch.load(path, weights_only=False)  # our own file: holds numpy and python RNG states


def restore_training_state(
    checkpoint: Path,
    run: PreparedRun,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Load what save_training_state wrote into the model, optimizer, scheduler and scaler, restore
    this process's RNG state, and return the loop's progress. Refused under another process count:
    the batches of an epoch are shared out by it."""
    state = read_training_state(checkpoint)
    if state["world_size"] != run.processes.world_size:
        raise DataError(
            f"--resume {checkpoint}: saved by {state['world_size']} process(es), resumed by "
            f"{run.processes.world_size}; resume with the same number (the batches of an epoch are shared out by it)"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _restore_rng_state(state["rng"][run.processes.rank])
    return state["progress"]
