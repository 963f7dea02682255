"""batch_inference.py on the tiny int8 model the quantization tests build, over the real BANKING77
test texts (3,080 rows, one CSV and one Parquet file): its Parquet output equals the edge runner's
CSV row for row, ids stay with their rows, a rerun writes identical files, a two-raylet cluster on
this machine shares the blocks, an actor killed with SIGKILL mid-job loses and repeats nothing,
Redis (a real redis-server on 127.0.0.1) holds one hash per row equal to the Parquet rows, and each
bad input stops with one line before any output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest

import batch_inference
import intel_compressor_test
from benchmarks.serving import free_port
from intel_compressor_test import DataError
from tests.helpers import run_python, shared_file

# The edge runner's CSV rounds probabilities to 6 decimals and ood_score to 4; the Parquet output
# keeps float32 / float64, and an actor's forward batches pad differently from the edge runner's.
PROB_ATOL, OOD_ATOL = 2e-6, 6e-5


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The BANKING77 test split as part-a.csv (1,800 rows) and part-b.parquet (1,280) in one
    directory, and the edge runner's predictions for the whole split."""
    directory = tmp_path_factory.mktemp("batch-texts")
    frame = pd.read_csv(shared_file("banking77/test.csv"), keep_default_na=False)
    inputs = directory / "texts"
    inputs.mkdir()
    frame.iloc[:1800].to_csv(inputs / "part-a.csv", index=False)
    frame.iloc[1800:].to_parquet(inputs / "part-b.parquet", index=False)
    return {"directory": directory, "inputs": inputs, "frame": frame}


@pytest.fixture(scope="module")
def edge_predictions(banking_runs, texts) -> pd.DataFrame:
    source = texts["directory"] / "all.csv"
    texts["frame"].to_csv(source, index=False)
    target = texts["directory"] / "edge.csv"
    intel_compressor_test.main([f"--model={banking_runs['int8']}", f"--input={source}", f"--output={target}"])
    return pd.read_csv(target, keep_default_na=False)


def assert_same_predictions(scored: pd.DataFrame, edge: pd.DataFrame) -> None:
    """Every column the edge runner writes, row for row: texts and labels exactly, numbers within
    the CSV's rounding."""
    assert len(scored) == len(edge)
    prob_columns = [c for c in edge.columns if c.startswith("prob_")]
    assert [c for c in scored.columns if c != batch_inference.ROW_ID] == list(edge.columns)
    for column in ["text", "label", "predicted"]:
        assert scored[column].tolist() == edge[column].tolist(), column
    assert scored["out_of_scope"].tolist() == (edge["out_of_scope"].astype(str) == "True").tolist()
    np.testing.assert_allclose(scored["ood_score"], edge["ood_score"], atol=OOD_ATOL)
    np.testing.assert_allclose(scored[prob_columns].to_numpy(), edge[prob_columns].to_numpy(), atol=PROB_ATOL)


def score(model: Path, inputs: Path | str, *options: str) -> batch_inference.BatchResult:
    return batch_inference.main([f"--model={model}", f"--input={inputs}", "--batch_size=256", *options])


# ---------------------------------------------------------------------------------------
# A cluster of two raylets (first: before this process starts a Ray of its own)
# ---------------------------------------------------------------------------------------


