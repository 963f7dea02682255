"""Knowledge distillation in the manual loop: a student with fewer encoder layers learns from a
fine-tuned teacher's predictions (and optionally its hidden states), then quantizes like any model.

Intel Neural Compressor quantizes in this project; it no longer distils: its training-time API
(`prepare_compression`, `DistillationConfig`) was deleted in INC 3.8, and `onnx-neural-compressor`
has none. So the student trains here, in `manual_classification.py --teacher DIR`:

- the student is `--model_name_or_path` (by default the teacher's own directory) with only
  `--student_layers` of its encoder layers kept, initialised from those layers' weights, the
  embeddings and the classification layer (DistilBERT kept every other layer of BERT this way);
- loss = (1 - alpha) x the task loss + alpha x the soft-target loss
  (+ --distill_hidden_weight x the MSE between each student layer's output and its teacher layer's);
- the teacher's logits are computed once per training text, in eval mode with its own tokenizer,
  and reused every epoch (cheaper than a teacher forward pass per step, and exact: eval mode has no
  dropout). Only hidden-state matching runs the teacher on every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from data_functions import LabeledData
from intel_compressor_test import DataError
from utility_functions import (
    ClassificationLoss,
    EncodedDataset,
    PaddingCollator,
    PreparedRun,
    autocast,
    encode,
    kept_layers,
    load_tokenizer,
    long_text_of,
    predict_logits,
)


def soft_target_loss(task: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x the distance between softened predictions: single-label, KL(teacher || student) of
    softmax(logits / T) (Hinton et al. 2015); binary, BCE of the student's logit margin / T against
    sigmoid(teacher margin / T); multi-label, per-label BCE of logits / T against sigmoid(teacher /
    T). T^2 keeps the gradient's size independent of T. Zero gradient when student == teacher."""
    student, teacher = student.float() / temperature, teacher.float() / temperature
    if task == "multiclass":
        log_p_student = nn.functional.log_softmax(student, dim=-1)
        log_p_teacher = nn.functional.log_softmax(teacher, dim=-1)
        loss = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    else:
        if task == "binary":  # the binary loss trains the margin of the two logits
            student, teacher = student[:, 1] - student[:, 0], teacher[:, 1] - teacher[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    return temperature**2 * loss


def hidden_state_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], layer_map: list[int], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over student layers of the MSE between student layer k's output and teacher layer
    layer_map[k]'s, over real tokens only (hidden_states[0] is the embeddings, [k + 1] layer k)."""
    mask = mask.unsqueeze(-1).float()
    losses = [
        ((student[k + 1].float() - teacher[t + 1].float()) ** 2 * mask).sum() / (mask.sum() * student[k + 1].shape[-1])
        for k, t in enumerate(layer_map)
    ]
    return torch.stack(losses).mean()


class DistillationLoss(nn.Module):
    """(1 - alpha) x task loss + alpha x soft_target_loss; alpha 0 is exactly the task loss."""

    def __init__(self, task_loss: ClassificationLoss, alpha: float, temperature: float):
        super().__init__()
        self.task_loss, self.alpha, self.temperature = task_loss, alpha, temperature

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        task = self.task_loss(logits, targets)
        if self.alpha == 0:
            return task
        soft = soft_target_loss(self.task_loss.task, logits, teacher_logits, self.temperature)
        return (1 - self.alpha) * task + self.alpha * soft


def load_teacher(run: PreparedRun) -> Any:
    """The teacher of --teacher, in eval mode with gradients off (build_model has checked its labels)."""
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(run.config.teacher, local_files_only=True)
    return teacher.to(run.device).eval().requires_grad_(False)


