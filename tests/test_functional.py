"""Pure math of src/peft_hydra/functional.py against naive per-head reference loops."""

from __future__ import annotations

import pytest
import torch

from peft_hydra import functional as HF

torch.set_default_dtype(torch.float32)


def reference_delta(x, A, B, scaling, router=None, fixed=None, router_input="x", top_k=None, temperature=1.0):
    """``scaling * sum_i g_i * B_i @ A_i @ x`` token by token, written as plainly as possible."""
    out_features, n, r = B.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(xs.shape[0]):
        xt = xs[t]
        h_shared = A @ xt
        if router is not None:
            logits = router @ (xt if router_input == "x" else h_shared)
            p = torch.softmax(logits / temperature, dim=-1)
            if top_k is not None and top_k < n:
                keep = torch.topk(p, top_k).indices
                mask = torch.zeros(n, dtype=torch.bool)
                mask[keep] = True
                p = torch.where(mask, p, torch.zeros_like(p))
                p = p / p.sum()
            g = p
        else:
            g = fixed if fixed is not None else torch.ones(1)
        acc = torch.zeros(out_features)
        for i in range(n):
            A_i = A if A.shape[0] == r else A[i * r : (i + 1) * r]
            acc = acc + g[i] * (B[:, i] @ (A_i @ xt))
        rows.append(scaling * acc)
    return torch.stack(rows).reshape(*lead, out_features)


def make(n, r=3, d_in=7, d_out=5, share_a=True, router_input="x", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r if share_a else n * r, d_in, generator=g, requires_grad=True)
    B = torch.randn(d_out, n, r, generator=g, requires_grad=True)
    router_in = d_in if router_input == "x" else A.shape[0]
    W = torch.randn(n, router_in, generator=g, requires_grad=True) if n > 1 else None
    return A, B, W


