# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

# Nothing is downloaded from a model hub: the default model and data ship in pip packages.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train quantize bench-quantization notebooks test test-unit test-slow lint clean

$(VENV)/.installed: requirements.txt requirements-serve.txt requirements-nodeps.txt requirements-scale.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt -r requirements-scale.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

train: install  ## fine-tune the default (MiniLM on BANKING77); pass options with ARGS="--epochs 3"
	$(BIN)/python manual_classification.py $(ARGS)

# The newest best_model under outputs/ (the last `make train`), or MODEL=path/to/best_model.
MODEL ?= $(shell ls -td outputs/*/best_model 2>/dev/null | head -1)

quantize: install  ## int8 of the last trained model with INC; prints fp32 and int8 side by side
	@test -n "$(MODEL)" || { echo "error: no outputs/*/best_model: run make train first, or pass MODEL=..."; exit 2; }
	$(BIN)/python intel_compressor.py --model $(MODEL) $(ARGS)

bench-quantization: install  ## fp32, ONNX Runtime's own int8 and INC's on the test split of MODEL
	$(BIN)/python benchmarks/quantization.py --model $(MODEL) $(ARGS)

notebooks: install  ## open the analysis notebooks in JupyterLab (they read the runs under outputs/)
	$(BIN)/jupyter lab notebooks/

test: install  ## the default test suite (under 10 minutes on 2 cores)
	$(BIN)/python -m pytest

test-unit: install  ## the pure tests alone (under 30 s: no training, no subprocess)
	$(BIN)/python -m pytest -m unit

test-slow: install  ## long tests (real MiniLM fine-tuning)
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
