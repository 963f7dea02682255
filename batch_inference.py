"""Score a whole dataset with a classifier on Ray Data: one machine or a cluster, to Parquet or Redis.

    python batch_inference.py --model outputs/default/best_model-int8 --input texts.csv
    python batch_inference.py --model M --input 'data/*.parquet' --output scored/ --actors 2
    python batch_inference.py --model M --input data/ --redis_url redis://127.0.0.1:6379/0
    python batch_inference.py --model M --input s3://bucket/texts/ --address auto   # a running cluster

--model is any directory the edge runner (intel_compressor_test.py) accepts. Its files are sent
to every actor through Ray's object store (no shared filesystem needed for the model), and each
actor loads them once with the edge runner's own code, so every output column equals what
`intel_compressor_test.py --input` writes for the same row: the input columns, predicted,
ood_score, out_of_scope and prob_<label>, plus row_id (FILE:ROW, the 0-based data row of the file,
stable across runs) unless --id_column names an id column of the input.

Rows are read by Ray's read tasks, scored by --actors actors of --threads_per_actor threads each,
and streamed back in input order to this process, which writes them: Parquet files in a directory
written aside and moved into place when the job ends, or one Redis hash per row (keyed
MODEL:VERSION:ID, a rerun overwrites). An actor that dies is restarted by Ray and its blocks
scored again; each block reaches the writer once. See docs/batch_inference.md.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from intel_compressor_test import (
    DataError,
    DriftWindow,
    HelpFormatter,
    describe_drift,
    load_classifier,
    prediction_columns,
    read_drift_reference,
    run_cli,
)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")  # what pyarrow's input streams decompress by extension
ROW_ID = "row_id"  # the id column when --id_column is not given
NODE = "_node"  # the node that scored a row: counted by the driver, never written
FORWARD_BATCH = 32  # texts per forward pass, as the edge runner's --batch_size default
ROWS_PER_FILE = 100_000  # Parquet output files roll over at this many rows
REDIS_TIMEOUT_S = 5
BLOCK_BYTES = 256 << 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="int8 directory from intel_compressor.py, or a best_model.")
    parser.add_argument(
        "--input", required=True, nargs="+",
        help="CSV, TSV, Parquet or JSONL files (.gz etc. too), directories of them, or globs; local or any "
        "URI pyarrow reads (s3://, gs://, hdfs://).",
    )  # fmt: skip
    parser.add_argument("--text_column", default="text", help="Column holding the texts.")
    parser.add_argument("--id_column", default="", help=f"Column of row ids; empty: {ROW_ID} = FILE:ROW.")
    parser.add_argument(
        "--output", default="", help="Parquet directory to write; empty: <first input>_scored beside it."
    )
    parser.add_argument(
        "--redis_url", default="", help="Write one hash per row to this Redis (redis://host:port/db) instead."
    )
    parser.add_argument("--model_name", default="", help="Redis key prefix; empty: the model directory's name.")
    parser.add_argument("--address", default="", help="Ray cluster (host:port or auto); empty: a local one.")
    parser.add_argument("--actors", type=int, default=0, help="Scoring actors; 0: the cluster's CPUs / threads.")
    parser.add_argument("--threads_per_actor", type=int, default=1, help="CPU threads of each actor.")
    parser.add_argument(
        "--batch_size", type=int, default=4096, help="Rows an actor scores at a time, sorted by length."
    )
    parser.add_argument("--label_delimiter", default=";", help="Separator of several predicted labels in one cell.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.output and args.redis_url:
        raise DataError("--output and --redis_url: give one of the two")
    for name in ("actors", "threads_per_actor", "batch_size"):
        if getattr(args, name) < (0 if name == "actors" else 1):
            raise DataError(f"--{name} {getattr(args, name)}: must be at least {0 if name == 'actors' else 1}")
    if "://" in args.output:
        raise DataError(f"--output {args.output}: a local directory (remote outputs are not supported)")


# ---------------------------------------------------------------------------------------
# Input: files, their format, and rows numbered within each file
# ---------------------------------------------------------------------------------------


def file_format(path: str) -> str:
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    kind = FORMATS.get(os.path.splitext(name)[1])
    if kind is None:
        raise DataError(f"--input {path}: not a CSV, TSV, Parquet or JSONL file ({', '.join(FORMATS)})")
    return kind


def input_files(patterns: list[str]) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """The files named by --input (globs expanded, directories listed), on one filesystem."""
    filesystem, files = None, []
    for pattern in patterns:
        if "://" not in pattern and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"--input {pattern}: no file matches")
            expanded = [os.path.abspath(m) for m in matches]
        else:
            expanded = [pattern if "://" in pattern else os.path.abspath(pattern)]
        for path in expanded:
            fs, inner = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
            if filesystem is not None and type(fs) is not type(filesystem):
                raise DataError(f"--input {path}: all inputs must be on one filesystem")
            filesystem = fs
            info = fs.get_file_info(inner)
            if info.type == pyarrow.fs.FileType.NotFound:
                raise DataError(f"--input {path}: no such file or directory")
            if info.type == pyarrow.fs.FileType.Directory:
                listed = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
                names = sorted(i.path for i in listed if i.is_file and not os.path.basename(i.path).startswith("."))
                found = [name for name in names if _known_format(name)]
                if not found:
                    raise DataError(f"--input {path}: no CSV, TSV, Parquet or JSONL file in the directory")
                files += found
            else:
                file_format(inner)
                files.append(inner)
    return filesystem, files


def default_output(first_input: str) -> str:
    """<input without its extensions>_scored, beside the first input (a glob: beside its directory;
    a remote input: in the current directory)."""
    path = first_input.split("://")[-1].rstrip("/")
    if "://" in first_input:
        path = os.path.basename(path)
    if glob.has_magic(path):
        path = os.path.join(os.path.dirname(path.split("*")[0]) or ".", "input")
    name = os.path.basename(path)
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    stem = name.rsplit(".", 1)[0] if os.path.splitext(name)[1].lower() in FORMATS else name
    return os.path.join(os.path.dirname(path), f"{stem}_scored")


def _known_format(path: str) -> bool:
    try:
        file_format(path)
    except DataError:
        return False
    return True


def open_text(stream) -> io.TextIOWrapper:
    return io.TextIOWrapper(stream, encoding="utf-8", newline="")


def file_columns(filesystem: pyarrow.fs.FileSystem, path: str) -> list[str]:
    """The column names of one input file, read from its header or schema only."""
    kind = file_format(path)
    try:
        if kind == "parquet":
            with filesystem.open_input_file(path) as f:
                return pq.read_schema(f).names
        with filesystem.open_input_stream(path) as stream:
            first = open_text(stream).readline()
        if kind == "jsonl":
            return list(json.loads(first)) if first.strip() else []
        return next(csv.reader([first], delimiter="\t" if kind == "tsv" else ","), [])
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"--input {path}: cannot read ({str(error).splitlines()[0]})") from None


def check_columns(filesystem: pyarrow.fs.FileSystem, files: list[str], args: argparse.Namespace) -> None:
    """Every file has the text column (and the id column), checked before any output."""
    for path in files:
        columns = file_columns(filesystem, path)
        if not columns:
            raise DataError(f"--input {path}: empty file (no header row)")
        for option in ("text_column", "id_column"):
            column = getattr(args, option)
            if column and column not in columns:
                raise DataError(f"--input {path}: no column {column!r} (--{option}; columns: {', '.join(columns)})")
        if not args.id_column and ROW_ID in columns:
            raise DataError(f"--input {path}: has a {ROW_ID!r} column already; pass --id_column {ROW_ID}")


def numbered_datasource(files: list[str], filesystem: pyarrow.fs.FileSystem, args: argparse.Namespace):
    """A Ray Data datasource that reads each file in one task, streamed in blocks of --batch_size rows
    with every text checked, and (without --id_column) a row_id that names the file and the row."""
    from ray.data.datasource import FileBasedDatasource

    base = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    text_column, id_column, block_rows = args.text_column, args.id_column, args.batch_size

    class NumberedFiles(FileBasedDatasource):
        def _open_input_source(self, filesystem, path: str, **open_args):
            if file_format(path) == "parquet":  # its footer comes first: random access, not a stream
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            name = os.path.relpath(path, base) if base else path
            row = 0
            for table in file_tables(f, path, block_rows):
                texts = table.column(text_column)
                for i, text in enumerate(texts.to_pylist()):
                    if not isinstance(text, str) or not text.strip():
                        raise DataError(f"--input {path}: row {row + i + 1}: empty text in column {text_column!r}")
                if not id_column:
                    table = table.append_column(ROW_ID, pa.array([f"{name}:{row + i}" for i in range(len(table))]))
                row += len(table)
                yield table

    return NumberedFiles(files, filesystem=filesystem)


def file_tables(f, path: str, rows: int) -> Iterator[pa.Table]:
    """One input file as tables of at most `rows` rows, in file order; CSV and JSONL cells as text,
    read by the same csv module as the edge runner."""
    kind = file_format(path)
    if kind == "parquet":
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([batch])
        return
    lines = open_text(f)
    records = csv.DictReader(lines, delimiter="\t" if kind == "tsv" else ",") if kind != "jsonl" else None
    chunk: list[dict] = []
    for record in records if records is not None else (json.loads(line) for line in lines if line.strip()):
        chunk.append(record)
        if len(chunk) == rows:
            yield pa.Table.from_pylist(chunk)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk)


# ---------------------------------------------------------------------------------------
# Scoring: one model per actor
# ---------------------------------------------------------------------------------------


def model_files(directory: Path) -> dict[str, bytes]:
    """The model directory's files, to be sent to the actors through the object store."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def model_version(files: dict[str, bytes]) -> str:
    """A digest of the model's files: a retrained or re-quantized model gets keys of its own."""
    digest = hashlib.sha256()
    for name, content in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()[:12]


