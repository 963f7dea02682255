"""Quantize a tiny BERT trained on real BANKING77 and NLU++ slices with intel_compressor.py, then
run it through the edge script: in a fresh process without torch or transformers, on texts and on
a streamed CSV, against the fp32 model; and the one-line errors for bad input."""

import dataclasses
import json
import shutil
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import intel_compressor
import intel_compressor_test
from configs import Config
from data_functions import load_split
from intel_compressor_test import run_cli
from tests.helpers import FAST_TIMING, banking77_slice, run_python, shared_file
from utility_functions import PaddingCollator, encode, load_tokenizer, predict_logits

REPORT_FIELDS = {
    "format", "mode", "fp32_layers", "inc_version", "onnxruntime_version", "torch_version", "source", "metric",
    "tolerance_points", "within_tolerance", "fp32", "int8", "peers", "agreement", "size_bytes", "size_ratio",
    "candidates", "graph_fusions", "calibration_texts", "validation_rows", "num_threads", "cpu", "int8_ops", "seconds",
}  # fmt: skip
SPEED_FIELDS = {
    "latency_batch1_p50_ms",
    "latency_batch1_p95_ms",
    "throughput_batch32_texts_per_s",
    "size_mb",
    "agreement",
}
PEERS = ["onnxruntime fp32", "onnxruntime quantize_dynamic int8"]


def test_report_has_fp32_onnxruntime_and_inc_side_by_side(banking_runs):
    report = banking_runs["report"]
    assert json.loads((banking_runs["int8"] / "quantization_report.json").read_text()) == report
    assert set(report) == REPORT_FIELDS
    assert (report["format"], report["mode"], report["fp32_layers"]) == ("onnx", "static", [])
    assert report["inc_version"] == version("onnx-neural-compressor") and report["onnxruntime_version"] == version(
        "onnxruntime"
    )
    assert report["torch_version"] == torch.__version__ and "vector extensions" in report["cpu"]
    assert sorted(report["peers"]) == PEERS
    for figures in [report["fp32"], report["int8"], *report["peers"].values()]:
        assert SPEED_FIELDS | {"accuracy", "macro_f1"} <= set(figures)
        assert figures["latency_batch1_p95_ms"] >= figures["latency_batch1_p50_ms"] > 0
    assert report["fp32"]["agreement"] == 1 and report["peers"]["onnxruntime fp32"]["agreement"] == 1  # same function
    assert report["validation_rows"] == 20 and report["calibration_texts"] == 180  # valid_size 0.1 of 200 rows
    # the tiny BERT's embeddings and two layers fused (attention, residual + LayerNorm twice each, bias +
    # GELU) and run in int8; the token types' builder pruned, so 1 Gather (the pooler's first token) is left
    assert report["graph_fusions"] == {
        "Attention": 2,
        "BiasGelu": 2,
        "EmbedLayerNormalization": 1,
        "SkipLayerNormalization": 4,
    }
    assert report["int8_ops"]["QAttention"] == 2 and report["int8_ops"]["QGemm"] == 2  # pooler and classifier too
    assert report["int8_ops"]["QEmbedLayerNormalization"] == 1
    graph = Counter(node.op_type for node in onnx.load(str(banking_runs["int8"] / "model.onnx")).graph.node)
    assert (graph["Gather"], graph["Expand"], graph["Where"]) == (1, 0, 0)
    # the 30522 x 64 embedding table is 7.5 MiB of the 8.4 MiB fp32 directory and 1.9 MiB in int8; both
    # directories hold the same 0.7 MiB tokenizer.json (MiniLM's int8 directory is 26% of fp32)
    assert report["size_bytes"]["int8"] < 0.45 * report["size_bytes"]["fp32"]
    assert sorted(p.name for p in banking_runs["int8"].iterdir()) == [
        "drift_reference.json",
        "edge_config.json",
        "model.onnx",
        "quantization_report.json",
        "tokenizer.json",
    ]
    assert report["agreement"] >= 0.8


def test_onnx_exports_compute_the_models_logits(banking_runs, tmp_path):
    """Both fp32 graphs (torch.onnx's default export, the peer's start; the fused one, INC's start)
    give transformers' logits on a padded batch of real texts, at a batch size and length that the
    example used for export did not have."""
    fp32 = intel_compressor_test.load_classifier(banking_runs["best"])
    config = json.loads((banking_runs["best"] / "config.json").read_text())
    exports = intel_compressor.export_graphs(banking_runs["best"], fp32, config, tmp_path)
    input_ids, mask = intel_compressor_test.pad(
        fp32.token_ids(pd.read_csv(banking_runs["test"])["text"].tolist()[:9]), fp32.pad_token_id
    )
    assert (mask == 0).any()
    expected = fp32.forward(input_ids, mask)
    for graph in exports.plain, exports.fused:  # float32 rounding of logits in the hundreds (a folded temperature)
        logits = intel_compressor_test.onnx_forward(graph)(input_ids, mask)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=2e-5)


