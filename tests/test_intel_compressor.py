"""Quantize a tiny BERT trained on real BANKING77 and NLU++ slices with intel_compressor.py, then
run it through the edge script: in a fresh process without transformers, on texts and on a
streamed CSV, against the fp32 model; and the one-line errors for bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import intel_compressor
import intel_compressor_test
from configs import Config
from tests.conftest import FAST_TIMING, REPO, banking77_slice, shared_file
from utility_functions import PaddingCollator, encode, load_split, load_tokenizer, predict_logits, run_cli

REPORT_FIELDS = {
    "mode", "fp32_layers", "inc_version", "torch_version", "source", "metric", "tolerance_points", "within_tolerance",
    "fp32", "int8", "agreement", "size_bytes", "size_ratio", "candidates", "calibration_texts", "validation_rows",
    "num_threads", "cpu_capability", "seconds",
}  # fmt: skip
SPEED_FIELDS = {"latency_batch1_p50_ms", "latency_batch1_p95_ms", "throughput_batch32_texts_per_s", "size_mb"}


def test_report_has_fp32_and_int8_side_by_side(banking_runs):
    report = banking_runs["report"]
    assert json.loads((banking_runs["int8"] / "quantization_report.json").read_text()) == report
    assert set(report) == REPORT_FIELDS
    assert report["mode"] == "static" and report["fp32_layers"] == []
    assert report["inc_version"].startswith("3.") and report["torch_version"] == torch.__version__
    for side in ("fp32", "int8"):
        assert SPEED_FIELDS | {"accuracy", "macro_f1"} <= set(report[side])
        assert report[side]["latency_batch1_p95_ms"] >= report[side]["latency_batch1_p50_ms"] > 0
    assert report["validation_rows"] == 20 and report["calibration_texts"] == 180  # valid_size 0.1 of 200 rows
    # int8 weights: the 30522 x 64 embedding table alone is 7.5 MiB in fp32 and 1.9 MiB in int8 (the
    # compiled code adds about 2 MiB, which a model this tiny cannot amortise; MiniLM's is 29%)
    assert report["size_bytes"]["int8"] < 0.6 * report["size_bytes"]["fp32"]
    assert sorted(p.name for p in banking_runs["int8"].iterdir()) == ["edge_config.json", "model.so", "quantization_report.json", "tokenizer.json"]
    assert report["agreement"] >= 0.8


def test_int8_runs_in_a_fresh_process_without_importing_torch_or_transformers(banking_runs):
    texts = pd.read_csv(banking_runs["test"])["text"].tolist()
    script = (
        "import json, sys; import intel_compressor_test as edge\n"
        f"model = edge.load_classifier({str(banking_runs['int8'])!r})\n"
        f"probs = model.probabilities({texts!r}, batch_size=4)\n"
        "print(json.dumps({'probs': probs.tolist(), 'heavy': sorted({'torch', 'transformers', 'pandas', 'neural_compressor'} & set(sys.modules))}))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    out = json.loads(result.stdout)
    assert out["heavy"] == []
    int8_probs = np.array(out["probs"])
    fp32_probs = intel_compressor_test.load_classifier(banking_runs["best"]).probabilities(texts)
    np.testing.assert_allclose(int8_probs.sum(axis=1), 1, atol=1e-4)
    agreement = (int8_probs.argmax(axis=1) == fp32_probs.argmax(axis=1)).mean()
    assert agreement >= 0.8
    assert np.abs(int8_probs - fp32_probs).max() < 0.3


def test_fp32_directory_matches_the_training_code(banking_runs):
    """The edge script's own tokenisation (tokenizers only) gives the logits the training code gives."""
    data, _ = load_split(str(banking_runs["test"]), Config())
    tokenizer = load_tokenizer(str(banking_runs["best"]))
    model = AutoModelForSequenceClassification.from_pretrained(banking_runs["best"]).eval()
    logits = predict_logits(model, encode(tokenizer, data, 64), PaddingCollator(tokenizer.pad_token_id), 8, torch.device("cpu"))
    edge = intel_compressor_test.load_classifier(banking_runs["best"])
    assert edge.kind == "fp32" and edge.max_length == 64
    np.testing.assert_allclose(edge.probabilities(data.texts, 8), torch.softmax(logits, -1).numpy(), atol=1e-5)


