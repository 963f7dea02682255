"""The analysis notebooks, executed headless against short real runs (the tiny model on BANKING77
and NLU++ slices, trained by both scripts and quantized), and the helpers they use, checked against
what the training scripts themselves wrote."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from notebooks import analysis
from tests.helpers import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; a cell that hangs fails the test instead of the CI job


# Run in the kernel before the notebook: count every matplotlib Figure created, whichever way.
COUNT_FIGURES = """
import matplotlib.figure
_figures_made = []
_figure_init = matplotlib.figure.Figure.__init__
def _counted_init(self, *args, **kwargs):
    _figure_init(self, *args, **kwargs)
    _figures_made.append(1)
matplotlib.figure.Figure.__init__ = _counted_init
"""
FIGURES_MADE = "print(len(_figures_made)); _figures_made.clear()"


def execute(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel, from its own folder as Jupyter does; any cell
    error raises CellExecutionError with the traceback. Each code cell's metadata gets
    `figures_made`: the matplotlib figures it created (counted by cells run around it, then removed)."""
    for key in ("NOTEBOOK_ARGS", "NOTEBOOK_OUTPUTS", "NOTEBOOK_RUNS", "NOTEBOOK_RUN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    cells = [nbformat.v4.new_code_cell(COUNT_FIGURES)]
    for cell in notebook.cells:
        cells += [cell, nbformat.v4.new_code_cell(FIGURES_MADE)] if cell.cell_type == "code" else [cell]
    notebook.cells = cells
    NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    kept = []
    for cell in notebook.cells[1:]:
        if cell.cell_type == "code" and cell.source == FIGURES_MADE:
            kept[-1].metadata["figures_made"] = int(cell.outputs[0].text)
        else:
            kept.append(cell)
    notebook.cells = kept
    return notebook


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def assert_every_figure_drawn(notebook: nbformat.NotebookNode) -> None:
    """Every figure a cell creates is shown among its outputs as a PNG, and nothing went to stderr."""
    drawing = 0
    for cell in code_cells(notebook):
        images = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.data]
        made = cell.metadata["figures_made"]
        assert len(images) >= made, f"{made} figures made, {len(images)} shown by:\n{cell.source[:200]}"
        drawing += made > 0
        stderr = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, stderr
    assert drawing, "no cell drew a figure"


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.text for cell in code_cells(notebook) for o in cell.outputs if o.output_type == "stream")


def results(notebook: nbformat.NotebookNode) -> list[str]:
    """The text form of each code cell's final value (tables), in order."""
    return [
        o.data["text/plain"] for cell in code_cells(notebook) for o in cell.outputs if o.output_type == "execute_result"
    ]


@pytest.mark.unit
def test_committed_notebooks_carry_no_outputs():
    assert [p.name for p in NOTEBOOKS] == ["1_data.ipynb", "2_training.ipynb", "3_quantization.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in code_cells(notebook):
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip the outputs (Kernel > Restart and Clear Outputs)"
            )
        assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith(f"# {path.name[0]}. ")


def test_data_notebook_on_the_embedded_default(monkeypatch):
    notebook = execute("1_data.ipynb", monkeypatch)
    assert_every_figure_drawn(notebook)
    assert "multiclass, 77 labels" in printed(notebook)
    assert "train 9,003 texts, validation 1,000 texts, test 3,080 texts" in printed(notebook)
    lengths, examples = results(notebook)
    assert "truncated share" in lengths and "Refund_not_showing_up" in examples


def test_data_notebook_on_a_multilabel_csv(nlupp_run, monkeypatch):
    args = " ".join([f"--model_name_or_path={nlupp_run['best']}", *nlupp_run["data_args"], "--max_length=16"])
    notebook = execute("1_data.ipynb", monkeypatch, NOTEBOOK_ARGS=args)
    assert_every_figure_drawn(notebook)
    assert "multilabel" in printed(notebook) and "labels per training text" in printed(notebook)
    train_row = results(notebook)[0].splitlines()[1].split()  # train, median, p95, max, truncated share, windows
    assert train_row[0] == "train" and 0 < float(train_row[-2]) < 1  # max_length 16 cuts some NLU++ texts
    assert float(train_row[-1]) > 1  # ... which windows would read in more than one input


def test_training_notebook_compares_the_two_scripts(banking_runs, monkeypatch):
    notebook = execute("2_training.ipynb", monkeypatch, NOTEBOOK_OUTPUTS=str(banking_runs["directory"] / "outputs"))
    assert_every_figure_drawn(notebook)
    runs = results(notebook)[0]
    assert "manual_classification.py" in runs and "trainer_classification.py" in runs
    worst = results(notebook)[-1]
    assert "confidence" in worst and "probability_of_true_label" in worst
    run_dir = banking_runs["directory"] / "outputs" / "trainer"
    metrics = json.loads((run_dir / "test_metrics.json").read_text())  # the notebook's first run: the newest, trainer
    assert f"test ECE after: {metrics['ece']:.4f}" in printed(notebook)
    assert f"test ECE before temperature: {metrics['ece_before_temperature']:.4f}" in printed(notebook)
    assert f"flagged out of scope: {metrics['out_of_scope_share']:.1%}" in printed(notebook)


def test_training_notebook_on_a_multilabel_run(nlupp_run, monkeypatch):
    notebook = execute(
        "2_training.ipynb",
        monkeypatch,
        NOTEBOOK_OUTPUTS=str(nlupp_run["directory"] / "outputs"),
        NOTEBOOK_RUNS="manual",
    )
    assert_every_figure_drawn(notebook)
    worst = results(notebook)[-1]
    assert "error" in worst and "confidence" in worst
    assert "flagged out of scope" in printed(notebook)