class Scorer:
    """A Ray Data actor: the edge runner's classifier, loaded once from the model's files."""

    def __init__(self, files: dict[str, bytes], threads: int, text_column: str, delimiter: str):
        import ray

        files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the fp32 path's torch threads
        # The classifier reads every file while loading, so the copy goes once it is loaded: an actor
        # that is restarted or killed leaves no model behind in the node's temporary directory.
        with tempfile.TemporaryDirectory(prefix="batch-inference-model-") as directory:
            for name, content in files.items():
                Path(directory, name).write_bytes(content)
            self.classifier = load_classifier(directory, threads)
        self.text_column, self.delimiter = text_column, delimiter
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs, ood = self.classifier.predictions(batch.column(self.text_column).to_pylist(), FORWARD_BATCH)
        for name, values in prediction_columns(self.classifier, probs, ood, self.delimiter).items():
            values = pa.array(values, type=pa.float32()) if name.startswith("prob_") else pa.array(values)
            batch = batch.append_column(name, values)
        return batch.append_column(NODE, pa.array([self.node] * len(batch)))


# ---------------------------------------------------------------------------------------
# Output: Parquet written aside and moved into place, or Redis hashes
# ---------------------------------------------------------------------------------------


class ParquetOutput:
    """Parquet files part-00000.parquet, ... in a directory beside the target, moved into place by
    close(); rows arrive in input order, so a rerun writes identical files."""

    def __init__(self, target: Path):
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        self.writer, self.parts, self.rows_in_part = None, 0, 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None or self.rows_in_part >= ROWS_PER_FILE:
            self.roll(table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows_in_part += len(table)

    def roll(self, schema: pa.Schema) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = pq.ParquetWriter(self.aside / f"part-{self.parts:05d}.parquet", schema)
        self.parts, self.rows_in_part = self.parts + 1, 0

    def close(self) -> str:
        if self.writer is not None:
            self.writer.close()
        os.chmod(self.aside, 0o755)
        if self.target.exists():  # an earlier run: replaced only now that the new one is complete
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.aside, self.target)
            shutil.rmtree(old)
        else:
            os.replace(self.aside, self.target)
        return f"{self.target} ({self.parts} Parquet file(s))"

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.aside, ignore_errors=True)


