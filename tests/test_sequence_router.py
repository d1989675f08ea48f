"""Sequence-scope routing (``router_scope="sequence"``), the cosine router (``router_cosine``) and the straight-through
top-1 router: the gates' math, causality, generation with a KV cache and padding, training, merging, saving."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig

from conftest import hydra

K = 4


def layers_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft_hydra.HydraLoraLayer)]


def seq_model(tiny_llama, seed=0, **kw):
    kw.setdefault("r", 2)
    kw.setdefault("num_experts", 3)
    kw.setdefault("router_scope", "sequence")
    kw.setdefault("router_pool_tokens", K)
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), hydra(**kw)).eval()
    with torch.no_grad():  # routers far from uniform, so that the gates differ visibly between tokens and sequences
        for _, layer in layers_of(model):
            router = layer.hydra_router["default"]
            w = router.weight if router.weight is not None else layer.hydra_A["default"].weight[layer._a_rows("default"):]
            w.mul_(8.0)
    return model


class Recorder:
    """Every router's input and gates, per forward, {layer: [(x, gates), ...]}."""

    def __init__(self, model):
        self.calls: dict[str, list] = {}
        self.handles = []
        for name, layer in layers_of(model):
            router = layer.hydra_router["default"]
            self.handles.append(router.register_forward_hook(
                lambda mod, args, out, name=name: self.calls.setdefault(name, []).append((args[0].detach(), out.detach()))
            ))  # fmt: skip

    def last(self):
        return {name: calls[-1] for name, calls in self.calls.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------- token scope
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_token_scope_is_the_per_token_math(tiny_llama, input_ids, top_k):
    """The default router: y = W0 x + scaling * sum_i g_i(x) B_i A x with g = softmax(W_g x) per token (top-k: the k
    largest renormalised; top-1: one-hot), recomputed here from the layer's own weights."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), hydra(r=2, num_experts=3, top_k=top_k)).eval()
    assert model.base_model._sequence_hooks == [] and not model.base_model.model._forward_pre_hooks
    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, o, name=name: seen.update({name: (a[0], o)}))
               for name, layer in layers_of(model)]  # fmt: skip
    with torch.no_grad():
        model(input_ids)
    for h in handles:
        h.remove()
    for name, layer in layers_of(model):
        x, y = seen[name]
        x = x.reshape(-1, x.shape[-1])
        A_full = layer.hydra_A["default"].weight
        A, Wg, B = A_full[:2], A_full[2:], layer.hydra_B["default"].weight
        logits = x @ Wg.T
        if top_k is None:
            g = logits.softmax(-1)
        else:
            kept = logits.topk(top_k, -1).indices
            g = torch.full_like(logits, -math.inf).scatter(-1, kept, logits.gather(-1, kept)).softmax(-1)
        heads = B.view(B.shape[0], 3, 2)
        delta = torch.einsum("tn,onr,rd,td->to", g, heads, A, x)
        expected = x @ layer.get_base_layer().weight.T + layer.scaling["default"] * delta
        assert torch.allclose(y.reshape(expected.shape), expected, atol=1e-5), name


def test_top1_is_one_hot_forward_and_trains_the_router(tiny_llama, input_ids):
    """top_k=1: the forward gates are exactly one-hot (as before), and the router rows of hydra_A get a gradient (the
    straight-through estimator; without it the router of a top-1 model never trains)."""
    for scope in ("token", "sequence"):
        kw = dict(router_pool_tokens=K) if scope == "sequence" else {}
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), hydra(r=2, num_experts=3, top_k=1, router_scope=scope, **kw))
        rec = Recorder(model)
        model(input_ids, labels=input_ids).loss.backward()
        rec.remove()
        for name, (_, gates) in rec.last().items():
            assert set(gates.unique().tolist()) <= {0.0, 1.0} and torch.equal(gates.sum(-1), torch.ones(len(gates)))
        layer = layers_of(model)[0][1]
        router_grad = layer.hydra_A["default"].weight.grad[2:]
        assert router_grad.abs().sum() > 0, scope


def test_top1_forward_values_equal_the_renormalised_top1_softmax():
    logits = torch.randn(50, 4, requires_grad=True)
    gates = peft_hydra.functional.router_gates(logits, top_k=1)
    old = torch.full_like(logits, -math.inf).scatter(-1, logits.topk(1, -1).indices, 0.0).softmax(-1)
    assert torch.equal(gates, old)
    (gates * torch.randn(50, 4)).sum().backward()
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- sequence scope
@pytest.mark.parametrize("cosine", [False, True])
def test_sequence_gates_are_the_router_on_the_running_mean_of_the_first_k_tokens(tiny_llama, cosine):
    model = seq_model(tiny_llama, router_cosine=cosine)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    rec = Recorder(model)
    with torch.no_grad():
        model(ids)
    rec.remove()
    for name, layer in layers_of(model):
        router = layer.hydra_router["default"]
        x, gates = rec.last()[name]
        x, gates = x.view(2, 9, -1).float(), gates.view(2, 9, 3)
        for t in range(9):
            mean = x[:, : min(t + 1, K)].mean(1)
            if cosine:
                logits = router.log_scale.exp() * F.normalize(mean, dim=-1) @ F.normalize(router.weight, dim=-1).T
            else:
                logits = mean  # the router on x is rows of hydra_A: its input is W_g x, and W_g mean(x) = mean(W_g x)
            assert torch.allclose(gates[:, t], logits.softmax(-1), atol=1e-5), (name, t)
        assert torch.equal(gates[:, K:], gates[:, K - 1 : K].expand(-1, 9 - K, -1))
        assert not torch.allclose(gates[0, K - 1], gates[1, K - 1], atol=1e-3)  # two sequences, two gate vectors


def test_sequence_gates_are_causal(tiny_llama):
    """Changing the token at position t changes no gate (of any layer) before t: the gates leak no later token."""
    model = seq_model(tiny_llama)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    rec = Recorder(model)
    with torch.no_grad():
        model(ids)
        before = rec.last()
        for t in (1, 2, 6):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 7) % 90 + 3
            model(changed)
            after = rec.last()
            moved = False
            for name in before:
                assert torch.equal(after[name][1][:t], before[name][1][:t]), (name, t)
                moved |= not torch.allclose(after[name][1][t:], before[name][1][t:])
            assert moved == (t < K), t  # from position K on, only tokens beyond the pool changed: no gate moves
    rec.remove()


def test_layer_called_outside_the_model_forward_is_a_new_sequence_of_real_tokens(tiny_llama):
    """What the comparison harness does (decoder layers run on cached hidden states): each call is a new sequence, all
    tokens real, and gives what the model's forward gives the same (unpadded) batch."""
    model = seq_model(tiny_llama)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    rec = Recorder(model)
    with torch.no_grad():
        model(ids)
        inside = rec.last()
        name, layer = layers_of(model)[-1]
        x_in = {}
        h = layer.register_forward_pre_hook(lambda m, a: x_in.update(x=a[0]))
        model(ids)
        h.remove()
        layer(x_in["x"])
        outside = rec.last()[name]
    rec.remove()
    assert torch.equal(outside[1], inside[name][1])


def greedy_without_cache(model, ids, mask, steps):
    ids, mask = ids.clone(), mask.clone()
    for _ in range(steps):
        nxt = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("cosine", [False, True])
def test_cached_generate_equals_the_uncached_loop_and_left_padding_each_prompt_alone(tiny_llama, cosine):
    """Prompts shorter and longer than K, left-padded into one batch: generate() with its KV cache (the pooled state
    carried over the decode steps) = a greedy loop of full forwards without cache = each prompt generated alone."""
    model = seq_model(tiny_llama, router_cosine=cosine)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (2, 6, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    steps = 6
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                pad_token_id=0, min_new_tokens=steps)  # fmt: skip
        uncached = greedy_without_cache(model, ids, mask, steps)
        assert torch.equal(cached, uncached)
        for i, p in enumerate(prompts):
            alone = model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=steps, do_sample=False, pad_token_id=0, min_new_tokens=steps)  # fmt: skip
            assert torch.equal(alone[0], cached[i, width - len(p):]), i
    # the generated tokens depend on the sequence routing: the same model with token routing generates otherwise
    assert len({tuple(row[width:].tolist()) for row in cached}) > 1