def test_quantization_notebook(banking_runs, monkeypatch):
    notebook = execute("3_quantization.ipynb", monkeypatch, NOTEBOOK_OUTPUTS=str(banking_runs["directory"] / "outputs"))
    assert_every_figure_drawn(notebook)
    out = printed(notebook)
    assert (
        "kept INC onnx static" in out
        and "vector extensions" in out
        and f"agreement {banking_runs['report']['agreement']:.4f}" in out
    )
    assert "fp32: test exact-match accuracy" in out and "int8: test exact-match accuracy" in out
    assert "this run has no teacher" in out


def test_quantization_notebook_shows_a_student_beside_its_teacher(distilled_run, banking_runs, monkeypatch):
    notebook = execute(
        "3_quantization.ipynb", monkeypatch, NOTEBOOK_OUTPUTS=str(distilled_run["directory"] / "outputs")
    )
    assert_every_figure_drawn(notebook)
    table = analysis.teacher_and_student(distilled_run["result"].run_dir)
    assert table.index.tolist() == ["teacher", "student"] and table["layers"].tolist() == [2, 1]
    assert table.loc["teacher", "agreement with teacher"] == 1.0
    assert table.loc["student", "test accuracy"] == distilled_run["result"].test["accuracy"]
    int8 = json.loads((distilled_run["int8"] / "quantization_report.json").read_text())["int8"]
    assert table.loc["student", "int8 MiB"] == int8["size_mb"]
    assert "agreement with teacher" in printed(notebook) and "this run has no teacher" not in printed(notebook)


# ---------------------------------------------------------------------------------------
# The helpers, against what the training scripts wrote
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["manual", "trainer"])
def test_tensorboard_curves_hold_the_validation_history(banking_runs, run):
    run_dir = banking_runs["directory"] / "outputs" / run
    scalars = analysis.read_scalars(analysis.log_dir(run_dir))
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    f1 = scalars[scalars["tag"] == "eval/macro_f1"]
    assert f1["step"].tolist() == [h["step"] for h in history]
    np.testing.assert_allclose(f1["value"], [h["macro_f1"] for h in history], rtol=1e-6)  # TensorBoard stores float32
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(scalars["tag"])


def test_report_table_puts_fp32_the_peers_and_every_candidate_side_by_side(banking_runs):
    report = banking_runs["report"]
    table = analysis.report_table(report)
    assert table.index.tolist() == [
        "torch fp32 eager",
        "onnxruntime fp32",
        "onnxruntime quantize_dynamic int8",
        "INC onnx static",
    ]
    assert table.index.name == "kept: INC onnx static"
    assert table.loc["INC onnx static", "agreement"] == report["agreement"]
    assert (
        table.loc["onnxruntime quantize_dynamic int8", "size_mb"]
        == report["peers"]["onnxruntime quantize_dynamic int8"]["size_mb"]
    )


def test_scores_and_confusion_match_the_test_metrics(banking_runs):
    run_dir = banking_runs["directory"] / "outputs" / "manual"
    predictions = analysis.read_predictions(run_dir)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    scores = analysis.per_label_scores(predictions, ";")
    assert scores["f1"].mean() == pytest.approx(metrics["macro_f1"], abs=1e-9)
    assert scores["support"].sum() == len(predictions) and scores["f1"].is_monotonic_increasing
    matrix = analysis.confusion(predictions)
    assert np.trace(matrix.to_numpy()) / len(predictions) == pytest.approx(metrics["accuracy"])
    assert list(matrix.index) == list(matrix.columns) == sorted(predictions["label"].unique())


def test_worst_errors_are_wrong_and_most_confident_first(banking_runs, nlupp_run):
    predictions = analysis.read_predictions(banking_runs["directory"] / "outputs" / "manual")
    worst = analysis.worst_errors(predictions, multilabel=False, delimiter=";", rows=5)
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    assert len(worst) == min(5, len(wrong)) and (worst["label"] != worst["predicted"]).all()
    top = wrong[analysis.probability_columns(wrong)].max(axis=1).sort_values(ascending=False)
    np.testing.assert_allclose(worst["confidence"], top.head(len(worst)))  # confidence: the winning probability
    multilabel = analysis.read_predictions(nlupp_run["directory"] / "outputs" / "manual")
    errors = analysis.worst_errors(multilabel, multilabel=True, delimiter=";", rows=20)
    assert errors["confidence"].is_monotonic_decreasing and len(errors) == 20
    for _, row in errors.iterrows():
        truth = row["label"] in multilabel.loc[multilabel["text"] == row["text"], "label"].iloc[0].split(";")
        assert (row["error"] == "missed") == truth
        assert row["confidence"] == pytest.approx(1 - row["probability"] if truth else row["probability"])


def test_default_runs_are_the_newest_of_each_script(banking_runs, monkeypatch):
    monkeypatch.delenv("NOTEBOOK_RUNS", raising=False)
    monkeypatch.delenv("NOTEBOOK_RUN", raising=False)
    outputs = banking_runs["directory"] / "outputs"
    assert sorted(run.name for run in analysis.runs_to_compare(outputs)) == ["manual", "trainer"]
    assert analysis.quantized_run(outputs).name == "manual"
    with pytest.raises(FileNotFoundError, match="run `make train` first"):
        analysis.finished_runs(Path(banking_runs["directory"]) / "nowhere")
