"""serve.py on the tiny int8 model the quantization tests build: started as a user starts it, on
127.0.0.1 at a free port, and driven by a real HTTP client (httpx). Its answers equal the edge
runner's; concurrent requests are batched; bad input gets its status and a one-line JSON error and
the server goes on; a full queue answers 429; /ready is 503 until the model is warm; SIGTERM answers
what is in flight and exits 0; the drift gauges follow a hand-made reference."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

import intel_compressor_test
from benchmarks.serving import Server, free_port, metric
from intel_compressor_test import (
    DriftWindow,
    label_counts,
    load_classifier,
    population_stability_index,
    predicted_label_sets,
)
from tests.helpers import answered_probabilities


@pytest.fixture(scope="module")
def served(banking_runs):
    server = Server(banking_runs["int8"])
    yield server
    assert server.stop()[0] == 0


@pytest.fixture(scope="module")
def test_texts(banking_runs) -> list[str]:
    return pd.read_csv(banking_runs["test"])["text"].tolist()


def test_predict_answers_what_the_edge_runner_answers(served, banking_runs, test_texts):
    edge = load_classifier(banking_runs["int8"])
    probs, ood = edge.predictions(test_texts)
    response = httpx.post(f"{served.url}/predict", json={"texts": test_texts, "top_k": len(edge.labels)})
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert len(answers) == len(test_texts) == 50
    got = np.array(answered_probabilities(answers, edge.labels))
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert [[item["label"] for item in a["labels"]] for a in answers] == edge.predicted_labels(probs)
    np.testing.assert_allclose([a["ood_score"] for a in answers], ood, atol=1e-3)
    assert [a["out_of_scope"] for a in answers] == (ood > edge.ood_threshold).tolist()
    one = httpx.post(f"{served.url}/predict", json={"text": test_texts[0]}).json()["predictions"]
    assert len(one) == 1 and "top_k" not in one[0] and one[0]["labels"] == answers[0]["labels"]


async def concurrent_posts(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/predict", json=body) for body in bodies))


def test_64_concurrent_requests_are_answered_and_batched(served, banking_runs, test_texts):
    before = httpx.get(f"{served.url}/metrics").text
    texts = (test_texts * 2)[:64]
    responses = asyncio.run(concurrent_posts(served.url, [{"text": text, "top_k": 5} for text in texts]))
    assert [r.status_code for r in responses] == [200] * 64
    edge = load_classifier(banking_runs["int8"])
    got = np.array(answered_probabilities([r.json()["predictions"][0] for r in responses], edge.labels))
    np.testing.assert_allclose(got, edge.probabilities(texts), atol=1e-5)
    after = httpx.get(f"{served.url}/metrics").text
    batches = metric(after, "batch_size_count") - metric(before, "batch_size_count")
    single = metric(after, 'batch_size_bucket{le="1.0"}') - metric(before, 'batch_size_bucket{le="1.0"}')
    assert batches < 64 and batches > single  # some batch held more than one text
    assert metric(after, 'requests_total{route="/predict",status="200"}') >= 64
    assert metric(after, "texts_scored_total") - metric(before, "texts_scored_total") == 64


BAD_REQUESTS = [
    (b"{not json", 422, "body: not JSON"),
    (b'["a list"]', 422, "body: expected a JSON object"),
    (b'{"texts": []}', 422, "texts: expected a non-empty list of strings"),
    (b'{"texts": "one string"}', 422, "texts: expected a non-empty list of strings"),
    (b'{"texts": ["fine", ""]}', 422, "texts[1]: expected a non-empty string"),
    (b'{"texts": ["fine", 3]}', 422, "texts[1]: expected a non-empty string, got int"),
    (b'{"text": null}', 422, "text: expected a non-empty string"),
    (b'{"text": "a", "texts": ["b"]}', 422, "not both"),
    (b'{"txt": "a"}', 422, "body: unknown field 'txt'"),
    (b'{"text": "a", "top_k": 0}', 422, "top_k: expected a positive integer"),
    (json.dumps({"texts": ["a card"] * 257}).encode(), 413, "at most 256 in one request (--max_client_texts)"),
    (json.dumps({"text": "x" * (1 << 20)}).encode(), 413, "(--max_body_bytes)"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_input_gets_its_status_and_one_line_and_the_server_goes_on(served, body, status, message):
    response = httpx.post(f"{served.url}/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()
    assert list(error) == ["error"] and message in error["error"] and "\n" not in error["error"]
    assert httpx.post(f"{served.url}/predict", json={"text": "my card is lost"}).status_code == 200


def test_other_routes_answer_json_errors_too(served, banking_runs):
    for response, status in (
        (httpx.get(f"{served.url}/predict"), 405),
        (httpx.get(f"{served.url}/nowhere"), 404),
    ):
        assert response.status_code == status and list(response.json()) == ["error"]
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{served.url}/info").json()
    assert (info["kind"], info["format"], len(info["labels"]), info["long_text"]) == ("int8", "onnx", 5, "head_tail")
    assert info["versions"]["built with INC"] == banking_runs["report"]["inc_version"]
    assert "/predict" in httpx.get(f"{served.url}/openapi.json").json()["paths"]


def test_a_full_queue_answers_429_and_only_that(banking_runs, test_texts):
    server = Server(banking_runs["int8"], "--max_queue=4", "--max_batch_texts=1")
    try:
        bodies = [{"texts": [text] * 2} for text in (test_texts * 4)[:200]]
        responses = asyncio.run(concurrent_posts(server.url, bodies))
        statuses = {r.status_code for r in responses}
        assert statuses == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and "queue full" in refused.json()["error"]
        assert httpx.post(f"{server.url}/predict", json={"text": "my card is lost"}).status_code == 200
    finally:
        assert server.stop()[0] == 0


def test_sigterm_answers_the_requests_in_flight_and_exits_0(banking_runs, test_texts):
    server = Server(banking_runs["int8"], "--max_batch_texts=1")
    bodies = [{"texts": test_texts * 2} for _ in range(8)]  # 800 inputs, one a batch

    async def send_then_terminate() -> list[httpx.Response]:
        sending = asyncio.ensure_future(concurrent_posts(server.url, bodies))
        async with httpx.AsyncClient() as client:
            while metric((await client.get(f"{server.url}/metrics")).text, "predict_in_flight") < 8:
                await asyncio.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)
        return await sending

    responses = asyncio.run(send_then_terminate())
    code, stderr = server.stop()
    assert [r.status_code for r in responses] == [200] * 8
    assert all(len(r.json()["predictions"]) == 100 for r in responses)
    assert code == 0, stderr


@contextlib.contextmanager
def served_in_this_process(model: Path, classifier):
    """serve.create_app around `classifier` (its forward wrapped by the test) under uvicorn in a thread
    on a free port; the URL once uvicorn listens."""
    import uvicorn

    import serve

    port = free_port()
    args = serve.build_parser().parse_args([f"--model={model}", f"--port={port}"])
    server = uvicorn.Server(uvicorn.Config(serve.create_app(args, classifier), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def until_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)


def test_ready_is_503_until_the_model_is_warm(banking_runs):
    """The warm-up is held back: the classifier's first call waits for an event."""
    classifier = load_classifier(banking_runs["int8"])
    warm = threading.Event()

    def held_forward(input_ids, mask):
        warm.wait(30)
        return classifier.forward(input_ids, mask)

    try:
        with served_in_this_process(banking_runs["int8"], dataclasses.replace(classifier, forward=held_forward)) as url:
            assert httpx.get(f"{url}/health").status_code == 200  # alive, not ready
            assert httpx.get(f"{url}/ready").status_code == 503
            early = httpx.post(f"{url}/predict", json={"text": "my card is lost"})
            assert early.status_code == 503 and "not ready" in early.json()["error"]
            warm.set()
            until_ready(url)
            assert httpx.post(f"{url}/predict", json={"text": "my card is lost"}).status_code == 200
    finally:
        warm.set()


