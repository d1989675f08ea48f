"""Evaluation and generation run the layer's one forward: without autograd (``no_grad``, ``inference_mode``,
``generate()``) the outputs are those of the same forward with autograd on."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_hydra import HydraLoraConfig

from conftest import make_tiny_llama

VARIANTS = {
    "dense": {},
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top1_temperature": dict(top_k=1, router_temperature=0.5),
    "router_on_a": dict(router_input="a"),
    "per_head_a": dict(share_a=False),
    "fixed_gates": dict(fixed_gates=[0.5, 0.3, 0.2]),
    "n1": dict(num_experts=1),
    "dropout": dict(lora_dropout=0.3),
}


class One(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 24)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 70])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_without_autograd_equals_the_forward_with_it(variant, tokens, dtype):
    config = {**dict(r=4, lora_alpha=8, num_experts=3, target_modules=["lin"], init_weights=False), **VARIANTS[variant]}
    torch.manual_seed(1)
    model = get_peft_model(One().to(dtype), HydraLoraConfig(**config), autocast_adapter_dtype=False).eval()
    x = torch.randn(2, tokens, 16, dtype=dtype)
    with torch.enable_grad():
        want = model(x).detach()
    assert not torch.allclose(want, model.base_model.model.lin.base_layer(x).detach())  # the adapter acts
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [None, 1])
def test_generate_equals_greedy_decoding_with_full_forwards(top_k, input_ids):
    config = HydraLoraConfig(r=4, num_experts=3, init_weights=False, top_k=top_k,
                             target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    model = get_peft_model(make_tiny_llama(), config).eval()
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ids = input_ids
    with torch.enable_grad():  # full forwards, no KV cache, autograd on
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
