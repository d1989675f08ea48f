"""HydraLoRA's math as pure functions on tensors.

Layouts: ``A`` (r, in), or (N*r, in) with one A per head (``share_a=False``); the N heads ``B_i`` (out, r) side by
side in ONE matrix ``B`` (out, N*r), head i = ``B[:, i*r:(i+1)*r]``. Per token, with gates g (N,):

    delta = scaling * sum_i g_i B_i h_i = scaling * B @ mix_input(h, g, r)        h = A x (or h_i = A_i x)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def router_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The dense router distribution: fp32 softmax of the logits (..., N) at ``temperature``."""
    if temperature != 1.0:
        logits = logits.float() / temperature
    if logits.dtype == torch.float32:  # the dtype argument costs a cast op even when there is nothing to cast
        return logits.softmax(dim=-1)
    return logits.softmax(dim=-1, dtype=torch.float32)


def router_gates(logits: torch.Tensor, top_k: Optional[int] = None, temperature: float = 1.0) -> torch.Tensor:
    """The gates (..., N), fp32: the dense softmax; with ``top_k``, the softmax over the k largest logits only (the k
    largest probabilities renormalised to sum 1, the others 0: the same function and gradient in fewer kernels). For
    ``top_k=1`` the forward value is the one-hot of the largest logit and the gradient the dense softmax's
    (straight-through estimator)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return router_probs(logits, temperature)
    if top_k == 1:
        # straight-through: the forward value is exactly one-hot (what the renormalised top-1 softmax gives), the
        # gradient that of the dense softmax (the renormalised top-1 gate is the constant 1: no router gradient)
        probs = router_probs(logits, temperature)
        hard = torch.zeros_like(probs).scatter_(-1, logits.topk(1, dim=-1).indices, 1.0)
        return hard + (probs - probs.detach()) if probs.requires_grad else hard
    values, index = logits.topk(top_k, dim=-1)
    return router_probs(torch.full_like(logits, float("-inf")).scatter(-1, index, values), temperature)


def cosine_logits(x: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, max_scale: float = 100.0):
    """``exp(s) * cos(weight_i, x)`` (..., N): the cosine router's logits, the scale exp(s) at most ``max_scale``."""
    cos = F.linear(F.normalize(x, dim=-1), F.normalize(weight, dim=-1))
    return cos * log_scale.clamp(max=math.log(max_scale)).exp().to(cos.dtype)