def grads(out, tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], retain_graph=False)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("share_a", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 4), (2, 3, 2)], ids=["2D", "3D", "4D"])
def test_hydra_delta_matches_reference_values_and_grads(n, share_a, lead):
    A, B, W = make(n, share_a=share_a)
    x = torch.randn(*lead, 7, requires_grad=True)
    weight = torch.randn(*lead, 5)
    delta, gates, probs = HF.hydra_delta(x, A, B, 0.5, router_weight=W)
    ref = reference_delta(x, A, B, 0.5, router=W)
    assert delta.shape == (*lead, 5)
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)
    if n > 1:
        assert gates.shape == (*lead, n) and probs.shape == (*lead, n)
    else:
        assert gates is None and probs is None
    got = grads((delta * weight).sum(), [A, B, W, x])
    want = grads((ref * weight).sum(), [A, B, W, x])
    names = ["A", "B", "router", "x"] if W is not None else ["A", "B", "x"]
    for name, g1, g2 in zip(names, got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    # every head gets a gradient of its own (not only the first one)
    assert all(got[1][:, i].abs().sum() > 0 for i in range(n))
    if W is not None:
        assert got[2].abs().sum() > 0


@pytest.mark.parametrize("n,top_k", [(3, 1), (4, 2), (4, 3), (3, 3)])
def test_top_k_gates(n, top_k):
    A, B, W = make(n, seed=3)
    x = torch.randn(4, 6, 7)
    delta, gates, probs = HF.hydra_delta(x, A, B, 1.0, router_weight=W, top_k=top_k)
    nonzero = (gates > 0).sum(-1)
    assert torch.equal(nonzero, torch.full_like(nonzero, top_k))
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 6))
    # the kept heads are the k largest router probabilities
    kept = gates > 0
    assert (probs[kept].reshape(4, 6, top_k).min(-1).values >= probs.masked_fill(kept, -1).max(-1).values).all()
    torch.testing.assert_close(delta, reference_delta(x, A, B, 1.0, router=W, top_k=top_k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(HF.top_k_gates(probs, None), probs)


@pytest.mark.parametrize("share_a", [True, False])
def test_router_input_a_routes_on_a_x(share_a):
    A, B, W = make(3, share_a=share_a, router_input="a", seed=5)
    x = torch.randn(2, 4, 7)
    delta, gates, probs = HF.hydra_delta(x, A, B, 1.0, router_weight=W, router_input="a")
    torch.testing.assert_close(probs, torch.softmax(x @ A.T @ W.T, dim=-1))
    torch.testing.assert_close(delta, reference_delta(x, A, B, 1.0, router=W, router_input="a"), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # a router of the wrong width cannot be silently used on x
        HF.hydra_delta(x, A, B, 1.0, router_weight=W, router_input="x")


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_temperature(temperature):
    A, B, W = make(3, seed=7)
    x = torch.randn(6, 7)
    _, _, probs = HF.hydra_delta(x, A, B, 1.0, router_weight=W, temperature=temperature)
    torch.testing.assert_close(probs, torch.softmax((x @ W.T) / temperature, dim=-1))
    delta, _, _ = HF.hydra_delta(x, A, B, 1.0, router_weight=W, temperature=temperature)
    ref = reference_delta(x, A, B, 1.0, router=W, temperature=temperature)
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)


def test_lower_temperature_sharpens():
    A, B, W = make(4, seed=8)
    x = torch.randn(32, 7)
    ent = [HF.gate_entropy(HF.router_probs(x, W, t)).mean() for t in (0.3, 1.0, 3.0)]
    assert ent[0] < ent[1] < ent[2]


def test_fixed_gates_match_reference():
    A, B, _ = make(3, seed=9)
    x = torch.randn(2, 5, 7)
    fixed = torch.tensor([0.2, 0.5, 0.3])
    delta, gates, probs = HF.hydra_delta(x, A, B, 2.0, fixed_gates=fixed)
    assert probs is None and gates is fixed
    torch.testing.assert_close(delta, reference_delta(x, A, B, 2.0, fixed=fixed), rtol=1e-5, atol=1e-5)


def test_mix_heads_requires_gates_for_several_heads():
    with pytest.raises(ValueError, match="gates are required"):
        HF.mix_heads(torch.randn(2, 3), None, torch.randn(4, 2, 3))


def test_gates_are_fp32_with_bf16_inputs():
    A, B, W = make(3, seed=11)
    A, B, W = (t.detach().bfloat16() for t in (A, B, W))
    x = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    delta, gates, probs = HF.hydra_delta(x, A, B, 1.0, router_weight=W, top_k=2)
    assert probs.dtype == torch.float32 and gates.dtype == torch.float32
    assert delta.dtype == torch.bfloat16
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("share_a", [True, False])
def test_delta_weight_equals_dense_per_token_delta(share_a):
    A, B, _ = make(3, share_a=share_a, seed=13)
    fixed = torch.tensor([0.6, 0.1, 0.3])
    x = torch.randn(2, 5, 7)
    W_delta = HF.delta_weight(A, B, fixed, 0.75)
    assert W_delta.shape == (5, 7)
    torch.testing.assert_close(x @ W_delta.T, reference_delta(x, A, B, 0.75, fixed=fixed), rtol=1e-5, atol=1e-5)
    delta, _, _ = HF.hydra_delta(x, A, B, 0.75, fixed_gates=fixed)
    torch.testing.assert_close(x @ W_delta.T, delta, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_balanced_collapsed_and_gradient():
    n = 4
    # perfectly balanced: uniform probabilities and an equal share of argmax tokens per head
    probs = torch.full((8, n), 1.0 / n)
    chosen = torch.eye(n).repeat(2, 1) * 0.4 + 0.15  # rows sum to 1, argmax cycles through the heads
    for p in (probs, chosen):
        loss = HF.load_balancing_loss(p, p)
        assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # collapsed: every token goes to head 0
    collapsed = torch.tensor([[0.9, 0.05, 0.03, 0.02]]).repeat(8, 1)
    assert HF.load_balancing_loss(collapsed, collapsed).item() > 1.0
    assert HF.load_balancing_loss(collapsed, collapsed).item() == pytest.approx(n * 0.9)
    # top-k: the fraction counts the kept heads
    gates = HF.top_k_gates(collapsed, 2)
    assert HF.load_balancing_loss(collapsed, gates, top_k=2).item() > 1.0
    # gradient reaches the router
    _, _, W = make(n, seed=17)
    x = torch.randn(3, 5, 7)
    p = HF.router_probs(x, W)
    loss = HF.load_balancing_loss(p, p)
    (g,) = torch.autograd.grad(loss, W)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gate_entropy():
    n = 4
    uniform = torch.full((3, n), 1.0 / n)
    torch.testing.assert_close(HF.gate_entropy(uniform), torch.full((3,), torch.log(torch.tensor(4.0)).item()))
    one_hot = torch.eye(n)
    torch.testing.assert_close(HF.gate_entropy(one_hot), torch.zeros(n))


# ------------------------------------------------------------------ the hot path against the reference, all variants
def reference_with_dropout(x, A, B, scaling, masks, router=None, fixed=None, router_input="x", top_k=None,
                           temperature=1.0):  # fmt: skip
    """Like ``reference_delta`` but head i reads ``x * masks[..., i, :]`` (the router reads the undropped ``x``, or
    ``A`` of the shared dropped input for router_input="a"): the authors' ``sum_i g_i B_i A dropout_i(x)``."""
    out_features, n, r = B.shape
    xs, ms = x.reshape(-1, x.shape[-1]), masks.reshape(-1, masks.shape[-2], masks.shape[-1])
    rows = []
    for t in range(xs.shape[0]):
        if router is not None:
            src = xs[t] if router_input == "x" else A @ (xs[t] * ms[t, 0])
            g = torch.softmax(router @ src / temperature, dim=-1)
            if top_k is not None and top_k < n:
                keep = torch.zeros(n, dtype=torch.bool)
                keep[torch.topk(g, top_k).indices] = True
                g = torch.where(keep, g, torch.zeros_like(g))
                g = g / g.sum()
        else:
            g = fixed if fixed is not None else torch.ones(1)
        acc = torch.zeros(out_features, dtype=x.dtype)
        for i in range(n):
            A_i = A if A.shape[0] == r else A[i * r : (i + 1) * r]
            acc = acc + g[i] * (B[:, i] @ (A_i @ (xs[t] * ms[t, i if ms.shape[1] > 1 else 0])))
        rows.append(scaling * acc)
    return torch.stack(rows).reshape(*x.shape[:-1], out_features)


class RecordingDropout(torch.nn.Dropout):
    """A training-mode dropout that remembers the mask it drew (so the reference can use the same one)."""

    def forward(self, x):
        out = super().forward(x)
        self.mask = (out != 0).to(x.dtype) / (1 - self.p)
        return out


VARIANTS = {
    "dense": {},
    "top_k": {"top_k": 2},
    "router_on_a": {"router_input": "a", "temperature": 0.5},
    "lora_split": {"share_a": False},
    "lora_split_top_k": {"share_a": False, "top_k": 1},
    "fixed_gates": {"fixed": [0.5, 0.2, 0.3]},
    "n1": {"n": 1},
}


@pytest.fixture(params=["separate", "fused"])
def router_gemm(request, monkeypatch):
    """Both router GEMM paths of delta_2d: its own GEMM, or one GEMM with A (forced at these tiny sizes by the
    threshold; taken only where the router reads x with no active dropout, and the dtypes agree)."""
    monkeypatch.setattr(HF, "FUSED_ROUTER_MIN_ELEMENTS", 1 << 62 if request.param == "separate" else 0)
    return request.param


@pytest.mark.parametrize("dropout", ["none", "shared", "per_head"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_2d_matches_reference_values_and_grads_every_variant(variant, dropout, router_gemm):
    kw = dict(VARIANTS[variant])
    n, share_a, fixed = kw.pop("n", 3), kw.pop("share_a", True), kw.pop("fixed", None)
    router_input, top_k, temperature = kw.get("router_input", "x"), kw.get("top_k"), kw.get("temperature", 1.0)
    A, B, W = make(n, share_a=share_a, router_input=router_input, seed=21)
    if dropout == "per_head" and router_input == "a":  # no single A x per token for the router to read
        with pytest.raises(ValueError, match="dropout_per_head"):
            HF.hydra_delta(torch.randn(2, 7), A, B, 1.0, router_weight=W, dropout=torch.nn.Dropout(0.4),
                           dropout_per_head=True, **kw)  # fmt: skip
        return
    W = None if fixed is not None else W
    fixed_t = torch.tensor(fixed) if fixed is not None else None
    x = torch.randn(2, 5, 7, requires_grad=True)
    drop = RecordingDropout(0.4).train() if dropout != "none" else None
    torch.manual_seed(0)
    delta, gates, probs = HF.hydra_delta(x, A, B, 0.75, router_weight=W, fixed_gates=fixed_t, dropout=drop,
                                         dropout_per_head=dropout == "per_head", **kw)  # fmt: skip
    if drop is None:
        masks = torch.ones(2, 5, 1, 7)
    elif dropout == "shared" or n == 1:
        masks = drop.mask.reshape(2, 5, 1, 7)
    else:
        masks = drop.mask.reshape(2, 5, n, 7)  # one mask per head
        assert not torch.equal(masks[:, :, 0], masks[:, :, 1])
    ref = reference_with_dropout(x, A, B, 0.75, masks, router=W, fixed=fixed_t, router_input=router_input,
                                 top_k=top_k, temperature=temperature)  # fmt: skip
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn(2, 5, 5)
    tensors = [A, B, W, x]
    got, want = grads((delta * weight).sum(), tensors), grads((ref * weight).sum(), tensors)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_bf16_close_to_fp32(variant, router_gemm):
    kw = dict(VARIANTS[variant])
    n, share_a, fixed = kw.pop("n", 3), kw.pop("share_a", True), kw.pop("fixed", None)
    A, B, W = make(n, share_a=share_a, router_input=kw.get("router_input", "x"), seed=23)
    W = None if fixed is not None else W
    fixed_t = torch.tensor(fixed) if fixed is not None else None
    x = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(29))
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (A, B, W)]
        delta, gates, probs = HF.hydra_delta(x.to(dtype), leaves[0], leaves[1], 0.5, router_weight=leaves[2],
                                             fixed_gates=fixed_t, **kw)  # fmt: skip
        assert delta.dtype == dtype
        if probs is not None:
            assert probs.dtype == torch.float32 and gates.dtype == torch.float32
        outs[dtype] = (delta.float(), [g.float() for g in grads(delta.float().square().sum(), leaves)])
    (d32, g32), (d16, g16) = outs[torch.float32], outs[torch.bfloat16]
    scale = d32.abs().max().item()
    torch.testing.assert_close(d16, d32, rtol=0.05, atol=0.03 * scale)
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * b.abs().max().item())  # bf16: ~3 digits


def test_per_head_dropout_draws_n_masks_and_equals_shared_path_without_dropout():
    A, B, W = make(3, seed=25)
    x = torch.randn(4, 7)
    drop = torch.nn.Dropout(0.5)
    eval_drop = torch.nn.Dropout(0.5).eval()
    shared, _, _ = HF.hydra_delta(x, A, B, 1.0, router_weight=W)
    for d in (None, eval_drop, torch.nn.Dropout(0.0)):
        per_head, _, _ = HF.hydra_delta(x, A, B, 1.0, router_weight=W, dropout=d, dropout_per_head=True)
        torch.testing.assert_close(per_head, shared)
    torch.manual_seed(3)
    a, _, _ = HF.hydra_delta(x, A, B, 1.0, router_weight=W, dropout=drop, dropout_per_head=True)
    torch.manual_seed(3)
    b, _, _ = HF.hydra_delta(x, A, B, 1.0, router_weight=W, dropout=drop, dropout_per_head=False)
    assert not torch.allclose(a, b)  # different masks per head than one shared mask
    with pytest.raises(ValueError, match="router_input='a'.*dropout_per_head"):
        A2, B2, W2 = make(3, router_input="a", seed=25)
        HF.hydra_delta(x, A2, B2, 1.0, router_weight=W2, router_input="a", dropout=drop, dropout_per_head=True)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_softmax_equals_renormalised_top_k(temperature):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for k in (1, 2, 4):
        fast = HF.top_k_softmax(logits, k, temperature)
        slow = HF.top_k_gates(HF.softmax_gates(logits, temperature), k)
        torch.testing.assert_close(fast, slow.to(fast.dtype))
        w = torch.randn(6, 5)
        torch.testing.assert_close(*(grads((t * w).sum(), [logits])[0] for t in (fast, slow)), rtol=1e-5, atol=1e-6)


def test_need_probs_false_skips_the_dense_softmax_only():
    A, B, W = make(4, seed=27)
    x = torch.randn(3, 7)
    d1, g1, p1 = HF.hydra_delta(x, A, B, 1.0, router_weight=W, top_k=2, need_probs=False)
    d2, g2, p2 = HF.hydra_delta(x, A, B, 1.0, router_weight=W, top_k=2)
    assert p1 is None and p2 is not None
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(g1, g2)


def test_head_mix_autograd_function_of_the_benchmark_passes_gradcheck():
    # benchmarks/bench_overhead.py measures a custom autograd.Function for the head mix (not shipped: slower on
    # the host-overhead case); its hand-written backward must still be right for the measurement to mean anything
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    for heads_in_h in (1, 3):  # a shared A (T, 1, r) and one A per head (T, N, r)
        g = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
        h = torch.randn(5, heads_in_h, 2, dtype=torch.float64, requires_grad=True)
        B_flat = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(module.HeadMix.apply, (g, h, B_flat))
        torch.testing.assert_close(module.HeadMix.apply(g, h, B_flat), HF._mix(h, g, B_flat.view(4, 3, 2), 1.0))


def test_router_gemm_is_fused_from_the_threshold_on(monkeypatch):
    """From FUSED_ROUTER_MIN_ELEMENTS elements of x on, A and the router are ONE GEMM over [A; W] (one mm over x in
    the forward instead of two); below it, or with an active dropout (A reads the dropped x, the router x), two."""
    from torch.profiler import ProfilerActivity, profile

    A, B, W = make(3, seed=5)
    x = torch.randn(6, 7)

    def mms(threshold, dropout=None):
        monkeypatch.setattr(HF, "FUSED_ROUTER_MIN_ELEMENTS", threshold)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            HF.delta_2d(x, A, B, 1.0, router_weight=W, fixed_gates=None, router_input="x", top_k=None,
                        temperature=1.0, dropout=dropout, dropout_per_head=False, need_probs=True)  # fmt: skip
        names = [e.name for e in prof.events()]
        return names.count("aten::mm"), names.count("aten::cat")

    assert mms(x.numel()) == (2, 1)  # [A; W] x, then the head mix
    assert mms(x.numel() + 1) == (3, 0)  # A x, W x, the head mix
    assert mms(0, dropout=torch.nn.Dropout(0.5).train()) == (3, 0)
