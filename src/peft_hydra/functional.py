"""HydraLoRA's math as pure functions: gates, the batched head mix, the load-balancing loss, router statistics.

Shapes: ``x`` is (..., in); ``h = A x`` is (..., r) with a shared A, or (..., N*r) with one A per head
(``share_a=False``); the N heads are ONE tensor ``B`` of shape (out, N, r), so that ``B.view(out, N*r)`` is free.

    delta = scaling * sum_i g_i B_i h       (h_i for per-head A)
          = scaling * B.view(out, N*r) @ flatten(g[..., :, None] * h.view(..., -1, r))

``A x`` is computed once per layer and all heads are applied by ONE matmul: no Python loop over heads, no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def router_probs(x: torch.Tensor, router_weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token softmax over the N heads, computed in fp32: (..., d) x (N, d) -> (..., N)."""
    return softmax_gates(F.linear(x.to(router_weight.dtype), router_weight), temperature)


def softmax_gates(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 softmax of router logits (..., N) at the given temperature."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.softmax(dim=-1)


def top_k_gates(probs: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Keep the ``top_k`` largest gates of every token and renormalise them to sum to 1 (None: dense gates)."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    values, index = probs.topk(top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, index, values)


def mix_heads(h: torch.Tensor, gates: Optional[torch.Tensor], B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * sum_i g_i B_i h_i`` for all heads in one matmul.

    The scaling is applied to the small (..., N) gates (or to h when N == 1), never to the (..., out) result.

    Args:
        h: (..., r) from a shared A, or (..., N*r) from one A per head.
        gates: (..., N) per-token gates, (N,) fixed gates, or None when N == 1.
        B: (out, N, r) stacked heads.
        scaling: the LoRA scaling factor.
    Returns: (..., out) in ``h``'s dtype.
    """
    out_features, n, r = B.shape
    if gates is None:
        if n != 1:
            raise ValueError(f"gates are required with {n} heads")
        return F.linear(h * scaling if scaling != 1.0 else h, B.view(out_features, r))
    gates = gates.to(h.dtype)
    if scaling != 1.0:
        gates = gates * scaling
    gated = gates.unsqueeze(-1) * h.unflatten(-1, (-1, r))  # (..., N, r); a shared A broadcasts
    return F.linear(gated.flatten(-2), B.view(out_features, n * r))


def hydra_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    router_weight: Optional[torch.Tensor] = None,
    fixed_gates: Optional[torch.Tensor] = None,
    router_input: str = "x",
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    dropout=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole HydraLoRA update of one layer: returns ``(delta, gates, probs)``.

    ``A`` is (r or N*r, in); ``router_weight`` is (N, in) for ``router_input="x"`` or (N, r) for ``"a"``;
    ``fixed_gates`` (N,) replaces the router. ``gates`` / ``probs`` are None without a router.
    """
    probs = None
    if router_weight is not None and router_input == "x" and _is_identity(dropout) and router_weight.dtype == A.dtype:
        # A and the router read the same x: one GEMM over x for both, then split (..., r | N)
        h, logits = F.linear(x, torch.cat([A, router_weight])).split([A.shape[0], router_weight.shape[0]], dim=-1)
        probs = softmax_gates(logits, temperature)
    else:
        h = F.linear(dropout(x) if dropout is not None else x, A)
        if router_weight is not None:
            probs = router_probs(x if router_input == "x" else h, router_weight, temperature)
    gates = top_k_gates(probs, top_k) if probs is not None else fixed_gates
    return mix_heads(h, gates, B, scaling), gates, probs


def _is_identity(dropout) -> bool:
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return True
    return isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training)


def delta_weight(A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) weight ``scaling * sum_i g_i B_i A_i`` for FIXED gates (merge / LoRA export)."""
    out_features, n, r = B.shape
    gates = gates.to(B.dtype)
    if A.shape[0] == r:  # shared A: (sum_i g_i B_i) A
        return scaling * torch.einsum("n,onr->or", gates, B) @ A
    return scaling * (B * gates[None, :, None]).reshape(out_features, n * r) @ A


def load_balancing_loss(probs: torch.Tensor, gates: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` over all tokens (1 when perfectly balanced).

    ``f_i``: the fraction of routing slots that go to head i (the argmax with dense gates, the kept heads with
    top-k), not differentiable; ``P_i``: the mean router probability of head i, which carries the gradient.
    """
    n = probs.shape[-1]
    probs = probs.reshape(-1, n)
    if top_k is None or top_k >= n:
        chosen = F.one_hot(probs.argmax(dim=-1), n).to(probs.dtype)
    else:
        chosen = (gates.reshape(-1, n) > 0).to(probs.dtype) / top_k
    f = chosen.mean(dim=0)
    return n * (f.detach() * probs.mean(dim=0)).sum()


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the router distribution (nats), shape (...,)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
