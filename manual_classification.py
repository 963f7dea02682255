"""Fine-tune a transformer text classifier with a hand-written PyTorch training loop.

    python manual_classification.py                    # all-MiniLM-L6-v2 on BANKING77, offline
    python manual_classification.py --train_file reviews.csv --text_column review --label_column stars

Binary tasks train BCE-with-logits (pos_weight = negatives/positives), multi-class tasks
cross-entropy, multi-label tasks per-label BCE on hard or soft (0..1) targets. The lower layers
are frozen for the first epochs, the best checkpoint by validation metric is kept, and the
run ends by testing that checkpoint. Outputs go to <output_dir>/<run_name>/, TensorBoard logs
to runs/<run_name>/.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from configs import parse_config
from utility_functions import (
    ClassificationLoss,
    PreparedRun,
    apply_freeze_schedule,
    autocast,
    autocast_dtype,
    build_loss,
    build_optimizer,
    build_scheduler,
    describe_data,
    evaluate,
    format_metrics,
    gpu_utilization,
    is_improvement,
    load_model_for_training,
    prepare_run,
    progress_bar,
    run_cli,
    save_model_directory,
    test_best_model,
    top_k_summary,
    train_loader,
    write_json,
)


def validate(model: torch.nn.Module, run: PreparedRun, loss_fn: ClassificationLoss, writer: SummaryWriter, step: int) -> dict[str, float]:
    """Validation metrics, logged to TensorBoard with a few examples and their top-5 predictions."""
    metrics, probs = evaluate(model, run.valid_set, run.collator, loss_fn, run.space, run.config.batch_size, run.device)
    for name, value in metrics.items():
        writer.add_scalar(f"eval/{name}", value, step)
    writer.add_text("eval/examples", top_k_summary(run.valid_data.texts, run.valid_data.targets, probs, run.space), step)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv, description=__doc__)
    run = prepare_run(config)  # reads and checks every split before anything is written
    config, device = run.config, run.device
    print(f"run {config.run_name} on {device}: {describe_data(run)}")

    model = load_model_for_training(config.model_name_or_path, run.space).to(device)
    loss_fn = build_loss(run.space, run.train_data.targets, config).to(device)
    loader = train_loader(run.train_set, run.collator, config)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)

    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / "config.json", dataclasses.asdict(config))
    writer = SummaryWriter(run.log_dir)
    history: list[dict] = []
    best: dict | None = None
    best_dir = run.run_dir / "best_model"
    metric = config.metric_for_best_model

    def validate_and_checkpoint(epoch: int, step: int, train_loss: float) -> None:
        nonlocal best
        metrics = validate(model, run, loss_fn, writer, step)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": train_loss, **metrics})
        improved = is_improvement(metric, metrics[metric], best and best[metric])
        print(f"epoch {epoch + 1} step {step}: validation {format_metrics(metrics)}{' (best)' if improved else ''}")
        if improved:
            best = history[-1]
            if run.space.task == "multilabel":
                model.config.multilabel_threshold = metrics["threshold"]  # reused on test and at inference
            save_model_directory(model, run.tokenizer, best_dir, {"metrics.json": best, "training_config.json": dataclasses.asdict(config)})
        write_json(run.run_dir / "metrics.json", {"metric_for_best_model": metric, "best": best, "history": history})
        model.train()

    step, started = 0, time.time()
    for epoch in range(config.epochs):
        print(f"epoch {epoch + 1}: {apply_freeze_schedule(model, config, epoch)}")
        loader.batch_sampler.set_epoch(epoch)  # a fresh, reproducible order every epoch
        model.train()
        running_loss, seen = 0.0, 0
        progress = progress_bar(loader, f"epoch {epoch + 1}/{config.epochs}")
        for i, batch in enumerate(progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast(device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits, batch["labels"])
            scaler.scale(loss / config.gradient_accumulation_steps).backward()
            running_loss += loss.item()
            seen += 1
            if (i + 1) % config.gradient_accumulation_steps and i + 1 < len(loader):
                continue  # keep accumulating gradients
            if config.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            lr = scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", **gpu_utilization(device))
            if step % config.logging_steps == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/learning_rate", lr, step)
            if config.eval_steps and step % config.eval_steps == 0:
                validate_and_checkpoint(epoch, step, running_loss / seen)
        validate_and_checkpoint(epoch, step, running_loss / seen)
    writer.close()

    train_seconds = time.time() - started
    print(f"training took {train_seconds:.0f}s; best {metric} {best[metric]:.4f} at epoch {best['epoch']} step {best['step']}")
    test_metrics = test_best_model(run, best_dir, loss_fn)
    if test_metrics is not None:
        print(f"test: {format_metrics(test_metrics)}")
    print(f"outputs in {run.run_dir}")
    return {"run_dir": run.run_dir, "best": best, "test": test_metrics, "train_seconds": train_seconds}


if __name__ == "__main__":
    sys.exit(run_cli(main))
