"""Routers that specialise: the cold-start options of HydraLoraConfig and the routing report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig
from peft_hydra import functional as HF

from conftest import VOCAB, IdsDataset  # noqa: E402

TARGETS = ["q_proj", "up_proj", "down_proj"]


def _config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=3, target_modules=TARGETS)
    kwargs.update(overrides)
    return HydraLoraConfig(**kwargs)


def _ids(n=4, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer)]


def _routers(model):
    """The routers' weights: the last N rows of every hydra_A (the router on x)."""
    return [m.hydra_A["default"].weight[m._a_rows("default") :] for m in _layers(model)]


def _router_grads(model):
    return [m.hydra_A["default"].weight.grad[m._a_rows("default") :].clone() for m in _layers(model)]


def _heads(model):
    """Every layer's B heads as (out, N, r)."""
    return [R.layer_heads(m, "default") for m in _layers(model)]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(head_init="random"), "head_init must be one of"),
        (dict(head_init="centered", head_init_std=0.0), "head_init_std must be a finite number > 0"),
        (dict(head_init_std=float("nan")), "head_init_std"),
        (dict(head_init="centered", num_experts=1), "needs num_experts >= 2"),
        (dict(head_init="orthogonal", init_weights=False), "init_weights=True"),
        (dict(router_init_std=-0.1), "router_init_std must be None"),
        (dict(router_init_std=True), "router_init_std must be None"),
        (dict(router_init_std=0.01, fixed_gates="uniform"), "router_init_std applies to a learned router"),
        (dict(router_init_std=0.01, num_experts=1), "router_init_std applies to a learned router"),
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
    grads = _router_grads(model)
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
        h, logits = layer.hydra_A["default"](x).split([4, 3], -1)  # A's rows, then the router's
        B = R.layer_heads(layer, "default")
        heads_out = torch.einsum("onr,tr->tno", B, h)  # (T, N, out)
        gates = torch.softmax(logits, -1)
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
    with pytest.raises(ValueError, match="aux_loss_step"):  # a training forward with labels needs the step
        model(input_ids=_ids(), labels=_ids())
    model(input_ids=_ids())  # without labels: the loop computes its own loss and passes the step
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


# ----------------------------------------------------------------------------------- routing statistics
from peft_hydra import routing as R  # noqa: E402


def test_mutual_information_known_cases():
    n = 4
    one_head_each = torch.eye(n)
    assert R.mutual_information(one_head_each, torch.ones(n)) / math.log(n) == pytest.approx(1.0)
    assert R.mutual_information(torch.full((n, n), 1 / n), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.0)
    same_profile = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3)  # all categories routed alike: no information
    assert R.mutual_information(same_profile, torch.tensor([5.0, 1, 1])) == pytest.approx(0.0, abs=1e-12)
    # two categories on disjoint pairs of heads: 1 bit = log 2 nats, half of log 4
    halves = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    assert R.mutual_information(halves, torch.ones(2)) == pytest.approx(math.log(2))
    # token shares weigh the categories: a category with no tokens adds nothing
    assert R.mutual_information(torch.eye(2), torch.tensor([1.0, 0.0])) == pytest.approx(0.0)


