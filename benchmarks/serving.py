"""Serving, side by side in one run: serve.py (micro-batching), serve.py with batching off, a naive
server (the common pattern: FastAPI, one session.run per request in a synchronous handler), and the
edge runner's own offline figures on the same model as the ceiling.

    .venv/bin/python benchmarks/serving.py --model outputs/<run>/best_model-int8
    .venv/bin/python benchmarks/serving.py --model outputs/<run>/best_model-int8 --texts imdb --requests 300

Each server runs in its own process on 127.0.0.1; an asyncio client (aiohttp) keeps a fixed number of
one-text requests in flight (concurrency 1, 8, 32, 128 by default; --requests each) and reports
requests/s, p50/p95/p99 latency, errors and, for serve.py, the mean batch size (from /metrics). Then
overload (--overload concurrent clients against --max_queue 64: only 200 and 429 expected, no 5xx, no
dropped connection; the server's resident memory before and after) and the drift gauges after
BANKING77 test texts and after IMDB reviews. The client shares the machine's cores with the server:
compare the variants within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from intel_compressor_test import HelpFormatter, cpu_description, load_classifier

SHARED = REPO.parent / "shared" / "data"
TEXTS = {"banking77": ("banking77/test.csv", "text"), "imdb": ("imdb/test.csv.gz", "text")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python serve.py --model MODEL --port PORT OPTIONS` (or another `script` taking those options)
    in its own process, ready when /ready says 200; stop() sends SIGTERM and returns the exit code and
    what it wrote on stderr."""

    def __init__(self, model: Path, *options: str, python: str = sys.executable, script: Path = REPO / "serve.py"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - as long as the server lives
        command = [python, str(script), f"--model={model}", f"--port={self.port}", *options]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{script.name} exited with {self.process.returncode}: {self.stderr_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{script.name} did not become ready in 60 s")

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        text = self.stderr_text()
        self.stderr.close()
        return self.process.returncode, text


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text page (name with its labels)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def naive_app(model: str):
    """The tutorial pattern: a synchronous handler (FastAPI runs it in its thread pool), one model
    call per request, no limits."""
    from fastapi import FastAPI

    classifier = load_classifier(model)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        texts = body.get("texts") or [body["text"]]
        probs, ood = classifier.predictions(texts)
        answers = []
        for row, labels, score in zip(probs, classifier.predicted_labels(probs), ood, strict=True):
            chosen = [{"label": label, "probability": float(row[classifier.labels.index(label)])} for label in labels]
            answers.append(
                {"labels": chosen, "ood_score": float(score), "out_of_scope": bool(score > classifier.ood_threshold)}
            )
        return {"predictions": answers}

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


async def drive(url: str, texts: list[str], concurrency: int, requests: int) -> dict:
    """`concurrency` clients sending one-text requests back to back until `requests` are answered
    (aiohttp: httpx's pool costs several times more client CPU a request at high concurrency, which
    the server's two cores would pay for): the wall time, every latency, the statuses, the dropped
    connections."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    dropped = 0
    counter = iter(range(requests))

    async def client_loop(session: aiohttp.ClientSession) -> None:
        nonlocal dropped
        for i in counter:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", json={"text": texts[i % len(texts)]}) as response:
                    await response.read()
            except aiohttp.ClientError:
                dropped += 1
                continue
            latencies.append(time.perf_counter() - started)
            statuses[response.status] = statuses.get(response.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"wall": wall, "latencies": latencies, "statuses": statuses, "dropped": dropped}


def figures_of(runs: list[dict]) -> dict[str, float]:
    """Rounds of one variant at one level: the median round's requests/s, latency percentiles over
    every request, and the errors (non-200 answers and dropped connections)."""
    latencies = [latency for run in runs for latency in run["latencies"]]
    q = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [np.nan] * 3
    errors = sum(n for run in runs for status, n in run["statuses"].items() if status != 200)
    return {
        "requests/s": statistics.median(run["statuses"].get(200, 0) / run["wall"] for run in runs),
        "p50 ms": float(q[0]),
        "p95 ms": float(q[1]),
        "p99 ms": float(q[2]),
        "errors": errors + sum(run["dropped"] for run in runs),
    }


def batch_mean(page_before: str, page_after: str) -> float:
    count = metric(page_after, "batch_size_count") - metric(page_before, "batch_size_count")
    total = metric(page_after, "batch_size_sum") - metric(page_before, "batch_size_sum")
    return total / count if count else float("nan")


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def offline_ceiling(model: Path, texts: list[str], threads: int) -> dict[str, float]:
    """The edge runner in this process: batch-32 texts/s over the texts, and batch-1 p50 latency."""
    classifier = load_classifier(model, threads)
    classifier.probabilities(texts[:64])
    started = time.perf_counter()
    classifier.probabilities(texts, 32)
    throughput = len(texts) / (time.perf_counter() - started)
    single = []
    for text in texts[:300]:
        started = time.perf_counter()
        classifier.probabilities([text], 1)
        single.append(time.perf_counter() - started)
    return {"texts/s": throughput, "p50 ms": statistics.median(single) * 1000}


def table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_texts(name: str, count: int) -> list[str]:
    path, column = TEXTS[name]
    return pd.read_csv(SHARED / path)[column].sample(frac=1.0, random_state=0).head(count).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="int8 directory (best_model-int8) to serve.")
    parser.add_argument("--texts", choices=sorted(TEXTS), default="banking77", help="Texts of the requests.")
    parser.add_argument("--requests", type=int, default=2000, help="Requests at each concurrency level.")
    parser.add_argument("--concurrency", default="1,8,32,128", help="Client concurrency levels, comma-separated.")
    parser.add_argument("--overload", type=int, default=512, help="Concurrent clients of the overload run (0: none).")
    parser.add_argument("--num_threads", type=int, default=2, help="ONNX Runtime threads (every variant).")
    parser.add_argument("--rounds", type=int, default=4, help="Rounds a level, the variants in turns.")
    parser.add_argument("--serve_naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_naive:
        import uvicorn

        uvicorn.run(naive_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")
        return

    model = Path(args.model)
    texts = read_texts(args.texts, 4000)
    levels = [int(c) for c in args.concurrency.split(",")]
    threads = f"--num_threads={args.num_threads}"
    variants = {
        "serve.py": lambda: Server(model, threads),
        "serve.py --max_batch_texts 1": lambda: Server(model, threads, "--max_batch_texts=1"),
        "naive server": lambda: Server(model, "--serve_naive", script=Path(__file__)),
    }
    servers = {name: start() for name, start in variants.items()}  # idle while the others are driven
    rows: dict[str, dict[str, float]] = {}
    try:
        for level in levels:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            batches: dict[str, list[float]] = {}
            for round_ in range(args.rounds):  # in turns, the order reversed every round: noise hits all alike
                names = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
                for name in names:
                    url = servers[name].url
                    before = httpx.get(f"{url}/metrics").text if name.startswith("serve") else ""
                    runs[name].append(asyncio.run(drive(url, texts, level, args.requests // args.rounds)))
                    if name.startswith("serve"):
                        batches.setdefault(name, []).append(batch_mean(before, httpx.get(f"{url}/metrics").text))
            for name in servers:
                mean_batch = statistics.mean(batches[name]) if name in batches else float("nan")
                rows[f"{name}, concurrency {level}"] = {**figures_of(runs[name]), "mean batch": mean_batch}
                print(f"{name}, concurrency {level}: {rows[f'{name}, concurrency {level}']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ceiling = offline_ceiling(model, texts, args.num_threads)

    print(f"\nCPU: {cpu_description()}; {args.texts} texts, {args.requests} one-text requests a level")
    columns = ["requests/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"]
    print(table(rows, columns))
    print(f"\nceiling (edge runner, this process): batch 32 {ceiling['texts/s']:.1f} texts/s, batch 1 p50 "
          f"{ceiling['p50 ms']:.2f} ms")  # fmt: skip
    for level in levels:
        ours, naive = rows[f"serve.py, concurrency {level}"], rows[f"naive server, concurrency {level}"]
        print(
            f"concurrency {level}: serve.py {ours['requests/s'] / ceiling['texts/s']:.2f}x the ceiling, "
            f"{ours['requests/s'] / naive['requests/s']:.2f}x the naive server; p50 {ours['p50 ms']:.2f} ms "
            f"against the naive {naive['p50 ms']:.2f} ms"
        )

    if args.overload:
        server = Server(model, threads, "--max_queue=64")
        try:
            before = resident_kib(server.process.pid)
            run = asyncio.run(drive(server.url, texts, args.overload, args.overload * 8))
            after = resident_kib(server.process.pid)
        finally:
            server.stop()
        print(
            f"\noverload: {args.overload} concurrent clients against --max_queue 64: statuses "
            f"{dict(sorted(run['statuses'].items()))}, dropped connections {run['dropped']}; resident memory "
            f"{before / 1024:.0f} -> {after / 1024:.0f} MiB"
        )

    # the PSI two samples of one distribution show by chance, about (buckets - 1) (1/n + 1/m) (chi-square)
    reference = json.loads((model / "drift_reference.json").read_text())
    noise = (len(reference["labels"]) - 1) * (1 / reference["texts"] + 1 / 1000)
    server = Server(model, threads, "--drift_window=1000")
    try:
        for name in ("banking77", "imdb"):
            asyncio.run(drive(server.url, read_texts(name, 1000), 8, 1000))
            page = httpx.get(f"{server.url}/metrics").text
            print(
                f"drift after 1,000 {name} texts: out of scope {metric(page, 'drift_out_of_scope_share'):.3f} "
                f"(validation {metric(page, 'drift_out_of_scope_expected'):.3f}), label PSI "
                f"{metric(page, 'drift_label_psi'):.3f} (sampling alone: {noise:.3f})"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
