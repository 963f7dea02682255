"""requirements-edge.txt alone runs the int8 model: a fresh virtual environment with only those
packages (no torch, no transformers) classifies texts with intel_compressor_test.py; with
requirements-serve.txt on top, it serves the model with serve.py."""

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from benchmarks.serving import Server
from intel_compressor_test import load_classifier
from tests.helpers import REPO, answered_probabilities


@pytest.mark.slow
def test_a_venv_from_requirements_edge_alone_runs_the_int8_model(banking_runs, tmp_path):
    venv = tmp_path / "edge"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(REPO / "requirements-edge.txt")]
    subprocess.run(install, check=True, capture_output=True)
    installed = json.loads(
        subprocess.run(
            [python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
        ).stdout
    )
    assert {p["name"].lower() for p in installed} - {"pip", "setuptools"} == {
        "numpy",
        "onnxruntime",
        "tokenizers",
        "tqdm",
    }
    texts = ["I still have not received my new card", "How do I activate my card?"]
    command = [python, str(REPO / "intel_compressor_test.py"), f"--model={banking_runs['int8']}", *texts]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, check=True
    )  # not the repository: nothing else importable
    labels = json.loads((banking_runs["int8"] / "edge_config.json").read_text())["labels"]
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == texts
    assert all(line.split("\t")[0].rsplit(" ", 1)[0] in labels for line in lines)


@pytest.mark.slow
def test_a_venv_from_the_edge_and_serve_requirements_serves_the_int8_model(banking_runs, tmp_path):
    venv = tmp_path / "serve"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for requirements in ("requirements-edge.txt", "requirements-serve.txt"):
        install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(REPO / requirements)]
        subprocess.run(install, check=True, capture_output=True)
    listing = [python, "-m", "pip", "list", "--format=json"]
    installed = json.loads(subprocess.run(listing, check=True, capture_output=True, text=True).stdout)
    assert not {"torch", "transformers", "pandas"} & {p["name"].lower() for p in installed}
    server = Server(banking_runs["int8"], python=python)
    try:
        texts = ["I still have not received my new card", "How do I activate my card?"]
        answer = httpx.post(f"{server.url}/predict", json={"texts": texts, "top_k": 5}).json()["predictions"]
    finally:
        assert server.stop()[0] == 0
    edge = load_classifier(banking_runs["int8"])
    np.testing.assert_allclose(answered_probabilities(answer, edge.labels), edge.probabilities(texts), atol=1e-5)
