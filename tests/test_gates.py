"""One gate argument everywhere: ``resolve_gates`` is the single parser behind ``fixed_gates``, ``merge_adapter``,
``merge_and_unload`` and ``export_lora``; every API accepts the same forms and raises the same error text."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig, resolve_gates
from peft_hydra.config import GATES_FORMS


def test_forms():
    assert torch.equal(resolve_gates("uniform", 4), torch.full((4,), 0.25))
    assert torch.equal(resolve_gates([1, 0, 3], 3), torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(resolve_gates(torch.tensor([0.2, 0.8], dtype=torch.float64), 2), torch.tensor([0.2, 0.8]))
    per_layer = {"a.q_proj": [0.1, 0.9], "a.v_proj": "uniform"}
    assert torch.allclose(resolve_gates(per_layer, 2, layer_name="a.q_proj"), torch.tensor([0.1, 0.9]))
    assert torch.equal(resolve_gates(per_layer, 2, layer_name="a.v_proj"), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    "bad", ["mean", [0.5, 0.5], [1, -1, 1], [0, 0, 0], [float("nan"), 1, 1], [True, 1, 1], None, 3, {"x": [1, 1, 1]}]
)
def test_one_error_text_for_every_bad_form(bad):
    with pytest.raises(ValueError) as info:
        resolve_gates(bad, 3)
    text = str(info.value)
    assert "num_experts=3" in text or "per-layer mapping without an entry" in text
    assert "'uniform'" in text or "measure_mean_gates" in text


@pytest.mark.parametrize("bad", ["mean", [0.5, 0.5], [1, -1, 1], [0, 0, 0]])
def test_same_error_from_config_merge_and_export(tiny_llama, tmp_path, bad):
    """The config, merge_and_unload and export_lora all reject a bad gate argument with the same text."""
    with pytest.raises(ValueError) as from_config:
        HydraLoraConfig(num_experts=3, fixed_gates=bad, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError) as from_merge:
        model.merge_and_unload(gates=bad)
    with pytest.raises(ValueError) as from_export:
        peft_hydra.export_lora(model, str(tmp_path), gates=bad)
    tail = lambda e: str(e.value).split("` must be ", 1)[1]  # noqa: E731  (same text after the argument's name)
    assert tail(from_config) == tail(from_merge) == tail(from_export)
    assert GATES_FORMS.split(",")[0] in tail(from_merge)


def test_merge_and_unload_accepts_uniform_and_per_layer_gates(tiny_llama, input_ids):
    """``merge_and_unload(gates="uniform")`` (a TypeError before) and per-layer gates equal the fixed-gate model."""
    config = dict(r=4, num_experts=3, target_modules=["q_proj", "v_proj"], init_weights=False)
    routed = get_peft_model(tiny_llama(), HydraLoraConfig(**config))
    routed_state = {k: v.clone() for k, v in routed.state_dict().items() if "hydra_" in k}
    state = {k: v[:4] if ".hydra_A." in k else v for k, v in routed_state.items()}  # A without the router's rows
    names = [n for n, m in routed.base_model.model.named_modules() if isinstance(m, peft_hydra.HydraLoraLayer)]
    per_layer = {name: [0.2 + 0.1 * i, 0.3, 0.5 - 0.1 * i] for i, name in enumerate(names)}
    for gates in ("uniform", [0.6, 0.3, 0.1], per_layer):
        fixed = get_peft_model(tiny_llama(), HydraLoraConfig(**config, fixed_gates=gates))
        fixed.load_state_dict(state, strict=False)
        with torch.no_grad():
            expected = fixed(input_ids).logits
            model = get_peft_model(tiny_llama(), HydraLoraConfig(**config))
            model.load_state_dict(routed_state, strict=False)
            merged = model.merge_and_unload(gates=gates)
            assert not any(isinstance(m, peft_hydra.HydraLoraLayer) for m in merged.modules())
            torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_per_layer_fixed_gates_in_config_need_every_layer(tiny_llama):
    with pytest.raises(ValueError, match="without an entry for layer 'model.layers.0.self_attn.q_proj'"):
        get_peft_model(
            tiny_llama(),
            HydraLoraConfig(num_experts=2, target_modules=["q_proj"], fixed_gates={"model.layers.1.self_attn.q_proj": [1, 1]}),
        )


def test_dropout_per_head_with_router_on_a_x_is_refused_in_the_config():
    with pytest.raises(ValueError, match="dropout_per_head=True with router_input='a'.*router_input='x'"):
        HydraLoraConfig(num_experts=2, router_input="a", dropout_per_head=True, lora_dropout=0.1)
    HydraLoraConfig(num_experts=2, router_input="a", dropout_per_head=True, lora_dropout=0.0)  # no dropout: fine
    HydraLoraConfig(num_experts=2, router_input="x", dropout_per_head=True, lora_dropout=0.1)


def test_per_layer_gates_naming_unknown_layers_are_refused(tiny_llama, tmp_path):
    """A typo in a per-layer mapping is an error everywhere (it was ignored by merge and by the config)."""
    good = "model.layers.0.self_attn.q_proj"
    gates = {f"model.layers.{i}.self_attn.q_proj": [1, 1] for i in range(2)} | {"model.layers.0.self_attn.q_prj": [1, 1]}
    with pytest.raises(ValueError, match=r"fixed_gates` names 1 layer\(s\) the adapter does not have.*q_prj"):
        get_peft_model(tiny_llama(), HydraLoraConfig(num_experts=2, target_modules=["q_proj"], fixed_gates=gates))
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"]))
    for call in (lambda: model.merge_and_unload(gates=gates), lambda: peft_hydra.export_lora(model, str(tmp_path), gates=gates)):
        with pytest.raises(ValueError, match=r"`gates` names 1 layer\(s\) the adapter does not have.*q_prj"):
            call()
    assert good in gates and not any(m.merged for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer))


def test_override_gates_per_sample_equals_fixed_gates_per_sample(tiny_llama, input_ids):
    """Per-sample gates given to a learned-router model: each sample's output is the output of the same adapter with
    those gates fixed (merged), in training forward, in a cached generate(), and the router is back afterwards."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=3, target_modules=["q_proj", "v_proj"],
                                                         init_weights=False)).eval()  # fmt: skip
    ids = input_ids[:2]
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    with torch.no_grad():
        before = model(ids).logits
        with model.override_gates(gates):
            given = model(ids).logits
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model(ids).logits, before)  # the learned router again
        for i in range(2):
            model.merge_adapter(gates=gates[i])
            assert torch.allclose(model(ids[i : i + 1]).logits, given[i : i + 1], atol=1e-5)
            merged_generated = model.generate(ids[i : i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(merged_generated, generated[i : i + 1])
            model.unmerge_adapter()
    assert not torch.allclose(given[0], given[1])


def test_override_gates_trains_the_heads_and_not_the_router(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"],
                                                         init_weights=False))  # fmt: skip
    with model.override_gates(torch.tensor([[1.0, 0.0]] * len(input_ids))):
        model(input_ids, labels=input_ids).loss.backward()
    layer = next(m for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer))
    B, A = layer.hydra_B["default"].weight.grad, layer.hydra_A["default"].weight.grad
    assert B[:, :2].abs().sum() > 0 and B[:, 2:].abs().sum() == 0  # head 0 only
    assert A[:2].abs().sum() > 0 and A[2:].abs().sum() == 0  # A trained, the router rows not


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 4), torch.ones(2, 3, dtype=torch.long), [0.5, 0.5]])
def test_override_gates_refuses_bad_shapes(tiny_llama, bad):
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(batch, N\) with N = 2"):
        with model.override_gates(bad):
            pass


def test_override_gates_refuses_a_batch_of_another_size_and_merged_layers(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="one row per sample"):
        with model.override_gates(torch.ones(3, 2) / 2):
            model(input_ids[:2])
    model.merge_adapter(gates="uniform")
    with pytest.raises(ValueError, match="unmerge_adapter"):
        with model.override_gates(torch.ones(2) / 2):
            pass
