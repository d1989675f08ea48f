"""PEFT's OWN generic tuner tests, run against HydraLoraConfig.

The ``peft`` sdist of the installed version ships its test suite. It is fetched once with
``pip download --no-deps --no-binary :all: peft==<version>`` into ``~/.cache/peft-hydra/`` (``$PEFT_HYDRA_CACHE``
overrides it; ``make setup`` fetches it, a test run reuses it; with ``CI=true`` a missing sdist fails the test), extracted, given a ``tests/__init__.py`` and put on ``sys.path``. We import the
module and call the methods of its ``TestPeftCustomModel`` class ourselves: importing its ``Test*`` classes here would
make pytest collect all ~18k PEFT tests.

Cases (built like PEFT's own LoRA/LoHa cases on its MockTransformerWrapper models; as there, the case keeps the
default identity init and the PEFT methods that need a non-identity adapter switch to ``init_weights=False``
themselves through PEFT's ``set_init_weights_false``):
N=1 (exactly LoRA), N=3 with a learned router (+ ``modules_to_save``), N=2 with fixed uniform gates (mergeable), N=4
LoRA-split with top-2 routing on ``A x``, and GPT-2 style ``Conv1D`` (``EmbConv1D``). Every method of
``TestPeftCustomModel`` that takes ``(test_name, model_id, config_cls, config_kwargs)`` is run on every case
(``test_adapter_dtype_autocast`` on a subset of its dtype grid). PEFT's own tests for prepare-for-training and
gradient-checkpointed training need a transformers model, so they run on the tiny Llama of conftest through
``PeftCommonTester`` (see ``DecoderTester``).

Skipped, with the reason in the message: ``test_only_params_are_updated`` for the router on lin1 of the N=3 case
(PEFT's training run diverges and saturates that softmax router); exact merging with a learned router (N>1 routes every token through its
own mix of heads: no single weight equals it). PEFT's ``test_forward_{float16,bfloat16}[_no_autocast]`` run a
forward pass and then merge: with a learned router they run up to the merge, which must raise our explanatory
ValueError.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft
import pytest
import torch

from peft_hydra import PREFIX, HydraLoraConfig

CACHE = Path(os.environ.get("PEFT_HYDRA_CACHE", Path.home() / ".cache" / "peft-hydra"))

CASES = [
    ("HydraLoRA N=1 MLP", "MLP", {"target_modules": ["lin0"], "num_experts": 1}),
    ("HydraLoRA N=3 MLP", "MLP", {"target_modules": ["lin0", "lin1"], "num_experts": 3}),
    ("HydraLoRA N=3 MLP modules_to_save", "MLP",
     {"target_modules": ["lin0"], "num_experts": 3, "modules_to_save": ["lin1"]}),
    ("HydraLoRA N=2 fixed gates MLP", "MLP", {"target_modules": ["lin0", "lin1"], "num_experts": 2,
                                              "fixed_gates": "uniform"}),
    ("HydraLoRA N=4 split top2 router_a MLP", "MLP",
     {"target_modules": ["lin0"], "num_experts": 4, "share_a": False, "top_k": 2, "router_input": "a"}),
    ("HydraLoRA N=2 Conv1D", "EmbConv1D", {"target_modules": ["conv1d"], "num_experts": 2}),
]  # fmt: skip

MERGE_TESTS = {
    "test_merge_layers", "test_merge_layers_fp16", "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode", "test_safe_merge", "test_disable_adapters_with_merging",
    "test_delete_merged_adapter_raises_without_mutation", "test_delete_merged_adapter_only_rejects_the_merged_one",
}  # fmt: skip

# every TestPeftCustomModel method parametrised over PEFT's TEST_CASES, in any supported peft (42 in peft 0.21.2, 37 in
# 0.18.1); a method that the installed peft does not have is skipped (test_methods_list_is_complete: none is missed)
METHODS = [
    "test_active_adapter", "test_adapter_name", "test_adding_multiple_adapters_with_bias_raises",
    "test_attributes_parametrized", "test_delete_adapter", "test_delete_adapter_properly_cleans_up_after_itself",
    "test_delete_inactive_adapter", "test_delete_merged_adapter_only_rejects_the_merged_one",
    "test_delete_merged_adapter_raises_without_mutation", "test_delete_unknown_adapter_raises",
    "test_disable_adapter_is_reentrant", "test_disable_adapter_with_bias_warns", "test_disable_adapters",
    "test_disable_adapters_exiting_context_irregular_state",
    "test_disable_adapters_exiting_context_restores_previous_state", "test_disable_adapters_with_merging",
    "test_forward_bfloat16", "test_forward_bfloat16_no_autocast", "test_forward_float16",
    "test_forward_float16_no_autocast", "test_forward_output_finite", "test_from_pretrained_config_construction",
    "test_get_base_model_state_dict", "test_in_features_out_features_exposed", "test_inference_safetensors",
    "test_load_model_low_cpu_mem_usage", "test_load_multiple_adapters", "test_merge_layers",
    "test_merge_layers_fp16", "test_merge_layers_is_deterministic_in_train_mode", "test_merge_layers_is_idempotent",
    "test_only_params_are_updated", "test_parameters_after_loading_model", "test_peft_model_device_map",
    "test_safe_merge", "test_save_load_roundtrip", "test_save_load_roundtrip_direct_injection",
    "test_save_pretrained", "test_save_pretrained_adapter_name_substring", "test_save_pretrained_pickle",
    "test_training_custom_models",
    # only in older peft (0.18.1): later moved out of the generic custom-model tests
    "test_generate", "test_generate_half_prec", "test_prepare_for_training_parametrized",
    "test_training_custom_models_gradient_checkpointing", "test_training_custom_models_layer_indexing",
]  # fmt: skip

DTYPE_GRID = [  # (dtype, autocast_adapter_dtype, low_cpu_mem_usage): a subset of PEFT's 12
    (torch.bfloat16, True, False), (torch.bfloat16, False, False), (torch.float16, True, True),
    (torch.float32, True, False),
]  # fmt: skip


def fetch_peft_tests() -> Path:
    """Download (once) and extract the sdist of the installed peft; return the folder holding ``tests/``."""
    version = peft.__version__
    root = CACHE / f"peft-{version}"
    if not (root / "tests" / "test_custom_models.py").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        sdist = CACHE / f"peft-{version}.tar.gz"
        if not sdist.exists():
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   f"peft=={version}", "-d", str(CACHE)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0 or not sdist.exists():
                message = f"cannot download the peft {version} sdist (needs PyPI): {proc.stderr.strip()[-500:]}"
                if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                    pytest.fail(f"{message}; `make setup` fetches it into {CACHE}")  # CI must run PEFT's tests
                pytest.skip(message)
        # extract next to the cache and rename, so that a concurrent run never sees a half-extracted folder
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        try:
            (tmp / f"peft-{version}").rename(root)
        except OSError:  # another process was faster
            shutil.rmtree(tmp / f"peft-{version}", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    (root / "tests" / "__init__.py").touch()
    return root


@pytest.fixture(scope="module")
def peft_tests():
    """PEFT's ``tests.test_custom_models`` module (imported as the ``tests`` package of the sdist)."""
    root = fetch_peft_tests()
    # our own tests/ folder has no __init__.py, so the name ``tests`` is free; make sure it is the sdist's
    loaded = sys.modules.get("tests")
    if loaded is not None and Path(loaded.__file__ or "").parent != root / "tests":
        pytest.skip(f"a different `tests` package is already imported: {loaded.__file__}")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("tests.test_custom_models")
    finally:
        sys.path.remove(str(root))
    if isinstance(getattr(module, "PREFIXES", None), dict):  # peft < 0.21 looks the parameter prefix up by config class
        module.PREFIXES.setdefault(HydraLoraConfig, PREFIX)
    return module