def test_beam_search_with_prompts_of_k_tokens_or_more_and_the_error_below(tiny_llama):
    model = seq_model(tiny_llama)
    g = torch.Generator().manual_seed(7)
    long_prompts = torch.randint(3, 96, (2, K + 1), generator=g)
    with torch.no_grad():
        both = model.generate(input_ids=long_prompts, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        for i in range(2):
            alone = model.generate(input_ids=long_prompts[i : i + 1], max_new_tokens=4, num_beams=3, do_sample=False,
                                   pad_token_id=0)  # fmt: skip
            assert torch.equal(alone[0], both[i])
        with pytest.raises(ValueError, match="num_beams=1 or longer prompts"):
            model.generate(input_ids=long_prompts[:, : K - 1], max_new_tokens=2, num_beams=2, pad_token_id=0)


def test_training_with_padding_and_gradient_checkpointing(tiny_llama):
    """Sequence routing trains: the loss falls, the routers get gradients, the balance loss and the router statistics
    see one (tokens, N) gate row per token; a gradient-checkpointing recompute (outside the model's forward) gives the
    same gradients as without checkpointing on a left-padded batch."""
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = seq_model(tiny_llama, router_aux_loss_coef=0.01)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".hydra_A." in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    router_rows = [g[2:] for n, g in grads[0].items() if ".hydra_A." in n]
    assert all(r.abs().sum() > 0 for r in router_rows)

    model = seq_model(tiny_llama, router_aux_loss_coef=0.01)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    with model.base_model.collect_router_stats():
        for _ in range(15):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            losses.append(float(out.loss))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        stats = model.base_model.router_stats()
    assert losses[-1] < losses[0] - 0.1
    assert model.base_model.last_aux_loss is not None and float(model.base_model.last_aux_loss) > 0
    assert all(s["tokens"] == 15 * ids.numel() for s in stats["layers"].values())


def test_merge_with_fixed_gates_equals_override_gates_and_export(tiny_llama, tmp_path):
    model = seq_model(tiny_llama)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(9))
    gates = torch.tensor([0.1, 0.7, 0.2])
    with torch.no_grad():
        with model.override_gates(gates):
            given = model(ids).logits
        model.merge_adapter(gates=gates)
        merged = model(ids).logits
        model.unmerge_adapter()
        assert torch.allclose(merged, given, atol=1e-5)
        assert not torch.allclose(model(ids).logits, given, atol=1e-4)  # the learned sequence routing again
        with pytest.raises(ValueError, match="without fixed gates"):
            model.merge_adapter()
        peft_hydra.export_lora(model, str(tmp_path), gates=gates.tolist())
        lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
        assert torch.allclose(lora(ids).logits, given, atol=1e-5)


