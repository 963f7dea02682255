"""Which parameters get gradients in each phase of the freeze schedule."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from configs import Config
from intel_compressor_test import DataError
from utility_functions import apply_freeze_schedule, describe_trainable, trainable_parameter_names

pytestmark = pytest.mark.unit  # pure: no training, no subprocess


def parameters_with_gradients(model: torch.nn.Module) -> set[str]:
    model.zero_grad(set_to_none=True)
    ids = torch.randint(100, 2000, (2, 9))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}


def test_lower_layers_frozen_then_unfrozen(tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    config = dataclasses.replace(Config(), freeze_layers=1, freeze_epochs=2)
    every = {name for name, _ in model.named_parameters()}
    frozen = {n for n in every if n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}
    assert frozen and len(frozen) < len(every)

    for epoch in (0, 1):
        description = apply_freeze_schedule(model, config, epoch)
        assert parameters_with_gradients(model) == every - frozen
        assert set(trainable_parameter_names(model)) == every - frozen
        assert "frozen: bert.embeddings, bert.encoder.layer.0" in description
    apply_freeze_schedule(model, config, 2)
    assert parameters_with_gradients(model) == every
    assert describe_trainable(model).endswith("frozen: nothing")


def test_freeze_epochs_zero_trains_everything(tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    apply_freeze_schedule(model, dataclasses.replace(Config(), freeze_layers=2, freeze_epochs=0), 0)
    assert len(parameters_with_gradients(model)) == len(list(model.parameters()))


def test_unmappable_architecture_and_too_many_layers_fail_clearly(tiny_bert_dir):
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(DataError, match="cannot map the GPT2ForSequenceClassification architecture.*--freeze_epochs 0"):
        apply_freeze_schedule(gpt2, Config(), 0)
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    with pytest.raises(DataError, match="--freeze_layers 5 exceeds the model's 2 encoder layers"):
        apply_freeze_schedule(bert, dataclasses.replace(Config(), freeze_layers=5), 0)
