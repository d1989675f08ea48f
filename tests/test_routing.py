"""Routers that specialise: the cold-start options of HydraLoraConfig and the routing report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_hydra import HydraLoraConfig
from peft_hydra import functional as HF

from conftest import VOCAB  # noqa: E402

TARGETS = ["q_proj", "up_proj", "down_proj"]


def _config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=3, target_modules=TARGETS)
    kwargs.update(overrides)
    return HydraLoraConfig(**kwargs)


def _ids(n=4, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def _routers(model):
    return [p for n, p in model.named_parameters() if "hydra_router" in n]


def _heads(model):
    return [p for n, p in model.named_parameters() if "hydra_B" in n]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(head_init="random"), "head_init must be one of"),
        (dict(head_init="centered", head_init_std=0.0), "head_init_std must be a finite number > 0"),
        (dict(head_init_std=float("nan")), "head_init_std"),
        (dict(head_init="centered", num_experts=1), "needs num_experts >= 2"),
        (dict(head_init="orthogonal", init_weights=False), "conflicts with init_weights=False"),
        (dict(router_init_std=-0.1), "router_init_std must be None"),
        (dict(router_init_std=True), "router_init_std must be None"),
        (dict(router_init_std=0.01, fixed_gates="uniform"), "no learned router"),
        (dict(router_init_std=0.01, num_experts=1), "no learned router"),
        (dict(router_aux_loss_warmup_steps=-1, router_aux_loss_coef=0.001), "integer >= 0"),
        (dict(router_aux_loss_warmup_steps=1.5, router_aux_loss_coef=0.001), "integer >= 0"),
        (dict(router_aux_loss_warmup_steps=10), "set router_aux_loss_coef > 0"),
    ],
)
def test_cold_start_options_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_defaults_and_paper_preset_keep_the_paper_init():
    for config in (HydraLoraConfig(), HydraLoraConfig.paper_preset()):
        assert config.head_init == "zero"
        assert config.router_init_std is None
        assert config.router_aux_loss_warmup_steps == 0


# -------------------------------------------------------------------------------------- pure init functions
@pytest.mark.parametrize("kind", ["centered", "orthogonal"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_init_heads_sum_to_zero_with_the_stated_scale(kind, n):
    out, r, std = 64, 4, 0.05
    B = HF.init_heads(kind, out, n, r, std, generator=torch.Generator().manual_seed(0))
    assert B.shape == (out, n, r) and B.dtype == torch.float32
    torch.testing.assert_close(B.sum(dim=1), torch.zeros(out, r), atol=1e-6, rtol=0)
    rms = B.pow(2).mean().sqrt().item()
    if kind == "orthogonal":
        assert rms == pytest.approx(std, rel=1e-5)  # exact by construction
    else:
        assert rms == pytest.approx(std, rel=0.15)  # a sample of 64*n*4 normal entries
    assert not torch.allclose(B[:, 0], B[:, 1])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_orthogonal_heads_are_disjoint_and_equiangular(n):
    out, r = 32, 4
    B = HF.orthogonal_heads(out, n, r, 0.1, generator=torch.Generator().manual_seed(1)).double()
    flat = B.permute(1, 0, 2).reshape(n, -1)
    cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    off = cos[~torch.eye(n, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / (n - 1)), atol=1e-6, rtol=0)
    gram = torch.einsum("oir,ojs->ijrs", B, B)  # (N, N, r, r)
    c2 = gram[0, 0].trace() / (r * (1 - 1 / n))  # c^2
    # <B_i, B_j> blocks equal c^2 (delta_ij I - I/N): the Q_i are orthonormal and mutually orthogonal
    for i in range(n):
        for j in range(n):
            want = c2 * ((1.0 if i == j else 0.0) - 1 / n) * torch.eye(r, dtype=B.dtype)
            torch.testing.assert_close(gram[i, j], want, atol=1e-6 * c2.item(), rtol=0)


def test_orthogonal_heads_need_enough_output_features():
    with pytest.raises(ValueError, match="out_features >= num_experts \\* r"):
        HF.orthogonal_heads(8, 3, 4, 0.1)


def test_aux_loss_warmup_coef():
    assert HF.aux_loss_warmup_coef(0.01, None, 0) == 0.01
    assert HF.aux_loss_warmup_coef(0.01, 0, 10) == 0.0
    assert HF.aux_loss_warmup_coef(0.01, 5, 10) == pytest.approx(0.005)
    assert HF.aux_loss_warmup_coef(0.01, 10, 10) == pytest.approx(0.01)
    assert HF.aux_loss_warmup_coef(0.01, 50, 10) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="hydra_aux_loss\\(step="):
        HF.aux_loss_warmup_coef(0.01, None, 10)


# ------------------------------------------------------------------------------------- the cold start
def _step(model, ids, opt=None):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.clone() for p in _routers(model)]
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return grads


def test_zero_heads_deadlock_the_router(tiny_llama):
    """The paper's init: the router's gradient is exactly zero at step 1, and under uniform gates (router at zero)
    the heads stay identical, so the router's gradient stays at rounding level (it is zero in exact arithmetic)
    and the output does not depend on the gates: HydraLoRA trains as one LoRA."""
    model = get_peft_model(tiny_llama(), _config(router_init_std=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = _step(model, _ids(), opt)
    assert all(g.abs().max() == 0 for g in grads)
    for seed in range(1, 4):
        grads = _step(model, _ids(seed=seed), opt)
        assert max(g.abs().max() for g in grads) < 1e-10  # rounding; 1e-6 to 2e-4 with centred heads (next test)
    for B in _heads(model):
        assert B.abs().max() > 0  # the heads did learn ...
        for i in range(1, B.shape[1]):
            torch.testing.assert_close(B[:, i], B[:, 0], rtol=0, atol=0)  # ... the same thing


@pytest.mark.parametrize("head_init", ["centered", "orthogonal"])
def test_nonzero_heads_give_the_router_a_gradient_at_step_1(tiny_llama, head_init):
    model = get_peft_model(tiny_llama(), _config(head_init=head_init, head_init_std=0.01))
    model.train()
    grads = _step(model, _ids())
    assert all(g.abs().max() > 1e-8 for g in grads)


@pytest.mark.parametrize("head_init", ["centered", "orthogonal"])
def test_nonzero_heads_keep_the_initial_output(tiny_llama, head_init):
    ids = _ids()
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=ids).logits
    # uniform gates at the start (router at zero): the centred heads cancel, the model is the base model
    model = get_peft_model(tiny_llama(), _config(head_init=head_init, head_init_std=0.05, router_init_std=0.0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, atol=1e-5, rtol=0)
    # the default router: each layer's update is scaling * sum_i (g_i - 1/N) B_i A x, bounded by
    # scaling * max_i |g_i - 1/N| * sum_i |B_i A x| per token
    model = get_peft_model(tiny_llama(), _config(head_init=head_init, head_init_std=0.05))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        h = layer.hydra_A["default"](x)
        B = layer.hydra_B["default"]
        heads_out = torch.einsum("onr,tr->tno", B, h)  # (T, N, out)
        gates = torch.softmax(layer.hydra_router["default"](x), -1)
        bound = layer.scaling["default"] * (gates - 1 / 3).abs().amax(-1, keepdim=True) * heads_out.abs().sum(1)
    assert delta.abs().max() > 0
    assert (delta.abs() <= bound + 1e-6).all()


def test_orthogonal_init_refuses_a_too_narrow_layer(tiny_llama):
    # k_proj of the tiny Llama has out_features 16 < N * r = 3 * 8
    with pytest.raises(ValueError, match="layer .*k_proj.* out_features=16"):
        get_peft_model(tiny_llama(), _config(r=8, head_init="orthogonal", target_modules=["k_proj"]))


def test_router_init_std(tiny_llama):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), _config(router_init_std=1e-3))
    weights = torch.cat([r.flatten() for r in _routers(model)])
    assert 0 < weights.abs().max() < 1e-2
    assert weights.std().item() == pytest.approx(1e-3, rel=0.2)
    model = get_peft_model(tiny_llama(), _config(router_init_std=0.0))
    assert all(r.abs().max() == 0 for r in _routers(model))


def test_aux_loss_warm_up_ramps_the_coefficient(tiny_llama):
    coef, warm = 0.01, 10
    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=coef, router_aux_loss_warmup_steps=warm))
    model.train()
    model(input_ids=_ids())
    with pytest.raises(ValueError, match="step="):
        model.base_model.hydra_aux_loss()
    full = model.base_model.hydra_aux_loss(step=warm)
    assert full > 0
    assert model.base_model.hydra_aux_loss(step=0).item() == 0
    torch.testing.assert_close(model.base_model.hydra_aux_loss(step=warm // 2), full / 2)
    torch.testing.assert_close(model.base_model.hydra_aux_loss(step=10 * warm), full)
    no_warm = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=coef))
    no_warm.train()
    no_warm(input_ids=_ids())
    torch.testing.assert_close(no_warm.base_model.hydra_aux_loss(), full)  # same init seed, same forward


# ------------------------------------------------------------------------------------------- save / load
def test_cold_start_options_round_trip_and_old_configs_load(tiny_llama, tmp_path):
    config = _config(head_init="orthogonal", head_init_std=0.02, router_init_std=0.005,
                     router_aux_loss_coef=0.001, router_aux_loss_warmup_steps=7)  # fmt: skip
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert (saved["head_init"], saved["head_init_std"], saved["router_init_std"]) == ("orthogonal", 0.02, 0.005)
    assert saved["router_aux_loss_warmup_steps"] == 7
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "new")
    got = loaded.peft_config["default"]
    assert (got.head_init, got.head_init_std, got.router_init_std, got.router_aux_loss_warmup_steps) == (
        "orthogonal", 0.02, 0.005, 7)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)

    # an adapter saved before these options existed: no such keys in adapter_config.json
    for key in ("head_init", "head_init_std", "router_init_std", "router_aux_loss_warmup_steps"):
        del saved[key]
    saved["router_aux_loss_coef"] = 0.0
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(saved))
    (tmp_path / "old" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "new" / "adapter_model.safetensors").read_bytes()
    )
    old = PeftModel.from_pretrained(tiny_llama(), tmp_path / "old")
    got = old.peft_config["default"]
    assert (got.head_init, got.router_init_std, got.router_aux_loss_warmup_steps) == ("zero", None, 0)
    with torch.no_grad():
        torch.testing.assert_close(old(input_ids=ids).logits, want)
