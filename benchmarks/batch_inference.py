"""Batch scoring, side by side in one run: the edge runner in one process (intel_compressor_test.py
--input, 2 threads) against batch_inference.py on Ray Data with 1 actor x 2 threads, 2 actors x 1
thread, and a two-node cluster on this machine (two raylets of one CPU each, as two `ray start`
would make; ray.cluster_utils.Cluster starts and stops them).

    .venv/bin/python benchmarks/batch_inference.py --model outputs/default/best_model-int8
    .venv/bin/python benchmarks/batch_inference.py --model M --banking_rows 20000 --imdb_rows 2000

Two datasets: BANKING77 test texts repeated to --banking_rows rows with distinct ids, and
--imdb_rows IMDB test reviews scored at max_length 256 (the model's directory copied with its
max_length raised: the workload, not the accuracy, is the point). Every variant runs as a user runs
it, in its own process: rows/s from its launch to its exit (imports and Ray's start-up included),
the time to its first output (the first scored rows on disk) and the rows/s from then to its exit
(once Ray has started and the models are loaded; by then each scorer has done one window or batch of
rows, which this rate counts too), its peak memory (the resident memory of the variant's processes
summed, sampled every 0.5 s: an upper bound, shared pages count once per process), and whether its
output equals the edge runner's (labels exactly, probabilities within the CSV's 6 decimals). The
2-actor job also runs on a quarter of the BANKING77 rows: peak memory flat in the number of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from intel_compressor_test import HelpFormatter, cpu_description

SHARED = REPO.parent / "shared" / "data"
FIRST_OUTPUT_BYTES = 16 << 10  # an output file past its header: the first scored rows are on disk
PROB_ATOL = 2e-6  # the edge runner's CSV rounds probabilities to 6 decimals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="int8 directory from intel_compressor.py.")
    parser.add_argument("--banking_rows", type=int, default=100_000, help="BANKING77 rows (test texts repeated).")
    parser.add_argument("--imdb_rows", type=int, default=20_000, help="IMDB test reviews, at max_length 256.")
    parser.add_argument("--work_dir", default="", help="Inputs and outputs; empty: a temporary directory.")
    parser.add_argument("--json", default="", help="Also write the results to this JSON file.")
    parser.add_argument(
        "--ceilings_only", action="store_true", help="Only the one-process ceilings of a cluster: reading, writing."
    )
    return parser


@dataclass
class Run:
    seconds: float
    first_output_seconds: float
    peak_rss_mib: float


def tree_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def measured(command: list[str], output: Path, env: dict[str, str]) -> Run:
    """Run `command` to its end; its wall time, when `output` (a file or directory, written aside
    under the same parent) first holds scored rows, and the peak resident memory of this process's
    children (the command, and what it or this process started for it: Ray's processes)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr))
    reader.start()
    first, peak, me = None, 0, psutil.Process()
    prefix = f".{output.name}."
    while process.poll() is None:
        peak = max(peak, tree_rss(me.children(recursive=True)))
        if first is None:
            written = [
                p for p in output.parent.rglob("*") if p.is_file() and prefix in str(p.relative_to(output.parent))
            ]
            if sum(p.stat().st_size for p in written) > FIRST_OUTPUT_BYTES:
                first = time.perf_counter() - started
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    reader.join()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{''.join(stderr[-20:])}")
    return Run(seconds, first or seconds, peak / 2**20)


def banking_input(directory: Path, rows: int) -> Path:
    test = pd.read_csv(SHARED / "banking77/test.csv", keep_default_na=False)
    frame = pd.concat([test] * (rows // len(test) + 1), ignore_index=True).iloc[:rows]
    frame.insert(0, "id", [f"b{i:07d}" for i in range(rows)])
    path = directory / f"banking77_{rows}.csv"
    frame.to_csv(path, index=False)
    return path


def imdb_input(directory: Path, rows: int) -> Path:
    frame = pd.read_csv(SHARED / "imdb/test.csv.gz", keep_default_na=False).sample(n=rows, random_state=0)
    frame.insert(0, "id", [f"m{i:06d}" for i in range(rows)])
    path = directory / f"imdb_{rows}.csv"
    frame[["id", "text"]].to_csv(path, index=False)
    return path


def model_at(model: Path, max_length: int, directory: Path) -> Path:
    copy = directory / f"{model.name}-{max_length}"
    shutil.copytree(model, copy, dirs_exist_ok=True)
    config = json.loads((copy / "edge_config.json").read_text())
    (copy / "edge_config.json").write_text(json.dumps({**config, "max_length": max_length}))
    return copy


def compare(scored: pd.DataFrame, edge: pd.DataFrame) -> str:
    """'identical' when every label and out-of-scope flag agrees and the probabilities agree within the
    CSV's rounding; otherwise what differs."""
    probs = [c for c in edge.columns if c.startswith("prob_")]
    labels = int((scored["predicted"].to_numpy() != edge["predicted"].to_numpy()).sum())
    flags = int((scored["out_of_scope"].to_numpy() != edge["out_of_scope"].astype(str).eq("True").to_numpy()).sum())
    worst = float(np.abs(scored[probs].to_numpy() - edge[probs].to_numpy()).max())
    same = labels == flags == 0 and worst <= PROB_ATOL and scored["id"].tolist() == edge["id"].tolist()
    return "identical" if same else f"{labels} labels, {flags} flags differ; max |dp| {worst:.1e}"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if shutil.which("redis-server") is None:  # the Redis ceiling runs last: refuse before the long runs
        raise SystemExit("error: redis-server not found on PATH (Debian: apt-get install redis-server)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.ceilings_only:
        return {"ceilings": print_ceilings(ceilings(work, banking_input(work, args.banking_rows), Path(args.model)))}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # the test cluster is on loopback
    python, model = sys.executable, Path(args.model).resolve()
    datasets = {
        "BANKING77": (banking_input(work, args.banking_rows), model),
        "IMDB at 256": (imdb_input(work, args.imdb_rows), model_at(model, 256, work)),
    }
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    results: dict[str, dict] = {}
    print(f"# {cpu_description()}", flush=True)
    for dataset, (source, model_dir) in datasets.items():
        rows = len(pd.read_csv(source, usecols=["id"]))
        edge_out = work / f"{source.stem}_edge.csv"
        runs = {"edge runner, 1 process x 2 threads": (
            [python, "intel_compressor_test.py", f"--model={model_dir}", f"--input={source}", f"--output={edge_out}",
             "--num_threads=2"], edge_out)}  # fmt: skip
        job = [python, "batch_inference.py", f"--model={model_dir}", f"--input={source}", "--id_column=id"]
        for name, options in [("Ray, 1 actor x 2 threads", ["--actors=1", "--threads_per_actor=2"]),
                              ("Ray, 2 actors x 1 thread", ["--actors=2"])]:  # fmt: skip
            out = work / f"{source.stem}_{options[0][2:].replace('=', '')}"
            runs[name] = ([*job, f"--output={out}", *options], out)
        measured_runs = {name: measured(command, out, env) for name, (command, out) in runs.items()}
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            out = work / f"{source.stem}_cluster"
            runs["Ray, two nodes x 1 actor x 1 thread"] = (
                [*job, f"--output={out}", f"--address={cluster.address}"],
                out,
            )
            measured_runs["Ray, two nodes x 1 actor x 1 thread"] = measured(
                runs["Ray, two nodes x 1 actor x 1 thread"][0], out, env
            )
        finally:
            cluster.shutdown()
        edge = pd.read_csv(edge_out, keep_default_na=False)
        base = measured_runs["edge runner, 1 process x 2 threads"]
        table = {}
        for name, run in measured_runs.items():
            out = runs[name][1]
            same = "reference" if out == edge_out else compare(pd.read_parquet(out), edge)
            table[name] = table_row(rows, run, base, same)
        results[dataset] = table
        print_table(dataset, table)
    quarter = banking_input(work, args.banking_rows // 4)
    out = work / f"{quarter.stem}_actors2"
    small = measured([python, "batch_inference.py", f"--model={model}", f"--input={quarter}", "--id_column=id",
                      f"--output={out}", "--actors=2"], out, env)  # fmt: skip
    full = results["BANKING77"]["Ray, 2 actors x 1 thread"]["peak_rss_mib"]
    results["memory"] = {
        "rows": [args.banking_rows // 4, args.banking_rows],
        "peak_rss_mib": [small.peak_rss_mib, full],
        "seconds": [small.seconds, results["BANKING77"]["Ray, 2 actors x 1 thread"]["seconds"]],
    }
    print(f"\npeak memory of Ray, 2 actors x 1 thread: {small.peak_rss_mib:,.0f} MiB on {args.banking_rows // 4:,} "
          f"rows, {full:,.0f} MiB on {args.banking_rows:,} rows")  # fmt: skip
    results["ceilings"] = print_ceilings(ceilings(work, datasets["BANKING77"][0], model))
    results["cpu"] = cpu_description()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def table_row(rows: int, run: Run, edge: Run, output: str) -> dict:
    """A variant's figures against the edge runner's: rows/s from launch to exit, and from its first
    scored rows on disk to exit (what remains once Ray has started and the actors have loaded)."""
    after_first = rows / max(run.seconds - run.first_output_seconds, 1e-9)
    edge_after_first = rows / max(edge.seconds - edge.first_output_seconds, 1e-9)
    return {"rows": rows, "rows_per_s": rows / run.seconds, "vs_edge": edge.seconds / run.seconds,
            "after_first_rows_per_s": after_first, "after_first_vs_edge": after_first / edge_after_first,
            "first_output_s": run.first_output_seconds, "peak_rss_mib": run.peak_rss_mib, "seconds": run.seconds,
            "output": output}  # fmt: skip


def ceilings(work: Path, source: Path, model: Path) -> dict[str, float]:
    """Rows/s of the parts of a job that do not spread over the cluster, each timed alone in this
    process on the BANKING77 rows: one read task parsing a CSV, and the driver writing scored rows to
    Parquet and to a local redis-server (pipelined HSETs, one round trip per block of 1,024 rows)."""
    import pyarrow as pa

    import batch_inference
    from benchmarks.serving import free_port
    from intel_compressor_test import load_classifier, prediction_columns

    started = time.perf_counter()
    with open(source, "rb") as f:
        tables = list(batch_inference.file_tables(f, str(source), 1024))
    rows = sum(len(t) for t in tables)
    rates = {"read a CSV (one read task)": rows / (time.perf_counter() - started)}
    classifier = load_classifier(model)
    block = tables[0].drop_columns(["id"])
    probs, ood = classifier.predictions(block.column("text").to_pylist(), 32)
    for name, values in prediction_columns(classifier, probs, ood, ";").items():
        block = block.append_column(name, pa.array(values, pa.float32() if name.startswith("prob_") else None))
    blocks = [block.append_column("id", pa.array([f"{i}:{j}" for j in range(len(block))])) for i in range(len(tables))]
    out = batch_inference.ParquetOutput(work / "ceiling_parquet")
    started = time.perf_counter()
    for b in blocks:
        out.write(b)
    out.close()
    rates["write Parquet (the driver)"] = rows / (time.perf_counter() - started)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        redis_out = batch_inference.RedisOutput(f"redis://127.0.0.1:{port}/0", "ceiling:v", "id", classifier.labels)
        started = time.perf_counter()
        for b in blocks:
            redis_out.write(b)
        rates["write Redis hashes (the driver, one connection)"] = redis_out.rows / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(10)
    return rates


def print_ceilings(rates: dict[str, float]) -> dict[str, float]:
    print("\n| one process, alone | rows/s |\n|---|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")
    return rates


def print_table(dataset: str, table: dict[str, dict]) -> None:
    print(f"\n{dataset}: {next(iter(table.values()))['rows']:,} rows")
    print("| variant | rows/s | vs edge runner | first output (s) | rows/s after first output | vs edge runner "
          "| peak memory (MiB) | output |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in table.items():
        print(f"| {name} | {r['rows_per_s']:,.0f} | {r['vs_edge']:.2f}x | {r['first_output_s']:.1f} | "
              f"{r['after_first_rows_per_s']:,.0f} | {r['after_first_vs_edge']:.2f}x | {r['peak_rss_mib']:,.0f} | "
              f"{r['output']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