def pool_weights(real: Optional[torch.Tensor], pool_tokens: int, done: Optional[torch.Tensor], batch: int,
                 length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Which tokens of a chunk of ``length`` positions enter a sequence's pool, and the running pool size.

    ``real`` (B, length): 1 for real tokens, 0 for padding (None: all real); ``done`` (B,): real tokens of the sequence
    before this chunk (a decode step of ``generate()``; None: the chunk starts the sequence). A real token enters the pool
    while fewer than ``pool_tokens`` real tokens precede it. Returns ``weights`` (B, L), 1 where a token enters, and
    ``counts`` (B, L), the pool size up to and including each position, over the first ``L`` positions of the chunk:
    the shortest prefix that holds every entering token (L >= 1); from position L on, the pool no longer changes.
    """
    if real is None and done is None:  # a new sequence of real tokens: the first K positions, no host sync
        n = min(length, pool_tokens)
        weights = torch.ones(batch, n, device=device)
        return weights, weights.cumsum(1)
    real = torch.ones(batch, length, device=device) if real is None else real.float()
    before = real.cumsum(1) - real  # real tokens before each position, in this chunk
    if done is not None:
        before = before + done.float().unsqueeze(1)
    weights = real * (before < pool_tokens)
    columns = weights.any(0).nonzero()
    n = int(columns[-1]) + 1 if len(columns) else 1
    weights = weights[:, :n]
    counts = weights.cumsum(1) if done is None else weights.cumsum(1) + done.float().clamp(max=pool_tokens).unsqueeze(1)
    return weights, counts


def pool_prefix(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                previous: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The running mean of the pooled tokens at each of the first L positions: ``x`` (B, S, d) with ``weights`` and
    ``counts`` (B, L) of :func:`pool_weights`, ``previous`` (B, d) the pooled sum carried from earlier chunks.
    Returns the means (B, L, d), fp32 (the zero vector where nothing was pooled yet: a pad token before the first real
    one), and the pooled sum (B, d) after the chunk (to carry into the next one)."""
    n = weights.shape[1]
    sums = (weights.unsqueeze(-1) * x[:, :n].float()).cumsum(1)
    if previous is not None:
        sums = sums + previous.unsqueeze(1)
    return sums / counts.clamp(min=1).unsqueeze(-1), sums[:, -1]


def hold_last(values: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, N) -> (B, length, N): positions L.. repeat position L-1 (the gates once the pool is complete)."""
    n = values.shape[1]
    if n >= length:
        return values[:, :length]
    return torch.cat([values, values[:, -1:].expand(-1, length - n, -1)], 1)


def mix_input(h: torch.Tensor, gates: Optional[torch.Tensor], rank: int) -> torch.Tensor:
    """The input of the side-by-side heads, (T, N*r): ``h`` (T, r) from a shared A, (T, N*r) from one A per head or
    (T, N, r) (one dropout mask per head) times the gates, (T, N) per token or (N,) fixed. Without gates (N = 1): h."""
    if gates is None:
        return h
    g = gates if gates.dtype == h.dtype else gates.to(h.dtype)
    if h.dim() == 2 and h.shape[-1] == rank:  # shared A: the outer product gates x h
        if g.dim() == 2 and not torch.compiler.is_compiling():
            # as a batched GEMM: its backward is two batched GEMMs instead of two multiplies and two reductions
            # (faster in eager, benchmarks/bench_overhead.py); compiled, the multiply below fuses with its neighbours
            return torch.bmm(g.unsqueeze(-1), h.unsqueeze(-2)).flatten(-2)
        return (g.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
    heads = h if h.dim() == 3 else h.unflatten(-1, (-1, rank))
    return (g.unsqueeze(-1) * heads).flatten(-2)


def sample_gates(gates: torch.Tensor, tokens: int, batch: Optional[int] = None) -> torch.Tensor:
    """Gates given per sample, (B, N), as per-token gates (tokens, N) of a batch of ``batch`` samples flattened
    sample-major (each sample's tokens together, as ``x.reshape(-1, d)`` of a (B, S, d) batch; ``batch=None``: one
    token per sample); (N,) gates are returned as they are."""
    if gates.dim() == 1:
        return gates
    samples = tokens if batch is None else batch
    if gates.shape[0] != samples:
        raise ValueError(
            f"Per-sample gates with {gates.shape[0]} rows for a batch of {samples} samples: give one row per sample "
            "of the batch (generate() with num_beams=k: each row repeated k times, gates.repeat_interleave(k, 0)), or "
            "(N,) gates for all."
        )
    return gates if tokens == samples else gates.repeat_interleave(tokens // samples, dim=0)


def merged_heads(B: torch.Tensor, gates: torch.Tensor, rank: int, shared_a: bool) -> torch.Tensor:
    """B (out, N*r) with FIXED gates (N,) folded in: ``sum_i g_i B_i`` (out, r) for a shared A, ``[g_1 B_1 | ... |
    g_N B_N]`` (out, N*r) for one A per head; the merged update is ``merged_heads(...) @ A``."""
    heads = B.unflatten(-1, (-1, rank)) * gates.to(B.dtype)[:, None]
    return heads.sum(-2) if shared_a else heads.flatten(-2)


def delta_weight(A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) weight ``scaling * sum_i g_i B_i A_i`` for FIXED gates (merge, LoRA export)."""
    rank = B.shape[-1] // gates.numel()
    return scaling * merged_heads(B, gates, rank, shared_a=A.shape[0] == rank) @ A


def load_balancing_loss(probs: torch.Tensor, gates: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` over the tokens (1 when balanced): (..., T, N) -> (...).

    ``f_i``: the share of routing slots that go to head i (the argmax with dense gates, the kept heads with top-k),
    not differentiable; ``P_i``: the mean router probability of head i, which carries the gradient.
    """
    n = probs.shape[-1]
    if top_k is None or top_k >= n:
        chosen = F.one_hot(probs.argmax(dim=-1), n).to(probs.dtype)
    else:
        chosen = (gates > 0).to(probs.dtype) / top_k
    return n * (chosen.mean(dim=-2).detach() * probs.mean(dim=-2)).sum(dim=-1)


def aux_loss_warmup_coef(coef: float, step: Optional[int], warmup_steps: int) -> float:
    """The balance-loss coefficient at optimizer step ``step``: ``coef * min(1, step / warmup_steps)`` (a linear ramp
    from 0 at step 0; ``coef`` itself when ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return coef
    if step is None:
        raise ValueError(
            f"router_aux_loss_warmup_steps={warmup_steps} ramps the balance loss with the optimizer step, which was "
            "not given: set model.base_model.aux_loss_step = optimizer_steps_done in your loop (the "
            "peft_hydra.HydraLoraCallback of a transformers Trainer does it), or pass hydra_aux_loss(step=...)."
        )
    return coef * min(1.0, max(int(step), 0) / warmup_steps)


# ------------------------------------------------------------------------------ cold-start initialisation
def centered_heads(
    out_features: int, num_experts: int, r: int, std: float, *, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random heads (out, N, r) that sum to zero over the heads (``head_init="centered"``).

    ``B_i = std * (G_i - mean_j G_j) * sqrt(N / (N - 1))`` with ``G`` standard normal: every entry has standard
    deviation ``std`` and ``sum_i B_i = 0``, so ``sum_i g_i B_i = sum_i (g_i - 1/N) B_i`` vanishes for uniform gates.
    """
    if num_experts < 2:
        raise ValueError(f"centered heads need num_experts >= 2 (one centred head is zero), got {num_experts}.")
    g = torch.randn(out_features, num_experts, r, generator=generator)
    g = g - g.mean(dim=1, keepdim=True)
    return g * (std * math.sqrt(num_experts / (num_experts - 1)))


def orthogonal_heads(
    out_features: int, num_experts: int, r: int, std: float, *, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Centred heads (out, N, r) built from disjoint orthonormal output subspaces (``head_init="orthogonal"``).

    ``Q`` (out, N*r) has orthonormal columns (QR of a Gaussian matrix); ``Q_i`` is its i-th block of r columns;
    ``B_i = c (Q_i - mean_j Q_j)`` with ``c = std * sqrt(out * N / (N - 1))``, so that every entry has root mean
    square ``std`` and ``sum_i B_i = 0``. The differences ``B_i - B_j = c (Q_i - Q_j)`` lie in disjoint subspaces, and
    every pair of (flattened) heads has cosine exactly ``-1 / (N - 1)``. Needs ``out >= N * r``.
    """
    if num_experts < 2:
        raise ValueError(f"orthogonal heads need num_experts >= 2 (one centred head is zero), got {num_experts}.")
    if out_features < num_experts * r:
        raise ValueError(
            f"orthogonal heads need out_features >= num_experts * r ({num_experts} x {r} = {num_experts * r} "
            f"orthogonal columns), got out_features={out_features}."
        )
    gauss = torch.randn(out_features, num_experts * r, generator=generator, dtype=torch.float64)
    q, upper = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(upper)).unsqueeze(0)  # the unique QR with a positive diagonal: Haar-distributed
    heads = q.view(out_features, num_experts, r)
    heads = heads - heads.mean(dim=1, keepdim=True)
    return (heads * (std * math.sqrt(out_features * num_experts / (num_experts - 1)))).float()


def init_heads(
    kind: str, out_features: int, num_experts: int, r: int, std: float, *, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The initial heads (out, N, r) for ``HydraLoraConfig.head_init`` = ``kind`` ("zero", "centered", "orthogonal")."""
    if kind == "zero":
        return torch.zeros(out_features, num_experts, r)
    if kind == "centered":
        return centered_heads(out_features, num_experts, r, std, generator=generator)
    if kind == "orthogonal":
        return orthogonal_heads(out_features, num_experts, r, std, generator=generator)
    raise ValueError(f"head_init must be 'zero', 'centered' or 'orthogonal', got {kind!r}.")
