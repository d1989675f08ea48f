"""Support for every peft in the range (src/peft_hydra/standalone/compat.py): frozen adapters stay frozen on half-precision
bases, one adapter's tensors per saved file, the strict check on PEFT's load path only, the feature checks and the
forward-compatibility warning. CI runs this module on the oldest and the newest supported peft (`make test-matrix`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import hydra, logits  # noqa: E402
from peft_hydra.standalone import compat as _compat



def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------- frozen stays frozen
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_loaded_for_inference_is_frozen_on_half_precision_base(dtype, tmp_path, tiny_llama):
    model = get_peft_model(tiny_llama().to(dtype), hydra(r=4, num_experts=3))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.hydra_B["default"].weight.dtype == torch.float32  # upcast
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)  # is_trainable=False
    assert trainable(loaded) == []
    # the adapter weights were upcast all the same (PEFT's autocast_adapter_dtype)
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.hydra_B["default"].weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inactive_adapter_is_frozen_on_half_precision_base(dtype, tiny_llama):
    model = get_peft_model(tiny_llama().to(dtype), hydra(r=4, num_experts=3))
    model.add_adapter("second", hydra(r=2, num_experts=2))
    names = trainable(model)
    assert names and all(".default" in n for n in names), [n for n in names if ".default" not in n][:3]
    assert any(".hydra_B.default" in n for n in names)  # the active adapter's heads stay trainable
    model.set_adapter("second")  # PEFT's set_adapter makes the newly active adapter trainable
    assert any(".hydra_B.second" in n for n in trainable(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trainable_load_on_half_precision_base(dtype, tmp_path, tiny_llama, input_ids):
    model = get_peft_model(tiny_llama().to(dtype), hydra(r=4, num_experts=3))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, is_trainable=True)
    names = trainable(loaded)
    assert any(".hydra_B." in n for n in names) and all(".hydra_" in n for n in names)
    loaded.train()
    loaded(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if ".hydra_B." in n)


# ------------------------------------------------------------------------------ one adapter per file
def test_each_saved_file_holds_only_its_adapter(tmp_path, tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3))
    model.add_adapter("other", hydra(r=2, num_experts=2))
    model.save_pretrained(tmp_path)
    files = {name: load_file(tmp_path / sub / "adapter_model.safetensors") for name, sub in
             (("default", "."), ("other", "other"))}  # fmt: skip
    assert len(files["default"]) == len(files["other"]) == 2 * 7 * 2  # A (+ router rows), B of 7 linears x 2 layers
    key = "base_model.model.model.layers.0.self_attn.q_proj.hydra_B.weight"
    assert files["default"][key].shape[1] == 3 * 4 and files["other"][key].shape[1] == 2 * 2
    assert not any(".other" in k or ".default" in k for f in files.values() for k in f)
    for name, sub in (("default", "."), ("other", "other")):
        model.set_adapter(name)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / sub)  # strict check passes on every peft
        torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ strict check scope
def test_strict_check_only_on_peft_adapter_load(saved_partial):
    """A user's own partial ``load_state_dict(strict=False)`` is not an adapter load: not refused (as on peft 0.21,
    where the check runs in PEFT's adapter-load hook only)."""
    model, partial = saved_partial
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys  # the rest of the model


@pytest.fixture
def saved_partial(tiny_llama):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3))
    partial = {k: v for k, v in model.state_dict().items() if ".hydra_A." in k}
    return model, partial


# -------------------------------------------------------------------------------------- the fallbacks
def test_fallbacks_match_peft(tiny_llama):
    """The fallbacks used on older peft give what peft >= 0.21's own functions give (skipped where peft lacks them)."""
    from peft.tuners import tuners_utils

    native = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    if native is None:
        pytest.skip(f"peft {peft.__version__} has no _get_tuner_state_dict_key_prefixes (added in 0.21.0)")
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, modules_to_save=["lm_head"]))
    model.add_adapter("other", hydra(r=2, num_experts=1, modules_to_save=["lm_head"]))
    for adapter in (None, "default", "other"):
        assert _compat._tuner_state_dict_key_prefixes_fallback(model, adapter) == native(model, adapter)
    tuner_cls = type(model.base_model)
    for key in model.state_dict():
        for adapter in ("default", "other"):
            assert _compat._remove_adapter_name_from_key_fallback(key, adapter) == tuner_cls._remove_adapter_name_from_key(
                key, adapter
            )


