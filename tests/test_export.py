"""export_lora: a HydraLoRA adapter with fixed gates becomes a plain PEFT LoRA adapter with the same outputs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_hydra import HydraLoraConfig, HydraLoraLayer, export_lora, measure_mean_gates

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained_hydra(tiny_llama, **overrides):
    """A HydraLoRA model whose B heads and router are random (so that gates matter), in eval mode."""
    kwargs = dict(r=4, lora_alpha=8, num_experts=3, target_modules=TARGETS, init_weights=False)
    kwargs.update(overrides)
    model = get_peft_model(tiny_llama(), HydraLoraConfig(**kwargs))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hydra_B" in name or "hydra_router" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _merged_reference(model, gates_for):
    """Independent reference: merge every layer's update with its fixed gates into a copy of the base weights."""
    ref = copy.deepcopy(model)
    for name, layer in ref.base_model.model.named_modules():
        if isinstance(layer, HydraLoraLayer):
            layer.merge(adapter_names=["default"], gates=gates_for(name))
    return ref


def _load_lora(tiny_llama, path):
    return PeftModel.from_pretrained(tiny_llama(), path).eval()


@pytest.mark.parametrize("share_a", [True, False])
@pytest.mark.parametrize("gates", ["uniform", [0.7, 0.2, 0.1]])
def test_export_equals_hydra_with_fixed_gates(tiny_llama, input_ids, tmp_path, share_a, gates):
    model = _trained_hydra(tiny_llama, share_a=share_a, use_rslora=not share_a)
    config = export_lora(model, str(tmp_path), gates=gates)
    assert isinstance(config, LoraConfig)
    assert config.r == 4 * (1 if share_a else 3)
    saved = json.load(open(tmp_path / "adapter_config.json"))
    assert saved["peft_type"] == "LORA" and saved["r"] == config.r

    lora = _load_lora(tiny_llama, str(tmp_path))
    vec = torch.full((3,), 1 / 3) if gates == "uniform" else torch.tensor(gates)
    ref = _merged_reference(model, lambda name: vec)
    with torch.no_grad():
        expected = ref(input_ids).logits
        got = lora(input_ids).logits
        routed = model(input_ids).logits
        base = tiny_llama()(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the adapter matters and the gates matter: the export differs from the base and from the routed model
    assert (got - base).abs().max() > 1e-2
    assert (got - routed).abs().max() > 1e-4


def test_export_fixed_gate_adapter_equals_its_forward(tiny_llama, input_ids, tmp_path):
    """An adapter trained with fixed gates exports exactly (no gates argument); checked against its own forward."""
    model = _trained_hydra(tiny_llama, fixed_gates=[0.5, 0.3, 0.2])
    export_lora(model, str(tmp_path))
    lora = _load_lora(tiny_llama, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_export_measured_per_layer_gates(tiny_llama, input_ids, tmp_path):
    model = _trained_hydra(tiny_llama, top_k=2)
    batches = [input_ids, {"input_ids": input_ids.flip(-1), "attention_mask": torch.ones_like(input_ids)}]
    mean_gates = measure_mean_gates(model, batches)
    layer_names = {n for n, m in model.base_model.model.named_modules() if isinstance(m, HydraLoraLayer)}
    assert set(mean_gates) == layer_names
    for g in mean_gates.values():
        assert len(g) == 3 and abs(sum(g) - 1) < 1e-5
    assert len({tuple(round(x, 4) for x in g) for g in mean_gates.values()}) > 1  # per layer, not one vector
    assert model.base_model.router_stats()["mean_gate"] is None  # nothing collected before: nothing after
    assert not model.base_model.router_stats_enabled

    # A caller that was collecting keeps its statistics and its collection on.
    tuner = model.base_model
    tuner.reset_router_stats()
    with torch.no_grad():
        model(input_ids)
    before = tuner.router_stats()
    assert measure_mean_gates(model, batches) == mean_gates
    assert tuner.router_stats_enabled and tuner.router_stats() == before

    export_lora(model, str(tmp_path), gates=mean_gates)
    lora = _load_lora(tiny_llama, str(tmp_path))
    ref = _merged_reference(model, lambda name: torch.tensor(mean_gates[name]))
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids).logits, ref(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_export_gpt2_conv1d_and_modules_to_save(tiny_gpt2, input_ids, tmp_path):
    model = get_peft_model(
        tiny_gpt2(),
        HydraLoraConfig(r=2, num_experts=2, target_modules=["c_attn"], fixed_gates="uniform", init_weights=False,
                        modules_to_save=["ln_f"]),
    )  # fmt: skip
    with torch.no_grad():
        model.base_model.model.transformer.ln_f.modules_to_save["default"].weight.mul_(1.5)
    model.eval()
    export_lora(model, str(tmp_path))
    lora = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_export_errors(tiny_llama, tmp_path, input_ids):
    model = _trained_hydra(tiny_llama)
    with pytest.raises(ValueError, match="Cannot merge or export HydraLoRA adapter 'default' without fixed gates"):
        export_lora(model, str(tmp_path))
    with pytest.raises(ValueError, match=r"list of num_experts=3 non-negative numbers.*got \[0.5, 0.5\]"):
        export_lora(model, str(tmp_path), gates=[0.5, 0.5])
    with pytest.raises(ValueError, match="'uniform'.*got 'mean'"):
        export_lora(model, str(tmp_path), gates="mean")
    with pytest.raises(ValueError, match="without an entry for layer"):
        export_lora(model, str(tmp_path), gates={"model.layers.0.self_attn.q_proj": [1, 0, 0]})
    with pytest.raises(ValueError, match="Unknown adapter"):
        export_lora(model, str(tmp_path), gates="uniform", adapter_name="nope")
    with pytest.raises(ValueError, match="no batches"):
        measure_mean_gates(model, [])
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no HydraLoRA adapter"):
        export_lora(lora, str(tmp_path), gates="uniform")


def test_exported_adapter_loads_with_peft_alone(tiny_llama, input_ids, tmp_path):
    """A fresh interpreter that never imports peft_hydra loads the export and reproduces the expected logits."""
    model = _trained_hydra(tiny_llama)
    export_lora(model, str(tmp_path / "lora"), gates="uniform")
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ref = _merged_reference(model, lambda name: torch.full((3,), 1 / 3))
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "expected": ref(input_ids).logits}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}),
                                          {str(tmp_path / "lora")!r}).eval()
        assert "peft_hydra" not in sys.modules, "peft_hydra was imported"
        with torch.no_grad():
            torch.testing.assert_close(model(io["input_ids"]).logits, io["expected"], rtol=1e-5, atol=1e-5)
        print("OK", type(model.peft_config["default"]).__name__)
        """
    )
    # PEFT_HYDRA_AUTOLOAD=0: the start-up hook of an installed peft-hydra must not import it behind our back
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PEFT_HYDRA_AUTOLOAD": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK LoraConfig" in out.stdout