def test_command_line_prints_label_and_probability_per_text(banking_runs):
    texts = ["I still have not received my new card", "How do I activate my card?"]
    result = subprocess.run(
        [sys.executable, "intel_compressor_test.py", f"--model={banking_runs['int8']}", *texts], cwd=REPO, capture_output=True, text=True, check=True
    )
    lines = result.stdout.strip().splitlines()
    labels = json.loads((banking_runs["int8"] / "edge_config.json").read_text())["labels"]
    assert [line.split("\t")[1] for line in lines] == texts
    for line in lines:
        label, probability = line.split("\t")[0].rsplit(" ", 1)
        assert label in labels and 1 / len(labels) < float(probability) <= 1
    assert "loaded int8 model" in result.stderr


def test_csv_is_streamed_in_chunks_with_one_probability_column_per_label(banking_runs, tmp_path):
    frame = pd.read_csv(banking_runs["test"]).assign(id=lambda f: range(len(f)))
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    frame.to_csv(source, index=False)
    intel_compressor_test.main([f"--model={banking_runs['int8']}", f"--input={source}", f"--output={target}", "--chunk_rows=7", "--batch_size=3"])
    out = pd.read_csv(target)
    model = intel_compressor_test.load_classifier(banking_runs["int8"])
    prob_columns = [f"prob_{label}" for label in model.labels]
    assert list(out.columns) == [*frame.columns, "predicted", *prob_columns]
    assert out["text"].tolist() == frame["text"].tolist() and out["id"].tolist() == frame["id"].tolist()
    whole = model.probabilities(frame["text"].tolist(), batch_size=32)
    np.testing.assert_allclose(out[prob_columns].to_numpy(), whole, atol=2e-5)  # chunking and batching change nothing
    assert (np.array(model.labels)[whole.argmax(axis=1)] == out["predicted"]).all()


def test_auto_keeps_the_fastest_variant_within_the_tolerance(banking_runs, tmp_path):
    tolerance = 2.0  # points; 20 validation rows move macro-F1 in steps of several points
    report = intel_compressor.main([f"--model={banking_runs['best']}", f"--output={tmp_path / 'auto'}", "--mode=auto", f"--tolerance={tolerance}", *FAST_TIMING])
    candidates = report["candidates"]
    assert {"static", "dynamic", "weight-only"} <= set(candidates)
    fp32 = report["fp32"]["macro_f1"]
    chosen = candidates[report["mode"] + (" (fp32 head)" if report["fp32_layers"] else "")]
    assert {k: chosen[k] for k in report["int8"]} == report["int8"] and report["within_tolerance"]
    assert fp32 - chosen["macro_f1"] <= tolerance / 100 + 1e-9
    for name, figures in candidates.items():
        if figures["throughput_batch32_texts_per_s"] > chosen["throughput_batch32_texts_per_s"]:
            assert fp32 - figures["macro_f1"] > tolerance / 100, f"{name} is faster and within the tolerance"
    assert intel_compressor_test.load_classifier(tmp_path / "auto").probabilities(["my card is lost"]).shape == (1, 5)


def test_multilabel_weight_only_writes_labels_above_the_tuned_threshold(nlupp_run, tmp_path):
    best, test = nlupp_run["best"], nlupp_run["test"]
    int8 = tmp_path / "int8"
    report = intel_compressor.main([f"--model={best}", f"--output={int8}", "--mode=weight-only", "--calibration_size=64", *FAST_TIMING])
    assert report["mode"] == "weight-only" and "micro_f1" in report["int8"]
    model = intel_compressor_test.load_classifier(int8)
    assert model.multilabel and model.threshold == json.loads((best / "config.json").read_text())["multilabel_threshold"]
    target = tmp_path / "preds.csv"
    intel_compressor_test.main([f"--model={int8}", f"--input={test}", f"--output={target}"])
    out = pd.read_csv(target, keep_default_na=False)
    probs = out[[f"prob_{label}" for label in model.labels]].to_numpy()
    above = [";".join(np.array(model.labels)[row >= model.threshold]) for row in probs]
    assert out["predicted"].tolist() == above
    fp32 = intel_compressor_test.load_classifier(best).probabilities(out["text"].tolist())
    assert np.abs(probs - fp32).max() < 0.05  # int8 weights, fp32 activations: close to fp32


