"""HydraLoRA as a PEFT tuner on a tiny Llama (nn.Linear) and a tiny GPT-2 (Conv1D, fan_in_fan_out)."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft_hydra import LLAMA_LIKE_TARGET_MODULES, HydraLoraConfig, HydraLoraLayer

# in/out features of the seven Llama linears in conftest.make_tiny_llama (hidden 32, intermediate 48, kv dim 16)
LLAMA_SHAPES = {
    "q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
    "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32),
}  # fmt: skip
N_LAYERS = 2


def hydra(**kw):
    kw.setdefault("target_modules", LLAMA_LIKE_TARGET_MODULES)
    return HydraLoraConfig(**kw)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def hydra_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, HydraLoraLayer)}


def router_weight(layer, adapter="default"):
    """The router's (N, d) weight: the last N rows of hydra_A with the router on x, the router's own with 'a'."""
    router = layer.hydra_router[adapter]
    return router.weight if router.weight is not None else layer.hydra_A[adapter].weight[layer._a_rows(adapter) :]


def router_grad(layer, adapter="default"):
    router = layer.hydra_router[adapter]
    if router.weight is not None:
        return router.weight.grad
    return layer.hydra_A[adapter].weight.grad[layer._a_rows(adapter) :]


def expected_trainable(r, n, router=True, share_a=True, router_input="x"):
    total = 0
    for d_in, d_out in LLAMA_SHAPES.values():
        a_rows = r if share_a else n * r
        total += a_rows * d_in + d_out * n * r
        if router and n > 1:
            total += n * (d_in if router_input == "x" else a_rows)
    return total * N_LAYERS


# ------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize(
    "kw",
    [dict(r=4, num_experts=3), dict(r=2, num_experts=4, share_a=False), dict(r=4, num_experts=2, router_input="a")],
    ids=["shared", "split", "router_a"],
)
def test_trainable_parameters_have_prefix_and_are_counted(tiny_llama, capsys, kw):
    model = get_peft_model(tiny_llama(), hydra(**kw))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hydra_" in n for n in trainable)
    routers = [n for n in trainable if ".hydra_router." in n]  # a router on x is the last N rows of hydra_A
    assert len(routers) == (7 * N_LAYERS if kw.get("router_input") == "a" else 0)
    assert len(trainable) == 7 * N_LAYERS * (3 if kw.get("router_input") == "a" else 2)  # LoRA's two tensors on x
    expected = expected_trainable(kw["r"], kw["num_experts"], share_a=kw.get("share_a", True),
                                  router_input=kw.get("router_input", "x"))  # fmt: skip
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == expected == sum(p.numel() for p in trainable.values())
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
    # nothing of the base model is trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if "hydra_" not in n)


def test_n1_has_no_router_and_lora_parameter_count(tiny_llama):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=1))
    assert not any("hydra_router" in n for n, _ in model.named_parameters())
    assert all(len(m.hydra_router) == 0 for m in hydra_layers(model).values())
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_LIKE_TARGET_MODULES))
    assert model.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(4, 1)


def test_fixed_gates_have_no_router(tiny_llama):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, fixed_gates="uniform"))
    assert not any("hydra_router" in n for n, _ in model.named_parameters())
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(4, 3, router=False)


# ------------------------------------------------------------------------------------ N = 1 equals LoRA
def copy_into_lora(hydra_model, lora_model):
    lora_modules = dict(lora_model.named_modules())
    for name, layer in hydra_layers(hydra_model).items():
        lora_layer = lora_modules[name]
        with torch.no_grad():
            lora_layer.lora_A["default"].weight.copy_(layer.hydra_A["default"].weight)
            lora_layer.lora_B["default"].weight.copy_(layer.hydra_B["default"].weight)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_n1_equals_peft_lora(tiny_llama, tiny_gpt2, input_ids, arch, use_rslora):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    targets = LLAMA_LIKE_TARGET_MODULES if arch == "llama" else ["c_attn", "c_proj", "c_fc"]
    common = dict(r=4, lora_alpha=12, use_rslora=use_rslora, target_modules=targets)
    with pytest.warns(UserWarning, match="fan_in_fan_out") if arch == "gpt2" else nullcontext():
        model = get_peft_model(make(), HydraLoraConfig(num_experts=1, init_weights=False, **common))
    lora = get_peft_model(make(), LoraConfig(fan_in_fan_out=arch == "gpt2", **common))
    copy_into_lora(model, lora)
    base = logits(make(), input_ids)
    out = logits(model, input_ids)
    assert not torch.allclose(out, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out, logits(lora, input_ids), rtol=1e-5, atol=1e-5)
    layer = next(iter(hydra_layers(model).values()))
    assert layer.scaling["default"] == pytest.approx(12 / (math.sqrt(4) if use_rslora else 4))


# ----------------------------------------------------------------------------------------------- training
def test_gradients_reach_a_every_head_and_router(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, layer in hydra_layers(model).items():
        assert layer.hydra_A["default"].weight.grad.abs().sum() > 0, name
        gB = layer.hydra_B["default"].weight.grad
        assert all(gB[:, 4 * i : 4 * (i + 1)].abs().sum() > 0 for i in range(3)), name
        assert router_grad(layer).abs().sum() > 0, name


def test_gradients_after_a_step_from_zero_b(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3))  # B = 0
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    layer = hydra_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.hydra_A["default"].weight.grad.abs().sum() == 0  # as LoRA's A (and the router rows) on step 1
    assert layer.hydra_B["default"].weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert layer.hydra_A["default"].weight.grad[:4].abs().sum() > 0
    assert router_grad(layer).abs().sum() > 0


def test_init_weights_true_is_identity(tiny_llama, input_ids):
    base = logits(tiny_llama(), input_ids)
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3))
    assert torch.equal(logits(model, input_ids), base)


def test_disable_adapter_gives_base_outputs(tiny_llama, input_ids):
    base = logits(tiny_llama(), input_ids)
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    assert not torch.allclose(logits(model, input_ids), base, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base)
    assert not torch.allclose(logits(model, input_ids), base, atol=1e-3)


def test_two_adapters_add_set_delete(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    torch.manual_seed(1)
    model.add_adapter("two", hydra(r=2, num_experts=2, init_weights=False))
    out_default = logits(model, input_ids)
    model.set_adapter("two")
    assert model.active_adapter == "two"
    out_two = logits(model, input_ids)
    assert not torch.allclose(out_default, out_two, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".two" in n for n in trainable)
    layer = next(iter(hydra_layers(model).values()))
    assert layer.hydra_B["default"].weight.shape[1] == 3 * 4 and layer.hydra_B["two"].weight.shape[1] == 2 * 2
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), out_default)
    model.delete_adapter("two")
    assert "two" not in model.peft_config
    assert not any(".two" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, input_ids), out_default)


def test_mixed_batch_adapter_names(tiny_llama, input_ids):
    base = logits(tiny_llama(), input_ids)
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    model.add_adapter("one", hydra(r=2, num_experts=1, init_weights=False))
    model.eval()
    ids = torch.cat([input_ids, input_ids[:1]])
    mixed = logits(model, ids, adapter_names=["default", "one", "__base__"])
    separate = {}
    for name in ("default", "one"):
        model.set_adapter(name)
        separate[name] = logits(model, ids)
    torch.testing.assert_close(mixed[0], separate["default"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], separate["one"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown adapter"):
        logits(model, ids, adapter_names=["default", "nope", "one"])
    with pytest.raises(ValueError, match="one adapter name"):
        logits(model, ids, adapter_names=["default"])


def test_gradient_checkpointing_trains(tiny_llama, input_ids):
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, hydra(r=4, num_experts=3, init_weights=False))
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(router_grad(layer).abs().sum() > 0 for layer in hydra_layers(model).values())


def test_generate(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, top_k=2))
    model.eval()
    out = model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, input_ids.shape[1] + 4)
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)


def test_bf16_base_fp32_adapter(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), hydra(r=4, num_experts=3, init_weights=False))
    layer = next(iter(hydra_layers(model).values()))
    assert layer.hydra_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype=True (default)
    assert layer.hydra_B["default"].weight.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    out = logits(model, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert router_grad(layer).dtype == torch.float32 and router_grad(layer).abs().sum() > 0


# ----------------------------------------------------------------------------------------------- merging
def test_merge_and_unload_exact_for_n1(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=1, init_weights=False))
    before = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, HydraLoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gates", ["uniform", [0.7, 0.0, 0.3]])
@pytest.mark.parametrize("share_a", [True, False])
def test_merge_and_unload_exact_for_fixed_gates(tiny_llama, input_ids, gates, share_a):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, fixed_gates=gates, share_a=share_a,
                                               init_weights=False))  # fmt: skip
    before = logits(model, input_ids)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), before, rtol=1e-4, atol=1e-5)


def test_merge_with_learned_router_raises(tiny_llama):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    W0 = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match=r"Cannot merge or export HydraLoRA adapter 'default'.*gates="):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="Cannot merge"):
        model.merge_adapter()
    # nothing was half-merged
    assert all(torch.equal(p, W0[n]) for n, p in model.named_parameters() if "base_layer" in n)
    with pytest.raises(ValueError, match="num_experts=3 non-negative numbers"):
        model.merge_and_unload(gates=[0.5, 0.5])


def test_merge_with_given_gates_equals_fixed_gate_model(tiny_llama, input_ids):
    g = [0.2, 0.5, 0.3]
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    fixed = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, fixed_gates=g))
    fixed_layers = hydra_layers(fixed)
    with torch.no_grad():  # same A and B; fixed has no router
        for name, layer in hydra_layers(model).items():
            fixed_layers[name].hydra_A["default"].weight.copy_(layer.hydra_A["default"].weight[:4])
            fixed_layers[name].hydra_B["default"].weight.copy_(layer.hydra_B["default"].weight)
    want = logits(fixed, input_ids)
    assert not torch.allclose(logits(model, input_ids), want, atol=1e-4)  # the router does route differently
    merged = model.merge_and_unload(gates=g)
    torch.testing.assert_close(logits(merged, input_ids), want, rtol=1e-4, atol=1e-5)


def test_merge_then_unmerge_restores_base_weights(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = logits(model, input_ids)
    model.base_model.merge_adapter(gates=[0.3, 0.3, 0.4])
    assert all(m.merged for m in hydra_layers(model).values())
    assert any(not torch.equal(p, W0[n]) for n, p in model.named_parameters() if "base_layer" in n)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- config errors
INVALID = [
    ("r", dict(r=0)),
    ("r", dict(r=1.5)),
    ("num_experts", dict(num_experts=0)),
    ("top_k", dict(num_experts=3, top_k=4)),
    ("top_k", dict(num_experts=3, top_k=0)),
    ("router_input", dict(router_input="h")),
    ("fixed_gates", dict(num_experts=3, fixed_gates=[0.5, 0.5])),
    ("fixed_gates", dict(num_experts=2, fixed_gates=[-0.5, 1.5])),
    ("fixed_gates", dict(fixed_gates="mean")),
    ("fixed_gates", dict(num_experts=3, fixed_gates=[0, 0, 0])),  # an adapter that would do nothing
    ("router_temperature", dict(router_temperature=-1.0)),
    ("router_temperature", dict(router_temperature=0)),
    ("router_aux_loss_coef", dict(router_aux_loss_coef=-0.01)),
    ("router_aux_loss_coef", dict(num_experts=1, router_aux_loss_coef=0.1)),
    ("router_aux_loss_coef", dict(fixed_gates="uniform", router_aux_loss_coef=0.1)),
    ("lora_dropout", dict(lora_dropout=1.0)),
    ("lora_dropout", dict(lora_dropout=-0.1)),
    ("lora_alpha", dict(lora_alpha=float("nan"))),
    ("rank_pattern", dict(rank_pattern={"q_proj": 0})),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": "big"})),
    ("target_parameters", dict(target_parameters=["mlp.experts.weight"])),
    ("layers_pattern", dict(layers_pattern="layers")),
]


@pytest.mark.parametrize("field,kw", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_raises_value_error_naming_the_field(field, kw):
    with pytest.raises(ValueError, match=rf"HydraLoraConfig\.{field}"):
        HydraLoraConfig(**kw)


def test_invalid_value_set_after_construction_is_caught_by_get_peft_model(tiny_llama):
    config = hydra(r=4, num_experts=3)
    config.top_k = 5
    with pytest.raises(ValueError, match="top_k"):
        get_peft_model(tiny_llama(), config)


def test_unsupported_target_module_type(tiny_llama):
    with pytest.raises(TypeError, match=r"cannot adapt module Embedding.*nn\.Linear"):
        get_peft_model(tiny_llama(), HydraLoraConfig(target_modules=["embed_tokens"]))


def test_no_matching_target_modules(tiny_llama):
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(tiny_llama(), HydraLoraConfig(target_modules=["nonexistent_proj"]))


# ------------------------------------------------------------------------------ aux loss / router stats
def lm_loss(out, ids):
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_balance_loss_joins_the_model_loss_in_training(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.1))
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    aux = model.base_model.hydra_aux_loss()
    assert aux.ndim == 0 and aux.item() >= 0.1 * (1 - 1e-6)  # the balance loss is >= 1 (N sum f_i P_i, argmax f)
    torch.testing.assert_close(out.loss, lm_loss(out, input_ids) + aux)
    torch.testing.assert_close(model.base_model.last_aux_loss, aux.detach())
    layers = list(hydra_layers(model).values())
    grads = torch.autograd.grad(aux, [layer.hydra_A["default"].weight for layer in layers], retain_graph=True)
    assert all(g[4:].abs().sum() > 0 for g in grads)  # the router rows
    out.loss.backward()
    # not without labels, not in eval mode, not with the coefficient 0
    assert torch.equal(model(input_ids=input_ids).logits, out.logits)
    model.eval()
    out_eval = model(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_eval.loss, lm_loss(out_eval, input_ids))
    off = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False)).train()
    out = off(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out.loss, lm_loss(out, input_ids))
    assert off.base_model.hydra_aux_loss().item() == 0


def test_balance_loss_with_a_peft_model_without_task_type(tiny_llama, input_ids):
    # PeftModel (task_type=None) calls the wrapped model directly, not the tuner's forward
    config = hydra(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.1)
    assert config.task_type is None
    model = get_peft_model(tiny_llama(), config).train()
    out = model(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out.loss, lm_loss(out, input_ids) + model.base_model.hydra_aux_loss())


def test_balance_loss_share_with_token_normalised_gradient_accumulation(tiny_llama, input_ids):
    # with num_items_in_batch the LM loss is the sum over this micro-batch's tokens / the accumulated batch's tokens:
    # the balance term gets the same share, so that accumulated micro-batches add up to one coefficient
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.1,
                                               task_type="CAUSAL_LM")).train()  # fmt: skip
    tokens = input_ids[:, 1:].numel()
    out = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=torch.tensor(4 * tokens))
    aux = model.base_model.hydra_aux_loss()
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out.loss, lm / (4 * tokens) + aux / 4)


def test_balance_loss_warmup_follows_aux_loss_step(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.1,
                                               router_aux_loss_warmup_steps=10)).train()  # fmt: skip
    with pytest.raises(ValueError, match="aux_loss_step"):
        model(input_ids=input_ids, labels=input_ids)
    model.base_model.aux_loss_step = 5
    out = model(input_ids=input_ids, labels=input_ids)
    full = model.base_model.hydra_aux_loss(step=10)
    torch.testing.assert_close(model.base_model.last_aux_loss, full.detach() / 2)
    torch.testing.assert_close(out.loss, lm_loss(out, input_ids) + full / 2)


def test_router_stats(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, top_k=2))
    tuner = model.base_model
    assert tuner.router_stats()["layers"] == {}
    assert not tuner.router_stats_enabled
    logits(model, input_ids)
    assert tuner.router_stats() == {"layers": {}, "mean_gate": None, "entropy": None}  # off by default
    tuner.reset_router_stats()
    assert tuner.router_stats_enabled
    logits(model, input_ids)
    logits(model, input_ids[:1])
    stats = tuner.router_stats()
    assert len(stats["layers"]) == 7 * N_LAYERS
    for name, s in stats["layers"].items():
        assert len(s["mean_gate"]) == 3
        assert sum(s["mean_gate"]) == pytest.approx(1.0, abs=1e-5)
        assert s["tokens"] == 3 * input_ids.shape[1]
        assert 0 <= s["entropy"] <= math.log(3) + 1e-6
    assert sum(stats["mean_gate"]) == pytest.approx(1.0, abs=1e-5)
    tuner.stop_router_stats()
    logits(model, input_ids)
    assert tuner.router_stats() == stats  # stopped: kept, no more tokens counted
    tuner.reset_router_stats()
    assert tuner.router_stats()["layers"] == {}


def test_collect_router_stats_block_restores_the_previous_state(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    tuner = model.base_model
    with tuner.collect_router_stats():  # from "off"
        logits(model, input_ids)
        inside = tuner.router_stats()
        assert {s["tokens"] for s in inside["layers"].values()} == {input_ids.numel()}
    assert not tuner.router_stats_enabled and tuner.router_stats()["layers"] == {}
    tuner.reset_router_stats()  # from "on" with statistics: the block neither sees nor changes them
    logits(model, input_ids[:1])
    before = tuner.router_stats()
    with tuner.collect_router_stats():
        assert tuner.router_stats()["layers"] == {}
        logits(model, input_ids)
        assert tuner.router_stats() == inside  # same model, same inputs: same statistics
    assert tuner.router_stats_enabled and tuner.router_stats() == before
    logits(model, input_ids[:1])
    assert {s["tokens"] for s in tuner.router_stats()["layers"].values()} == {2 * input_ids.shape[1]}


def test_aux_loss_coefficient_set_after_creation_is_refused(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    model(input_ids=input_ids)
    model.peft_config["default"].router_aux_loss_coef = 0.1
    with pytest.raises(ValueError, match="router_aux_loss_coef .* after the adapter was created"):
        model.base_model.hydra_aux_loss()


@pytest.mark.parametrize("top_k", [None, 2])
def test_batched_aux_loss_equals_mean_of_per_layer_losses(tiny_llama, input_ids, top_k):
    from peft_hydra import functional as HF

    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, top_k=top_k,
                                               router_aux_loss_coef=0.5))  # fmt: skip
    model.train()
    seen = []  # every router's (probs, gates), from hooks of the test's own
    handles = [m.hydra_router["default"].register_forward_hook(
        lambda mod, args, gates: seen.append((mod.probs(args[0], gates), gates))) for m in hydra_layers(model).values()]
    model(input_ids=input_ids)
    for h in handles:
        h.remove()
    want = 0.5 * torch.stack([HF.load_balancing_loss(p.reshape(-1, 3), g.reshape(-1, 3), top_k) for p, g in seen]).mean()
    got = model.base_model.hydra_aux_loss()
    torch.testing.assert_close(got, want)
    weights = [m.hydra_A["default"].weight for m in hydra_layers(model).values()]
    for g1, g2 in zip(torch.autograd.grad(got, weights, retain_graph=True), torch.autograd.grad(want, weights)):
        torch.testing.assert_close(g1, g2)


def test_deepcopy_and_state_dict_roundtrip(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, input_ids), logits(model, input_ids))


def checkpointed(make, use_reentrant):
    base = make()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return base


@pytest.mark.parametrize("top_k", [None, 2])
def test_balance_loss_counted_once_with_gradient_checkpointing(tiny_llama, input_ids, top_k):
    # the recompute inside backward() runs the routers again: the balance loss and its gradient must be those of the
    # forward, exactly as without checkpointing (and the recompute must save what the forward saved: top-k's probs)
    config = dict(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.5, top_k=top_k)
    grads = {}
    for ckpt in (False, True):
        base = checkpointed(tiny_llama, False) if ckpt else tiny_llama()
        model = get_peft_model(base, hydra(**config)).train()
        torch.manual_seed(0)
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.testing.assert_close(out.loss, lm_loss(out, input_ids) + model.base_model.hydra_aux_loss())
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)


def test_a_balance_loss_nobody_uses_is_warned_about_once(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, router_aux_loss_coef=0.1, init_weights=False)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(2):  # a loop that adds the term itself: fine
            out = model(input_ids=input_ids)
            (lm_loss(out, input_ids) + model.base_model.hydra_aux_loss()).backward()
    with pytest.warns(UserWarning, match="balance loss .* was not used") as caught:
        for _ in range(3):  # a loop that forgets it
            lm_loss(model(input_ids=input_ids), input_ids).backward()
    assert sum("was not used" in str(w.message) for w in caught) == 1


def test_reentrant_gradient_checkpointing_warns_once_that_the_balance_loss_has_no_gradient(tiny_llama, input_ids):
    model = get_peft_model(checkpointed(tiny_llama, True), hydra(r=4, num_experts=3, router_aux_loss_coef=0.1,
                                                                 init_weights=False)).train()  # fmt: skip
    with pytest.warns(UserWarning, match=r"use_reentrant.*False") as caught:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert sum("balance loss" in str(w.message) for w in caught) == 1
    plain = get_peft_model(checkpointed(tiny_llama, True), hydra(r=4, num_experts=3, init_weights=False)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no balance loss: nothing to warn about
        plain(input_ids=input_ids, labels=input_ids)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_router_stats_count_each_token_once_with_gradient_checkpointing(tiny_llama, input_ids, use_reentrant):
    # checkpointing recomputes every forward inside backward(); the statistics must not count those tokens twice
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model = get_peft_model(base, hydra(r=4, num_experts=3, init_weights=False))
    model.train()
    model.base_model.reset_router_stats()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    layers = model.base_model.router_stats()["layers"]
    assert layers and {s["tokens"] for s in layers.values()} == {input_ids.numel()}


def test_router_outputs_of_an_unknown_adapter_raise(tiny_llama, input_ids):
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3))
    model(input_ids=input_ids)
    for call in (model.base_model.router_stats, model.base_model.hydra_aux_loss):
        with pytest.raises(ValueError, match=r"Unknown adapter 'typo'.*default"):
            call("typo")


def test_parts_of_the_model_run_directly_need_the_observation_window(tiny_llama, input_ids):
    # e.g. a harness that runs the decoder (or single decoder layers) itself, not the model's forward
    model = get_peft_model(tiny_llama(), hydra(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.5)).train()
    decoder = model.base_model.model.model
    decoder(input_ids=input_ids)
    with pytest.raises(ValueError, match="observation_window"):
        model.base_model.hydra_aux_loss()
    with model.base_model.observation_window():
        decoder(input_ids=input_ids)
    aux = model.base_model.hydra_aux_loss()
    assert aux.item() >= 0.5 * (1 - 1e-6) and aux.requires_grad
    model.base_model.reset_router_stats()
    with torch.no_grad(), model.base_model.observation_window():
        decoder(input_ids=input_ids)
    assert {s["tokens"] for s in model.base_model.router_stats()["layers"].values()} == {input_ids.numel()}
