"""Fine-tune a transformer text classifier with a hand-written PyTorch training loop.

    python manual_classification.py                    # all-MiniLM-L6-v2 on BANKING77, offline
    python manual_classification.py --train_file reviews.csv --text_column review --label_column stars
    python manual_classification.py --run_name reviews --resume     # continue an interrupted run
    python manual_classification.py --teacher outputs/default/best_model --student_layers 3   # distil

Binary tasks train BCE-with-logits (pos_weight = negatives/positives), multi-class tasks
cross-entropy, multi-label tasks per-label BCE on hard or soft (0..1) targets. The head starts as
a linear probe fitted on the frozen model's features (LP-FT), small data trains at least
--min_steps optimizer steps, the lower layers are frozen for the first epochs, the best
checkpoint by validation metric is kept, its probabilities are calibrated (a temperature) and
given an out-of-scope threshold, and the run ends by testing that checkpoint. With --teacher, a
student with fewer layers learns from a fine-tuned model's predictions too (distillation.py).
Outputs go to <output_dir>/<run_name>/, TensorBoard logs to runs/<run_name>/. A training state is
saved after every epoch (and every --eval_steps), so a resumed run continues exactly: same batches,
same losses.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from configs import checkpoint_to_resume, parse_config
from data_functions import write_json
from distillation import build_distiller
from intel_compressor_test import run_cli
from utility_functions import (
    ClassificationLoss,
    PreparedRun,
    RunResult,
    apply_freeze_schedule,
    autocast,
    autocast_dtype,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    describe_data,
    describe_processes,
    evaluate,
    finish_run,
    format_metrics,
    gpu_utilization,
    is_improvement,
    mean_across,
    prepare_run,
    probabilities,
    progress_bar,
    restore_training_state,
    save_model_directory,
    save_training_state,
    stopped_early,
    top_k_summary,
    train_loader,
    write_run_metrics,
)


@dataclass
class Progress:
    """Where training stands; saved in every training state so a resumed run picks up exactly."""

    epoch: int = 0  # epoch in progress, 0-based
    batches_done: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps so far
    epoch_loss: float = 0.0  # sum of step losses in this epoch ...
    epoch_steps: int = 0  # ... over this many steps
    window_loss: float = 0.0  # sum of step losses since the last TensorBoard point ...
    window_steps: int = 0  # ... over this many steps
    best: dict | None = None
    history: list[dict] = field(default_factory=list)

    def record_step(self, loss: float, batches_done: int) -> None:
        """One optimizer step done, after `batches_done` batches of the epoch; `loss` (its mean
        across processes) counts towards the epoch's mean and the next TensorBoard point."""
        self.step, self.batches_done = self.step + 1, batches_done
        self.epoch_loss, self.epoch_steps = self.epoch_loss + loss, self.epoch_steps + 1
        self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1

    def take_window_loss(self) -> float:
        """The mean step loss since the last TensorBoard point, starting the next window."""
        loss = self.window_loss / self.window_steps
        self.window_loss, self.window_steps = 0.0, 0
        return loss

    def end_epoch(self) -> None:
        self.epoch, self.batches_done = self.epoch + 1, 0
        self.epoch_loss, self.epoch_steps = 0.0, 0


def validate(
    model: torch.nn.Module, run: PreparedRun, loss_fn: ClassificationLoss, writer: SummaryWriter | None, step: int
) -> dict[str, float]:
    """Validation metrics (the same on every process), logged to TensorBoard with a few examples
    and their top-5 predictions."""
    metrics, logits = evaluate(
        model,
        run.valid_set,
        run.collator,
        loss_fn,
        run.space,
        run.config.batch_size,
        run.device,
        processes=run.processes,
    )
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
        probs = probabilities(logits, run.space.task)
        writer.add_text(
            "eval/examples", top_k_summary(run.valid_data.texts, run.valid_data.targets, probs, run.space), step
        )
    return metrics


