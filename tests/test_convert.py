"""Importing checkpoints of the HydraLoRA authors' code (convert_official_checkpoint, `peft-hydra convert`) and the
authors' recipe as a preset (HydraLoraConfig.paper_preset).

The parity tests re-implement the authors' layer forward (HydraLoRA/peft/tuners/lora.py in Clin0212/HydraLoRA: a
per-head loop over lora_B{i}(lora_A(dropout(x))) weighted by softmax(lora_route(x))) on a tiny Llama, save it in
their key layout (adapter_model.bin, keys without base_layer, peft_type "LORA" with lora_nums), convert it and load it
with PeftModel.from_pretrained.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_hydra import HydraLoraConfig, HydraLoraLayer
from peft_hydra.convert import convert_official_checkpoint, main

from conftest import make_tiny_llama, pack_4bit_for_cpu

MLP = ["gate_proj", "up_proj", "down_proj"]


class AuthorsLinear(nn.Module):
    """The authors' HydraLoRA linear layer, re-implemented: it replaces the nn.Linear (holds its weight and bias),
    one shared lora_A, heads lora_B0..lora_B{N-1}, a bias-free router lora_route on x, scaling lora_alpha / r."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_nums: int, lora_dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_nums, self.scaling = lora_nums, lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout)
        self.lora_route = nn.Linear(base.in_features, lora_nums, bias=False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        for i in range(lora_nums):
            head = nn.Linear(r, base.out_features, bias=False)
            nn.init.uniform_(head.weight, -0.5, 0.5)  # "trained": B is not zero
            setattr(self, f"lora_B{i}", head)

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias)
        route = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.lora_nums):  # one dropout draw per head, as theirs
            head = getattr(self, f"lora_B{i}")(self.lora_A(self.lora_dropout(x)))
            result = result + route[..., i : i + 1] * head * self.scaling
        return result


def authors_config(**overrides):
    """adapter_config.json as their fork writes it (its LoraConfig + PeftConfig fields)."""
    config = {
        "base_model_name_or_path": "/data/llama-2-7b",
        "bias": "none",
        "blc_alpha": None,
        "blc_weight": None,
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_nums": 3,
        "merge_weights": False,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "target_modules": ["gate_proj", "down_proj", "up_proj"],
        "task_type": "CAUSAL_LM",
    }
    config.update(overrides)
    return config


def authors_model(r=4, lora_alpha=32, lora_nums=3, lora_dropout=0.05, targets=MLP, seed=0, **model_config):
    model = make_tiny_llama(**model_config)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        for name in targets:
            parent = layer.mlp if name in MLP else layer.self_attn
            setattr(parent, name, AuthorsLinear(getattr(parent, name), r, lora_alpha, lora_nums, lora_dropout))
    return model.eval()


def save_authors(model, path, fmt="bin", **config):
    """Their PeftModel.save_pretrained: the lora_ tensors under base_model.model.<name>, and the config."""
    path.mkdir(parents=True, exist_ok=True)
    state = {f"base_model.model.{k}": v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    if fmt == "bin":
        torch.save(state, path / "adapter_model.bin")
    else:
        save_file(state, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(authors_config(**config), indent=2))
    return state


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_checkpoint_reproduces_the_authors_forward(tmp_path, input_ids, fmt):
    theirs = authors_model()
    want = logits(theirs, input_ids)
    assert (want - logits(make_tiny_llama(), input_ids)).abs().max() > 0.1  # the adapter matters
    save_authors(theirs, tmp_path / "theirs", fmt=fmt)

    config = convert_official_checkpoint(tmp_path / "theirs", tmp_path / "ours", base_model_name_or_path="tiny")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.num_experts) == (4, 32, 0.05, 3)
    assert config.target_modules == set(MLP) and config.router_input == "x" and config.dropout_per_head
    assert config.base_model_name_or_path == "tiny" and config.task_type == "CAUSAL_LM"
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj."
    theirs_layer = theirs.model.layers[1].mlp.down_proj
    assert saved[key + "hydra_B.weight"].shape == (32, 3 * 4)  # (out, N*r): the heads side by side
    torch.testing.assert_close(saved[key + "hydra_B.weight"][:, 8:12], theirs_layer.lora_B2.weight)
    assert saved[key + "hydra_A.weight"].shape == (4 + 3, 48)  # A's rows, then the router's
    torch.testing.assert_close(saved[key + "hydra_A.weight"][4:], theirs_layer.lora_route.weight)
    assert not any("hydra_router" in k for k in saved)

    ours = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
    assert isinstance(ours.peft_config["default"], HydraLoraConfig)
    assert sum(isinstance(m, HydraLoraLayer) for m in ours.modules()) == 3 * 2
    torch.testing.assert_close(logits(ours, input_ids), want, rtol=1e-5, atol=1e-5)


