"""The same job as manual_classification.py, through the Hugging Face `Trainer` API.

    python trainer_classification.py                   # all-MiniLM-L6-v2 on BANKING77, offline
    python trainer_classification.py --run_name demo --resume        # continue an interrupted run

Same configs.py options, same data, losses, freeze schedule, metrics and output layout as the
hand-written loop, so the two can be compared on equal terms. What differs is who runs the
loop: Trainer (its length-grouped sampler, its checkpoints under <run>/checkpoints/).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np
import torch
from torch.utils.data import Sampler, SequentialSampler
from torch.utils.tensorboard import SummaryWriter
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from configs import Config, checkpoint_to_resume, parse_config
from data_functions import LabelSpace, write_json
from intel_compressor_test import DataError, run_cli
from utility_functions import (
    ClassificationLoss,
    EncodedDataset,
    PreparedRun,
    RunResult,
    apply_freeze_schedule,
    autocast_dtype,
    build_loss,
    build_model,
    compute_metrics,
    describe_data,
    describe_processes,
    finish_run,
    prepare_run,
    probabilities,
    save_model_directory,
    train_collator,
    tune_threshold,
)

TRAINER_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "epoch")


class FreezeCallback(TrainerCallback):
    """The manual loop's freeze schedule, applied at the start of each epoch. Trainer has built
    its optimizer over every parameter by then, so unfrozen layers start training at once."""

    def __init__(self, config: Config):
        self.config = config

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = int((state.epoch or 0) + 1e-6)  # state.epoch is fractional mid-epoch after a resume
        described = apply_freeze_schedule(model, self.config, epoch)  # on every process alike
        if state.is_world_process_zero:
            print(f"epoch {epoch + 1}: {described}")


class ClassificationTrainer(Trainer):
    # Our loss is a per-batch mean: Trainer must divide it by the accumulation steps, as the manual loop does.
    loss_is_scaled_for_ga = False

    def _get_eval_sampler(self, eval_dataset: EncodedDataset) -> Sampler | None:
        """Evaluation in dataset order. Under group_by_length, Trainer (transformers 5) also length-groups
        and shuffles the evaluation batches, but the metrics match predictions with the validation rows
        (and a text's windows) by position. Under torchrun Trainer shards the rows in order itself."""
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def loss_for_trainer(loss_fn: ClassificationLoss):
    """Adapter from Trainer's compute_loss_func(outputs, labels, num_items_in_batch) to our loss."""

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return loss_fn(outputs.logits, labels)

    return compute_loss


def metrics_for_trainer(space: LabelSpace, valid_set: EncodedDataset):
    """Trainer's compute_metrics: the same metrics as the manual loop (threshold tuned on validation),
    on one prediction per text (Trainer predicts every input of `valid_set`, in order; with --long_text
    windows a text's windows are combined first; Trainer's eval_loss stays the mean over inputs)."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        probs = probabilities(torch.as_tensor(valid_set.combine(prediction.predictions)), space.task)
        targets = valid_set.targets
        threshold = tune_threshold(probs, targets) if space.task == "multilabel" else 0.5
        return compute_metrics(space.task, probs, targets, threshold)

    return compute


def training_arguments(run: PreparedRun) -> TrainingArguments:
    config = run.config
    per_steps = config.eval_steps > 0
    dtype = autocast_dtype(run.device)
    return TrainingArguments(
        output_dir=str(run.run_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=config.lr_scheduler_type,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 1e9,
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        eval_strategy="steps" if per_steps else "epoch",
        save_strategy="steps" if per_steps else "epoch",
        eval_steps=config.eval_steps or None,
        save_steps=config.eval_steps or 500,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=config.metric_for_best_model,
        greater_is_better=config.metric_for_best_model != "loss",
        logging_steps=config.logging_steps,
        report_to="none",  # TensorBoard is added as a callback, writing to runs/<run_name>
        seed=config.seed,
        use_cpu=run.device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        # under torchrun, DistributedDataParallel is built once with every layer trainable; the layers
        # frozen in the first epochs then produce no gradients, which it must be told to expect
        ddp_find_unused_parameters=config.freeze_epochs > 0 and config.freeze_layers > 0,
        # our loss is a per-batch mean; with this on, Trainer would multiply it by the number of
        # processes (it expects a sum over the global batch), doubling the step under torchrun
        average_tokens_across_devices=False,
    )


def build_trainer(run: PreparedRun, callbacks: list[TrainerCallback] | None = None) -> ClassificationTrainer:
    """Model, loss, callbacks and Trainer for a prepared run (the tests use it directly)."""
    loss_fn = build_loss(run.space, run.train_data.targets, run.config)
    model = build_model(run, loss_fn)
    patience = run.config.early_stopping_patience
    if patience:
        callbacks = [EarlyStoppingCallback(early_stopping_patience=patience), *(callbacks or [])]
    return ClassificationTrainer(
        model=model,
        args=training_arguments(run),
        data_collator=train_collator(run),
        train_dataset=run.train_set,
        eval_dataset=run.valid_set,
        processing_class=run.tokenizer,
        compute_loss_func=loss_for_trainer(loss_fn),
        compute_metrics=metrics_for_trainer(run.space, run.valid_set),
        callbacks=[FreezeCallback(run.config), *tensorboard(run), *(callbacks or [])],
    )


def tensorboard(run: PreparedRun) -> list[TrainerCallback]:
    """TensorBoard logging to runs/<run_name>, from the main process only."""
    return [TensorBoardCallback(SummaryWriter(run.log_dir))] if run.processes.is_main else []


def validation_history(log_history: list[dict]) -> list[dict]:
    """Trainer's log into the manual loop's metrics.json entries: epoch, step, mean training loss
    since the previous evaluation, and the validation metrics without their `eval_` prefix."""
    history, losses = [], []
    for entry in log_history:
        if "loss" in entry:
            losses.append(entry["loss"])
        if "eval_loss" in entry:
            metrics = {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and k[5:] not in TRAINER_BOOKKEEPING}
            train_loss = float(np.mean(losses)) if losses else None
            history.append(
                {"epoch": math.ceil(entry["epoch"] - 1e-6), "step": entry["step"], "train_loss": train_loss, **metrics}
            )
            losses = []
    return history


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> RunResult:
    config = parse_config(argv, description=__doc__)
    if config.teacher:
        raise DataError("--teacher: distillation runs in manual_classification.py; this script does not distil")
    run = prepare_run(config)  # reads and checks every split before anything is written
    config, processes = run.config, run.processes
    say = print if processes.is_main else lambda *args, **kwargs: None
    say(f"run {config.run_name} on {run.device}: {describe_data(run)}")
    if processes.world_size > 1:
        say(describe_processes(run))
    trainer = build_trainer(run, callbacks)

    if processes.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "config.json", dataclasses.asdict(config))
    resume = str(checkpoint_to_resume(config)) if config.resume else None
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - started

    # load_best_model_at_end has put the best checkpoint's weights back into trainer.model
    history = validation_history(trainer.state.log_history)
    best = next(h for h in history if h["step"] == trainer.state.best_global_step)
    if run.space.task == "multilabel":
        trainer.model.config.multilabel_threshold = best["threshold"]
    if processes.is_main:
        extra = {"metrics.json": best, "training_config.json": dataclasses.asdict(config)}
        save_model_directory(trainer.model, run.tokenizer, run.run_dir / "best_model", extra)
    loss_fn = build_loss(run.space, run.train_data.targets, config)
    return finish_run(run, "trainer_classification.py", best, history, loss_fn, train_seconds)


if __name__ == "__main__":
    sys.exit(run_cli(main))
