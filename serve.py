"""Serve a classifier over HTTP: micro-batched, bounded, with health, readiness and Prometheus metrics.

    python serve.py --model outputs/<run>/best_model-int8 --host 127.0.0.1 --port 8000
    curl -s 127.0.0.1:8000/predict -H 'content-type: application/json' -d '{"text": "my card has not arrived"}'

Serves any directory intel_compressor_test.py accepts (int8 ONNX; an fp32 best_model/ too) through
the edge runner's own loading, tokenising, long-text handling, thresholds and out-of-scope score, so
the server and the CLI answer the same for the same text. Needs requirements-edge.txt and
requirements-serve.txt (FastAPI, uvicorn, prometheus-client): no torch for an int8 model.

Routes: POST /predict ({"texts": [...]} or {"text": "..."}, optional "top_k"), GET /health (alive),
GET /ready (model loaded and warmed up; 503 before), GET /info, GET /metrics (Prometheus), and the
OpenAPI page at /docs.

Micro-batching: every request's model inputs (a text, or its windows) go into one bounded queue; one
batcher takes up to --max_batch_texts inputs and --max_batch_tokens padded tokens from it and runs the
model in a worker thread (ONNX Runtime releases the GIL, so the event loop keeps accepting). While the
model runs, requests queue up and the next batch takes them; when requests arrived during a batch it
waits up to --max_wait_ms for more before the next one, and with no traffic it never waits.
--max_batch_texts 1 turns batching off. Errors are one-line JSON bodies, {"error": "..."}: 422 bad
input, 413 too many texts or too large a body, 429 queue full (with Retry-After), 503 not ready. On
SIGTERM or Ctrl-C the server stops accepting, answers what is queued and in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from intel_compressor_test import (
    DataError,
    DriftWindow,
    EdgeClassifier,
    HelpFormatter,
    aggregate_windows,
    classifier_settings,
    cpu_description,
    load_classifier,
    ood_scores,
    pad,
    read_drift_reference,
    run_cli,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one text at a time: no tokenizer thread pool to wake
WARM_UP_TEXTS = ["warm up", "a slightly longer text to warm the model up with"]
LIMITS = ("max_batch_texts", "max_batch_tokens", "max_wait_ms", "max_queue", "max_client_texts", "max_body_bytes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model", required=True, help="int8 directory from intel_compressor.py, or an fp32 best_model."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--max_batch_texts", type=int, default=32, help="Model inputs per batch; 1: no batching.")
    parser.add_argument("--max_batch_tokens", type=int, default=16384, help="Padded tokens per batch at most.")
    parser.add_argument(
        "--max_wait_ms", type=float, default=2.0, help="Wait for more inputs after a busy batch, at most this long."
    )
    parser.add_argument("--max_queue", type=int, default=1024, help="Model inputs waiting at most; beyond: 429.")
    parser.add_argument("--max_client_texts", type=int, default=256, help="Texts in one request at most; beyond: 413.")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="Request body size at most; beyond: 413.")
    parser.add_argument("--drift_window", type=int, default=1000, help="Texts the drift gauges look back over.")
    parser.add_argument("--num_threads", type=int, default=0, help="ONNX Runtime threads; 0: one per core.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in LIMITS:
        if name != "max_wait_ms" and getattr(args, name) < 1:
            raise DataError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.max_wait_ms < 0 or args.drift_window < 1:
        raise DataError("--max_wait_ms must be >= 0 and --drift_window >= 1")


class RequestError(Exception):
    """A request the server refuses: its status and one-line message (and headers, for 429)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------------------
# The batcher: one queue of model inputs, one worker thread running the model
# ---------------------------------------------------------------------------------------


# What one more model call costs, in padded tokens (one token of one row): on the default int8 MiniLM
# (2 threads, AMD Zen 4) a call took 1-2 ms plus 62-66 us a padded token at 16-64 tokens and 1-32 rows.
CALL_COST_TOKENS = 24