def for_training(model: torch.nn.Module, run: PreparedRun) -> torch.nn.Module:
    """The model as the training step calls it: alone, the model itself; under torchrun, wrapped in
    DistributedDataParallel, which averages the gradients of all processes. DDP registers its hooks
    on the parameters trainable when it is built, so it is built again whenever the freeze schedule
    changes them (building it also copies the main process's weights to every process)."""
    if run.processes.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def main(argv: list[str] | None = None) -> RunResult:
    config = parse_config(argv, description=__doc__)
    run = prepare_run(config)  # reads and checks every split before anything is written
    config, device, processes = run.config, run.device, run.processes
    say = print if processes.is_main else lambda *args, **kwargs: None
    say(f"run {config.run_name} on {device}: {describe_data(run)}")
    if processes.world_size > 1:
        say(describe_processes(run))

    loss_fn = build_loss(run.space, run.train_data.targets, config).to(device)
    model = build_model(run, loss_fn)
    distiller = None
    if config.teacher:
        distiller, described = build_distiller(run, loss_fn, model)  # before the loader: it adds the teacher's logits
        say(described)
    loader = train_loader(run)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)
    progress = Progress()
    if config.resume:
        checkpoint = checkpoint_to_resume(config)
        progress = Progress(**restore_training_state(checkpoint, run, model, optimizer, scheduler, scaler))
        say(
            f"resuming from {checkpoint}: epoch {progress.epoch + 1}, "
            f"batch {progress.batches_done}, step {progress.step}"
        )

    if processes.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "config.json", dataclasses.asdict(config))
    writer = SummaryWriter(run.log_dir) if processes.is_main else None
    best_dir = run.run_dir / "best_model"
    metric = config.metric_for_best_model

    def save_state() -> None:
        save_training_state(run, dataclasses.asdict(progress), model, optimizer, scheduler, scaler)

    def validate_and_checkpoint() -> None:
        metrics = validate(model, run, loss_fn, writer, progress.step)
        train_loss = progress.epoch_loss / max(progress.epoch_steps, 1)
        progress.history.append(
            {"epoch": progress.epoch + 1, "step": progress.step, "train_loss": train_loss, **metrics}
        )
        improved = is_improvement(metric, metrics[metric], progress.best and progress.best[metric])
        say(
            f"epoch {progress.epoch + 1} step {progress.step}: validation "
            f"{format_metrics(metrics)}{' (best)' if improved else ''}"
        )
        if improved:
            progress.best = progress.history[-1]
            if run.space.task == "multilabel":
                model.config.multilabel_threshold = metrics["threshold"]  # reused on test and at inference
            extra = {"metrics.json": progress.best, "training_config.json": dataclasses.asdict(config)}
            if processes.is_main:
                save_model_directory(model, run.tokenizer, best_dir, extra)
        write_run_metrics(run, "manual_classification.py", progress.best, progress.history)
        model.train()

    started = time.time()
    try:
        while progress.epoch < config.epochs:
            if stopped_early(progress.history, progress.best, config.early_stopping_patience):
                say(f"stopping early: {config.early_stopping_patience} validations without a better {metric}")
                break
            epoch = progress.epoch
            say(f"epoch {epoch + 1}: {apply_freeze_schedule(model, config, epoch)}")
            trained = for_training(model, run)
            loader.batch_sampler.set_epoch(epoch, skip=progress.batches_done)  # reproducible order per epoch
            model.train()
            step_loss, micro_batches = 0.0, 0
            bar = progress_bar(
                loader, f"epoch {epoch + 1}/{config.epochs}", done=progress.batches_done, show=processes.is_main
            )
            for i, batch in enumerate(bar, start=progress.batches_done):
                batch = {key: value.to(device) for key, value in batch.items()}
                # the optimizer steps after every gradient_accumulation_steps batches, and after the epoch's last
                ends_step = (i + 1) % config.gradient_accumulation_steps == 0 or i + 1 == len(loader)
                # gradients are averaged across processes on the step's last micro-batch only
                with trained.no_sync() if not ends_step and trained is not model else nullcontext():
                    with autocast(device):
                        output = trained(
                            input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            output_hidden_states=distiller is not None and distiller.wants_hidden_states,
                        )
                    loss = loss_fn(output.logits, batch["labels"]) if distiller is None else distiller(output, batch)
                    scaler.scale(loss / config.gradient_accumulation_steps).backward()
                step_loss += loss.item()
                micro_batches += 1
                if not ends_step:
                    continue
                if config.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                mean_loss, step_loss, micro_batches = mean_across(processes, step_loss / micro_batches), 0.0, 0
                progress.record_step(mean_loss, batches_done=i + 1)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **gpu_utilization(device), refresh=False)
                if progress.step % config.logging_steps == 0:
                    window_loss = progress.take_window_loss()
                    if writer is not None:
                        writer.add_scalar("train/loss", window_loss, progress.step)
                        writer.add_scalar("train/learning_rate", lr, progress.step)
                if config.eval_steps and progress.step % config.eval_steps == 0 and i + 1 < len(loader):
                    validate_and_checkpoint()
                    save_state()
            validate_and_checkpoint()
            progress.end_epoch()
            save_state()
    except KeyboardInterrupt:
        if processes.is_main:
            print(
                f"\ninterrupted; best model in {best_dir}; continue with: --run_name {config.run_name} --resume",
                file=sys.stderr,
            )
        raise
    finally:
        if writer is not None:
            writer.close()

    return finish_run(run, "manual_classification.py", progress.best, progress.history, loss_fn, time.time() - started)


if __name__ == "__main__":
    sys.exit(run_cli(main))