# ------------------------------------------------------------------------------ import-time feature checks
def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEFT_HYDRA_AUTOLOAD="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_newer_untried_peft_warns_once_and_works():
    proc = run_python(
        """
        import warnings
        import peft, torch
        peft.__version__ = "0.99.0"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft_hydra
            import peft_hydra.bnb, peft_hydra.export, peft_hydra.standalone.card
        ours = [w for w in caught if issubclass(w.category, peft_hydra.standalone.compat.UntestedPeftVersionWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "0.99.0" in str(ours[0].message) and "untried" in str(ours[0].message)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        model = peft.get_peft_model(model, peft_hydra.HydraLoraConfig(target_modules=["0"], r=2, num_experts=2))
        assert model(torch.ones(2, 8)).shape == (2, 8)
        print("OK")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_tested_peft_does_not_warn():
    proc = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft_hydra
        print(sum(issubclass(w.category, peft_hydra.standalone.compat.UntestedPeftVersionWarning) for w in caught))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0"


@pytest.mark.parametrize(
    "setup,needle",
    [
        ("peft.__version__ = '0.17.1'", "peft>=0.18.0"),
        ("import peft.tuners.tuners_utils as t; del t._get_in_out_features", "_get_in_out_features"),
        ("import peft.tuners.tuners_utils as t; del t.BaseTunerLayer._cast_input_dtype", "_cast_input_dtype"),
    ],
    ids=["too-old", "module-function-gone", "method-gone"],
)
def test_missing_peft_internal_names_version_and_range(setup, needle):
    proc = run_python(
        f"""
        import peft
        {setup}
        try:
            import peft_hydra
        except ImportError as e:
            print("ERR", e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip()
    assert out.startswith("ERR") and needle in out and "Supported: peft>=0.18.0" in out, out
    assert "installed peft" in out


def test_fallback_used_when_peft_lacks_the_private_helper():
    """With ``_get_tuner_state_dict_key_prefixes`` gone (as on peft < 0.21) the import works, the fallback is used and
    the strict check still refuses a checkpoint that does not match its config (the load path of peft < 0.21 itself
    is covered by tests/test_save_load.py in `make test-oldest`)."""
    proc = run_python(
        """
        import json, os, tempfile
        import peft, torch
        from peft.tuners import tuners_utils as t
        native = t.__dict__.pop("_get_tuner_state_dict_key_prefixes", None)  # hidden from peft_hydra's import only
        import peft_hydra
        if native is not None:
            t._get_tuner_state_dict_key_prefixes = native  # PEFT's own code needs it back
        assert peft_hydra.standalone.compat._get_tuner_state_dict_key_prefixes is peft_hydra.standalone.compat._tuner_state_dict_key_prefixes_fallback
        base = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        model = peft.get_peft_model(base(), peft_hydra.HydraLoraConfig(target_modules=["0", "1"], r=2, num_experts=2))
        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        cfg["r"] = 3
        json.dump(cfg, open(os.path.join(d, "adapter_config.json"), "w"))
        try:
            peft.PeftModel.from_pretrained(base(), d)
        except ValueError as e:
            assert "does not match its config" in str(e), e
            print("OK")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------- the [compare] harness's methods
def test_compare_methods_build_on_installed_peft(tiny_llama):
    """Every compared method's PEFT config builds and wraps a model on the installed peft; Lily only where peft has
    it (0.19+), else a clear error at config resolution, before anything runs."""
    from peft_hydra.compare.methods import METHODS, build_peft_config, method_specs

    names = [n for n, (kind, _, _) in METHODS.items() if kind != "full" and (kind != "lily" or hasattr(peft, "LilyConfig"))]
    common = {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [0, 1], "num_layers": 2}
    for spec in method_specs(names, {}):
        model = get_peft_model(tiny_llama(), build_peft_config(spec, r=2, factor=-1, common=common))
        assert any(p.requires_grad for p in model.parameters()), spec.name


def test_compare_lily_needs_peft_019(monkeypatch):
    from peft_hydra.compare.methods import method_specs

    monkeypatch.delattr(peft, "LilyConfig", raising=False)  # as on peft 0.18
    monkeypatch.setattr(peft, "__version__", "0.18.1")
    with pytest.raises(ValueError, match=r"(?s)'lily' needs peft\.LilyConfig \(peft >= 0\.19\.0\).*peft 0\.18\.1.*Remove"):
        method_specs(["lora", "lily"], {})
    assert [s.name for s in method_specs(["lora", "hydralora"], {})] == ["lora", "hydralora"]