def padded_runs(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[tuple[int, int]]:
    """Split inputs sorted by length into runs [start, end) that minimise the padded tokens (each run
    padded to its longest) plus call_cost a run: a dynamic programme over the split points."""
    best, back = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(max(0, end - 64), end):  # runs of up to 64 inputs: enough, and quick for 256
            cost = best[start] + (end - start) * lengths[end - 1] + call_cost
            if best[end] is None or cost < best[end]:
                best[end], back[end] = cost, start
    runs, end = [], len(lengths)
    while end:
        runs.append((back[end], end))
        end = back[end]
    return runs[::-1]


@dataclass
class Pending:
    """One request's model inputs, their logits as batches fill them in, and its answer."""

    ids: list[list[int]]
    owners: np.ndarray  # the request's text each input belongs to
    texts: int
    future: asyncio.Future
    logits: np.ndarray  # (inputs, labels)
    taken: int = 0  # inputs handed to a batch so far
    scored: int = 0  # inputs whose logits are in


class Batcher:
    def __init__(self, classifier: EdgeClassifier, args: argparse.Namespace, metrics: Metrics):
        self.classifier, self.args, self.metrics = classifier, args, metrics
        self.queue: deque[Pending] = deque()
        self.queued = 0  # inputs waiting, not yet in a batch
        self.arrived = asyncio.Event()
        self.busy = False
        self.arrived_while_busy = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def submit(self, texts: list[str]) -> asyncio.Future:
        """Queue a request's texts; its future gets (logits per text) once every input is scored."""
        ids, owners = self.classifier.inputs(texts)
        if len(ids) > self.args.max_queue:  # windows of long texts: more than the queue ever holds
            raise RequestError(413, f"texts: {len(ids)} model inputs, more than --max_queue {self.args.max_queue}")
        if self.queued + len(ids) > self.args.max_queue:
            raise RequestError(429, f"queue full ({self.queued} inputs waiting); retry shortly", {"Retry-After": "1"})
        logits = np.empty((len(ids), len(self.classifier.labels)))
        pending = Pending(ids, owners, len(texts), asyncio.get_running_loop().create_future(), logits)
        self.queue.append(pending)
        self.queued += len(ids)
        self.arrived_while_busy |= self.busy
        self.metrics.queue_depth.set(self.queued)
        self.arrived.set()
        return pending.future

    def take_batch(self) -> list[tuple[Pending, int]]:
        """Inputs in arrival order, up to --max_batch_texts and --max_batch_tokens padded tokens."""
        rows: list[tuple[Pending, int]] = []
        longest = 0
        while self.queue:
            pending = self.queue[0]
            length = len(pending.ids[pending.taken])
            tokens = max(longest, length) * (len(rows) + 1)
            if rows and (len(rows) == self.args.max_batch_texts or tokens > self.args.max_batch_tokens):
                break
            rows.append((pending, pending.taken))
            longest = max(longest, length)
            pending.taken += 1
            if pending.taken == len(pending.ids):
                self.queue.popleft()
        self.queued -= len(rows)
        self.metrics.queue_depth.set(self.queued)
        return rows

    async def wait_for_more(self) -> None:
        """After a batch during which requests arrived, give the traffic up to --max_wait_ms to fill
        the next one; never when the model was idle."""
        if not self.arrived_while_busy or self.args.max_wait_ms == 0:
            return
        deadline = time.perf_counter() + self.args.max_wait_ms / 1000
        while self.queued < self.args.max_batch_texts and (left := deadline - time.perf_counter()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return

    def forward(self, rows: list[tuple[Pending, int]]) -> np.ndarray:
        """Logits of the batch's inputs, in its order: run sorted by length, in the runs of similar
        length that padded_runs chooses (a batch of mixed lengths padded to its longest costs up to
        2.5x more on BANKING77's texts)."""
        ids = [pending.ids[i] for pending, i in rows]
        order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
        logits = np.empty((len(ids), len(self.classifier.labels)), dtype=np.float32)
        for start, end in padded_runs([len(ids[k]) for k in order]):
            part = order[start:end]
            logits[part] = self.classifier.forward(*pad([ids[k] for k in part], self.classifier.pad_token_id))
        return logits

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            await self.wait_for_more()
            rows = self.take_batch()
            self.busy, self.arrived_while_busy = True, False
            try:
                logits = await loop.run_in_executor(self.executor, self.forward, rows)
            except Exception as error:  # noqa: BLE001 - whatever the model raised: a one-line 503, and serve on
                for pending in {id(p): p for p, _ in rows}.values():
                    if not pending.future.done():
                        pending.future.set_exception(RequestError(503, f"the model failed: {error}".splitlines()[0]))
                continue
            finally:
                self.busy = False
            self.metrics.batch_size.observe(len(rows))
            self.deliver(rows, logits)

    def deliver(self, rows: list[tuple[Pending, int]], logits: np.ndarray) -> None:
        for (pending, i), row in zip(rows, logits, strict=True):
            pending.logits[i] = row
            pending.scored += 1
            if pending.scored == len(pending.ids) and not pending.future.done():
                how = self.classifier.long_text.aggregation
                pending.future.set_result(aggregate_windows(pending.logits, pending.owners, pending.texts, how))


# ---------------------------------------------------------------------------------------
# Metrics (Prometheus) and drift
# ---------------------------------------------------------------------------------------


class Metrics:
    def __init__(self, labels: list[str]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
        self.latency = Histogram(
            "request_seconds", "Request latency by route", ["route"], registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_size = Histogram(
            "batch_size", "Model inputs per batch", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.queue_depth = Gauge("queue_depth", "Model inputs waiting for a batch", registry=registry)
        self.in_flight = Gauge("predict_in_flight", "/predict requests being answered", registry=registry)
        self.texts = Counter("texts_scored", "Texts scored", registry=registry)
        self.out_of_scope = Counter("texts_out_of_scope", "Texts flagged out of scope", registry=registry)
        self.predictions = Counter("predictions", "Predicted labels", ["label"], registry=registry)
        self.oos_share = Gauge(
            "drift_out_of_scope_share", "Share out of scope, last --drift_window texts", registry=registry
        )
        self.oos_expected = Gauge("drift_out_of_scope_expected", "Share out of scope on validation", registry=registry)
        self.label_psi = Gauge(
            "drift_label_psi", "PSI of the predicted labels, last --drift_window texts, against validation",
            registry=registry,
        )  # fmt: skip
        for label in labels:
            self.predictions.labels(label)

    def watch(self, drift: DriftWindow) -> None:
        """The drift gauges read the window when /metrics is scraped, not at every request."""
        self.oos_share.set_function(lambda: drift.summary()["out_of_scope_share"])
        self.oos_expected.set_function(lambda: drift.summary()["expected_out_of_scope_share"])
        self.label_psi.set_function(lambda: drift.summary()["label_psi"])

    def record(self, label_sets: list[list[str]], flagged: list[bool], drift: DriftWindow | None) -> None:
        self.texts.inc(len(label_sets))
        self.out_of_scope.inc(sum(flagged))
        for labels in label_sets:
            for label in labels:
                self.predictions.labels(label).inc()
        if drift is not None:
            drift.add(label_sets, flagged)


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


def texts_of(body: object, max_texts: int) -> tuple[list[str], int | None]:
    """The texts of a /predict body and its top_k, or a RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(422, "body: expected a JSON object with 'texts' (a list of strings) or 'text'")
    unknown = set(body) - {"texts", "text", "top_k"}
    if unknown:
        raise RequestError(422, f"body: unknown field {min(unknown)!r} (fields: texts, text, top_k)")
    if ("texts" in body) == ("text" in body):
        raise RequestError(422, "body: give 'texts' (a list of strings) or 'text' (one string), not both")
    texts = body["texts"] if "texts" in body else [body["text"]]
    where = "texts" if "texts" in body else "text"
    if not isinstance(texts, list) or not texts:
        raise RequestError(422, f"{where}: expected a non-empty list of strings")
    if len(texts) > max_texts:
        raise RequestError(413, f"texts: {len(texts)} texts, at most {max_texts} in one request (--max_client_texts)")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            at = f"texts[{i}]" if where == "texts" else "text"
            raise RequestError(422, f"{at}: expected a non-empty string, got {type(text).__name__} {str(text)[:40]!r}")
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise RequestError(422, f"top_k: expected a positive integer, got {top_k!r}")
    return texts, top_k


def answers(classifier: EdgeClassifier, logits: np.ndarray, top_k: int | None) -> list[dict]:
    """Per text, as the edge CLI: the predicted label(s) with probabilities, ood_score and out_of_scope;
    the top_k most probable labels too when asked."""
    probs = classifier.to_probabilities(logits)
    scores = ood_scores(logits, classifier.multilabel, classifier.temperature)
    index = {label: i for i, label in enumerate(classifier.labels)}
    out = []
    for row, labels, score in zip(probs, classifier.predicted_labels(probs), scores, strict=True):
        answer = {
            "labels": [{"label": label, "probability": round(float(row[index[label]]), 6)} for label in labels],
            "ood_score": round(float(score), 4),
            "out_of_scope": bool(score > classifier.ood_threshold),
        }
        if top_k:
            top = np.argsort(-row)[:top_k]
            answer["top_k"] = [{"label": classifier.labels[j], "probability": round(float(row[j]), 6)} for j in top]
        out.append(answer)
    return out


def built_with(directory: Path) -> dict[str, str]:
    """The versions an int8 directory was quantized with (its quantization_report.json), if it says."""
    report = directory / "quantization_report.json"
    if not report.is_file():
        return {}
    figures = json.loads(report.read_text())
    return {f"built with {name}": figures[key] for name, key in (
        ("INC", "inc_version"), ("onnxruntime", "onnxruntime_version"), ("torch", "torch_version")
    ) if key in figures}  # fmt: skip


def model_info(classifier: EdgeClassifier, directory: Path, args: argparse.Namespace) -> dict:
    return {
        "model": str(directory),
        "kind": classifier.kind,
        "format": "onnx" if classifier.kind == "int8" else "transformers",
        **classifier_settings(classifier),
        "versions": {
            "onnxruntime": version("onnxruntime"),
            "tokenizers": version("tokenizers"),
            **built_with(directory),
        },
        "limits": {name: getattr(args, name) for name in LIMITS},
        "cpu": cpu_description(),
    }


class LimitsAndMetrics:
    """ASGI middleware: a body announced larger than --max_body_bytes gets 413 before it is read;
    every answer is counted by route and status and timed."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            body = json.dumps({"error": f"body: {int(length)} bytes, at most {self.max_body_bytes} (--max_body_bytes)"})
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await sending({"type": "http.response.start", "status": 413, "headers": headers})
            await sending({"type": "http.response.body", "body": body.encode()})
        else:
            await self.app(scope, receive, sending)
        self.metrics.requests.labels(route, str(status[0])).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(args: argparse.Namespace, classifier: EdgeClassifier):
    """The FastAPI application around a loaded classifier; it warms the model up once listening, and
    /ready says 200 from then on."""
    directory = Path(args.model)
    metrics = Metrics(classifier.labels)
    reference = read_drift_reference(directory)
    drift = DriftWindow(reference, args.drift_window) if reference else None
    if drift is not None:
        metrics.watch(drift)
    info = model_info(classifier, directory, args)
    state = {"ready": False}

    async def warm_up_then_serve(batcher: Batcher) -> None:
        await asyncio.get_running_loop().run_in_executor(batcher.executor, classifier.predictions, WARM_UP_TEXTS)
        state["ready"] = True
        print(f"serving {classifier.kind} model {directory} on http://{args.host}:{args.port}", file=sys.stderr)
        await batcher.run()

    @asynccontextmanager
    async def lifespan(app):
        batcher = state["batcher"] = Batcher(classifier, args, metrics)
        task = asyncio.create_task(warm_up_then_serve(batcher))
        yield
        state["ready"] = False
        task.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="Text classifier", lifespan=lifespan, description="Micro-batched text classification.")

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid"}
        where = ".".join(str(part) for part in first.get("loc", ["body"]))
        return error(422, f"{where}: {first.get('msg', 'invalid')}".splitlines()[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail).splitlines()[0], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(503, f"the server failed on this request: {type(exc).__name__}: {exc}".splitlines()[0])

    app.add_middleware(LimitsAndMetrics, max_body_bytes=args.max_body_bytes, metrics=metrics)

    @app.post("/predict", summary="Classify texts", openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(request: Request) -> JSONResponse:
        if not state["ready"]:
            raise RequestError(503, "not ready: the model is warming up", {"Retry-After": "1"})
        raw = await request.body()
        if len(raw) > args.max_body_bytes:  # a body sent without Content-Length
            raise RequestError(413, f"body: {len(raw)} bytes, at most {args.max_body_bytes} (--max_body_bytes)")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise RequestError(422, f"body: not JSON ({exc})") from None
        texts, top_k = texts_of(body, args.max_client_texts)
        with metrics.in_flight.track_inprogress():
            results = answers(classifier, await state["batcher"].submit(texts), top_k)
        flagged = [r["out_of_scope"] for r in results]
        metrics.record([[item["label"] for item in r["labels"]] for r in results], flagged, drift)
        return JSONResponse({"predictions": results})

    @app.get("/health", summary="Alive")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Model loaded and warmed up (503 before)")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/info", summary="Labels, task, long-text mode, thresholds, limits, versions")
    async def model_details() -> JSONResponse:
        return JSONResponse(info)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


ROUTES = ("/predict", "/health", "/ready", "/info", "/metrics", "/docs", "/openapi.json")
PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "text": {"type": "string"},
                    "top_k": {"type": "integer", "minimum": 1},
                },
            },
            "example": {"texts": ["my card has not arrived", "how do I top up?"], "top_k": 3},
        }
    },
}


class GracefulServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C uvicorn stops accepting, lets the requests in flight finish (their batches
    included) and shuts the application down; then it re-raises the signal, which would end the process
    as killed by it. A shutdown that went as planned exits 0 here instead."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    classifier = load_classifier(args.model, args.num_threads)  # bad model directories: one line, before listening

    # one process: the batching queue lives in it
    config = uvicorn.Config(
        create_app(args, classifier), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30
    )
    GracefulServer(config).run()


if __name__ == "__main__":
    sys.exit(run_cli(main))
