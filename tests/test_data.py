"""Reading, label mapping, task detection, bad input, stratified sampling, batching."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs import Config
from data_functions import load_split, reduce, sort_labels, split_off, stratify_keys
from intel_compressor_test import DataError
from tests.helpers import shared_file
from utility_functions import PaddingCollator, TrainBatchSampler

pytestmark = pytest.mark.unit  # pure: no training, no subprocess

CONFIG = Config()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_label_map_is_sorted_numerically_for_integer_labels(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\na,10\nb,2\nc,1\nd,2\n")
    data, space = load_split(path, CONFIG)
    assert space.labels == ["1", "2", "10"]
    assert space.task == "multiclass"
    assert data.targets.tolist() == [2, 1, 0, 1]
    assert sort_labels({"b", "a", "C"}) == ["C", "a", "b"]


def test_task_detection_on_real_data():
    imdb = load_split(str(shared_file("imdb/test.csv.gz")), CONFIG)[1]
    assert (imdb.task, imdb.labels) == ("binary", ["negative", "positive"])
    banking = load_split(str(shared_file("banking77/test.csv")), CONFIG)[1]
    assert banking.task == "multiclass" and banking.num_labels == 77
    nlu_config = dataclasses.replace(CONFIG, label_column="labels")
    data, nlu = load_split(str(shared_file("nlupp/banking.csv")), nlu_config)
    assert nlu.task == "multilabel" and nlu.num_labels == 48
    raw = pd.read_csv(shared_file("nlupp/banking.csv"), keep_default_na=False)
    assert data.targets.sum(axis=1).tolist() == [
        len({x for x in cell.split(";") if x}) for cell in raw["labels"]
    ]  # duplicates collapse


def test_soft_label_columns_are_multilabel(tmp_path):
    path = write(tmp_path / "soft.csv", "text,pos,neg\ngood film,0.9,0.1\nbad film,0.2,0.7\n")
    data, space = load_split(path, dataclasses.replace(CONFIG, label_column="pos,neg"))
    assert space.task == "multilabel" and space.labels == ["pos", "neg"] and space.soft_columns
    np.testing.assert_allclose(data.targets, [[0.9, 0.1], [0.2, 0.7]])


def test_parquet_with_integer_labels(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 1]}).to_parquet(path)
    data, space = load_split(str(path), CONFIG)
    assert space.task == "binary" and space.labels == ["0", "1"] and data.targets.tolist() == [0, 1, 1]


BAD_INPUT = [
    ("missing.csv", None, r"missing\.csv: file not found"),
    ("empty.csv", "", r"empty\.csv: file is empty"),
    ("header.csv", "text,label\n", r"header\.csv: file has a header but no rows"),
    ("nocol.csv", "body,label\nx,a\ny,b\n", r"nocol\.csv: column 'text' not found \(columns: body, label\)"),
    ("nolabel.csv", "text,tag\nx,a\n", r"nolabel\.csv: column 'label' not found"),
    ("blank.csv", "text,label\nfine,a\n   ,b\n", r"blank\.csv, row 2: column 'text' is empty"),
    ("missing_label.csv", "text,label\nx,a\ny,b\nz,\n", r"missing_label\.csv, row 3: column 'label' has no label"),
    ("single.csv", "text,label\nx,a\ny,a\n", r"single\.csv: column 'label' has a single class 'a'"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_INPUT)
def test_bad_training_input_names_file_row_or_column(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_split(str(path), CONFIG)
    assert "\n" not in str(error.value)


def test_non_string_text_in_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["fine", None, "x"], "label": ["a", "b", "a"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"t\.parquet, row 2: column 'text' is empty"):
        load_split(str(path), CONFIG)
    pd.DataFrame({"text": [7, 8, 9], "label": ["a", "b", "a"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"t\.parquet, row 1: column 'text' holds int 7, not text"):
        load_split(str(path), CONFIG)


def test_unseen_label_in_validation(tmp_path):
    _, space = load_split(write(tmp_path / "train.csv", "text,label\nx,a\ny,b\n"), CONFIG)
    with pytest.raises(DataError, match=r"valid\.csv, row 2: label 'c' does not appear in the training data"):
        load_split(write(tmp_path / "valid.csv", "text,label\nx,a\ny,c\n"), CONFIG, space)


def test_soft_labels_outside_unit_interval(tmp_path):
    path = write(tmp_path / "soft.csv", "text,p,q\nx,0.5,0.5\ny,1.5,0\n")
    with pytest.raises(
        DataError, match=r"soft\.csv, row 2: column 'p' holds '1\.5'; soft labels must be numbers in 0\.\.1"
    ):
        load_split(path, dataclasses.replace(CONFIG, label_column="p,q"))


def test_validation_split_is_stratified_seeded_and_disjoint():
    data, space = load_split(str(shared_file("banking77/train.csv")), CONFIG)
    rest, held = split_off(data, space.task, 0.1, seed=7)
    assert len(rest) + len(held) == len(data)
    assert sorted(held.texts + rest.texts) == sorted(data.texts)
    counts = np.bincount(data.targets, minlength=77)
    held_counts = np.bincount(held.targets, minlength=77)
    assert np.all(np.abs(held_counts - 0.1 * counts) <= 1)  # every class keeps its share
    again = split_off(data, space.task, 0.1, seed=7)[1]
    assert again.texts == held.texts
    assert split_off(data, space.task, 0.1, seed=8)[1].texts != held.texts


def test_multilabel_stratification_spreads_rare_labels():
    config = dataclasses.replace(CONFIG, label_column="labels")
    data, space = load_split(str(shared_file("nlupp/banking.csv")), config)
    rest, held = split_off(data, space.task, 0.2, seed=0)
    totals = (data.targets >= 0.5).sum(axis=0)
    for j in np.flatnonzero(totals >= 5):  # labels with 5+ rows appear on both sides
        assert held.targets[:, j].sum() >= 1 and rest.targets[:, j].sum() >= 1, space.labels[j]
    keys = stratify_keys(data.targets, "multilabel")
    assert set(keys) - {"<none>"} <= {str(j) for j in range(space.num_labels)}


def test_reduce_ratio_keeps_every_class():
    data, space = load_split(str(shared_file("banking77/train.csv")), CONFIG)
    small = reduce(data, space.task, 0.05, seed=1)
    assert abs(len(small) - 0.05 * len(data)) < 77
    assert set(small.targets.tolist()) == set(range(77))


def test_collator_pads_each_batch_to_its_longest_member():
    collate = PaddingCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [5], "labels": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert PaddingCollator(0, pad_to=6)([{"input_ids": [5], "labels": 0}])["input_ids"].shape == (1, 6)


def test_length_grouped_batches_cover_all_rows_reproducibly_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000).tolist()
    grouped = TrainBatchSampler(lengths, 32, seed=3, group_by_length=True)
    plain = TrainBatchSampler(lengths, 32, seed=3, group_by_length=False)
    for sampler in (grouped, plain):
        rows = [i for batch in sampler for i in batch]
        assert sorted(rows) == list(range(1000)) and len(list(sampler)) == len(sampler)

    def padded_tokens(sampler):
        return sum(len(b) * max(lengths[i] for i in b) for b in sampler)

    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first
    grouped.set_epoch(0)
    assert list(grouped) == first