def test_ctypes_runner_returns_what_torchs_own_aoti_runner_returns(banking_runs):
    """The edge calls model.so through AOTInductor's C interface; torch's C++ runner is the reference."""
    library = banking_runs["int8"] / "model.so"
    model = intel_compressor_test.load_classifier(banking_runs["int8"])
    texts = pd.read_csv(banking_runs["test"])["text"].tolist()[:7]
    input_ids, mask = intel_compressor_test.pad(model.token_ids(texts), model.pad_token_id)  # 7 texts, padded
    reference = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1).run([torch.from_numpy(input_ids), torch.from_numpy(mask)])[0]
    logits = intel_compressor_test.CompiledProgram(library)(input_ids, mask)
    assert logits.dtype == np.float32 and logits.shape == (7, 5)
    np.testing.assert_array_equal(logits, reference.numpy())


def test_edge_refuses_a_program_compiled_for_another_torch(banking_runs, tmp_path):
    copy = tmp_path / "int8"
    shutil.copytree(banking_runs["int8"], copy)
    config = json.loads((copy / "edge_config.json").read_text())
    (copy / "edge_config.json").write_text(json.dumps({**config, "torch_version": "2.12.0+cpu"}))
    with pytest.raises(intel_compressor_test.EdgeError, match=r"compiled for torch 2.12.0\+cpu, the installed torch is 2.13.0"):
        intel_compressor_test.load_classifier(copy)


LONG = intel_compressor.MATH_ATTENTION_MAX_TOKENS + 32  # max_length of the tiny models: both attention forms in reach
TINY_ARCHITECTURES = {
    "roberta": lambda vocab: RobertaForSequenceClassification(RobertaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=LONG + 2, pad_token_id=0, num_labels=5)),  # positions start after the padding id
    "distilbert": lambda vocab: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=LONG, pad_token_id=0, num_labels=5)),
}  # fmt: skip


def short_and_long_texts(count: int) -> list[str]:
    """Real BANKING77 texts (about 16 tokens), every other one run on with the next few, past the
    length where the compiled program switches its attention form."""
    texts = pd.read_csv(shared_file("banking77/test.csv"))["text"].sample(count * 8, random_state=0).tolist()
    return [" ".join(texts[i : i + 8]) if i % 16 else texts[i] for i in range(0, len(texts), 8)]


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_roberta_and_distilbert_quantize_and_run_at_the_edge(architecture, minilm_path, tmp_path):
    """A random tiny model of each architecture goes through the static path (int8 embedding, INC
    PT2E, AOTInductor) and the edge runner; its logits stay close to fp32 eager on real texts, short
    ones and ones long enough for the program's other attention form."""
    torch.manual_seed(0)
    directory = tmp_path / architecture
    TINY_ARCHITECTURES[architecture](AutoTokenizer.from_pretrained(minilm_path).vocab_size).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(directory)
    assert intel_compressor.check_model_directory(directory)["model_type"] == architecture
    fp32 = intel_compressor_test.load_classifier(directory)
    texts = short_and_long_texts(60)
    rows = [ids[:LONG] for ids in fp32.token_ids(texts)]
    batches = [intel_compressor.torch_batch(rows[i : i + 10], fp32.pad_token_id) for i in range(0, len(texts), 10)]
    module = intel_compressor.load_for_int8_program(directory)
    quantized = intel_compressor.quantize_pt2e(module, "static", batches, LONG, [])
    intel_compressor.compile_program(quantized, batches[0], LONG, directory / "model.so", freeze=True)
    program = intel_compressor_test.CompiledProgram(directory / "model.so")
    for batch in rows[:8:2], rows[:16]:  # short texts only (plain attention), then up to LONG tokens (SDPA)
        input_ids, mask = intel_compressor_test.pad(batch, fp32.pad_token_id)
        expected, logits = fp32.forward(input_ids, mask), program(input_ids, mask)
        assert logits.shape == expected.shape == (len(batch), 5)
        assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()  # int8 noise, not a different function
    assert input_ids.shape[1] > intel_compressor.MATH_ATTENTION_MAX_TOKENS