class RedisOutput:
    """One hash per row at PREFIX:ID (label, probabilities as JSON, ood_score, out_of_scope);
    HSET overwrites, so a rerun leaves the same keys. close() counts the keys under PREFIX."""

    def __init__(self, url: str, prefix: str, id_column: str, labels: list[str]):
        self.client, self.url = redis_client(url), url
        self.prefix, self.id_column, self.labels = prefix, id_column, labels
        self.rows = self.new = 0

    def write(self, table: pa.Table) -> None:
        columns = table.to_pydict()
        pipe = self.client.pipeline(transaction=False)
        for i, key in enumerate(columns[self.id_column]):
            pipe.hset(f"{self.prefix}:{key}", mapping=redis_fields(columns, i, self.labels))
        replies = pipe.execute()
        self.rows += len(replies)
        self.new += sum(reply == len(REDIS_FIELDS) for reply in replies)  # every field new: a new key

    def close(self) -> str:
        keys = sum(1 for _ in self.client.scan_iter(match=f"{self.prefix}:*", count=10_000))
        if keys < self.rows:
            raise DataError(
                f"--id_column {self.id_column}: {self.rows:,} rows but {keys:,} keys under {self.prefix}: ids repeat"
            )
        return (
            f"{self.url}: {self.rows:,} hashes under {self.prefix}: ({self.new:,} new, "
            f"{self.rows - self.new:,} overwritten; {keys:,} keys under the prefix)"
        )

    def abort(self) -> None:
        """Hashes already written stay: each is complete, and a rerun overwrites them."""