def test_two_raylet_cluster_shares_the_blocks(banking_runs, texts, edge_predictions, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a cluster on loopback, for this test only
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        output = tmp_path / "scored"
        result = run_python(
            "batch_inference.py", f"--model={banking_runs['int8']}", f"--input={texts['inputs']}",
            f"--output={output}", f"--address={cluster.address}", "--batch_size=128",
        )  # fmt: skip
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    summary = [line for line in result.stderr.splitlines() if line.startswith("scored ")]
    # one actor per node (2 CPUs / 1 thread), and both took blocks
    assert summary and "scored 3,080 rows" in summary[0] and "2 actor(s) x 1 thread(s) on 2 node(s)" in summary[0]
    assert_same_predictions(pd.read_parquet(output), edge_predictions)


# ---------------------------------------------------------------------------------------
# One machine: a local Ray of two CPUs in this process
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scored(banking_runs, texts, local_ray, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("batch-scored") / "scored"
    result = score(banking_runs["int8"], texts["inputs"], f"--output={output}", "--actors=2")
    return {"result": result, "output": output}


def test_parquet_output_equals_the_edge_runner_row_for_row(scored, edge_predictions):
    frame = pd.read_parquet(scored["output"])
    assert_same_predictions(frame, edge_predictions)
    assert sorted(p.name for p in scored["output"].iterdir()) == ["part-00000.parquet"]
    assert scored["result"].rows == 3080 and sum(scored["result"].rows_per_node.values()) == 3080
    # this tiny model predicts the five intents it learned for every text: 3,080 texts it never saw
    # most of them out of scope, as the edge runner says too
    assert frame["out_of_scope"].sum() == (edge_predictions["out_of_scope"].astype(str) == "True").sum()


def test_row_ids_name_the_file_and_the_row(scored, texts):
    frame = pd.read_parquet(scored["output"])
    expected = [f"part-a.csv:{i}" for i in range(1800)] + [f"part-b.parquet:{i}" for i in range(1280)]
    assert frame[batch_inference.ROW_ID].tolist() == expected
    assert frame["text"].tolist() == texts["frame"]["text"].tolist()


def test_drift_summary_equals_the_edge_runners(banking_runs, scored, edge_predictions):
    reference = intel_compressor_test.read_drift_reference(banking_runs["int8"])
    window = intel_compressor_test.DriftWindow(reference)
    window.add(
        [set(labels.split(";")) for labels in edge_predictions["predicted"]],
        (edge_predictions["out_of_scope"].astype(str) == "True").tolist(),
    )
    assert scored["result"].drift == pytest.approx(window.summary())


def test_a_rerun_writes_identical_files(banking_runs, texts, scored, local_ray):
    first = (scored["output"] / "part-00000.parquet").read_bytes()
    score(banking_runs["int8"], texts["inputs"], f"--output={scored['output']}", "--actors=2")
    assert (scored["output"] / "part-00000.parquet").read_bytes() == first
    assert sorted(p.name for p in scored["output"].parent.iterdir()) == ["scored"]  # nothing left aside


def test_a_scorer_scores_with_its_model_and_leaves_no_copy_of_it(banking_runs, texts, local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the actor copies the model's files
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the actor sets it: restored afterwards
    scorer = batch_inference.Scorer(batch_inference.model_files(banking_runs["int8"]), 1, "text", ";")
    assert list(tmp_path.iterdir()) == []  # a killed or restarted actor leaves nothing on the node
    sample = texts["frame"]["text"].head(40).tolist()
    scored = scorer(pa.table({"text": sample}))
    expected = intel_compressor_test.load_classifier(banking_runs["int8"], 1).probabilities(sample, 32)
    labels = [name for name in scored.column_names if name.startswith("prob_")]
    got = np.stack([scored.column(name).to_numpy() for name in labels], axis=1)
    np.testing.assert_allclose(got, expected, atol=PROB_ATOL)


def test_an_id_column_is_kept_with_its_rows(banking_runs, texts, local_ray, tmp_path):
    frame = texts["frame"].sample(frac=1, random_state=0).assign(id=lambda f: [f"q{i:05d}" for i in f.index])
    frame.to_csv(tmp_path / "shuffled.csv", index=False)
    score(banking_runs["int8"], tmp_path / "shuffled.csv", "--id_column=id", "--actors=1")
    out = pd.read_parquet(tmp_path / "shuffled_scored")
    assert batch_inference.ROW_ID not in out.columns and out["id"].tolist() == frame["id"].tolist()
    original = texts["frame"]["text"]
    assert all(original[int(i[1:])] == text for i, text in zip(out["id"], out["text"]))


def test_an_actor_killed_mid_job_loses_and_repeats_no_row(banking_runs, texts, local_ray, tmp_path, monkeypatch):
    """SIGKILL to one scoring actor once the first rows are written: Ray restarts it and scores
    its blocks again, and every row reaches the output once."""
    train = pd.read_csv(shared_file("banking77/train.csv"), keep_default_na=False)
    train.to_csv(tmp_path / "train.csv", index=False)  # 10,003 rows: many blocks of 128
    killed: list[int] = []
    first_write = threading.Event()
    write = batch_inference.ParquetOutput.write

    def write_and_signal(self, table):
        write(self, table)
        first_write.set()

    def kill_one_actor():
        first_write.wait(120)
        actors = [
            p for p in psutil.process_iter(["cmdline"]) if "MapBatches(Scorer)" in " ".join(p.info["cmdline"] or [])
        ]
        if actors:
            os.kill(actors[0].pid, signal.SIGKILL)
            killed.append(actors[0].pid)

    monkeypatch.setattr(batch_inference.ParquetOutput, "write", write_and_signal)
    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    result = score(banking_runs["int8"], tmp_path / "train.csv", "--actors=2", "--batch_size=128")
    killer.join()
    assert killed and not psutil.pid_exists(killed[0])
    out = pd.read_parquet(tmp_path / "train_scored")
    assert result.rows == len(out) == len(train) == 10003
    assert out[batch_inference.ROW_ID].tolist() == [f"train.csv:{i}" for i in range(len(train))]
    assert out["text"].tolist() == train["text"].tolist()


# ---------------------------------------------------------------------------------------
# Redis: one hash per row
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on 127.0.0.1 at a free port, without persistence; stopped at the end."""
    import redis

    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    try:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.fail("redis-server missing: install Debian's redis-server (apt-get install redis-server; .ci/run does)")
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


def test_redis_holds_one_hash_per_row_equal_to_the_parquet_rows(banking_runs, texts, scored, redis_url, capsys):
    import redis

    result = score(banking_runs["int8"], texts["inputs"], f"--redis_url={redis_url}", "--model_name=tiny")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"tiny:{batch_inference.model_version(batch_inference.model_files(banking_runs['int8']))}"
    keys = sorted(client.scan_iter(match=f"{prefix}:*", count=10_000))
    frame = pd.read_parquet(scored["output"]).set_index(batch_inference.ROW_ID)
    assert len(keys) == result.rows == 3080 and keys == sorted(f"{prefix}:{i}" for i in frame.index)
    assert "3,080 hashes under" in capsys.readouterr().err and "(3,080 new, 0 overwritten" in result.output
    labels = json.loads((banking_runs["int8"] / "edge_config.json").read_text())["labels"]
    for key in keys[::97]:
        stored, row = client.hgetall(key), frame.loc[key.removeprefix(f"{prefix}:")]
        assert sorted(stored) == ["label", "ood_score", "out_of_scope", "probabilities"]
        assert stored["label"] == row["predicted"] and stored["out_of_scope"] == str(int(row["out_of_scope"]))
        assert float(stored["ood_score"]) == row["ood_score"]
        assert json.loads(stored["probabilities"]) == pytest.approx({k: row[f"prob_{k}"] for k in labels}, abs=1e-7)

    rerun = score(banking_runs["int8"], texts["inputs"], f"--redis_url={redis_url}", "--model_name=tiny")
    assert "(0 new, 3,080 overwritten; 3,080 keys under the prefix)" in rerun.output
    assert sorted(client.scan_iter(match=f"{prefix}:*", count=10_000)) == keys


def test_repeated_ids_are_refused_after_the_count(banking_runs, texts, redis_url, local_ray, tmp_path):
    frame = texts["frame"].iloc[:300].assign(id=[f"q{i % 200}" for i in range(300)])
    frame.to_csv(tmp_path / "repeats.csv", index=False)
    with pytest.raises(DataError, match=r"--id_column id: 300 rows but 200 keys under repeats:.*ids repeat"):
        score(banking_runs["int8"], tmp_path / "repeats.csv", "--id_column=id", f"--redis_url={redis_url}",
              "--model_name=repeats")  # fmt: skip


# ---------------------------------------------------------------------------------------
# Bad input: one line, no output
# ---------------------------------------------------------------------------------------


ONE_TEXT = "text\nhello\n"


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("missing.csv", None, [], r"--input .*missing.csv: no such file or directory"),
        ("a.csv", "body,label\nhello,x\n", [], r"a.csv: no column 'text' \(--text_column; columns: body, label\)"),
        ("a.csv", ONE_TEXT, ["--id_column=key"], r"no column 'key' \(--id_column"),
        ("a.parquet", "not parquet", [], r"a.parquet: cannot read \("),
        ("a.xlsx", "x", [], r"a.xlsx: not a CSV, TSV, Parquet or JSONL file"),
        ("a.csv", "", [], r"a.csv: empty file \(no header row\)"),
        ("a.csv", ONE_TEXT, ["--address={closed}"], r"--address 127.0.0.1:\d+: no Ray cluster there"),
        ("a.csv", ONE_TEXT, ["--redis_url=redis://{closed}/0"], r"--redis_url redis://127.0.0.1:\d+/0: cannot use"),
        ("a.csv", ONE_TEXT, ["--output=o", "--redis_url=redis://x"], r"--output and --redis_url: give one"),
        ("a.csv", ONE_TEXT, ["--actors=-1"], r"--actors -1: must be at least 0"),
    ],
    ids=["missing-file", "missing-text-column", "missing-id-column", "unreadable", "unknown-format", "empty",
         "unreachable-cluster", "unreachable-redis", "two-outputs", "negative-actors"],
)  # fmt: skip
def test_bad_input_stops_before_any_output(banking_runs, tmp_path, name, content, options, message):
    source = tmp_path / name
    if content is not None:
        source.write_text(content)
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(DataError, match=message):
        batch_inference.main(
            [f"--model={banking_runs['int8']}", f"--input={source}", *(o.format(closed=closed) for o in options)]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if content is not None else [])


def test_an_empty_text_names_its_row_and_writes_nothing(banking_runs, local_ray, tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nhello,x\nworld,y\n  ,z\n")
    with pytest.raises(DataError, match=r"a.csv: row 3: empty text in column 'text'"):
        score(banking_runs["int8"], tmp_path / "a.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_the_command_line_prints_one_error_line(banking_runs, tmp_path):
    result = run_python("batch_inference.py", f"--model={banking_runs['int8']}", f"--input={tmp_path / 'none.csv'}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: --input ")


def test_tsv_and_compressed_jsonl_read_as_the_csv(banking_runs, texts, edge_predictions, local_ray, tmp_path):
    frame = texts["frame"].iloc[:600]
    inputs = tmp_path / "mixed"
    inputs.mkdir()
    frame.iloc[:300].to_csv(inputs / "a.tsv", sep="\t", index=False)
    frame.iloc[300:].to_json(inputs / "b.jsonl.gz", orient="records", lines=True, compression="gzip")
    score(banking_runs["int8"], inputs, "--actors=1")
    out = pd.read_parquet(tmp_path / "mixed_scored")
    assert out[batch_inference.ROW_ID].tolist()[299:301] == ["a.tsv:299", "b.jsonl.gz:0"]
    assert_same_predictions(out, edge_predictions.iloc[:600])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("first_input", "expected"),
    [("/data/t.csv.gz", "/data/t_scored"), ("/data/texts/", "/data/texts_scored"),
     ("data/*.parquet", "data/input_scored"), ("s3://bucket/texts/", "texts_scored")],
)  # fmt: skip
def test_the_default_output_sits_beside_the_input(first_input, expected):
    assert batch_inference.default_output(first_input) == expected