@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_cosine_router_scale_is_saved_and_loaded(tiny_llama, tmp_path, scope):
    kw = dict(router_pool_tokens=K) if scope == "sequence" else {}
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), hydra(r=2, num_experts=3, router_cosine=True, router_scope=scope, **kw))
    layer = layers_of(model)[0][1]
    router = layer.hydra_router["default"]
    assert float(router.log_scale.exp()) == pytest.approx(peft_hydra.config.COSINE_INIT_SCALE)
    assert layer.hydra_A["default"].weight.shape[0] == 2  # the router's weight is its own, not rows of hydra_A
    with torch.no_grad():
        for _, l in layers_of(model):
            l.hydra_router["default"].log_scale.fill_(1.234)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(10))
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    scales = [l.hydra_router["default"].log_scale for _, l in layers_of(loaded)]
    assert scales and all(float(s) == pytest.approx(1.234) for s in scales)
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
    assert loaded.peft_config["default"].router_scope == scope
    # a trained scale changes the outputs: the loaded one is used
    with torch.no_grad():
        scales[0].fill_(0.0)
    assert not torch.allclose(loaded(ids).logits, expected, atol=1e-4)


def test_sequence_router_refuses_what_it_cannot_do(tiny_llama, input_ids):
    with pytest.raises(ValueError, match="router_scope applies to a learned router.*set router_scope='token'"):
        HydraLoraConfig(num_experts=2, router_scope="sequence", fixed_gates="uniform")
    with pytest.raises(ValueError, match="router_scope applies to a learned router"):
        HydraLoraConfig(num_experts=1, router_scope="sequence")
    with pytest.raises(ValueError, match="router_cosine applies to a learned router"):
        HydraLoraConfig(num_experts=1, router_cosine=True)
    with pytest.raises(ValueError, match="router_scope must be one of"):
        HydraLoraConfig(router_scope="prompt")
    with pytest.raises(ValueError, match="router_pool_tokens must be an integer >= 1"):
        HydraLoraConfig(router_scope="sequence", router_pool_tokens=0)
    with pytest.raises(ValueError, match="applies to router_scope='sequence'"):
        HydraLoraConfig(router_pool_tokens=16)
    model = seq_model(tiny_llama)
    with pytest.raises(ValueError, match="adapter_names.*router_scope='sequence'"):
        model(input_ids, adapter_names=["default", "__base__"])
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="packed"):
        model(input_ids, position_ids=packed)
    # the sequence hooks leave with the last sequence adapter
    assert model.base_model._sequence_hooks
    model.add_adapter("tok", hydra(r=2, num_experts=2))
    model.delete_adapter("default")
    assert not model.base_model._sequence_hooks and not model.base_model.model._forward_pre_hooks