def test_single_head_checkpoint_drops_the_constant_router(tmp_path, input_ids):
    theirs = authors_model(lora_nums=1)
    want = logits(theirs, input_ids)
    save_authors(theirs, tmp_path / "theirs", lora_nums=1)
    convert_official_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    assert not any("hydra_router" in k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    ours = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(ours, input_ids), want, rtol=1e-5, atol=1e-5)


def test_attention_targets_and_bf16_tensors(tmp_path, input_ids):
    theirs = authors_model(targets=["q_proj", "v_proj"], lora_alpha=16)
    with torch.no_grad():  # their bf16 training saves bf16 adapter tensors
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())
    want = logits(theirs, input_ids)
    state = save_authors(theirs, tmp_path / "theirs", target_modules=["q_proj", "v_proj"], lora_alpha=16)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "theirs" / "adapter_model.bin")
    config = convert_official_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    assert config.target_modules == {"q_proj", "v_proj"}
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.hydra_A.weight"
    ].dtype == torch.bfloat16
    ours = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(ours, input_ids), want, rtol=1e-5, atol=1e-5)


def test_converted_checkpoint_on_a_4bit_base(tmp_path, input_ids):
    """Their users' usual next steps: the converted adapter on a QLoRA (bitsandbytes 4-bit) base, evaluated, then
    merged with fixed gates after bitsandbytes repacked the 4-bit weights for its CPU kernel (as an evaluation does
    on CPUs with AVX512-BF16; done explicitly here, so on every CPU). Hidden size 64: bitsandbytes' 4-bit CPU kernels
    crash on hidden size 32 even without an adapter."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_hydra.bnb import Linear4bit

    wide = dict(hidden_size=64, intermediate_size=128)
    save_authors(authors_model(**wide), tmp_path / "theirs")
    convert_official_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    make_tiny_llama(**wide).save_pretrained(tmp_path / "base")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc, device_map="cpu")
    model = PeftModel.from_pretrained(base, tmp_path / "ours")
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, HydraLoraLayer)}
    assert len(layers) == 3 * 2 and all(type(m) is Linear4bit for m in layers.values())
    adapted = logits(model, input_ids)
    with model.disable_adapter():
        assert (adapted - logits(model, input_ids)).abs().max() > 1e-3  # the converted heads act
    assert torch.isfinite(adapted).all()

    pack_4bit_for_cpu(model)
    expected = {}
    for name, layer in layers.items():  # bitsandbytes' quantization of the float sum, read from the packed layout
        weight = layer.get_base_layer().weight
        total = layer._dequantize().float() + layer.get_delta_weight("default", gates="uniform").float()
        q, state = bnb.functional.quantize_4bit(total, blocksize=weight.blocksize, quant_type=weight.quant_type)
        expected[name] = bnb.functional.dequantize_4bit(q, state)
    merged = model.merge_and_unload(gates="uniform")
    for name, module in merged.named_modules():
        if name in expected:
            got = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            torch.testing.assert_close(got, expected[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def theirs_dir(tmp_path):
    save_authors(authors_model(), tmp_path / "theirs")
    return tmp_path / "theirs"


def rewrite_state(path, change):
    state = torch.load(path / "adapter_model.bin", weights_only=True)
    change(state)
    torch.save(state, path / "adapter_model.bin")


def test_missing_head_is_named(theirs_dir, tmp_path):
    rewrite_state(theirs_dir, lambda s: s.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B2.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*missing.*lora_B2\.weight"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()  # nothing half-written


def test_unknown_tensor_is_named(theirs_dir, tmp_path):
    rewrite_state(theirs_dir, lambda s: s.update({"base_model.model.lm_head.weight": torch.zeros(96, 32)}))
    with pytest.raises(ValueError, match=r"1 unknown tensor.*lm_head\.weight"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")


def test_mllm_variant_is_refused_with_a_reason(theirs_dir, tmp_path):
    key = "base_model.model.model.layers.0.mlp."
    rewrite_state(theirs_dir, lambda s: s.update({key + "shared_lora_A_gate": torch.zeros(4, 32)}))
    with pytest.raises(ValueError, match=r"shared_lora_A_gate.*MLLM-HydraLoRA.*not supported"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")


def test_extra_head_and_wrong_shape_are_named(theirs_dir, tmp_path):
    key = "base_model.model.model.layers.0.mlp.gate_proj."
    rewrite_state(theirs_dir, lambda s: s.update({key + "lora_B3.weight": torch.zeros(48, 4)}))
    with pytest.raises(ValueError, match=r"unexpected.*gate_proj\.lora_B3\.weight"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")
    save_authors(authors_model(), theirs_dir)
    rewrite_state(theirs_dir, lambda s: s.update({key + "lora_route.weight": torch.zeros(2, 32)}))
    with pytest.raises(ValueError, match=r"gate_proj.*lora_route has shape \(2, 32\), expected \(lora_nums=3, in=32\)"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")


def test_config_checks(theirs_dir, tmp_path):
    config_path = theirs_dir / "adapter_config.json"
    for change, message in [
        ({"lora_nums": None}, "lora_nums must be an integer"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_alpha": None}, "lora_alpha must be a number"),
        ({"use_dora": False}, r"field\(s\) \['use_dora'\]"),
    ]:
        config_path.write_text(json.dumps(authors_config(**change)))
        with pytest.raises(ValueError, match=message):
            convert_official_checkpoint(theirs_dir, tmp_path / "ours")
    config = authors_config()
    del config["lora_nums"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="peft_type='LORA' and no 'lora_nums'"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")


def test_a_current_peft_lora_is_refused(tmp_path):
    from peft import LoraConfig

    get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="no 'lora_nums'.*plain PEFT LoRA adapter needs no conversion"):
        convert_official_checkpoint(tmp_path / "lora", tmp_path / "ours")


def test_subfolder_hint_and_no_overwrite(theirs_dir, tmp_path):
    with pytest.raises(ValueError, match="sft_lora_model"):
        nested = tmp_path / "run"
        save_authors(authors_model(), nested / "sft_lora_model")
        convert_official_checkpoint(nested, tmp_path / "ours")
    convert_official_checkpoint(theirs_dir, tmp_path / "ours")
    with pytest.raises(ValueError, match="already holds an adapter.*overwrite"):
        convert_official_checkpoint(theirs_dir, tmp_path / "ours")
    convert_official_checkpoint(theirs_dir, tmp_path / "ours", overwrite=True)


def test_cli(theirs_dir, tmp_path, capsys):
    assert main([str(theirs_dir), str(tmp_path / "ours"), "--base-model", "my/llama"]) == 0
    out = capsys.readouterr().out
    assert "num_experts=3" in out and "PeftModel.from_pretrained" in out
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/llama"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "error: Cannot convert" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- paper preset
def test_paper_preset_values_and_overrides():
    config = HydraLoraConfig.paper_preset()
    assert config.target_modules == {"gate_proj", "up_proj", "down_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout, config.num_experts) == (4, 32, 0.05, 4)
    assert config.dropout_per_head and config.router_input == "x" and config.top_k is None
    assert config.fixed_gates is None and config.router_aux_loss_coef == 0 and not config.use_rslora
    assert config.task_type == "CAUSAL_LM"
    other = HydraLoraConfig.paper_preset(num_experts=2, r=8)
    assert (other.num_experts, other.r, other.lora_alpha) == (2, 8, 32)
    with pytest.raises(ValueError, match="num_experts"):
        HydraLoraConfig.paper_preset(num_experts=0)


def test_paper_preset_on_a_model_matches_the_authors_layout(tmp_path):
    model = get_peft_model(make_tiny_llama(), HydraLoraConfig.paper_preset())
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, HydraLoraLayer)}
    assert set(layers) == set(MLP)  # MLP only, no attention projections
    layer = layers["up_proj"]
    assert layer.scaling["default"] == 8 and layer.hydra_B["default"].weight.shape == (48, 4 * 4)
    assert layer.hydra_A["default"].weight.shape == (4 + 4, 32)  # A's r rows, then the router's N rows
    # a checkpoint of their recipe converts to the same configuration
    save_authors(authors_model(lora_nums=4), tmp_path / "theirs", lora_nums=4)
    converted = convert_official_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    preset = HydraLoraConfig.paper_preset()
    fields = ("r", "lora_alpha", "lora_dropout", "num_experts", "target_modules", "dropout_per_head", "router_input")
    for field in fields:
        assert getattr(converted, field) == getattr(preset, field), field


# ------------------------------------------------------------ README snippet ("Coming from the authors' code")
def test_readme_authors_snippet(tmp_path, monkeypatch, input_ids):
    """The "Coming from the authors' code" snippet of /work/coord/readme-quant.md (README.md), run as written; keep
    the two identical. Their checkpoint folder and base model are the tiny stand-ins built here."""
    save_authors(authors_model(), tmp_path / "hydralora_output" / "sft_lora_model")
    make_tiny_llama().save_pretrained(tmp_path / "llama-2-7b")
    want = logits(authors_model(), input_ids)
    monkeypatch.chdir(tmp_path)
    # --- snippet start
    import peft_hydra
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_hydra.convert_official_checkpoint("hydralora_output/sft_lora_model", "hydralora-converted")
    base = AutoModelForCausalLM.from_pretrained("llama-2-7b")
    model = PeftModel.from_pretrained(base, "hydralora-converted")
    # --- snippet end
    torch.testing.assert_close(logits(model, input_ids), want, rtol=1e-5, atol=1e-5)
    assert math.isclose(model.peft_config["default"].lora_dropout, 0.05)
