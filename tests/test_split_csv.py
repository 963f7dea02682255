"""split_csv_script.py on the real data."""

import pandas as pd
import pytest

import split_csv_script
from tests.helpers import run_python, shared_file


@pytest.mark.unit
def test_multiclass_split_is_stratified_seeded_and_complete(tmp_path, capsys):
    source = shared_file("banking77/test.csv")
    train_path, test_path = split_csv_script.main([str(source), "--test_size", "0.25", "--output_dir", str(tmp_path)])
    original, train, test = pd.read_csv(source), pd.read_csv(train_path), pd.read_csv(test_path)
    assert (train_path.name, test_path.name) == ("test_train.csv", "test_test.csv")
    assert len(train) + len(test) == len(original)
    pd.testing.assert_frame_equal(
        pd.concat([train, test]).sort_values(["label", "text"]).reset_index(drop=True),
        original.sort_values(["label", "text"]).reset_index(drop=True),
    )
    share = test["label"].value_counts() / original["label"].value_counts()
    assert share.between(0.2, 0.3).all()  # every class keeps about a quarter on the test side
    printed = capsys.readouterr().out
    assert "card_arrival" in printed and f"test {test_path}: {len(test)} rows" in printed

    again = split_csv_script.main([str(source), "--test_size", "0.25", "--output_dir", str(tmp_path / "again")])
    assert pd.read_csv(again[1]).equals(test)
    other = split_csv_script.main(
        [str(source), "--test_size", "0.25", "--seed", "1", "--output_dir", str(tmp_path / "o")]
    )
    assert not pd.read_csv(other[1]).equals(test)


@pytest.mark.unit
def test_multilabel_split_keeps_every_test_label_in_train(tmp_path):
    source = shared_file("nlupp/banking.csv")
    train_path, test_path = split_csv_script.main(
        [str(source), "--label_column", "labels", "--test-size", "0.2", "--output_dir", str(tmp_path)]
    )
    train = pd.read_csv(train_path, keep_default_na=False)
    test = pd.read_csv(test_path, keep_default_na=False)
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25

    def labels(frame):
        return {label for cell in frame["labels"] for label in cell.split(";") if label}

    assert labels(test) <= labels(train)
    assert len(labels(test)) >= 40  # rare labels are spread, not all left in train


def test_too_few_examples_is_refused_in_one_line(tmp_path):
    source = tmp_path / "small.csv"
    source.write_text("text,label\na,x\nb,x\nc,y\n")
    result = run_python("split_csv_script.py", str(source))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {source}: 1 class(es) have a single row and cannot be split: 'y'"
    assert not (tmp_path / "small_train.csv").exists()


@pytest.mark.unit
def test_bad_test_size():
    with pytest.raises(split_csv_script.DataError, match="--test_size must be between 0 and 1"):
        split_csv_script.main([str(shared_file("banking77/test.csv")), "--test-size", "1.5"])


def test_split_script_and_notebook_tables_start_without_torch(tmp_path):
    """split_csv_script.py and notebooks/analysis.py need pandas-level code only: importing torch,
    transformers or scikit-learn would add seconds to every start (measured 3.0 s against 0.6 s)."""
    split = f"import split_csv_script; split_csv_script.main([{str(shared_file('banking77/test.csv'))!r}, "
    split += f"'--output_dir', {str(tmp_path)!r}])"
    heavy = "; import sys; print(sorted({'torch', 'transformers', 'sklearn'} & set(sys.modules)))"
    for code in (split, "import sys; sys.path.insert(0, 'notebooks'); import analysis"):
        result = run_python("-c", code + heavy)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "test_train.csv").is_file()