def test_a_failing_model_call_answers_503_in_one_line_and_the_server_goes_on(banking_runs):
    classifier = load_classifier(banking_runs["int8"])
    poisoned = classifier.tokenizer.encode("poison", add_special_tokens=False).ids[0]

    def failing_forward(input_ids, mask):
        if (input_ids == poisoned).any():
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory\nat line 2")
        return classifier.forward(input_ids, mask)

    with served_in_this_process(banking_runs["int8"], dataclasses.replace(classifier, forward=failing_forward)) as url:
        until_ready(url)
        failed = httpx.post(f"{url}/predict", json={"text": "poison"})
        assert failed.status_code == 503
        assert failed.json() == {
            "error": "the model failed: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory"
        }
        assert httpx.post(f"{url}/predict", json={"text": "my card is lost"}).status_code == 200


def test_drift_gauges_against_a_hand_made_reference(banking_runs, test_texts, tmp_path):
    """A reference that puts every validation text on the label the model predicts least: the PSI
    gauge equals the PSI of what was predicted against it, and the out-of-scope gauges say the share."""
    model = shutil.copytree(banking_runs["int8"], tmp_path / "int8")
    edge = load_classifier(model)
    probs, ood = edge.predictions(test_texts)
    predicted = predicted_label_sets(probs, edge.labels, edge.multilabel, edge.threshold)
    counts = label_counts(predicted, edge.labels)
    shares = np.zeros(len(edge.labels) + 1)
    shares[int(np.argmin(counts[:-1]))] = 1.0
    reference = {"labels": [*edge.labels, "(no label)"], "label_shares": shares.tolist(), "out_of_scope_share": 0.25}
    (model / "drift_reference.json").write_text(json.dumps(reference))
    server = Server(model, "--drift_window=40")
    try:
        for text in test_texts:  # one at a time: the window holds the last 40, in order
            assert httpx.post(f"{server.url}/predict", json={"text": text}).status_code == 200
        page = httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop()[0] == 0
    last = slice(len(test_texts) - 40, None)
    expected_psi = population_stability_index(shares, label_counts(predicted[last], edge.labels))
    assert expected_psi > 1  # far from the reference
    assert metric(page, "drift_label_psi") == pytest.approx(expected_psi, rel=1e-6)
    assert metric(page, "drift_out_of_scope_share") == pytest.approx(np.mean(ood[last] > edge.ood_threshold))
    assert metric(page, "drift_out_of_scope_expected") == 0.25
    assert metric(page, "texts_out_of_scope_total") == np.sum(ood > edge.ood_threshold)