REDIS_FIELDS = ("label", "probabilities", "ood_score", "out_of_scope")


def redis_fields(columns: dict[str, list], i: int, labels: list[str]) -> dict[str, str]:
    probabilities = {label: columns[f"prob_{label}"][i] for label in labels}
    return {
        "label": columns["predicted"][i],
        "probabilities": json.dumps(probabilities),
        "ood_score": repr(columns["ood_score"][i]),
        "out_of_scope": "1" if columns["out_of_scope"][i] else "0",
    }


def redis_client(url: str):
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        client.ping()
    except (ValueError, redis.exceptions.RedisError) as error:
        raise DataError(f"--redis_url {url}: cannot use it ({error})") from None
    return client


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    rows: int
    seconds: float
    first_rows_seconds: float  # from the start of the job to the first scored rows back
    output: str  # the Parquet directory, or the Redis URL and key prefix
    rows_per_node: dict[str, int]
    drift: dict[str, float] | None


def connect(address: str) -> None:
    """Join the cluster at --address (checked first: Ray itself retries an unreachable one for
    minutes), or start a local one; the two scripts the actors import travel with the job."""
    import logging

    import ray

    if address and address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            raise DataError(f"--address {address}: no Ray cluster there ({error})") from None
    if ray.is_initialized():  # a caller's own Ray (a notebook, the tests)
        return
    here = Path(__file__).resolve().parent
    modules = [str(here / "intel_compressor_test.py"), str(here / "batch_inference.py")]
    try:
        ray.init(
            address=address or None,
            runtime_env={"py_modules": modules} if address else None,
            logging_level=logging.WARNING,
            **({} if address else {"include_dashboard": False}),
        )
    except ConnectionError as error:
        raise DataError(f"--address {address}: no Ray cluster ({str(error).splitlines()[0]})") from None


