"""The HydraLoRA layer (src/peft_hydra/layer.py) on single nn.Linear / GPT-2 Conv1D modules."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_hydra import HydraLoraConfig, HydraLoraLayer
from peft_hydra.layer import Linear


class TwoLayer(nn.Module):
    def __init__(self, conv1d: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = Conv1D(12, 10) if conv1d else nn.Linear(10, 12)  # Conv1D(nf=out, nx=in), weight (in, out)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


def wrap(conv1d=False, **kw):
    kw.setdefault("target_modules", ["proj"])
    kw.setdefault("init_weights", False)
    model = get_peft_model(TwoLayer(conv1d), HydraLoraConfig(**kw))
    layer = model.base_model.model.proj
    assert isinstance(layer, Linear) and isinstance(layer, HydraLoraLayer)
    return model, layer


def reference_delta(layer, x, adapter="default", masks=None):
    """``scaling * sum_i g_i B_i A_i x_i`` with an explicit loop over the heads, from the layer's weights (not through
    functional.py); ``masks`` (T, N, in): head i sees ``x * masks[:, i]`` (per-head dropout), the router sees x."""
    n, r, rows = layer.num_experts[adapter], layer.r[adapter], layer._a_rows(adapter)
    W, B = layer.hydra_A[adapter].weight, layer.hydra_B[adapter].weight
    A = W[:rows]
    x2 = x.reshape(-1, x.shape[-1])
    router = layer.hydra_router[adapter] if adapter in layer.hydra_router else None
    if router is None:
        gates = torch.ones(len(x2), 1)
    elif not router.learned:
        gates = router.fixed_gates.expand(len(x2), n)
    else:
        logits = x2 @ W[rows:].T if router.weight is None else (x2 @ A.T) @ router.weight.T
        probs = torch.softmax(logits / router.temperature, -1)
        if router.top_k is not None:
            kept = torch.zeros_like(probs).scatter(-1, probs.topk(router.top_k, -1).indices, 1.0)
            probs = probs * kept / (probs * kept).sum(-1, keepdim=True)
        gates = probs
    out = 0
    for i in range(n):
        A_i = A if rows == r else A[i * r : (i + 1) * r]
        x_i = x2 if masks is None else x2 * masks[:, i]
        out = out + gates[:, i : i + 1] * (x_i @ A_i.T) @ B[:, i * r : (i + 1) * r].T
    return layer.scaling[adapter] * out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kw", [dict(top_k=2, router_temperature=0.5), dict(share_a=False), dict(router_input="a"),
                                dict(fixed_gates=[0.2, 0.3, 0.5]), dict(num_experts=1)],
                         ids=["top2", "split", "router_a", "fixed", "n1"])  # fmt: skip
def test_layer_forward_is_base_plus_the_sum_over_heads(conv1d, kw):
    kw = {"r": 3, "num_experts": 3, **kw}
    with pytest.warns(UserWarning, match="fan_in_fan_out") if conv1d else nullcontext():
        _, layer = wrap(conv1d, **kw)
    assert layer.fan_in_fan_out is conv1d
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + reference_delta(layer, x))


def test_adapter_weights_are_used_by_calling_their_modules():
    """A (with the router's rows) and B are read through their modules' forward, so that whatever the module
    computes its weight from (a parametrization here; ZeRO-3 / FSDP gathering alike) is the one used."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    _, layer = wrap(r=3, num_experts=3)
    x = torch.randn(2, 5, 10)
    before = reference_delta(layer, x)
    parametrize.register_parametrization(layer.hydra_A["default"], "weight", Double())
    parametrize.register_parametrization(layer.hydra_B["default"], "weight", Double())
    assert "weight" not in layer.hydra_A["default"]._parameters
    want = layer.get_base_layer()(x) + reference_delta(layer, x)
    assert not torch.allclose(want, layer.get_base_layer()(x) + before)
    torch.testing.assert_close(layer(x), want)


def test_base_layer_sees_x_as_the_model_gives_it():
    _, layer = wrap(r=3, num_experts=3)
    seen = []
    layer.get_base_layer().register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(2, 5, 10)
    layer(x)
    assert seen[0] is x


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("share_a", [True, False])
def test_delta_weight_layout_and_merge_unmerge(conv1d, share_a):
    _, layer = wrap(conv1d, r=3, num_experts=3, fixed_gates=[0.5, 0.25, 0.25], share_a=share_a)
    base = layer.get_base_layer()
    W0 = base.weight.detach().clone()
    x = torch.randn(4, 10)
    before = layer(x)
    delta = layer.get_delta_weight("default")
    assert delta.shape == W0.shape  # (in, out) for Conv1D, (out, in) for Linear
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)  # merged: base layer only
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before)