def teacher_layer_map(kept: list[int], source_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer matched by each student layer: the kept index itself when the student was cut from
    a model of the teacher's depth, else the teacher layer at the same relative depth."""
    return [round((i + 1) * teacher_layers / source_layers) - 1 for i in kept]


def check_hidden_states_match(run: PreparedRun, teacher: Any, teacher_tokenizer: Any, student: nn.Module) -> None:
    """Hidden-state matching compares token by token and feature by feature: the same vocabulary and width."""
    option = f"--distill_hidden_weight {run.config.distill_hidden_weight}"
    if teacher_tokenizer.get_vocab() != run.tokenizer.get_vocab():
        raise DataError(f"{option}: the teacher's tokenizer differs from the student's; use 0 (logits only)")
    widths = teacher.config.hidden_size, student.config.hidden_size
    if widths[0] != widths[1]:
        raise DataError(f"{option}: teacher hidden size {widths[0]} != student's {widths[1]}; use 0 (logits only)")


@dataclass
class Distiller:
    """The teacher's part of the training step: its logits of every training input (precomputed) and,
    with hidden-state matching, the teacher itself with the student-to-teacher layer map."""

    loss_fn: DistillationLoss
    hidden_weight: float
    teacher: Any = None  # kept only when hidden states are matched
    layer_map: list[int] | None = None

    @property
    def wants_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    def __call__(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(output.logits, batch["labels"], batch["teacher_logits"])
        if not self.wants_hidden_states:
            return loss
        with torch.no_grad(), autocast(batch["input_ids"].device):
            teacher = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
        hidden = hidden_state_loss(output.hidden_states, teacher.hidden_states, self.layer_map, batch["attention_mask"])
        return loss + self.hidden_weight * hidden


def teacher_logits_per_text(run: PreparedRun, teacher: Any, teacher_tokenizer: Any, data: LabeledData) -> np.ndarray:
    """The teacher's logits of every text of `data`, read with its own tokenizer (the run's max_length
    and long-text handling; a text's windows combined)."""
    encoded = encode(teacher_tokenizer, data, long_text_of(run.config))
    collator = PaddingCollator(teacher_tokenizer.pad_token_id)
    return predict_logits(teacher, encoded, collator, run.config.batch_size, run.device, run.processes).numpy()


def teacher_logits_per_input(run: PreparedRun, teacher: Any, teacher_tokenizer: Any) -> np.ndarray:
    """The teacher's logits of every training text, repeated for each of the student's inputs of that text."""
    return teacher_logits_per_text(run, teacher, teacher_tokenizer, run.train_data)[run.train_set.owners]


def teacher_labels(task: str, logits: np.ndarray, threshold: float) -> np.ndarray:
    """The teacher's predictions as training targets: its top class (binary, multiclass), or every label
    whose probability passes its multi-label threshold."""
    if task == "multilabel":
        return (1 / (1 + np.exp(-logits)) > threshold).astype(np.float32)
    return logits.argmax(axis=1)


def with_transfer_set(run: PreparedRun, teacher: Any, teacher_tokenizer: Any) -> EncodedDataset:
    """The training set followed by the transfer texts, which the teacher labels: its logits as their
    soft targets and its predicted labels as their task targets. Call after the training set's own
    teacher logits are set."""
    train, transfer = run.train_set, run.transfer_set
    logits = teacher_logits_per_text(run, teacher, teacher_tokenizer, run.transfer_data)
    threshold = float(getattr(teacher.config, "multilabel_threshold", 0.5))
    targets = teacher_labels(run.space.task, logits, threshold).astype(train.targets.dtype)
    joined = EncodedDataset(
        train.input_ids + transfer.input_ids,
        np.concatenate([train.targets, targets]),
        np.concatenate([train.owners, transfer.owners + train.texts]),
        train.aggregation,
    )
    joined.teacher_logits = np.concatenate([train.teacher_logits, logits[transfer.owners]])
    return joined


def build_distiller(run: PreparedRun, task_loss: ClassificationLoss, student: nn.Module) -> tuple[Distiller, str]:
    """The Distiller of --teacher, and a log line. The run's training set gets the teacher's logits."""
    config = run.config
    teacher = load_teacher(run)
    teacher_tokenizer = load_tokenizer(config.teacher)
    run.train_set.teacher_logits = teacher_logits_per_input(run, teacher, teacher_tokenizer)
    if run.transfer_set is not None:
        run.train_set = with_transfer_set(run, teacher, teacher_tokenizer)
    loss_fn = DistillationLoss(task_loss, config.distill_alpha, config.distill_temperature)
    if config.distill_hidden_weight == 0:
        distiller = Distiller(loss_fn, 0.0)
    else:
        from transformers import AutoConfig

        check_hidden_states_match(run, teacher, teacher_tokenizer, student)
        source_layers = AutoConfig.from_pretrained(config.model_name_or_path).num_hidden_layers
        layer_map = teacher_layer_map(kept_layers(config), source_layers, teacher.config.num_hidden_layers)
        distiller = Distiller(loss_fn, config.distill_hidden_weight, teacher, layer_map)
    hidden = f", hidden states x {config.distill_hidden_weight}" if distiller.wants_hidden_states else ""
    line = (
        f"distilling {teacher.config.num_hidden_layers}-layer teacher {config.teacher} into a "
        f"{student.config.num_hidden_layers}-layer student: loss (1 - {config.distill_alpha}) x task + "
        f"{config.distill_alpha} x soft targets at T {config.distill_temperature}{hidden}; "
        f"teacher logits of {len(run.train_data)} training texts computed once"
    )
    if run.transfer_data is not None:
        line += f"; {len(run.transfer_data)} transfer texts of {config.transfer_file} labelled by the teacher"
    return distiller, line
