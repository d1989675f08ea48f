"""The inference path of the HydraLoRA layer (forwards without autograd: ``generate()``, evaluation): its values equal
the training path's, and its cache of prepared weights never goes stale."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_hydra import HydraLoraConfig
from peft_hydra import functional as HF
from peft_hydra.layer import HydraLoraLayer

from conftest import make_tiny_llama

VARIANTS = {
    "dense": {},
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top1_temperature": dict(top_k=1, router_temperature=0.5),
    "router_on_a": dict(router_input="a"),
    "per_head_a": dict(share_a=False),
    "per_head_a_top1": dict(share_a=False, top_k=1),
    "fixed_gates": dict(fixed_gates=[0.5, 0.3, 0.2]),
    "n1": dict(num_experts=1),
    "dropout": dict(lora_dropout=0.3),
}


class One(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 24, bias=bias)

    def forward(self, x):
        return self.lin(x)


def wrap(dtype=torch.float32, **kw):
    config = dict(r=4, lora_alpha=8, num_experts=3, target_modules=["lin"], init_weights=False)
    config.update(kw)
    torch.manual_seed(1)
    model = get_peft_model(One().to(dtype), HydraLoraConfig(**config), autocast_adapter_dtype=False).eval()
    return model, model.base_model.model.lin


def training_path(model, x):
    """The same forward with autograd on: the training path (and the inference cache dropped)."""
    with torch.enable_grad():
        return model(x).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 5, HF.TOP1_GATHER_MAX_TOKENS + 6])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_path_equals_training_path(variant, tokens, dtype):
    model, layer = wrap(dtype, **VARIANTS[variant])
    x = torch.randn(2, tokens, 16, dtype=dtype)
    with torch.no_grad():
        fast = model(x)
    assert "default" in layer._inference_cache  # the inference path ran (dropout is inactive in eval mode)
    slow = training_path(model, x)
    assert not layer._inference_cache  # a forward with autograd on drops the prepared weights
    # bf16: addmm rounds base + update once, the training path twice (1 ulp)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, slow, **tol)


def test_adapter_in_fp32_on_a_bf16_base_layer():
    """PEFT's default for a bf16 model: adapter weights in fp32. The update is cast and added as in training."""
    torch.manual_seed(1)
    model = get_peft_model(One().to(torch.bfloat16), HydraLoraConfig(r=4, num_experts=3, target_modules=["lin"],
                                                                     init_weights=False)).eval()  # fmt: skip
    layer = model.base_model.model.lin
    assert layer.hydra_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = model(x)
    assert "default" in layer._inference_cache
    torch.testing.assert_close(fast, training_path(model, x), rtol=0, atol=0)


def test_active_dropout_takes_the_training_path():
    model, layer = wrap(lora_dropout=0.5)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 16))
    assert not layer._inference_cache


def test_inference_path_can_be_switched_off():
    model, layer = wrap()
    layer.inference_path = False
    with torch.no_grad():
        model(torch.randn(4, 16))
    assert not layer._inference_cache


def _check_fresh(model, layer, x):
    """A no-grad forward (the inference path, from the cache) equals the training path on the current weights."""
    with torch.no_grad():
        fast = model(x)
    assert "default" in layer._inference_cache
    torch.testing.assert_close(fast, training_path(model, x))


def _prime(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("variant", ["dense", "fixed_gates", "n1"])
def test_cache_follows_in_place_optimizer_updates(variant):
    model, layer = wrap(**VARIANTS[variant])
    x = torch.randn(4, 16)
    before = _prime(model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients from elsewhere: no forward between the cached one and the update
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(params, lr=0.1).step()
    assert "default" in layer._inference_cache  # not dropped: the weights' _version tells it is stale
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, training_path(model, x))


def test_cache_follows_load_state_dict_and_replaced_data():
    model, layer = wrap()
    other, _ = wrap()
    x = torch.randn(4, 16)
    _prime(model, x)
    state = {k: v * 3 for k, v in other.state_dict().items() if "hydra_" in k}
    model.load_state_dict(state, strict=False)  # in place (copy_): _version
    _check_fresh(model, layer, x)
    _prime(model, x)
    layer.hydra_router["default"].weight.data = layer.hydra_router["default"].weight.data * -2  # another storage
    _check_fresh(model, layer, x)
    _prime(model, x)
    layer.hydra_B["default"].data = layer.hydra_B["default"].data.flip(1).contiguous()
    _check_fresh(model, layer, x)
    _prime(model, x)
    layer.hydra_A["default"].weight = nn.Parameter(torch.randn_like(layer.hydra_A["default"].weight))  # another tensor
    _check_fresh(model, layer, x)
    _prime(model, x)
    model.to(torch.float64)
    _check_fresh(model, layer, x.double())


def test_fixed_gates_changed_in_place():
    model, layer = wrap(**VARIANTS["fixed_gates"])
    x = torch.randn(4, 16)
    _prime(model, x)
    layer.hydra_gates["default"].copy_(torch.tensor([0.1, 0.1, 0.8]))
    _check_fresh(model, layer, x)


def test_merge_unmerge_delete_adapter():
    model, layer = wrap(fixed_gates="uniform")
    x = torch.randn(4, 16)
    want = _prime(model, x)
    model.merge_adapter()
    torch.testing.assert_close(_prime(model, x), want, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(_prime(model, x), want, rtol=1e-5, atol=1e-6)
    model.base_model.delete_adapter("default")
    assert "default" not in layer._inference_cache


@pytest.mark.parametrize("variant", ["dense", "top1"])
def test_router_statistics_and_balance_loss_on_the_inference_path(variant):
    model, layer = wrap(router_aux_loss_coef=0.01, **VARIANTS[variant])
    x = torch.randn(6, 16)
    model.base_model.reset_router_stats()
    _prime(model, x)
    assert "default" in layer._inference_cache
    fast_stats, fast_loss = layer.router_stats("default"), layer.aux_loss("default")
    model.base_model.reset_router_stats()
    training_path(model, x)
    stats, loss = layer.router_stats("default"), layer.aux_loss("default")
    assert fast_stats["tokens"] == stats["tokens"] == 6
    torch.testing.assert_close(torch.tensor(fast_stats["mean_gate"]), torch.tensor(stats["mean_gate"]))
    torch.testing.assert_close(fast_stats["entropy"], stats["entropy"])
    torch.testing.assert_close(fast_loss, loss.detach())


@pytest.mark.parametrize("top_k", [None, 1])
def test_generate_is_the_same_with_and_without_the_inference_path(top_k):
    torch.manual_seed(3)
    config = HydraLoraConfig(r=4, num_experts=3, top_k=top_k, init_weights=False,
                             target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])  # fmt: skip
    model = get_peft_model(make_tiny_llama(), config).eval()
    ids = torch.randint(3, 96, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    fast = model.generate(input_ids=ids, **kw)
    layers = [m for m in model.modules() if isinstance(m, HydraLoraLayer)]
    assert all("default" in m._inference_cache for m in layers)
    for m in layers:
        m.inference_path = False
    slow = model.generate(input_ids=ids, **kw)
    assert torch.equal(fast.sequences, slow.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(slow.scores), rtol=1e-4, atol=1e-5)
