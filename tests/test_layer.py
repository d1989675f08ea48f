"""The HydraLoRA layer (src/peft_hydra/layer.py) on single nn.Linear / GPT-2 Conv1D modules."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_hydra import HydraLoraConfig, HydraLoraLayer
from peft_hydra import functional as HF
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


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_layer_forward_is_base_plus_functional_delta(conv1d):
    with pytest.warns(UserWarning, match="fan_in_fan_out") if conv1d else nullcontext():
        _, layer = wrap(conv1d, r=3, num_experts=3, top_k=2, router_temperature=0.5)
    assert layer.fan_in_fan_out is conv1d
    x = torch.randn(2, 5, 10)
    want = layer.get_base_layer()(x) + HF.hydra_delta(
        x, layer.hydra_A["default"].weight, layer.hydra_B["default"], layer.scaling["default"],
        router_weight=layer.hydra_router["default"].weight, top_k=2, temperature=0.5,
    )[0]  # fmt: skip
    torch.testing.assert_close(layer(x), want)


def test_forward_reads_adapter_weights_that_are_not_plain_parameters():
    """The forward reads A, the router and B from ``_parameters`` (fast); a weight that is not a registered parameter
    there (a parametrization here; FSDP's flat-parameter views alike) must still be the one used, not skipped."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    _, layer = wrap(r=3, num_experts=3)
    x = torch.randn(2, 5, 10)
    A = layer.hydra_A["default"].weight.detach().clone()
    W = layer.hydra_router["default"].weight.detach().clone()
    B = layer.hydra_B["default"].detach().clone()
    parametrize.register_parametrization(layer.hydra_A["default"], "weight", Double())
    parametrize.register_parametrization(layer.hydra_router["default"], "weight", Double())
    assert "weight" not in layer.hydra_A["default"]._parameters
    want = layer.get_base_layer()(x) + HF.hydra_delta(x, 2 * A, B, layer.scaling["default"], router_weight=2 * W)[0]
    torch.testing.assert_close(layer(x), want)
    # B lives in a ParameterDict: replaced by a plain tensor attribute, the forward must read that one
    del layer.hydra_B._parameters["default"]
    object.__setattr__(layer.hydra_B, "default", 3 * B)
    want = layer.get_base_layer()(x) + HF.hydra_delta(x, 2 * A, 3 * B, layer.scaling["default"], router_weight=2 * W)[0]
    torch.testing.assert_close(layer(x), want)


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
    assert len(layer.hydra_router) == 0 and len(layer.hydra_gates) == 0
    x = torch.randn(3, 10)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_fixed_gates_buffer_is_not_saved_or_trained():
    model, layer = wrap(r=2, num_experts=3, fixed_gates=[1, 2, 3])
    torch.testing.assert_close(layer.hydra_gates["default"], torch.tensor([1.0, 2.0, 3.0]))
    assert not any("hydra_gates" in k for k in model.state_dict())
    assert not any("hydra_gates" in n for n, _ in model.named_parameters())


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
    # the per-head path is the functional one with the layer's own dropout (one (T, N, in) mask draw)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    want = layer.get_base_layer()(x) + HF.hydra_delta(
        x, layer.hydra_A["default"].weight, layer.hydra_B["default"], layer.scaling["default"],
        router_weight=layer.hydra_router["default"].weight, dropout=layer.hydra_dropout["default"],
        dropout_per_head=True,
    )[0]  # fmt: skip
    torch.testing.assert_close(got, want)


def test_router_input_a_router_shape():
    _, layer = wrap(r=3, num_experts=4, router_input="a", share_a=False)
    assert layer.hydra_router["default"].weight.shape == (4, 12)  # N x (N*r)
    assert layer.hydra_A["default"].weight.shape == (12, 10)
    assert layer.hydra_B["default"].shape == (12, 4, 3)
    assert layer(torch.randn(2, 10)).shape == (2, 12)


def test_bf16_adapter_without_autocast():
    model = TwoLayer().to(torch.bfloat16)
    config = HydraLoraConfig(target_modules=["proj"], r=2, num_experts=3, init_weights=False, router_aux_loss_coef=0.1)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    assert layer.hydra_B["default"].dtype == torch.bfloat16
    out = layer(torch.randn(2, 10, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert layer._router_out["default"][1].dtype == torch.float32  # gates in fp32


def test_router_stats_and_outputs_per_layer():
    _, layer = wrap(r=2, num_experts=3, router_aux_loss_coef=0.1)
    assert layer.router_stats("default") is None and layer.aux_loss("default") is None
    layer(torch.randn(4, 10))
    assert layer.router_stats("default") is None  # collection is off by default
    assert layer.aux_loss("default").item() >= 1.0 - 1e-6  # kept: router_aux_loss_coef > 0
    layer.reset_router_stats()  # clears and switches collection on
    x1, x2 = torch.randn(4, 10), torch.randn(2, 3, 10)
    layer(x1)
    layer(x2)
    stats = layer.router_stats("default")
    assert stats["tokens"] == 10 and sum(stats["mean_gate"]) == pytest.approx(1.0)
    # the device-side sums equal the plain per-token statistics
    with torch.no_grad():
        probs = torch.cat([HF.router_probs(x, layer.hydra_router["default"].weight).reshape(-1, 3) for x in (x1, x2)])
    torch.testing.assert_close(torch.tensor(stats["mean_gate"]), probs.mean(0), rtol=1e-5, atol=1e-6)
    assert stats["entropy"] == pytest.approx(float(HF.gate_entropy(probs).mean()), rel=1e-5)
    layer.stop_router_stats()
    layer(x1)
    assert layer.router_stats("default")["tokens"] == 10  # stopped: kept, not counted
    layer.reset_router_stats()
    layer.clear_router_outputs()
    assert layer.router_stats("default") is None and layer.aux_loss("default") is None


def test_router_outputs_are_not_kept_without_balance_loss():
    _, layer = wrap(r=2, num_experts=3, top_k=2)
    layer(torch.randn(4, 10))
    assert layer._router_out == {} and layer._router_acc == {} and layer.aux_loss("default") is None


def test_stats_off_forward_runs_no_statistics_ops():
    # the cost of "nothing asked": a forward with collection off and no balance loss runs no entropy/cat/sum ops
    from torch.profiler import ProfilerActivity, profile

    _, layer = wrap(r=2, num_experts=3)
    x = torch.randn(4, 10)

    def ops():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x)
        return [e.name for e in prof.events() if e.name.startswith("aten::")]

    off = ops()
    layer.reset_router_stats()
    on = ops()
    assert not any(name in off for name in ("aten::special_entr", "aten::cat", "aten::sum"))
    assert "aten::special_entr" in on and len(on) > len(off)


def test_update_layer_rejects_bad_rank():
    _, layer = wrap(r=2, num_experts=2)
    with pytest.raises(ValueError, match="`r` must be a positive integer"):
        layer.update_layer("other", 0, 1.0, HydraLoraConfig(r=2))


def test_repr():
    _, layer = wrap(r=2, num_experts=2)
    assert repr(layer).startswith("hydralora.Linear(")