def test_int8_runs_in_a_fresh_process_without_importing_torch_or_transformers(banking_runs):
    texts = pd.read_csv(banking_runs["test"])["text"].tolist()
    script = (
        "import json, sys; import intel_compressor_test as edge\n"
        f"model = edge.load_classifier({str(banking_runs['int8'])!r})\n"
        f"probs = model.probabilities({texts!r}, batch_size=4)\n"
        "heavy = {'torch', 'transformers', 'pandas', 'onnx', 'neural_compressor', 'onnx_neural_compressor'}\n"
        "print(json.dumps({'probs': probs.tolist(), 'heavy': sorted(heavy & set(sys.modules))}))"
    )
    result = run_python("-c", script, check=True)
    out = json.loads(result.stdout)
    assert out["heavy"] == []  # onnxruntime, tokenizers and numpy only
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
    logits = predict_logits(
        model,
        encode(tokenizer, data, intel_compressor_test.LongText(max_length=64)),
        PaddingCollator(tokenizer.pad_token_id),
        8,
        torch.device("cpu"),
    )
    edge = intel_compressor_test.load_classifier(banking_runs["best"])
    assert edge.kind == "fp32" and edge.max_length == 64
    np.testing.assert_allclose(edge.probabilities(data.texts, 8), torch.softmax(logits, -1).numpy(), atol=1e-5)


def test_command_line_prints_label_probability_and_ood_score_per_text(banking_runs):
    texts = ["I still have not received my new card", "How do I activate my card?"]
    result = run_python("intel_compressor_test.py", f"--model={banking_runs['int8']}", *texts, check=True)
    lines = result.stdout.strip().splitlines()
    labels = json.loads((banking_runs["int8"] / "edge_config.json").read_text())["labels"]
    assert [line.split("\t")[2] for line in lines] == texts
    model = intel_compressor_test.load_classifier(banking_runs["int8"])
    for line, score in zip(lines, model.predictions(texts)[1]):
        label, probability = line.split("\t")[0].rsplit(" ", 1)
        assert label in labels and 1 / len(labels) < float(probability) <= 1
        scope = "OUT OF SCOPE " if score > model.ood_threshold else ""
        assert line.split("\t")[1] == f"{scope}ood_score {score:.2f}"
    assert "loaded int8 model" in result.stderr


def test_csv_is_streamed_in_chunks_with_one_probability_column_per_label(banking_runs, tmp_path):
    frame = pd.read_csv(banking_runs["test"]).assign(id=lambda f: range(len(f)))
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    frame.to_csv(source, index=False)
    intel_compressor_test.main(
        [
            f"--model={banking_runs['int8']}",
            f"--input={source}",
            f"--output={target}",
            "--chunk_rows=7",
            "--batch_size=3",
        ]
    )
    out = pd.read_csv(target)
    model = intel_compressor_test.load_classifier(banking_runs["int8"])
    prob_columns = [f"prob_{label}" for label in model.labels]
    assert list(out.columns) == [*frame.columns, "predicted", "ood_score", "out_of_scope", *prob_columns]
    assert out["text"].tolist() == frame["text"].tolist() and out["id"].tolist() == frame["id"].tolist()
    whole = model.probabilities(frame["text"].tolist(), batch_size=32)
    np.testing.assert_allclose(out[prob_columns].to_numpy(), whole, atol=2e-5)  # chunking and batching change nothing
    assert (np.array(model.labels)[whole.argmax(axis=1)] == out["predicted"]).all()