def run_job(args: argparse.Namespace) -> BatchResult:
    import ray

    model = Path(args.model)
    classifier = load_classifier(model)  # checks the directory before anything starts
    files_on_disk = model_files(model)
    filesystem, files = input_files(args.input)
    check_columns(filesystem, files, args)
    name = args.model_name or f"{model.resolve().parent.name}/{model.resolve().name}"
    prefix = f"{name}:{model_version(files_on_disk)}"
    id_column = args.id_column or ROW_ID
    redis = RedisOutput(args.redis_url, prefix, id_column, classifier.labels) if args.redis_url else None
    reference = read_drift_reference(model)
    drift = DriftWindow(reference) if reference else None

    started = time.perf_counter()
    connect(args.address)
    output = redis or ParquetOutput(Path(args.output or default_output(args.input[0])).resolve())
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows written in input order
    # Small blocks (Ray's default is 128 MiB): memory stays flat however large a file is, the first
    # rows come back soon, and the actors share the last blocks evenly.
    context.target_max_block_size = BLOCK_BYTES
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.threads_per_actor)
    # Reads take no CPU slot: parsing text is cheap beside a forward pass, and a read waiting for a
    # slot that the actors hold would wait forever when the actors fill the cluster.
    source = ray.data.read_datasource(numbered_datasource(files, filesystem, args), num_cpus=0)
    scored = source.map_batches(
        Scorer,
        fn_constructor_kwargs={"files": ray.put(files_on_disk), "threads": args.threads_per_actor,
                               "text_column": args.text_column, "delimiter": args.label_delimiter},
        batch_size=args.batch_size, batch_format="pyarrow", num_cpus=args.threads_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
        max_restarts=-1, max_task_retries=-1,  # a dead actor is restarted and its blocks scored again
    )  # fmt: skip
    nodes: Counter[str] = Counter()
    first_rows = None
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            first_rows = first_rows or time.perf_counter() - started
            nodes.update(table.column(NODE).to_pylist())
            table = table.drop_columns([NODE])
            if drift is not None:
                probs = np.column_stack([table.column(f"prob_{label}").to_numpy() for label in classifier.labels])
                drift.add(classifier.predicted_labels(probs), table.column("out_of_scope").to_pylist())
            output.write(table)
        where = output.close()
    except BaseException as error:  # noqa: BLE001 (Ctrl-C too: nothing is left aside)
        output.abort()
        raise unwrapped(error) from None
    seconds = time.perf_counter() - started
    rows = sum(nodes.values())
    print(f"scored {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s; first rows after "
          f"{first_rows or seconds:.1f} s) with {actors} actor(s) x {args.threads_per_actor} thread(s) on {len(nodes)} "
          f"node(s); wrote {where}", file=sys.stderr)  # fmt: skip
    if drift is not None:
        print(describe_drift(drift.summary()), file=sys.stderr)
    return BatchResult(rows, seconds, first_rows or seconds, where, dict(nodes), drift.summary() if drift else None)


def unwrapped(error: BaseException) -> BaseException:
    """A failure inside a Ray task as one line: the DataError it raised (an empty text), or the
    I/O error that stopped a read (a file that is not what its name says); others as they are."""
    chain = [error]  # Ray's wrappers hold the original exception in .cause, the deepest last
    while len(chain) < 20 and (inner := getattr(chain[-1], "cause", None) or chain[-1].__cause__) is not None:
        chain.append(inner)
    for cause in reversed(chain):
        if isinstance(cause, DataError):
            return cause
        if isinstance(cause, (OSError, pa.ArrowException)):
            return DataError(f"--input: reading failed ({str(cause).splitlines()[0]})")
    return error


def main(argv: list[str] | None = None) -> BatchResult:
    args = build_parser().parse_args(argv)
    check_args(args)
    return run_job(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
