"""The torch-free shared pieces: atomic writes, reading and checking labelled tables, label spaces
and task detection, stratified sampling, and loading a run's splits.

Both training scripts use them through utility_functions.py; split_csv_script.py, intel_compressor.py's
data loading and notebooks/analysis.py import them alone, so they start without torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import Config
from intel_compressor_test import DataError

# ---------------------------------------------------------------------------------------
# Atomic writes (DataError and run_cli, the one error path of every script, come from
# intel_compressor_test.py, which must run alone at the edge)
# ---------------------------------------------------------------------------------------


def _default_mode(directory: bool) -> int:
    """Permissions a plain open()/mkdir() would give; mkstemp and mkdtemp use owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def replace_directory(staging: Path, target: Path) -> None:
    """Move a fully written `staging` directory to `target`, replacing what was there.

    Two renames: the old directory moves aside, the new one moves in, then the old one is
    deleted. A crash between the renames leaves the previous version at `.<name>.old`.
    """
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` to write into. When the block ends it replaces `target`
    (replace_directory); when the block fails it is deleted and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
        os.chmod(staging, _default_mode(directory=True))
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------
# Reading and checking data
# ---------------------------------------------------------------------------------------


def read_table(path: str | Path) -> pd.DataFrame:
    """Read .csv, .tsv (optionally .gz) or .parquet. CSV cells stay strings: 'NA' is text, not missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        else:
            sep = "\t" if name.endswith((".tsv", ".tsv.gz")) else ","
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot be read ({first_line})") from None
    if frame.empty:
        raise DataError(f"{path}: file has a header but no rows")
    return frame


def require_columns(frame: pd.DataFrame, path: str | Path, columns: list[str]) -> None:
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{path}: column {column!r} not found (columns: {', '.join(map(str, frame.columns))})")


def checked_texts(frame: pd.DataFrame, path: str | Path, column: str) -> list[str]:
    """The text column as a list of strings; empty, blank or non-string cells are errors."""
    texts = frame[column].tolist()
    for row, text in enumerate(texts, start=1):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise DataError(f"{path}, row {row}: column {column!r} is empty")
        if not isinstance(text, str):
            raise DataError(f"{path}, row {row}: column {column!r} holds {type(text).__name__} {text!r}, not text")
        if not text.strip():
            raise DataError(f"{path}, row {row}: column {column!r} is empty")
    return texts


def label_columns(config: Config) -> list[str]:
    """Several comma-separated label columns mean multi-label soft targets, one column per label."""
    return [c.strip() for c in config.label_column.split(",") if c.strip()]


# ---------------------------------------------------------------------------------------
# Label spaces and task detection
# ---------------------------------------------------------------------------------------


@dataclass
class LabelSpace:
    """The task and its sorted labels, built from the training data and saved with the model."""

    task: str
    labels: list[str]
    soft_columns: bool = False  # multi-label targets read from one numeric column per label

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


@dataclass
class LabeledData:
    """Texts with their targets: class ids (binary, multiclass) or a float matrix (multilabel)."""

    source: str
    texts: list[str]
    targets: np.ndarray

    def subset(self, indices: np.ndarray) -> LabeledData:
        return LabeledData(self.source, [self.texts[i] for i in indices], self.targets[indices])

    def __len__(self) -> int:
        return len(self.texts)


def sort_labels(labels: set[str]) -> list[str]:
    """Sort numerically when every label is an integer ('2' before '10'), else alphabetically."""
    if all(_is_int(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _label_cells(frame: pd.DataFrame, path: str | Path, column: str) -> list[str]:
    """Label cells as stripped strings (parquet integers become '3'); NaN and None become ''."""
    cells = []
    for value in frame[column].tolist():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append("")
        elif isinstance(value, float) and value.is_integer():
            cells.append(str(int(value)))
        else:
            cells.append(str(value).strip())
    return cells


def _split_cell(cell: str, delimiter: str) -> list[str]:
    return [part.strip() for part in cell.split(delimiter) if part.strip()]


def detect_label_space(frame: pd.DataFrame, path: str | Path, config: Config) -> LabelSpace:
    """Work out the task (unless given) and the sorted label list from the training data."""
    columns = label_columns(config)
    require_columns(frame, path, columns)
    if len(columns) > 1:
        if config.task not in ("auto", "multilabel"):
            raise DataError(f"{path}: several label columns ({', '.join(columns)}) need --task multilabel")
        return LabelSpace("multilabel", columns, soft_columns=True)

    column = columns[0]
    cells = _label_cells(frame, path, column)
    is_list = any(config.label_delimiter in cell for cell in cells)
    task = config.task
    if task == "auto":
        task = "multilabel" if is_list else None
    if task == "multilabel":
        labels = {label for cell in cells for label in _split_cell(cell, config.label_delimiter)}
    else:
        for row, cell in enumerate(cells, start=1):
            if not cell:
                raise DataError(f"{path}, row {row}: column {column!r} has no label")
        labels = set(cells)
    if len(labels) < 2:
        only = next(iter(labels), "")
        raise DataError(f"{path}: column {column!r} has a single class {only!r}; training needs at least two")
    if task is None:
        task = "binary" if len(labels) == 2 else "multiclass"
    if task == "binary" and len(labels) != 2:
        raise DataError(f"{path}: --task binary needs two labels in column {column!r}, found {len(labels)}")
    return LabelSpace(task, sort_labels(labels))


def encode_targets(frame: pd.DataFrame, path: str | Path, config: Config, space: LabelSpace) -> np.ndarray:
    """Targets for one split, checked against the training label space."""
    columns = label_columns(config)
    require_columns(frame, path, columns)
    if space.soft_columns:
        return _soft_targets(frame, path, columns)
    column = columns[0]
    cells = _label_cells(frame, path, column)
    index = space.label2id
    if space.task == "multilabel":
        targets = np.zeros((len(cells), space.num_labels), dtype=np.float32)
        for row, cell in enumerate(cells, start=1):
            for label in _split_cell(cell, config.label_delimiter):
                targets[row - 1, _label_id(index, label, path, row)] = 1.0
        return targets
    ids = np.empty(len(cells), dtype=np.int64)
    for row, cell in enumerate(cells, start=1):
        if not cell:
            raise DataError(f"{path}, row {row}: column {column!r} has no label")
        ids[row - 1] = _label_id(index, cell, path, row)
    return ids


def _label_id(index: dict[str, int], label: str, path: str | Path, row: int) -> int:
    if label not in index:
        raise DataError(f"{path}, row {row}: label {label!r} does not appear in the training data")
    return index[label]


def _soft_targets(frame: pd.DataFrame, path: str | Path, columns: list[str]) -> np.ndarray:
    targets = np.zeros((len(frame), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~((values >= 0) & (values <= 1)))  # NaN fails both comparisons
        if bad.size:
            row = int(bad[0])
            raw = frame[column].iloc[row]
            raise DataError(
                f"{path}, row {row + 1}: column {column!r} holds {raw!r}; soft labels must be numbers in 0..1"
            )
        targets[:, j] = values
    return targets


def load_split(path: str, config: Config, space: LabelSpace | None = None) -> tuple[LabeledData, LabelSpace]:
    """Read one split; the training split (space=None) defines the label space."""
    frame = read_table(path)
    if space is None:
        space = detect_label_space(frame, path, config)
    require_columns(frame, path, [config.text_column])
    texts = checked_texts(frame, path, config.text_column)
    targets = encode_targets(frame, path, config, space)
    return LabeledData(str(path), texts, targets), space


def load_transfer_texts(config: Config) -> LabeledData:
    """The texts of --transfer_file, not yet labelled: their targets are zeros until the teacher's
    predictions replace them (distillation.with_transfer_set)."""
    frame = read_table(config.transfer_file)
    require_columns(frame, config.transfer_file, [config.text_column])
    texts = checked_texts(frame, config.transfer_file, config.text_column)
    return LabeledData(config.transfer_file, texts, np.zeros(len(texts), dtype=np.int64))


def hard_label_sets(targets: np.ndarray, space: LabelSpace) -> list[list[str]]:
    """Labels of each row as lists (multilabel rows: labels with target >= 0.5)."""
    if space.task == "multilabel":
        return [[space.labels[j] for j in np.flatnonzero(row >= 0.5)] for row in targets]
    return [[space.labels[int(i)]] for i in targets]


# ---------------------------------------------------------------------------------------
# Stratified sampling (validation split, reduce_ratio, split_csv_script)
# ---------------------------------------------------------------------------------------


def stratify_keys(targets: np.ndarray, task: str) -> np.ndarray:
    """One group key per row. Multi-label rows are keyed by their rarest label (or none), so
    rare labels are spread over both sides of a split instead of landing on one."""
    if task != "multilabel":
        return targets.astype(str)
    hard = targets >= 0.5
    frequency = hard.sum(axis=0)
    keys = []
    for row in hard:
        present = np.flatnonzero(row)
        keys.append(str(present[np.argmin(frequency[present])]) if present.size else "<none>")
    return np.array(keys)


def take_per_group(keys: np.ndarray, count: Callable[[int], int], seed: int) -> np.ndarray:
    """Sorted indices of `count(n)` random rows from each group of n rows sharing a key."""
    rng = np.random.default_rng(seed)
    taken = []
    for key in sorted(set(keys.tolist())):
        members = np.flatnonzero(keys == key)
        taken.extend(rng.choice(members, size=count(len(members)), replace=False).tolist())
    return np.array(sorted(taken), dtype=np.int64)


def held_out_count(fraction: float) -> Callable[[int], int]:
    """How many of a group of n go to the held-out side: about `fraction`, at least one, and
    never all of them (a group of one stays on the training side)."""
    return lambda n: 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))


def kept_count(fraction: float) -> Callable[[int], int]:
    """reduce_ratio: keep about `fraction` of each group and at least one row of it."""
    return lambda n: max(1, round(fraction * n))


def split_off(data: LabeledData, task: str, fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
    """Stratified, seeded split into (rest, held_out)."""
    held = take_per_group(stratify_keys(data.targets, task), held_out_count(fraction), seed)
    rest = np.setdiff1d(np.arange(len(data)), held)
    return data.subset(rest), data.subset(held)


def reduce(data: LabeledData, task: str, ratio: float, seed: int) -> LabeledData:
    if ratio >= 1:
        return data
    return data.subset(take_per_group(stratify_keys(data.targets, task), kept_count(ratio), seed))


# ---------------------------------------------------------------------------------------
# A run's splits
# ---------------------------------------------------------------------------------------


def load_data(config: Config) -> tuple[LabelSpace, LabeledData, LabeledData, LabeledData | None]:
    """All splits, checked, before anything is written: bad input stops the run here."""
    train, space = load_split(config.train_file, config)
    if config.validation_file:
        valid, _ = load_split(config.validation_file, config, space)
    else:
        train, valid = split_off(train, space.task, config.valid_size, config.seed)
    test = load_split(config.test_file, config, space)[0] if config.test_file else None
    train = reduce(train, space.task, config.reduce_ratio, config.seed)
    valid = reduce(valid, space.task, config.reduce_ratio, config.seed)
    if test is not None:
        test = reduce(test, space.task, config.reduce_ratio, config.seed)
    if space.task == "binary" and not 0 < int(train.targets.sum()) < len(train):
        raise DataError(f"{config.train_file}: binary training data needs both labels after reduce_ratio")
    return space, train, valid, test