@pytest.mark.parametrize("length", [24, intel_compressor.MATH_ATTENTION_MAX_TOKENS + 40])
def test_length_switched_attention_matches_the_models_own(length, tiny_bert_dir, tmp_path):
    """The attention of the int8 program computes what transformers' SDPA attention computes, in
    both of its forms: fp32, on a padded batch short enough for one form and long enough for the other."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_bert_dir, max_position_embeddings=256)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    texts = short_and_long_texts(6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding masked out
    with torch.no_grad():
        model = intel_compressor.load_hf_model(tmp_path)
        switched = intel_compressor.load_for_int8_program(tmp_path).model
        switched.set_input_embeddings(model.get_input_embeddings())  # the fp32 table: attention is what differs
        torch.testing.assert_close(switched(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-4)


def test_int8_embedding_and_linear_match_their_fp32_layers():
    torch.manual_seed(0)
    weight = torch.randn(1000, 64)
    embedding = intel_compressor.Int8Embedding(weight)
    ids = torch.randint(0, 1000, (4, 9))
    error = (embedding(ids) - weight[ids]).abs()
    assert embedding.qweight.dtype == torch.int8
    assert (error <= embedding.scale[ids].unsqueeze(-1) / 2 + 1e-6).all()  # at most half a quantization step
    linear = torch.nn.Linear(64, 32)
    scales = linear.weight.abs().amax(dim=1) / 127
    q = intel_compressor.Int8WeightOnlyLinear(torch.round(linear.weight / scales[:, None]), scales, linear.bias)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        dequantized = torch.nn.functional.linear(x, q.qweight.float() * scales[:, None], linear.bias)
        torch.testing.assert_close(q(x), dequantized, atol=1e-4, rtol=1e-4)


def one_line_error(capsys, monkeypatch, main, argv: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    assert run_cli(main) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_compressor_rejects_bad_model_directories(banking_runs, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    assert str(missing) in one_line_error(capsys, monkeypatch, intel_compressor.main, [f"--model={missing}"])
    encoder = write_config(tmp_path / "encoder", {"model_type": "bert", "architectures": ["BertModel"]})
    assert "not a sequence classifier" in one_line_error(capsys, monkeypatch, intel_compressor.main, [f"--model={encoder}"])
    gpt2 = write_config(tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"], "id2label": {"0": "a", "1": "b"}})
    message = one_line_error(capsys, monkeypatch, intel_compressor.main, [f"--model={gpt2}"])
    assert "'gpt2' is not supported" in message and str(gpt2) in message
    other_data = banking77_slice(tmp_path, classes=3, train_per_class=5, test_per_class=1)[0]
    message = one_line_error(capsys, monkeypatch, intel_compressor.main, [f"--model={banking_runs['best']}", f"--train_file={other_data}"])
    assert "labels differ" in message


@pytest.mark.parametrize("content", ["", "text,id\n"], ids=["zero-bytes", "header-only"])
def test_edge_script_rejects_an_empty_csv_in_one_line(banking_runs, tmp_path, content):
    source = tmp_path / "empty.csv"
    source.write_text(content)
    result = subprocess.run(
        [sys.executable, "intel_compressor_test.py", f"--model={banking_runs['int8']}", f"--input={source}"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(source) in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "empty_predictions.csv").exists()


def test_edge_script_names_missing_directory_and_column(banking_runs, tmp_path):
    with pytest.raises(intel_compressor_test.EdgeError, match="no such directory"):
        intel_compressor_test.load_classifier(tmp_path / "nowhere")
    source = tmp_path / "in.csv"
    source.write_text("sentence\nhello\n")
    with pytest.raises(intel_compressor_test.EdgeError, match=r"in.csv: no column 'text' \(columns: sentence\)"):
        intel_compressor_test.main([f"--model={banking_runs['int8']}", f"--input={source}"])
