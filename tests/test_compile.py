"""torch.compile: no graph breaks in the HydraLoRA layer, compiled training matches eager, generate() with KV cache."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_hydra import HydraLoraConfig, HydraLoraLayer

VARIANTS = {
    "dense": {},
    "top_k": {"top_k": 2},
    "router_on_a": {"router_input": "a", "router_temperature": 0.5},
    "lora_split": {"share_a": False},
    "fixed_gates": {"fixed_gates": [0.5, 0.3, 0.2]},
    "n1": {"num_experts": 1},
    "dropout": {"lora_dropout": 0.1},
    "dropout_per_head": {"lora_dropout": 0.1, "dropout_per_head": True},
    "balance_loss": {"router_aux_loss_coef": 0.1, "top_k": 2},
}


def _model(tiny_llama, **overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=3, target_modules=["q_proj", "v_proj", "down_proj"],
                  init_weights=False, router_aux_loss_coef=0.0)  # fmt: skip
    kwargs.update(overrides)
    return get_peft_model(tiny_llama(), HydraLoraConfig(**kwargs))


@pytest.mark.parametrize("stats", [False, True], ids=["stats_off", "stats_on"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_has_no_graph_breaks(tiny_llama, variant, stats):
    torch._dynamo.reset()
    model = _model(tiny_llama, **VARIANTS[variant]).train()
    if stats:
        model.base_model.reset_router_stats()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, HydraLoraLayer)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("variant", ["top_k", "router_on_a", "lora_split", "fixed_gates"])
def test_compiled_layer_fullgraph_forward_backward_matches_eager(tiny_llama, variant):
    torch._dynamo.reset()
    model = _model(tiny_llama, **VARIANTS[variant]).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    params = [p for p in layer.parameters() if p.requires_grad]

    def loss_of(fn):
        for p in params:
            p.grad = None
        y = fn(x)
        y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in params]

    y_ref, g_ref = loss_of(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, g = loss_of(compiled)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_compiled_model_trains(tiny_llama, input_ids):
    torch._dynamo.reset()
    model = _model(tiny_llama, router_aux_loss_coef=0.01).train()
    eager_loss = model(input_ids=input_ids, labels=input_ids).loss.detach()  # with the balance term (grad on)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(4):
        out = compiled(input_ids=input_ids, labels=input_ids)
        loss = out.loss  # the balance loss joined inside the (compiled) forward
        if step == 0:
            torch.testing.assert_close(loss.detach(), eager_loss)
            assert model.base_model.last_aux_loss > 0
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", ["dense", "top_k", "fixed_gates"])
def test_generate_with_kv_cache_matches_no_cache(tiny_llama, input_ids, variant):
    model = _model(tiny_llama, **VARIANTS[variant]).eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=input_ids, use_cache=False, **kwargs)
        base = tiny_llama().generate(input_ids=input_ids, **kwargs)
    assert cached.shape == (2, input_ids.shape[1] + 6)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter changes what is generated


def test_compiled_router_stats_equal_eager(tiny_llama, input_ids):
    # statistics collection under torch.compile: device-side accumulators mutated in the graph, no graph break
    torch._dynamo.reset()
    model = _model(tiny_llama, top_k=2).eval()
    tuner = model.base_model
    with torch.no_grad(), tuner.collect_router_stats():
        model(input_ids=input_ids)
        model(input_ids=input_ids[:1])
        eager = tuner.router_stats()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), tuner.collect_router_stats():
        compiled(input_ids=input_ids)
        compiled(input_ids=input_ids[:1])
        got = tuner.router_stats()
    assert got["layers"].keys() == eager["layers"].keys() and len(got["layers"]) == 2 * 3
    for name, s in eager["layers"].items():
        assert got["layers"][name]["tokens"] == s["tokens"] == 3 * input_ids.shape[1]
        assert got["layers"][name]["mean_gate"] == pytest.approx(s["mean_gate"], abs=1e-6)
        assert got["layers"][name]["entropy"] == pytest.approx(s["entropy"], abs=1e-6)