@pytest.mark.unit
def test_population_stability_index_by_hand():
    assert population_stability_index([0.5, 0.5], [50, 50]) == 0
    by_hand = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert population_stability_index([1, 1], [8, 2]) == pytest.approx(by_hand)
    assert np.isfinite(population_stability_index([1, 0], [0, 1]))  # empty buckets floored, not infinite


@pytest.mark.unit
def test_the_drift_window_forgets_what_falls_out_of_it():
    reference = {"labels": ["a", "b", "(no label)"], "label_shares": [0.5, 0.5, 0.0], "out_of_scope_share": 0.1}
    window = DriftWindow(reference, size=4)
    window.add([["a"], ["a"], ["a"], ["a"]], [True, True, False, False])
    window.add([["b"], ["b"], []], [False, False, False])  # the first three fall out
    summary = window.summary()
    assert summary["texts"] == 4 and summary["out_of_scope_share"] == 0
    expected = population_stability_index([0.5, 0.5, 0.0], [1, 2, 1])
    assert summary["label_psi"] == pytest.approx(expected)
    assert "out of scope 0.0% (validation: 10.0%)" in intel_compressor_test.describe_drift(summary)


def test_the_edge_runner_prints_the_drift_summary_of_a_file(banking_runs, tmp_path, capsys):
    target = tmp_path / "out.csv"
    model, source = banking_runs["int8"], banking_runs["test"]
    intel_compressor_test.main([f"--model={model}", f"--input={source}", f"--output={target}"])
    out = pd.read_csv(target)
    reference = json.loads((model / "drift_reference.json").read_text())
    line = capsys.readouterr().err.strip().splitlines()[-1]
    counts = label_counts([[label] for label in out["predicted"]], reference["labels"][:-1])
    psi = population_stability_index(reference["label_shares"], counts)
    assert line.startswith(f"drift over 50 texts: out of scope {out['out_of_scope'].mean():.1%}")
    assert f"predicted-label PSI against validation {psi:.3f}" in line