def test_auto_keeps_the_fastest_variant_within_the_tolerance(banking_runs, tmp_path):
    tolerance = 2.0  # points; 20 validation rows move macro-F1 in steps of several points
    report = intel_compressor.main(
        [
            f"--model={banking_runs['best']}",
            f"--output={tmp_path / 'auto'}",
            "--mode=auto",
            f"--tolerance={tolerance}",
            *FAST_TIMING,
        ]
    )
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
    report = intel_compressor.main(
        [f"--model={best}", f"--output={int8}", "--mode=weight-only", "--calibration_size=64", *FAST_TIMING]
    )
    assert report["mode"] == "weight-only" and "micro_f1" in report["int8"]
    model = intel_compressor_test.load_classifier(int8)
    assert (
        model.multilabel and model.threshold == json.loads((best / "config.json").read_text())["multilabel_threshold"]
    )
    target = tmp_path / "preds.csv"
    intel_compressor_test.main([f"--model={int8}", f"--input={test}", f"--output={target}"])
    out = pd.read_csv(target, keep_default_na=False)
    probs = out[[f"prob_{label}" for label in model.labels]].to_numpy()
    above = [";".join(np.array(model.labels)[row >= model.threshold]) for row in probs]
    assert out["predicted"].tolist() == above
    fp32_model = intel_compressor_test.load_classifier(best)
    fp32 = fp32_model.probabilities(out["text"].tolist())
    # 4-bit weights of the real MiniLM, fp32 activations: probabilities move by 0.006 on average, and
    # 80% of the texts keep fp32's exact label set (measured; a model that ignored its weights keeps none)
    assert np.abs(probs - fp32).mean() < 0.01
    same = [a == b for a, b in zip(model.predicted_labels(probs), fp32_model.predicted_labels(fp32), strict=True)]
    assert np.mean(same) >= 0.75


def test_edge_refuses_a_directory_of_another_format(banking_runs, tmp_path):
    """A directory from an older intel_compressor.py (--format aoti, model.so) gets one line."""
    old = shutil.copytree(banking_runs["int8"], tmp_path / "old")
    config = json.loads((old / "edge_config.json").read_text())
    (old / "edge_config.json").write_text(json.dumps({**config, "format": "aoti"}))
    with pytest.raises(intel_compressor_test.DataError, match=r"old/edge_config.json: format 'aoti' is not served"):
        intel_compressor_test.load_classifier(old)


def test_edge_names_a_truncated_or_foreign_onnx_model(banking_runs, tmp_path):
    truncated = shutil.copytree(banking_runs["int8"], tmp_path / "truncated")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        intel_compressor_test.DataError, match=r"truncated/model.onnx: not a loadable ONNX model \(.*\)$"
    ):
        intel_compressor_test.load_classifier(truncated)
    foreign = shutil.copytree(banking_runs["int8"], tmp_path / "foreign")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["pixels"], ["logits"])], "image",
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph), foreign / "model.onnx")
    with pytest.raises(
        intel_compressor_test.DataError,
        match=r"foreign/model.onnx: not a model from intel_compressor.py \(inputs pixels; expected",
    ):
        intel_compressor_test.load_classifier(foreign)


LONG = 160  # max_length of the tiny models
TINY_ARCHITECTURES = {
    "roberta": lambda vocab: RobertaForSequenceClassification(RobertaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=LONG + 2, pad_token_id=0, num_labels=5)),  # positions start after the padding id
    "distilbert": lambda vocab: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=LONG, pad_token_id=0,
        num_labels=5)),
    "mpnet": lambda vocab: MPNetForSequenceClassification(MPNetConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=LONG + 2, pad_token_id=0, num_labels=5)),  # relative position buckets in the graph
}  # fmt: skip


def short_and_long_texts(count: int) -> list[str]:
    """Real BANKING77 texts (about 16 tokens), every other one run on with the next few (up to about
    130 tokens), so a padded batch mixes short rows and long ones."""
    texts = pd.read_csv(shared_file("banking77/test.csv"))["text"].sample(count * 8, random_state=0).tolist()
    return [" ".join(texts[i : i + 8]) if i % 16 else texts[i] for i in range(0, len(texts), 8)]


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_roberta_distilbert_and_mpnet_quantize_and_run_at_the_edge(architecture, minilm_path, tmp_path):
    """A random tiny model of each architecture goes through the static path (export, fusion, INC
    static) and the edge runner; its fused fp32 graph computes the model's logits and its int8 logits
    stay close to fp32 eager on real texts, short ones and ones cut at max_length."""
    torch.manual_seed(0)
    directory = tmp_path / architecture
    TINY_ARCHITECTURES[architecture](AutoTokenizer.from_pretrained(minilm_path).vocab_size).eval().save_pretrained(
        directory
    )
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(directory)
    model_config = intel_compressor.check_model_directory(directory)
    assert model_config["model_type"] == architecture
    fp32 = dataclasses.replace(
        intel_compressor_test.load_classifier(directory), long_text=intel_compressor_test.LongText(max_length=LONG)
    )
    texts = short_and_long_texts(60)
    rows = [ids[:LONG] for ids in fp32.token_ids(texts)]
    batches = [intel_compressor_test.pad(rows[i : i + 10], fp32.pad_token_id) for i in range(0, len(texts), 10)]
    exports = intel_compressor.export_graphs(directory, fp32, model_config, tmp_path)
    intel_compressor.quantize_onnx(exports.fused, "static", batches, [], tmp_path / "model.onnx")
    input_ids, mask = intel_compressor_test.pad(rows[:16], fp32.pad_token_id)
    fused = intel_compressor_test.onnx_forward(exports.fused)(input_ids, mask)  # the graph work changes nothing
    np.testing.assert_allclose(fused, fp32.forward(input_ids, mask), atol=1e-4)
    int8 = intel_compressor_test.onnx_forward(tmp_path / "model.onnx")
    for batch in rows[:8:2], rows[:16]:  # short texts only, then run-on ones among them
        input_ids, mask = intel_compressor_test.pad(batch, fp32.pad_token_id)
        expected = fp32.forward(input_ids, mask)
        logits = int8(input_ids, mask)
        assert logits.shape == expected.shape == (len(batch), 5)
        assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()  # int8 noise, not another function
    assert input_ids.shape[1] > 4 * mask.sum(axis=1).min()  # rows of very different lengths, padded