def test_merge_with_gates_then_unmerge_uses_the_same_gates():
    _, layer = wrap(r=2, num_experts=3)
    W0 = layer.get_base_layer().weight.detach().clone()
    layer.merge(gates=torch.tensor([0.1, 0.6, 0.3]))
    assert not torch.allclose(layer.get_base_layer().weight, W0)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, W0, rtol=0, atol=1e-6)


def test_learned_router_refuses_merge_and_bad_gates():
    _, layer = wrap(r=2, num_experts=3)
    with pytest.raises(ValueError, match="Cannot merge or export HydraLoRA adapter 'default'"):
        layer.merge()
    with pytest.raises(ValueError, match="num_experts=3 non-negative numbers"):
        layer.merge(gates=[1.0, float("nan"), 0.0])
    assert not layer.merged


def test_merged_layer_refuses_mixed_batch():
    _, layer = wrap(r=2, num_experts=2, fixed_gates="uniform")
    layer.merge()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        layer(torch.randn(2, 10), adapter_names=["default", "__base__"])


def test_n1_layer_has_no_router_and_merges_exactly():
    _, layer = wrap(r=2, num_experts=1)
    assert len(layer.hydra_router) == 0
    x = torch.randn(3, 10)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_fixed_gates_buffer_is_not_saved_or_trained():
    model, layer = wrap(r=2, num_experts=3, fixed_gates=[1, 2, 3])
    torch.testing.assert_close(layer.hydra_router["default"].fixed_gates, torch.tensor([1.0, 2.0, 3.0]))
    assert not any("hydra_router" in k for k in model.state_dict())
    assert not any("hydra_router" in n for n, _ in model.named_parameters())


def test_dropout_only_in_training():
    model, layer = wrap(r=2, num_experts=2, lora_dropout=0.5)
    x = torch.randn(64, 10)
    model.eval()
    torch.testing.assert_close(layer(x), layer(x))
    model.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x))


@pytest.mark.parametrize("share_a", [True, False])
def test_dropout_per_head_layer(share_a):
    model, layer = wrap(r=2, num_experts=3, lora_dropout=0.5, dropout_per_head=True, share_a=share_a)
    _, shared = wrap(r=2, num_experts=3, lora_dropout=0.5, share_a=share_a)  # same seed: same weights
    x = torch.randn(6, 10)
    model.eval()
    shared.eval()
    torch.testing.assert_close(layer(x), shared(x))  # eval: no dropout, the same function
    model.train()
    shared.train()
    torch.manual_seed(0)
    per_head_out = layer(x)
    torch.manual_seed(0)
    assert not torch.allclose(per_head_out, shared(x))  # N masks drawn, not one
    # head i on x times its own mask, the router on x as given
    masks = (torch.rand(6, 3, 10) > 0.5).float() * 2

    class FixedMasks(nn.Dropout):
        def forward(self, x):  # x (T, N, in): one mask per head
            assert x.shape == masks.shape
            return x * masks

    layer.hydra_dropout["default"] = FixedMasks(0.5)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + reference_delta(layer, x, masks=masks))


def test_router_input_a_router_shape():
    _, layer = wrap(r=3, num_experts=4, router_input="a", share_a=False)
    assert layer.hydra_router["default"].weight.shape == (4, 12)  # N x (N*r)
    assert layer.hydra_A["default"].weight.shape == (12, 10)
    assert layer.hydra_B["default"].weight.shape == (12, 4 * 3)
    assert layer(torch.randn(2, 10)).shape == (2, 12)


def test_layout_with_the_router_on_x():
    _, layer = wrap(r=3, num_experts=4)
    assert layer.hydra_A["default"].weight.shape == (3 + 4, 10)  # A's rows, then the router's
    assert layer.hydra_router["default"].weight is None and not list(layer.hydra_router.parameters())
    assert layer.hydra_B["default"].weight.shape == (12, 4 * 3)


def test_bf16_adapter_without_autocast():
    model = TwoLayer().to(torch.bfloat16)
    config = HydraLoraConfig(target_modules=["proj"], r=2, num_experts=3, init_weights=False, router_aux_loss_coef=0.1)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    assert layer.hydra_B["default"].weight.dtype == torch.bfloat16
    model.base_model.enable_router_logging()
    out = model(torch.randn(2, 10, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert model.base_model.get_router_log()[0]["proj"].dtype == torch.float32  # gates in fp32


def test_repr():
    _, layer = wrap(r=2, num_experts=2)
    assert repr(layer).startswith("hydralora.Linear(")
