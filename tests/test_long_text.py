"""Texts longer than max_length (--long_text): windows cover every token, head+tail keeps the
configured share of each end, window logits combine as stated, and every path (both training
scripts, the fp32 and int8 edge runners) writes one row per input text; a 100,000-character text
goes through the edge in flat memory."""

import dataclasses
import itertools
import json

import numpy as np
import pandas as pd
import pytest

import intel_compressor
import manual_classification
import trainer_classification
from data_functions import LabeledData
from intel_compressor_test import (
    EdgeClassifier,
    LongText,
    aggregate_windows,
    load_classifier,
    model_inputs,
    window_starts,
)
from tests.helpers import FAST_TIMING, run_python, shared_file, tiny_run_args
from utility_functions import encode, load_tokenizer


@pytest.mark.parametrize(
    ("length", "size", "stride"), [(1, 5, 2), (5, 5, 2), (6, 5, 2), (17, 5, 2), (17, 5, 5), (100, 30, 7), (31, 30, 15)]
)
@pytest.mark.unit
def test_windows_cover_every_token_once_a_stride_and_end_with_the_text(length, size, stride):
    starts = window_starts(length, size, stride)
    windows = [range(start, min(start + size, length)) for start in starts]
    assert set().union(*windows) == set(range(length))  # every token read
    assert all(len(w) == min(size, length) for w in windows)  # full windows only
    assert starts[0] == 0 and windows[-1][-1] == length - 1  # the last window ends with the text
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))
    assert starts[:-1] == list(range(0, length - size, stride))  # one every `stride` tokens before the last


@pytest.mark.unit
def test_model_inputs_wrap_each_piece_in_the_special_tokens_and_name_its_text():
    bodies = [list(range(10, 22)), [7, 8], list(range(30, 40))]
    rows, owners = model_inputs(bodies, LongText("windows", max_length=7, stride=3), [1], [2])
    assert owners.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]  # 12 tokens, room 5: starts 0, 3, 6 and 7
    assert rows[:4] == [
        [1, 10, 11, 12, 13, 14, 2],
        [1, 13, 14, 15, 16, 17, 2],
        [1, 16, 17, 18, 19, 20, 2],
        [1, 17, 18, 19, 20, 21, 2],
    ]
    assert rows[4] == [1, 7, 8, 2]
    truncated, owners = model_inputs(bodies, LongText("truncate", max_length=7), [1], [2])
    assert truncated == [[1, 10, 11, 12, 13, 14, 2], [1, 7, 8, 2], [1, 30, 31, 32, 33, 34, 2]] and owners.tolist() == [
        0,
        1,
        2,
    ]


@pytest.mark.unit
@pytest.mark.parametrize(("share", "head", "tail"), [(0.25, 64, 190), (0.0, 0, 254), (1.0, 254, 0), (0.5, 127, 127)])
def test_head_and_tail_keep_the_configured_share_of_each_end(share, head, tail):
    body = list(range(1000, 2000))
    (piece,) = LongText("head_tail", max_length=256, head_share=share).pieces(body, room=254)
    assert piece == body[:head] + body[len(body) - tail :] and len(piece) == 254
    assert LongText("head_tail", head_share=share).pieces(body[:100], room=254) == [body[:100]]  # short: whole


@pytest.mark.unit
def test_head_and_tail_of_a_real_review_with_minilms_tokenizer(minilm_path):
    tokenizer = load_tokenizer(minilm_path)
    review = max(pd.read_csv(shared_file("imdb/test.csv.gz"), nrows=200)["text"], key=len)
    data = LabeledData("imdb", [review], np.array([1]))
    (ids,) = encode(tokenizer, data, LongText("head_tail", max_length=128, head_share=0.25)).input_ids
    full = tokenizer(review)["input_ids"]  # [CLS] body [SEP], not truncated
    assert len(full) > 600 and len(ids) == 128
    assert ids[:33] == full[:33]  # [CLS] and the first round(126 * 0.25) = 32 tokens
    assert ids[33:] == full[-95:]  # the last 94 tokens and [SEP]