def test_fused_embeddings_compute_the_models_logits(tiny_bert_dir, tmp_path):
    """The fused fp32 graph of a BERT reads its (random, nonzero) type-0 token-type row through the
    mask-fed two-row table and no longer builds the token types from the input's shape; its logits on
    a padded batch of real texts are the model's."""
    torch.manual_seed(0)
    directory = tmp_path / "classifier"
    config = AutoConfig.from_pretrained(tiny_bert_dir, num_labels=5)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(directory)
    fp32 = intel_compressor_test.load_classifier(directory)
    model_config = intel_compressor.check_model_directory(directory)
    exports = intel_compressor.export_graphs(directory, fp32, model_config, tmp_path)
    assert exports.fusions["EmbedLayerNormalization"] == 1
    graph = onnx.load(str(exports.fused))
    embed = next(node for node in graph.graph.node if node.op_type == "EmbedLayerNormalization")
    types = onnx.numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == embed.input[4]))
    assert types.shape == (2, 64) and np.array_equal(types[0], types[1]) and np.abs(types[0]).max() > 0
    assert embed.input[1] == embed.input[7]  # token types read from the int32 mask
    assert not {"Expand", "Where", "ConstantOfShape"} & {node.op_type for node in graph.graph.node}
    input_ids, mask = intel_compressor_test.pad(fp32.token_ids(short_and_long_texts(8)), fp32.pad_token_id)
    assert (mask == 0).any()
    logits = intel_compressor_test.onnx_forward(exports.fused)(input_ids, mask)
    np.testing.assert_allclose(logits, fp32.forward(input_ids, mask), atol=1e-4)


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
    assert "not a sequence classifier" in one_line_error(
        capsys, monkeypatch, intel_compressor.main, [f"--model={encoder}"]
    )
    gpt2 = write_config(
        tmp_path / "gpt2",
        {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"], "id2label": {"0": "a", "1": "b"}},
    )
    message = one_line_error(capsys, monkeypatch, intel_compressor.main, [f"--model={gpt2}"])
    assert "'gpt2' is not supported" in message and str(gpt2) in message
    other_data = banking77_slice(tmp_path, classes=3, train_per_class=5, test_per_class=1)[0]
    message = one_line_error(
        capsys, monkeypatch, intel_compressor.main, [f"--model={banking_runs['best']}", f"--train_file={other_data}"]
    )
    assert "labels differ" in message


@pytest.mark.parametrize("content", ["", "text,id\n"], ids=["zero-bytes", "header-only"])
def test_edge_script_rejects_an_empty_csv_in_one_line(banking_runs, tmp_path, content):
    source = tmp_path / "empty.csv"
    source.write_text(content)
    result = run_python("intel_compressor_test.py", f"--model={banking_runs['int8']}", f"--input={source}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(source) in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "empty_predictions.csv").exists()


def test_edge_script_names_missing_directory_and_column(banking_runs, tmp_path):
    with pytest.raises(intel_compressor_test.DataError, match="no such directory"):
        intel_compressor_test.load_classifier(tmp_path / "nowhere")
    source = tmp_path / "in.csv"
    source.write_text("sentence\nhello\n")
    with pytest.raises(intel_compressor_test.DataError, match=r"in.csv: no column 'text' \(columns: sentence\)"):
        intel_compressor_test.main([f"--model={banking_runs['int8']}", f"--input={source}"])
