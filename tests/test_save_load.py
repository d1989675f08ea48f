"""Saving and loading HydraLoRA adapters through PEFT (save_pretrained / from_pretrained / AutoPeftModel)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import hydra, logits  # noqa: E402
from peft_hydra import HydraLoraConfig



@pytest.fixture
def saved(tmp_path, input_ids, tiny_llama):
    """A trained-looking (random B) N=3 adapter saved to tmp_path/adapter; returns (path, logits)."""
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, top_k=2))
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path, logits(model, input_ids)


def test_saved_files_and_keys(saved):
    path, _ = saved
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    assert {prefix + "hydra_A.weight", prefix + "hydra_B.weight"} <= keys
    assert not any("default" in k for k in keys)  # adapter name stripped
    assert all(".hydra_" in k for k in keys)
    assert len(keys) == 2 * 7 * 2  # per targeted linear: A with the router's rows, and B
    tensors = load_file(path / "adapter_model.safetensors")
    assert tensors[prefix + "hydra_A.weight"].shape == (4 + 3, 32) and tensors[prefix + "hydra_B.weight"].shape == (32, 12)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYDRALORA" and config["num_experts"] == 3 and config["top_k"] == 2


def test_reload_identical_outputs_frozen_by_default(saved, input_ids, tiny_llama):
    path, want = saved
    loaded = PeftModel.from_pretrained(tiny_llama(), path)
    assert isinstance(loaded.peft_config["default"], HydraLoraConfig)
    torch.testing.assert_close(logits(loaded, input_ids), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.peft_config["default"].inference_mode


def test_reload_trainable(saved, input_ids, tiny_llama):
    path, want = saved
    loaded = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".hydra_" in n for n in trainable)
    assert any(".hydra_A." in n for n in trainable) and any(".hydra_B." in n for n in trainable)
    loaded.train()
    loaded(input_ids=input_ids, labels=input_ids).loss.backward()


def test_load_under_another_adapter_name(saved, input_ids, tiny_llama):
    path, want = saved
    loaded = PeftModel.from_pretrained(tiny_llama(), path, adapter_name="mine")
    assert list(loaded.peft_config) == ["mine"] and loaded.active_adapter == "mine"
    torch.testing.assert_close(logits(loaded, input_ids), want, rtol=0, atol=0)
    loaded.load_adapter(path, adapter_name="second")
    loaded.set_adapter("second")
    torch.testing.assert_close(logits(loaded, input_ids), want, rtol=0, atol=0)


def edit_config(path, **changes):
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def test_shape_mismatch_raises_clear_error(saved, tiny_llama):
    path, _ = saved
    edit_config(path, num_experts=2, top_k=None)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(tiny_llama(), path)
    msg = str(err.value)
    assert "does not match its config" in msg
    assert "28 tensor(s) with another shape" in msg  # hydra_A (the router's rows) and hydra_B of all 14 layers
    assert re.search(r"hydra_B\.weight: shape \(\d+, 12\) in the checkpoint, \(\d+, 8\) from the config", msg)
    assert "num_experts=2" in msg and "r=4" in msg


def test_rank_mismatch_raises_clear_error(saved, tiny_llama):
    path, _ = saved
    edit_config(path, r=2)
    with pytest.raises(ValueError, match=r"(?s)hydra_A\.weight: shape \(7, \d+\) in the checkpoint, \(5, \d+\).*r=2"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_missing_tensor_raises_clear_error(saved, tiny_llama):
    path, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.hydra_B.weight"
    del tensors[key]
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(tiny_llama(), path)
    msg = str(err.value)
    assert "1 missing tensor(s)" in msg and "layers.1.mlp.down_proj.hydra_B" in msg
    assert "num_experts=3" in msg


def test_router_saved_without_router_in_config_raises(saved, tiny_llama):
    path, _ = saved
    edit_config(path, fixed_gates="uniform", top_k=None)
    with pytest.raises(ValueError, match=r"(?s)hydra_A\.weight: shape \(7, 32\) in the checkpoint, \(4, 32\).*fixed_gates='uniform'"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_router_on_a_x_is_saved_as_its_own_tensor(tmp_path, tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, router_input="a"))
    model.save_pretrained(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.hydra_router.weight"
    assert load_file(tmp_path / "adapter_model.safetensors")[key].shape == (3, 4)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=0)


# ----------------------------------------------------------------------------- checkpoints of version 0.1
FIXTURE = Path(__file__).parent / "fixtures" / "hydra_v0_1"


def fixture_base():
    from conftest import make_tiny_llama

    base = make_tiny_llama(seed=0)
    base.load_state_dict(load_file(FIXTURE / "base_model.safetensors"))
    return base


def test_a_checkpoint_of_version_0_1_loads_with_identical_outputs(tmp_path):
    assert load_file(FIXTURE / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.hydra_B"].shape == (32, 3, 4)  # the old layout
    expected = torch.load(FIXTURE / "expected.pt")
    loaded = PeftModel.from_pretrained(fixture_base(), FIXTURE)
    torch.testing.assert_close(logits(loaded, expected["input_ids"]), expected["logits"], rtol=1e-6, atol=1e-6)
    # saved again: today's layout, same outputs
    loaded.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.hydra_B.weight"].shape == (32, 12)
    again = PeftModel.from_pretrained(fixture_base(), tmp_path)
    torch.testing.assert_close(logits(again, expected["input_ids"]), expected["logits"], rtol=1e-6, atol=1e-6)


def test_a_checkpoint_of_version_0_1_with_the_wrong_config_raises_clear_error(tmp_path):
    import shutil

    shutil.copytree(FIXTURE, tmp_path / "old")
    edit_config(tmp_path / "old", num_experts=2)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(fixture_base(), tmp_path / "old")
    msg = str(err.value)
    assert "does not match its config" in msg and "peft-hydra 0.1" in msg and "num_experts=2" in msg
    assert re.search(r"hydra_B\.weight: shape \(\d+, 12\) in the checkpoint, \(\d+, 8\) from the config", msg)


# -------------------------------------------------------------------------------------- fresh processes
@pytest.fixture
def saved_with_base(tmp_path, input_ids, tiny_llama):
    """Base model saved to tmp_path/base, adapter to tmp_path/adapter (base_model_name_or_path -> base)."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    model = get_peft_model(base, hydra(r=4, num_experts=3))
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": input_ids, "logits": logits(model, input_ids)}, tmp_path / "expected.pt")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    return tmp_path