def test_centred_router_tracks_the_pooled_mean_in_training_only_and_is_saved(tiny_llama, tmp_path):
    """router_center: the first training forward sets the centre to the batch mean of the pooled inputs, later ones
    move it by 0.1; evaluation leaves it; the gates come from the centred pool; it is saved and loaded with the adapter."""
    torch.manual_seed(0)
    config = hydra(r=2, num_experts=3, target_modules=["q_proj"], router_scope="sequence", router_cosine=True,
                   router_center=True, router_pool_tokens=4)  # fmt: skip
    model = get_peft_model(tiny_llama(), config)
    layer = next(m for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer))
    router = layer.hydra_router["default"]
    captured = {}
    layer.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    ids = torch.randint(3, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids)
    pooled = captured["x"][:, :4].float().mean(1)  # (B, in): every token real, K = 4
    assert torch.allclose(router.center, pooled.mean(0), atol=1e-5)
    first = router.center.clone()
    ids2 = torch.randint(3, 30, (3, 9), generator=torch.Generator().manual_seed(2))
    model(ids2)
    assert torch.allclose(router.center, 0.9 * first + 0.1 * captured["x"][:, :4].float().mean(1).mean(0), atol=1e-5)
    model.eval()
    kept = router.center.clone()
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(router.center, kept)
        expected = F.softmax(
            router.log_scale.exp() * F.cosine_similarity((pooled - kept)[:, None], router.weight[None], dim=-1), -1
        )
        assert torch.allclose(router(captured["x"].reshape(-1, captured["x"].shape[-1]), batch=3)[3::9], expected,
                              atol=1e-5)  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)


def test_router_center_needs_sequence_scope():
    with pytest.raises(ValueError, match="router_scope='sequence' or router_center=False"):
        HydraLoraConfig(num_experts=3, router_center=True, target_modules=["q_proj"])


def test_adapters_with_different_pool_sizes_each_pool_their_own_first_tokens_in_cached_generate(tiny_llama):
    """Two sequence-scope adapters of one model, K = 2 and K = 6, both active: each router pools its own first K
    real tokens, over the prompt and the decode steps (cached generate() = the uncached loop, left padding = alone)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), hydra(r=2, num_experts=3, router_scope="sequence", router_pool_tokens=2),
                           adapter_name="short")  # fmt: skip
    model.add_adapter("long", hydra(r=2, num_experts=3, router_scope="sequence", router_pool_tokens=6))
    model.base_model.set_adapter(["short", "long"])
    model.eval()
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (3, 5)]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 5 - len(p):], mask[i, 5 - len(p):] = p, 1
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                do_sample=False, pad_token_id=0)  # fmt: skip
        assert torch.equal(cached, greedy_without_cache(model, ids, mask, 5))
        for i, p in enumerate(prompts):
            alone = model.generate(input_ids=p[None], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(alone[0], cached[i, 5 - len(p):]), i


def test_sequence_router_on_a_bf16_base_trains_and_generates_like_its_uncached_loop(tiny_llama):
    """A bf16 base model with a centred cosine sequence router: the adapter stays fp32 (PEFT's autocast), a training
    step gives finite losses and gradients to the router (weight and scale), the centre is tracked in fp32, and
    cached generation equals the uncached greedy loop."""
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, hydra(r=2, num_experts=3, router_scope="sequence", router_cosine=True,
                                       router_center=True, router_pool_tokens=4))  # fmt: skip
    router = layers_of(model)[0][1].hydra_router["default"]
    assert router.weight.dtype == torch.float32 and router.center.dtype == torch.float32
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and int(router.center_updates) == 1 and torch.isfinite(router.center).all()
    assert router.weight.grad.abs().sum() > 0 and router.log_scale.grad.abs().sum() > 0
    model.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                do_sample=False, pad_token_id=0)  # fmt: skip
        assert torch.equal(cached, greedy_without_cache(model, ids, mask, 4))