def test_head_similarity_known_cases():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(16, 1, 4, generator=g)
    same = R.head_similarity(head.expand(16, 3, 4))
    torch.testing.assert_close(same["abs_cosine"], torch.ones(3, 3, dtype=torch.float64))
    torch.testing.assert_close(same["subspace"], torch.ones(3, 3, dtype=torch.float64))
    mirrored = R.head_similarity(torch.cat([head, -2 * head], dim=1))
    torch.testing.assert_close(mirrored["abs_cosine"], torch.ones(2, 2, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(16, 12, generator=g, dtype=torch.float64))
    disjoint = R.head_similarity(q.view(16, 3, 4))
    torch.testing.assert_close(disjoint["abs_cosine"], torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(disjoint["subspace"], torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.isnan(R.head_similarity(torch.zeros(8, 3, 2))["subspace"]).all()


def test_layer_routing_usage_entropy_dead_heads():
    n = 3
    stats = R.layer_routing(
        {"a": [0.98, 0.01, 0.01], "b": [0.98, 0.01, 0.01]}, {"a": 10, "b": 30}, {"a": 0.1, "b": 0.3},
        heads=torch.zeros(8, n, 2),
    )  # fmt: skip
    assert stats["usage"] == pytest.approx([0.98, 0.01, 0.01])
    assert stats["dead_heads"] == [1, 2]  # usage below 0.1 / 3
    assert stats["mi_normalized"] == pytest.approx(0.0, abs=1e-12)
    assert stats["token_entropy"] == pytest.approx((0.25 * 0.1 + 0.75 * 0.3) / math.log(n))
    assert stats["usage_entropy"] < 0.15
    assert stats["head_abs_cosine"] is None and stats["head_subspace"] is None  # zero heads
    assert stats["mi_max"] == pytest.approx(math.log(2) / math.log(3))
    unlabelled = R.layer_routing({None: [1 / 3] * 3}, {None: 5}, {None: math.log(3)}, labelled=False)
    assert unlabelled["mi"] is None and unlabelled["token_entropy"] == pytest.approx(1.0)
    assert unlabelled["usage_entropy"] == pytest.approx(1.0) and unlabelled["dead_heads"] == []


def test_router_health_conditions():
    n = 4
    uniform = {"l0": {"mean_gate": [0.25] * n, "entropy": 0.995 * math.log(n)}}
    collapsed = {"l0": {"mean_gate": [0.94, 0.02, 0.02, 0.02], "entropy": 0.2}}
    healthy = {"l0": {"mean_gate": [0.4, 0.3, 0.2, 0.1], "entropy": 0.5 * math.log(n)}}
    found = peft_hydra.router_health(uniform)
    assert list(found) == ["uniform"] and "0.995 of log N" in found["uniform"] and "head_init=" in found["uniform"]
    found = peft_hydra.router_health(collapsed)
    assert list(found) == ["collapse"] and "0.940" in found["collapse"] and "router_aux_loss_coef" in found["collapse"]
    assert peft_hydra.router_health(healthy) == {}
    assert peft_hydra.router_health({}) == {}


class _Routed(torch.nn.Module):
    """One linear layer on one-hot inputs: category c is the basis vector e_c."""

    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, 8)

    def forward(self, input_ids):
        return self.lin(torch.nn.functional.one_hot(input_ids, self.lin.in_features).float())


def test_routing_report_known_routers():
    n = 3
    torch.manual_seed(0)
    config = HydraLoraConfig(r=2, num_experts=n, target_modules=["lin"], head_init="centered", head_init_std=0.1)
    model = get_peft_model(_Routed(n), config)
    batches = [torch.full((2, 5), c) for c in range(n) for _ in range(2)]
    labels = [f"task{c}" for c in range(n) for _ in range(2)]
    router = model.base_model.model.lin.hydra_A["default"].weight[2:]  # the router's rows under A's r=2
    with torch.no_grad():
        router.copy_(50 * torch.eye(n))  # category c -> head c
    model.train()
    report = peft_hydra.routing_report(model, batches, labels)
    assert model.training  # restored
    layer = report["layers"]["lin"]
    assert layer["mi_normalized"] == pytest.approx(1.0, abs=1e-6)
    assert layer["usage"] == pytest.approx([1 / 3] * 3) and layer["dead_heads"] == []
    assert layer["token_entropy"] < 1e-6 and layer["usage_entropy"] == pytest.approx(1.0)
    assert layer["category_gates"]["task1"] == pytest.approx([0, 1, 0], abs=1e-6)
    assert layer["category_tokens"] == {"task0": 20, "task1": 20, "task2": 20}
    assert layer["head_abs_cosine"] is not None and layer["head_abs_cosine"] < 1
    assert report["categories"] == ["task0", "task1", "task2"]
    assert report["summary"]["mi_normalized_median"] == pytest.approx(1.0, abs=1e-6)
    text = peft_hydra.format_routing_report(report)
    assert "| lin | 1.000 |" in text and "Dead heads (usage < 0.1/N): 0 of 3" in text

    with torch.no_grad():
        router.zero_()  # uniform gates
    layer = peft_hydra.routing_report(model, batches, labels)["layers"]["lin"]
    assert layer["mi_normalized"] == pytest.approx(0.0, abs=1e-9)
    assert layer["token_entropy"] == pytest.approx(1.0)
    unlabelled = peft_hydra.routing_report(model, batches)
    assert unlabelled["layers"]["lin"]["mi"] is None and unlabelled["categories"] == []


def test_routing_report_errors(tiny_llama):
    model = get_peft_model(tiny_llama(), _config())
    with pytest.raises(ValueError, match="2 batches but 1 labels"):
        peft_hydra.routing_report(model, [_ids(), _ids(seed=1)], ["a"])
    with pytest.raises(ValueError, match="no batches"):
        peft_hydra.routing_report(model, [])
    fixed = get_peft_model(tiny_llama(), _config(fixed_gates="uniform"))
    with pytest.raises(ValueError, match="no learned router"):
        peft_hydra.routing_report(fixed, [_ids()])


def test_routing_report_keeps_the_collection_state(tiny_llama):
    model = get_peft_model(tiny_llama(), _config())
    tuner = model.base_model
    assert not tuner.router_stats_enabled
    report = peft_hydra.routing_report(model, [_ids(), _ids(seed=1)], ["a", "b"])
    assert not tuner.router_stats_enabled and tuner.router_stats()["mean_gate"] is None
    assert len(report["layers"]) == 2 * len(TARGETS)
    assert "model.layers.0.mlp.up_proj" in report["layers"]  # the names of measure_mean_gates / router_stats


# ------------------------------------------------------------------------------------ training-time warnings
def _trainer(model, tmp_path, steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=IdsDataset(_ids(n=16, seed=3)))


def _router_warnings(record):
    return [str(w.message) for w in record if "HydraLoRA routers" in str(w.message)]


def test_prepare_trainer_warns_once_when_the_gates_stay_uniform(tiny_llama, tmp_path):
    # zero heads and a zero router: the deadlock, every token gets gates 1/N for the whole run
    model = get_peft_model(tiny_llama(), _config(router_init_std=0.0, task_type="CAUSAL_LM"))
    trainer = peft_hydra.prepare_trainer(_trainer(model, tmp_path, steps=6), router_warnings_after_steps=3)
    with pytest.warns(UserWarning) as record:
        trainer.train()
    found = _router_warnings(record)
    assert len(found) == 1, found  # once, although steps 3-6 all qualify
    assert "stay uniform" in found[0] and "1.000 of log N" in found[0] and "training step 3" in found[0]
    assert "head_init='centered'" in found[0]
    assert all("router_entropy" in h for h in trainer.state.log_history if "loss" in h)  # metrics still logged

    quiet = get_peft_model(tiny_llama(), _config(router_init_std=0.0, task_type="CAUSAL_LM"))
    trainer = peft_hydra.prepare_trainer(_trainer(quiet, tmp_path, steps=3), router_warnings=False)
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert _router_warnings(record) == []


def test_prepare_trainer_rejects_bad_warning_steps(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), _config(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="router_warnings_after_steps"):
        peft_hydra.prepare_trainer(_trainer(model, tmp_path, steps=1), router_warnings_after_steps=-1)


def test_prepare_trainer_ramps_the_balance_loss_with_the_global_step(tiny_llama, tmp_path):
    coef, warm = 0.01, 4
    config = _config(task_type="CAUSAL_LM", router_aux_loss_coef=coef, router_aux_loss_warmup_steps=warm)
    trainer = peft_hydra.prepare_trainer(_trainer(get_peft_model(tiny_llama(), config), tmp_path, steps=6))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["router_aux_loss"] == 0  # computed at global_step 0: coefficient 0
    aux = [h["router_aux_loss"] / coef for h in logs[1:]]  # the balance loss x min(1, step / warm), steps 1..5
    ramp = [min(1.0, step / warm) for step in range(1, 6)]
    balance = [a / w for a, w in zip(aux, ramp)]
    assert all(0.9 < b < 3.0 for b in balance), balance  # N * sum f_i P_i: 1 when balanced, at most N
    assert max(balance) / min(balance) < 1.2, balance  # the same loss, scaled by the ramp


# ------------------------------------------------------------------------------ observing the routers
class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(10, 12)

    def forward(self, x):
        return self.proj(x)


def _one(**kw):
    return get_peft_model(_One(), HydraLoraConfig(target_modules=["proj"], r=2, num_experts=3, init_weights=False, **kw))


def test_router_stats_equal_the_plain_per_token_statistics():
    model = _one(top_k=2)
    tuner, layer = model.base_model, model.base_model.model.proj
    x1, x2 = torch.randn(4, 10), torch.randn(2, 3, 10)
    tuner.reset_router_stats()
    model(x1)
    model(x2)
    stats = tuner.router_stats()["layers"]["proj"]
    with torch.no_grad():
        logits = torch.cat([layer.hydra_A["default"](x.reshape(-1, 10))[:, 2:] for x in (x1, x2)])
        probs = torch.softmax(logits, -1)
        gates = HF.router_gates(logits, 2)
    assert stats["tokens"] == 10
    torch.testing.assert_close(torch.tensor(stats["mean_gate"]), gates.mean(0), rtol=1e-5, atol=1e-6)  # kept gates
    assert stats["entropy"] == pytest.approx(float(torch.special.entr(probs).sum(-1).mean()), rel=1e-5)  # dense


def test_a_forward_nobody_observes_runs_no_statistics_ops_and_no_hooks():
    from torch.profiler import ProfilerActivity, profile

    model = _one()
    tuner = model.base_model
    x = torch.randn(4, 10)

    def ops():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
        return [e.name for e in prof.events() if e.name.startswith("aten::")]

    assert tuner._hooks == []  # nothing asked: no hook on any router
    off = ops()
    tuner.reset_router_stats()
    assert tuner._hooks
    on = ops()
    assert not any(name in off for name in ("aten::special_entr", "aten::cat", "aten::sum"))
    assert "aten::special_entr" in on and len(on) > len(off)
    tuner.stop_router_stats()
    assert tuner._hooks == [] and ops() == off


def test_router_log_keeps_every_forward_s_gates():
    model = _one(top_k=1)
    tuner = model.base_model
    tuner.enable_router_logging()
    with torch.no_grad():
        model(torch.randn(4, 10))
        model(torch.randn(2, 3, 10))
    log = tuner.get_router_log()
    assert [entry["proj"].shape for entry in log] == [(4, 3), (6, 3)]
    assert all(((e["proj"] == 1).sum(-1) == 1).all() for e in log)  # top-1: one head per token, gate 1
    tuner.disable_router_logging()
    model(torch.randn(1, 10))
    assert len(tuner.get_router_log()) == 2 and tuner._hooks == []  # kept, nothing added
    tuner.clear_router_log()
    assert tuner.get_router_log() == []


def test_observation_hooks_follow_a_deep_copy():
    import copy

    model = _one()
    model.base_model.reset_router_stats()
    clone = copy.deepcopy(model)
    clone(torch.randn(4, 10))
    assert clone.base_model.router_stats()["layers"]["proj"]["tokens"] == 4
    assert model.base_model.router_stats()["layers"] == {}  # the original saw nothing


# ----------------------------------------------------------------------------------- token-level routing
def test_token_information_separates_token_category_and_uniform_routing():
    """Gates that follow the token: high token MI, ~0 category MI; that follow the category: the reverse (the token
    MI no higher than its shuffled baseline); uniform gates: ~0 everywhere. Each estimate sits beside its shuffled
    baseline, and the excess is what is routing."""
    g = torch.Generator().manual_seed(0)
    n, T, vocab = 3, 6000, 30
    tokens = torch.randint(0, vocab, (T,), generator=g)
    category = torch.randint(0, n, (T,), generator=g)  # independent of the token
    eye = torch.eye(n)
    cases = {"by_token": eye[tokens % n], "by_category": eye[category], "uniform": torch.full((T, n), 1 / n)}
    got = {k: R.token_information(gates, {"token": tokens}, groups=category) for k, gates in cases.items()}
    cat_mi = {k: R.gate_information(gates, category) / math.log(n) for k, gates in cases.items()}
    assert got["by_token"]["token_mi"] == pytest.approx(1.0, abs=0.01) and cat_mi["by_token"] < 0.01
    assert got["by_token"]["token_mi_excess"] > 0.95 and got["by_token"]["token_mi_given_category_excess"] > 0.95
    assert cat_mi["by_category"] == pytest.approx(1.0, abs=0.01)
    assert abs(got["by_category"]["token_mi_excess"]) < 0.01 and abs(got["by_category"]["token_mi_given_category"]) < 1e-9
    assert cat_mi["uniform"] < 1e-9 and got["uniform"]["token_mi"] < 1e-9 and got["uniform"]["token_mi_shuffled"] < 1e-9
    assert got["by_token"]["token_values"] == vocab


def test_shuffled_baseline_exposes_the_plug_in_bias():
    """Random gates, many distinct tokens, few tokens each: the plug-in MI is far above 0 although the gates ignore
    the token; the shuffled baseline is as high, so the excess is about 0."""
    g = torch.Generator().manual_seed(1)
    T = 400
    tokens = torch.randint(0, 300, (T,), generator=g)
    gates = torch.softmax(3 * torch.randn(T, 4, generator=g), -1)
    info = R.token_information(gates, {"token": tokens})
    assert info["token_mi"] > 0.3
    assert abs(info["token_mi_excess"]) < 0.1 * info["token_mi"]


def test_token_variables_of_a_padded_batch():
    ids = torch.tensor([[5, 6, 7, -1], [8, 9, -1, -1]])
    v = R.token_variables(ids, position_bucket=2)
    assert v["token"].tolist() == [5, 6, 7, -1, 8, 9, -1, -1]
    assert v["target"].tolist() == [6, 7, -1, -1, 9, -1, -1, -1]
    assert v["position"].tolist() == [0, 0, 1, -1, 0, 0, -1, -1]


class _RoutedMasked(_Routed):
    def forward(self, input_ids, attention_mask=None):  # the mask only tells the report which tokens are padding
        return super().forward(input_ids)


def test_routing_report_by_token_through_the_model():
    """A router that sends token t to head t % N, observed through the model's router log: token MI 1 (excess near
    1), target and category MI near 0 when the batches' tokens do not depend on their category; padding left out."""
    n, vocab = 3, 12
    torch.manual_seed(0)
    model = get_peft_model(_RoutedMasked(vocab), HydraLoraConfig(r=2, num_experts=n, target_modules=["lin"],
                                                           head_init="centered", head_init_std=0.1))  # fmt: skip
    router = model.base_model.model.lin.hydra_A["default"].weight[2:]
    with torch.no_grad():
        router.copy_(50 * torch.eye(n)[torch.arange(vocab) % n].T)  # token t -> head t % n
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, vocab, (4, 10), generator=g),
                "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(12)]  # fmt: skip
    batches[0]["attention_mask"][:, 8:] = 0
    labels = [f"task{i % 3}" for i in range(12)]
    report = peft_hydra.routing_report(model, batches, labels, token_routing=True)
    layer = report["layers"]["lin"]
    assert layer["token_mi"] == pytest.approx(1.0, abs=0.01) and layer["token_mi_excess"] > 0.9
    assert layer["mi_normalized"] < 0.05 and abs(layer["target_mi_excess"]) < 0.05
    assert layer["token_mi_given_category_excess"] > 0.9 and layer["token_values"] == vocab
    assert not model.base_model.get_router_log()  # the log is as it was (empty)
    assert report["summary"]["token_mi_excess_median"] == pytest.approx(layer["token_mi_excess"])
    text = peft_hydra.format_routing_report(report)
    assert "| MI token/head (/ log N): plug-in - shuffled = excess |" in text
    plain = peft_hydra.routing_report(model, batches, labels)["layers"]["lin"]
    assert "token_mi" not in plain and plain["mi_normalized"] == pytest.approx(layer["mi_normalized"])