def peft_method(tester, method: str):
    """The bound PEFT test method, or a skip when the installed peft does not have it."""
    fn = getattr(tester, method, None)
    if fn is None:
        pytest.skip(f"{method} is not a test of the installed peft {peft.__version__}")
    return fn


@pytest.fixture(scope="module")
def tester(peft_tests):
    return peft_tests.TestPeftCustomModel()


def has_router(kwargs: dict) -> bool:
    return kwargs["num_experts"] > 1 and kwargs.get("fixed_gates") is None


def skip_reason(method: str, test_name: str, kwargs: dict) -> str | None:
    if method == "test_only_params_are_updated" and test_name == "HydraLoRA N=3 MLP":
        return ("PEFT's check trains 3 SGD steps at lr=0.5 on inputs up to 89 and diverges (gradients ~1e20); the "
                "router of lin1 then sees activations ~1e6, its softmax saturates to one-hot and its update is ~1e-6 "
                "< PEFT's 1e-4 tolerance (any softmax router would); routers on lin0 pass the check in the other cases")
    if method in MERGE_TESTS and has_router(kwargs):
        return ("HydraLoRA with a learned router (N>1) has no exact merge: every token has its own mix of heads "
                "(merge_and_unload raises; merge_and_unload(gates=...) is an approximation)")  # fmt: skip
    return None