@pytest.mark.unit
def test_window_logits_combine_by_mean_or_max():
    logits = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0], [0.5, 0.5], [2.0, 2.0], [4.0, -4.0]])
    owners = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(aggregate_windows(logits, owners, 3, "mean"), [[1.0, 1.0], [0.5, 0.5], [3.0, -1.0]])
    np.testing.assert_allclose(aggregate_windows(logits, owners, 3, "max"), [[3.0, 5.0], [0.5, 0.5], [4.0, 2.0]])
    same = np.arange(6.0).reshape(3, 2)
    assert aggregate_windows(same, np.arange(3), 3, "max") is same  # one input per text: untouched


@pytest.mark.unit
def test_a_sample_of_the_training_windows_is_seeded_and_keeps_short_texts_whole(minilm_path):
    tokenizer = load_tokenizer(minilm_path)
    reviews = pd.read_csv(shared_file("imdb/train.csv.gz"), nrows=40)["text"].tolist()
    data = LabeledData("imdb", reviews, np.zeros(40, dtype=int))
    long_text = LongText("windows", max_length=64, stride=32)
    every, sampled = encode(tokenizer, data, long_text), encode(tokenizer, data, long_text, keep_windows=2, seed=3)
    counts = np.bincount(every.owners, minlength=40)
    assert counts.max() > 2 and np.bincount(sampled.owners, minlength=40).tolist() == np.minimum(counts, 2).tolist()
    assert set(map(tuple, sampled.input_ids)) <= set(map(tuple, every.input_ids))
    assert encode(tokenizer, data, long_text, keep_windows=2, seed=3).input_ids == sampled.input_ids


def counting_rows(classifier: EdgeClassifier) -> tuple[EdgeClassifier, list[int]]:
    """The classifier with its forward function wrapped to record the rows (model inputs) of each call."""
    rows: list[int] = []

    def forward(input_ids, mask):
        rows.append(len(input_ids))
        return classifier.forward(input_ids, mask)

    return dataclasses.replace(classifier, forward=forward), rows


@pytest.fixture(scope="module")
def imdb_slice(tmp_path_factory):
    """60 training and 15 test reviews of the real IMDB split (most far longer than 64 tokens)."""
    directory = tmp_path_factory.mktemp("imdb-long")
    train = pd.read_csv(shared_file("imdb/train.csv.gz")).groupby("label").head(30)
    test = pd.read_csv(shared_file("imdb/test.csv.gz")).groupby("label").head(8).head(15)
    paths = directory / "train.csv", directory / "test.csv"
    train[["text", "label"]].to_csv(paths[0], index=False)
    test[["text", "label"]].to_csv(paths[1], index=False)
    return paths


@pytest.fixture(scope="module")
def windows_runs(imdb_slice, tiny_bert_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("windows")
    train, test = imdb_slice
    data = [f"--train_file={train}", f"--test_file={test}", "--long_text=windows", "--window_stride=32", "--epochs=1"]
    return {
        name: script.main([*tiny_run_args(tiny_bert_dir, directory, name), *data])
        for name, script in (("manual", manual_classification), ("trainer", trainer_classification))
    }


@pytest.mark.parametrize("script", ["manual", "trainer"])
def test_both_scripts_write_one_prediction_per_test_text(windows_runs, imdb_slice, script):
    run_dir = windows_runs[script].run_dir
    predictions, expected = pd.read_csv(run_dir / "test_predictions.csv"), pd.read_csv(imdb_slice[1])
    assert predictions["text"].tolist() == expected["text"].tolist()
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["long_text"], saved["window_stride"], saved["window_aggregation"]) == ("windows", 32, "mean")
    correct = (predictions["predicted"] == predictions["label"]).mean()
    assert correct == pytest.approx(windows_runs[script].test["accuracy"])  # the file holds what was scored