@pytest.mark.slow
def test_auto_peft_model_in_fresh_process(saved_with_base):
    proc = run_python(
        """
        import torch, peft_hydra
        from peft import AutoPeftModelForCausalLM
        expected = torch.load("expected.pt")
        model = AutoPeftModelForCausalLM.from_pretrained("adapter")
        assert type(model.peft_config["default"]) is peft_hydra.HydraLoraConfig
        with torch.no_grad():
            out = model(input_ids=expected["ids"]).logits
        torch.testing.assert_close(out, expected["logits"], rtol=0, atol=0)
        print("OK")
        """,
        cwd=saved_with_base,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def run_python(code: str, cwd, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)  # fmt: skip


LOAD_WITHOUT_IMPORT = """
    import sys
    from peft import AutoPeftModelForCausalLM
    try:
        model = AutoPeftModelForCausalLM.from_pretrained("adapter")
    except Exception as e:
        print("ERROR", type(e).__name__, repr(str(e)))
    else:
        import torch
        expected = torch.load("expected.pt")
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
        print("LOADED", [c.__name__ for c in type(model.base_model).__mro__ if c.__name__ == "HydraLoraModel"][0])
    """


def test_loading_without_import_peft_hydra_works(saved_with_base):
    """The installed start-up hook (``peft_hydra-autoload.pth``) registers HydraLoRA when ``peft`` is imported, so a
    script that never imports peft_hydra loads the adapter (tests/test_package.py covers fresh regular and editable
    installs)."""
    proc = run_python(LOAD_WITHOUT_IMPORT, cwd=saved_with_base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED HydraLoraModel", proc.stdout + proc.stderr[-2000:]


def test_loading_with_autoload_switched_off_fails_in_peft(saved_with_base):
    """With ``PEFT_HYDRA_AUTOLOAD=0`` nothing of peft_hydra runs: PEFT 0.21 fails with its bare ``KeyError:
    'HYDRALORA'`` (PEFT_TYPE_TO_CONFIG_MAPPING lookup), which the README documents (then ``import peft_hydra``)."""
    proc = run_python(LOAD_WITHOUT_IMPORT, cwd=saved_with_base, PEFT_HYDRA_AUTOLOAD="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ERROR KeyError") and "HYDRALORA" in last, last