FORWARD_THEN_MERGE_TESTS = {
    "test_forward_float16", "test_forward_bfloat16", "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
}  # fmt: skip


@pytest.mark.parametrize("test_name,model_id,config_kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("method", METHODS)
def test_peft_custom_model(tester, method, test_name, model_id, config_kwargs, tmp_path):
    reason = skip_reason(method, test_name, config_kwargs)
    if reason:
        pytest.skip(reason)
    fn = peft_method(tester, method)
    params = inspect.signature(fn).parameters
    extra = {"tmp_path": tmp_path} if "tmp_path" in params else {}
    if "use_reentrant" in params:  # peft 0.18's gradient-checkpointing test: both variants
        fn(test_name, model_id, HydraLoraConfig, dict(config_kwargs), use_reentrant=True, **extra)
        extra["use_reentrant"] = False
    if method in FORWARD_THEN_MERGE_TESTS and has_router(config_kwargs):
        with pytest.raises(ValueError, match="Cannot merge or export HydraLoRA adapter"):  # raised after the forward passes
            fn(test_name, model_id, HydraLoraConfig, dict(config_kwargs), **extra)
        return
    fn(test_name, model_id, HydraLoraConfig, dict(config_kwargs), **extra)


@pytest.mark.parametrize("dtype,autocast_adapter_dtype,low_cpu_mem_usage", DTYPE_GRID)
@pytest.mark.parametrize("test_name,model_id,config_kwargs", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_peft_adapter_dtype_autocast(tester, test_name, model_id, config_kwargs, dtype, autocast_adapter_dtype,
                                     low_cpu_mem_usage, tmp_path):  # fmt: skip
    peft_method(tester, "test_adapter_dtype_autocast")(test_name, model_id, HydraLoraConfig, dict(config_kwargs), dtype,
                                       autocast_adapter_dtype, low_cpu_mem_usage, tmp_path)  # fmt: skip


def test_methods_list_is_complete(peft_tests):
    """Fails when a new PEFT version adds a generic custom-model test that this module does not run."""
    generic = {
        name
        for name, fn in inspect.getmembers(peft_tests.TestPeftCustomModel, inspect.isfunction)
        if name.startswith("test_")
        and list(inspect.signature(fn).parameters)[1:5] == ["test_name", "model_id", "config_cls", "config_kwargs"]
    }
    missed = generic - {"test_adapter_dtype_autocast"} - set(METHODS)
    assert not missed, f"peft {peft.__version__} has generic custom-model tests this module does not run: {sorted(missed)}"


# ------------------------------------------------------------------- PEFT's transformers-model checks
class _TinyLlamaWrapper:
    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        from conftest import make_tiny_llama

        model = make_tiny_llama()
        return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def decoder_tester(peft_tests):
    from tests.testing_common import PeftCommonTester

    class DecoderTester(PeftCommonTester):  # not Test*: pytest must not collect PEFT's methods
        transformers_class = _TinyLlamaWrapper

        def prepare_inputs_for_testing(self):
            input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    return DecoderTester()


DECODER_CASES = [
    ("N=1", {"num_experts": 1}),
    ("N=3", {"num_experts": 3}),
]
DECODER_METHODS = [
    "_test_prepare_for_training", "_test_training", "_test_training_gradient_checkpointing", "_test_generate",
    "_test_peft_model_device_map", "_test_delete_adapter", "_test_training_layer_indexing",
]  # fmt: skip


@pytest.mark.parametrize("name,config_kwargs", DECODER_CASES, ids=[c[0] for c in DECODER_CASES])
@pytest.mark.parametrize("method", DECODER_METHODS)
def test_peft_common_on_tiny_llama(decoder_tester, method, name, config_kwargs):
    kwargs = {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": False, "r": 4, **config_kwargs}
    getattr(decoder_tester, method)("tiny-llama", HydraLoraConfig, kwargs)