def test_the_edge_reads_windows_fp32_and_int8_one_row_per_text(windows_runs, imdb_slice, tmp_path):
    best = windows_runs["manual"].run_dir / "best_model"
    texts = pd.read_csv(imdb_slice[1])["text"].tolist()
    fp32, rows_read = counting_rows(load_classifier(best))
    assert fp32.long_text == LongText("windows", max_length=64, stride=32, aggregation="mean")
    fp32_probs = fp32.probabilities(texts, 8)
    predictions = pd.read_csv(windows_runs["manual"].run_dir / "test_predictions.csv")
    np.testing.assert_allclose(fp32_probs, predictions[["prob_negative", "prob_positive"]].to_numpy(), atol=1e-5)
    assert sum(rows_read) > 3 * len(texts)  # several windows a review

    intel_compressor.main([f"--model={best}", *FAST_TIMING])
    int8 = load_classifier(best.with_name("best_model-int8"))
    assert int8.long_text == fp32.long_text and int8.kind == "int8"
    assert (int8.probabilities(texts, 8).argmax(1) == fp32_probs.argmax(1)).mean() >= 0.8


def peak_memory_of_the_edge_cli(model, source, tmp_path) -> int:
    """Peak resident memory (KiB) of the edge CLI classifying `source` in a fresh process: VmHWM,
    which starts afresh at exec (ru_maxrss would carry the forking pytest process's peak)."""
    report = (
        "import atexit; "
        "atexit.register(lambda: print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]))"
    )
    run = (
        "import runpy, sys; sys.argv[0] = 'intel_compressor_test.py'; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = [
        f"--model={model}",
        f"--input={source}",
        f"--output={tmp_path / 'out.csv'}",
        "--chunk_rows=2",
        "--batch_size=16",
    ]
    result = run_python("-c", f"{report}; {run}", *args, check=True)
    return int(result.stdout.split("VmHWM:")[-1].split()[0])


def test_a_100000_character_text_goes_through_the_edge_in_flat_memory(windows_runs, tmp_path):
    int8 = windows_runs["manual"].run_dir / "best_model-int8"
    if not int8.is_dir():
        intel_compressor.main([f"--model={int8.with_name('best_model')}", *FAST_TIMING])
    reviews = pd.read_csv(shared_file("imdb/test.csv.gz"), nrows=400)["text"]
    long = " ".join(reviews)[:100_000]
    one, many = tmp_path / "one.csv", tmp_path / "many.csv"
    pd.DataFrame({"text": [long]}).to_csv(one, index=False)
    pd.DataFrame({"text": [long[i:] + long[:i] for i in range(0, 40_000, 1_000)]}).to_csv(many, index=False)
    peak_one, peak_many = (
        peak_memory_of_the_edge_cli(int8, one, tmp_path),
        peak_memory_of_the_edge_cli(int8, many, tmp_path),
    )
    written = pd.read_csv(tmp_path / "out.csv")
    assert len(written) == 40 and written["predicted"].isin(["negative", "positive"]).all()
    # 2 rows a chunk: 40 texts cost what 2 do (measured +16 MiB; with all 40 in one chunk, +134 MiB)
    assert peak_many - peak_one < 40 * 1024, (peak_one, peak_many)
    classifier, rows_read = counting_rows(load_classifier(int8))
    classifier.probabilities([long], 16)
    tokens = len(classifier.tokenizer.encode(long, add_special_tokens=False).ids)
    assert tokens > 20_000 and sum(rows_read) == len(window_starts(tokens, 62, 32))  # every window read


def test_the_server_reads_windows_as_the_edge_runner_does(windows_runs, imdb_slice):
    """Every window of a long review is a model input of the batcher (and counts in its batches); the
    answer per review combines them as the edge runner does."""
    import httpx

    from benchmarks.serving import Server, metric

    best = windows_runs["manual"].run_dir / "best_model"
    texts = pd.read_csv(imdb_slice[1])["text"].tolist()
    edge, rows_read = counting_rows(load_classifier(best))
    expected = edge.probabilities(texts)
    server = Server(best, "--max_batch_texts=8")
    try:
        answers = httpx.post(f"{server.url}/predict", json={"texts": texts, "top_k": 2}, timeout=60).json()
        page = httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop()[0] == 0
    got = [
        [{i["label"]: i["probability"] for i in a["top_k"]}[label] for label in edge.labels]
        for a in answers["predictions"]
    ]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    windows = sum(rows_read)
    assert windows > 3 * len(texts) and metric(page, "batch_size_sum") == windows  # every window, once
    assert metric(page, "batch_size_count") >= windows / 8
