"""Pure math of src/peft_hydra/functional.py against naive per-head reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from peft_hydra import functional as HF


def reference_update(x, A, B, scaling, gates):
    """``scaling * sum_i g_i B_i A_i x`` token by token; ``B`` (out, N*r) side by side, ``gates`` (T, N) or (N,)."""
    n = gates.shape[-1]
    r = B.shape[1] // n
    rows = []
    for t in range(x.shape[0]):
        g = gates[t] if gates.dim() == 2 else gates
        acc = torch.zeros(B.shape[0], dtype=x.dtype)
        for i in range(n):
            A_i = A if A.shape[0] == r else A[i * r : (i + 1) * r]
            acc = acc + g[i] * (B[:, i * r : (i + 1) * r] @ (A_i @ x[t]))
        rows.append(scaling * acc)
    return torch.stack(rows)


def make(n, r=3, d_in=7, d_out=5, share_a=True, seed=0, tokens=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r if share_a else n * r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, n * r, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    return x, A, B


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("share_a", [True, False])
@pytest.mark.parametrize("gates", ["per_token", "fixed"])
def test_mix_input_then_b_is_the_sum_over_heads_values_and_grads(n, share_a, gates):
    x, A, B = make(n, share_a=share_a)
    if n == 1:
        g = None
    elif gates == "per_token":
        g = torch.softmax(torch.randn(x.shape[0], n, dtype=torch.float64), -1).requires_grad_(True)
    else:
        g = torch.tensor([0.5, 0.25, 0.15, 0.1][:n], dtype=torch.float64)
    got = 1.5 * (HF.mix_input(x @ A.T, g, 3) @ B.T)
    want = reference_update(x, A, B, 1.5, g if g is not None else torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(got, want)
    inputs = [t for t in (x, A, B, g) if t is not None and t.requires_grad]
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_mix_input_per_head_rows_of_h():
    # one dropout mask per head: h is (T, N, r), head i's row mixed with gate i
    h = torch.randn(4, 3, 2)
    g = torch.softmax(torch.randn(4, 3), -1)
    torch.testing.assert_close(HF.mix_input(h, g, 2), (g.unsqueeze(-1) * h).flatten(1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_router_gates_dense_and_top_k(temperature):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    dense = HF.router_gates(logits, None, temperature)
    torch.testing.assert_close(dense, torch.softmax(logits / temperature, -1).float())
    assert torch.equal(HF.router_probs(logits, temperature), dense)
    for k in (1, 2, 4):
        fast = HF.router_gates(logits, k, temperature)
        p = torch.softmax(logits / temperature, -1)
        kept = torch.zeros_like(p).scatter(-1, p.topk(k, -1).indices, 1.0)
        slow = p * kept / (p * kept).sum(-1, keepdim=True)  # the k largest probabilities renormalised
        torch.testing.assert_close(fast, slow.float())
        assert ((fast > 0).sum(-1) == k).all()
        w = torch.randn(6, 5)
        ga = torch.autograd.grad((fast * w).sum(), logits)[0]
        # top-1: straight-through, the one-hot forward with the dense softmax's gradient (the renormalised top-1
        # gate is the constant 1, which would give the router no gradient)
        gb = torch.autograd.grad(((p if k == 1 else slow).float() * w).sum(), logits)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
        assert ga.abs().sum() > 0


def test_lower_temperature_sharpens_and_gates_are_fp32():
    logits = torch.randn(32, 4, dtype=torch.bfloat16)
    entropy = [torch.special.entr(HF.router_probs(logits, t)).sum(-1).mean() for t in (0.3, 1.0, 3.0)]
    assert entropy[0] < entropy[1] < entropy[2]
    for k in (None, 2):
        gates = HF.router_gates(logits, k)
        assert gates.dtype == torch.float32
        torch.testing.assert_close(gates.sum(-1), torch.ones(32))


@pytest.mark.parametrize("share_a", [True, False])
def test_delta_weight_equals_the_per_token_update_with_fixed_gates(share_a):
    x, A, B = make(3, share_a=share_a, seed=13)
    fixed = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    W_delta = HF.delta_weight(A, B, fixed, 0.75)
    assert W_delta.shape == (5, 7)
    torch.testing.assert_close(x @ W_delta.T, reference_update(x, A, B, 0.75, fixed))
    assert HF.merged_heads(B, fixed, 3, shared_a=share_a).shape == (5, 3 if share_a else 9)


def test_load_balancing_loss_balanced_collapsed_batched_and_gradient():
    n = 4
    balanced = torch.eye(n).repeat(2, 1) * 0.4 + 0.15  # rows sum to 1, the argmax cycles through the heads
    for p in (torch.full((8, n), 1.0 / n), balanced):
        assert HF.load_balancing_loss(p, p).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.tensor([[0.9, 0.05, 0.03, 0.02]]).repeat(8, 1)
    assert HF.load_balancing_loss(collapsed, collapsed).item() == pytest.approx(n * 0.9)
    top2 = HF.router_gates(collapsed.log(), 2)
    assert HF.load_balancing_loss(collapsed, top2, top_k=2).item() > 1.0
    # (L, T, N) -> (L,): the same as layer by layer
    probs = torch.softmax(torch.randn(3, 8, n), -1)
    torch.testing.assert_close(HF.load_balancing_loss(probs, probs), torch.stack([HF.load_balancing_loss(p, p) for p in probs]))
    # the gradient reaches the logits (through P_i only)
    logits = torch.randn(10, n, requires_grad=True)
    p = HF.router_probs(logits)
    (g,) = torch.autograd.grad(HF.load_balancing_loss(p, p), logits)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_uniform_gates_have_entropy_log_n():
    assert float(torch.special.entr(HF.router_probs(torch.zeros(1, 4))).sum()) == pytest.approx(math.log(4))
