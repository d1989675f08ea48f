"""HydraLoRA's math as pure functions: gates, the batched head mix, the load-balancing loss, router statistics.

Shapes: ``x`` is (..., in); ``h = A x`` is (..., r) with a shared A, or (..., N*r) with one A per head
(``share_a=False``); the N heads are ONE tensor ``B`` of shape (out, N, r), so that ``B.view(out, N*r)`` is free.

    delta = scaling * sum_i g_i B_i h       (h_i for per-head A)
          = scaling * B.view(out, N*r) @ flatten(g[..., :, None] * h.view(..., -1, r))

``A x`` is computed once per layer and all heads are applied by ONE matmul: no Python loop over heads, no host sync.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


FUSED_ROUTER_MIN_ELEMENTS = 1 << 16
"""Size of x (tokens x in-features) from which :func:`delta_2d` computes ``A x`` and the router logits as ONE GEMM
over ``[A; W_router]``. Measured on CPU (fp32, 1 thread, forward + backward, r = 8, N = 3, quiet machine;
``benchmarks/bench_overhead.py --router-gemm``), fused / separate: 1.14 at 8 tokens x 32 and 1.20 at 8 x 576 (the
``cat`` and ``split`` are pure overhead there), 1.03-1.04 at 16 x 2048 and 32 x 576, 0.99 at 64 x 576 and 128 x 576,
0.96 at 128 x 1536, 0.91 at 512 x 576 (x is read once, and the router stops being a second skinny GEMM over x in
the forward and the backward). Set it to 0 to always fuse or to a huge value to never fuse."""


def router_probs(x: torch.Tensor, router_weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token softmax over the N heads, computed in fp32: (..., d) x (N, d) -> (..., N)."""
    return softmax_gates(F.linear(_as(x, router_weight.dtype), router_weight), temperature)


def softmax_gates(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 softmax of router logits (..., N) at the given temperature (the cast is fused into the softmax)."""
    if temperature != 1.0:
        logits = logits.float() / temperature
    if logits.dtype == torch.float32:  # the dtype argument costs a cast op even when there is nothing to cast
        return logits.softmax(dim=-1)
    return logits.softmax(dim=-1, dtype=torch.float32)


def top_k_gates(probs: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Keep the ``top_k`` largest gates of every token and renormalise them to sum to 1 (None: dense gates)."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    values, index = probs.topk(top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, index, values)


def top_k_softmax(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """``top_k_gates(softmax_gates(logits))`` in fewer kernels: the softmax over the k largest logits only.

    Renormalising the k largest probabilities is the softmax restricted to their logits (the others set to -inf),
    so this is the same function with the same gradient, in 4 kernels (topk, full, scatter, softmax) instead of 6.
    """
    if temperature != 1.0:
        logits = logits.float() / temperature
    values, index = logits.topk(top_k, dim=-1)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, index, values)
    return masked.softmax(dim=-1, dtype=torch.float32)


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
    r = B.shape[-1]
    if gates is None and B.shape[1] != 1:
        raise ValueError(f"gates are required with {B.shape[1]} heads")
    if gates is not None:
        h = h.unsqueeze(-2) if h.shape[-1] == r else h.unflatten(-1, (-1, r))
    return _mix(h, gates, B, scaling)


def _mix(h: torch.Tensor, gates: Optional[torch.Tensor], B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The head mix on ``h`` of shape (..., 1, r) (a shared A, broadcast over the heads) or (..., N, r); without
    gates (N == 1, plain LoRA) ``h`` is (..., r)."""
    out_features, n, r = B.shape
    if gates is None:
        return F.linear(h * scaling if scaling != 1.0 else h, B.view(out_features, r))
    g = gates if gates.dtype == h.dtype else gates.to(h.dtype)
    if scaling != 1.0:
        g = g * scaling
    if g.dim() == 2 and h.shape[-2] == 1 and not torch.compiler.is_compiling():
        # per-token gates on a shared A, (T, N) x (T, 1, r): the outer product as a batched GEMM, whose backward is
        # two batched GEMMs instead of two multiplies and two reductions: in the host-bound step of
        # benchmarks/bench_overhead.py --choices 0.5-2% faster than the multiply (between runs). Under torch.compile
        # the pointwise multiply below is kept: it fuses with its neighbours, a bmm does not.
        gated = torch.bmm(g.unsqueeze(-1), h)
    else:
        gated = g.unsqueeze(-1) * h  # (..., N, r)
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
    dropout_per_head: bool = False,
    need_probs: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole HydraLoRA update of one layer: returns ``(delta, gates, probs)``.

    ``A`` is (r or N*r, in); ``router_weight`` is (N, in) for ``router_input="x"`` or (N, r) for ``"a"``;
    ``fixed_gates`` (N,) replaces the router. ``gates`` / ``probs`` are None without a router; with ``top_k`` and
    ``need_probs=False`` the dense ``probs`` (only needed for statistics and the balance loss) are not computed.
    ``dropout_per_head``: an active ``dropout`` draws one mask per head (``x`` is expanded to (..., N, in)), as the
    authors' per-head loop ``sum_i g_i B_i A dropout_i(x)`` does.
    """
    lead = x.shape[:-1]
    delta, gates, probs = delta_2d(
        x.reshape(-1, x.shape[-1]), A, B, scaling, router_weight=router_weight, fixed_gates=fixed_gates,
        router_input=router_input, top_k=top_k, temperature=temperature, dropout=active_dropout(dropout),
        dropout_per_head=dropout_per_head, need_probs=need_probs,
    )  # fmt: skip
    n = B.shape[1]
    if probs is not None:
        probs = probs.view(*lead, n)
    if gates is not None and gates is not fixed_gates:
        gates = gates.view(*lead, n)
    return delta.view(*lead, B.shape[0]), gates, probs


def delta_2d(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    router_weight: Optional[torch.Tensor],
    fixed_gates: Optional[torch.Tensor],
    router_input: str,
    top_k: Optional[int],
    temperature: float,
    dropout,
    dropout_per_head: bool,
    need_probs: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`hydra_delta` on a 2-D ``x`` (T, in), the layer's hot path: returns (T, out), (T, N), (T, N).

    ``dropout`` is an active dropout module or None (see :func:`active_dropout`). Kept minimal in ops and autograd
    nodes (see benchmarks/bench_overhead.py): 2-D GEMMs (no view/unsafe-view pairs), the fp32 cast fused into the
    softmax, top-k as a softmax over the k largest logits, and the head mix as one outer product (``bmm`` in eager)
    and one GEMM. The router shares A's GEMM over x (a per-forward ``cat`` of the two weights) when x has at least
    :data:`FUSED_ROUTER_MIN_ELEMENTS` elements, and runs as its own GEMM below that (see the constant).
    """
    n, r = B.shape[1], B.shape[2]
    logits = None
    if dropout is not None:
        if dropout_per_head and n > 1:
            xd = dropout(x.unsqueeze(1).expand(-1, n, -1))  # (T, N, in): one mask per head
            h = F.linear(xd, A) if A.shape[0] == r else torch.einsum("tni,nri->tnr", xd, A.view(n, r, -1))
        else:
            h = F.linear(dropout(x), A)  # (T, r) or (T, N*r)
    elif router_weight is None or router_input != "x":
        h = F.linear(x, A)
    elif x.numel() < FUSED_ROUTER_MIN_ELEMENTS or not router_weight.dtype == A.dtype == x.dtype:
        h = F.linear(x, A)
        logits = F.linear(_as(x, router_weight.dtype), router_weight)
    else:
        # A and the router read the same x: one GEMM over x for both (x is read once, and the router's N-column
        # GEMM and its backward stop being separate skinny GEMMs), at the cost of a small per-forward ``cat``
        h, logits = F.linear(x, torch.cat([A, router_weight])).split([A.shape[0], n], dim=-1)
    probs = None
    if router_weight is None:
        gates = fixed_gates
    else:
        if logits is None:  # the router reads the un-dropped x, or A x
            if router_input == "x":
                logits = F.linear(_as(x, router_weight.dtype), router_weight)
            elif h.dim() == 2:
                logits = F.linear(_as(h, router_weight.dtype), router_weight)
            else:
                raise ValueError(
                    "router_input='a' needs one A x per token: it cannot be combined with dropout_per_head."
                )
        if top_k is None or top_k >= n:
            gates = probs = softmax_gates(logits, temperature)
        else:
            gates = top_k_softmax(logits, top_k, temperature)
            probs = softmax_gates(logits, temperature) if need_probs else None
    if gates is not None and h.dim() == 2:
        h = h.unsqueeze(-2) if A.shape[0] == r else h.view(-1, n, r)
    return _mix(h, gates, B, scaling), gates, probs


# --------------------------------------------------------------------------------------------- inference
# Without autograd (generate(), evaluation under no_grad) the layer runs the update from weights prepared once
# (``prepare_inference``; the layer caches them and rebuilds them when a weight changes) and adds it to the base
# output in the same GEMM: fewer ops per token than the training path (``delta_2d``), the same values up to
# floating-point rounding (tests/test_layer.py checks it against the training path).


class InferenceWeights(NamedTuple):
    """The update of one adapter prepared for inference by :func:`prepare_inference`: contiguous copies in the
    layouts the GEMMs read fastest (a strided view of B made the top-1 gather 2x and the dense ``addmm`` 1.2x slower
    at SmolLM2 width, one token, CPU), so the caller must prepare them again when a weight changes."""

    w_in: torch.Tensor  # (in, rows + N): [A; W_router]^T for a router on x; else A^T (in, rows)
    rows: int  # rows of A: r, or N*r for one A per head
    n: int  # heads whose gates are computed per token (1: none, fixed gates folded into b_mix)
    router_h: Optional[torch.Tensor]  # (N, rows) for router_input="a"; else None
    b_mix: torch.Tensor  # (N*r, out) = B.view(out, N*r).T; with fixed gates or N = 1 the folded (rows, out)
    b_heads: Optional[torch.Tensor]  # (N, r, out): B per head, for the top-1 gather (top_k=1, shared A only)


def prepare_inference(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    router_weight: Optional[torch.Tensor],
    fixed_gates: Optional[torch.Tensor],
    router_input: str,
    top_k: Optional[int] = None,
) -> InferenceWeights:
    """The weights :func:`inference_update` needs, prepared once: the router on x joins A in ONE weight ``[A;
    W_router]`` (one GEMM over x for both); fixed gates (and N = 1) are folded into B (``gated_heads``), so that
    the update is two GEMMs as LoRA's. With ``top_k=1`` the heads are also laid out per head for the gather."""
    out_features, n, r = B.shape
    rows = A.shape[0]
    if router_weight is None:
        if n == 1:
            b_mix = B.view(out_features, r).t().contiguous()
        else:
            b_mix = gated_heads(B, fixed_gates, shared_a=rows == r).t().contiguous()
        return InferenceWeights(A.t().contiguous(), rows, 1, None, b_mix, None)
    if router_weight.dtype != A.dtype:
        raise ValueError(
            f"prepare_inference needs the router in A's dtype ({A.dtype}), got {router_weight.dtype}: cast the "
            "adapter to one dtype (the layer runs the training path for such an adapter)."
        )
    w_in = (torch.cat([A, router_weight]) if router_input == "x" else A).t().contiguous()  # torch.mm(x, w_in)
    router_h = router_weight if router_input != "x" else None
    b_heads = B.permute(1, 2, 0).contiguous() if rows == r and top_k == 1 else None
    b_mix = B.view(out_features, n * r).t().contiguous()
    return InferenceWeights(w_in, rows, n, router_h, b_mix, b_heads)


def inference_update(
    result: torch.Tensor,
    x: torch.Tensor,
    w: InferenceWeights,
    scaling: float,
    *,
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    need_probs: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``result + scaling * delta`` for tokens ``x`` (T, in) with the prepared weights ``w``, no dropout: returns
    (T, out), and the gates and probabilities as :func:`delta_2d` does (``probs`` None with top-k unless
    ``need_probs``).

    Per token: one GEMM over x for A and the router, the softmax, and the head mix as one outer product and one GEMM
    that also adds to ``result`` (``addmm``; when ``result`` has another dtype than the adapter, the update is cast
    and added as the training path does). Top-1 gathers the chosen head of every token (at most
    :data:`TOP1_GATHER_MAX_TOKENS` tokens; beyond, the gates are scattered and mixed like dense ones).
    """
    y = torch.mm(x, w.w_in)
    n, rows = w.n, w.rows
    if n == 1:  # no per-token gates: LoRA's two GEMMs
        return _add_scaled(result, y, w.b_mix, scaling), None, None
    if w.router_h is None:
        h, logits = y.split_with_sizes([rows, n], dim=-1)
    else:
        h, logits = y, F.linear(y, w.router_h)
    probs = None
    if top_k is None or top_k >= n:
        gates = probs = softmax_gates(logits, temperature)
    else:
        if need_probs:
            probs = softmax_gates(logits, temperature)
        if top_k == 1 and w.b_heads is not None and x.shape[0] <= TOP1_GATHER_MAX_TOKENS:
            # top-1: the kept head's gate is exactly 1 (a softmax over one logit), so the update is B_i A x of the
            # chosen head i: gather the (r, out) heads of the T tokens, one batched GEMM; no gates to mix (they are
            # built only for the statistics / balance loss: ``need_probs``)
            index = logits.topk(1, dim=-1)[1].view(-1)
            heads = w.b_heads.index_select(0, index)  # (T, r, out)
            gates = None
            if need_probs:
                gates = torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, index.view(-1, 1), 1.0)
            if x.shape[0] == 1:
                return _add_scaled(result, h, heads[0], scaling), gates, probs
            delta = torch.bmm(h.unsqueeze(1), heads).view(result.shape)
            return _add_to(result, delta, scaling), gates, probs
        gates = top_k_softmax(logits, top_k, temperature)
    g = gates if gates.dtype == h.dtype else gates.to(h.dtype)
    if rows * n == w.b_mix.shape[0]:  # shared A: the outer product gates x (A x), (T, N, r)
        gated = torch.bmm(g.unsqueeze(-1), h.unsqueeze(-2))
    else:  # one A per head: h is (T, N*r)
        gated = g.unsqueeze(-1) * h.view(h.shape[0], n, -1)
    return _add_scaled(result, gated.view(h.shape[0], -1), w.b_mix, scaling), gates, probs


TOP1_GATHER_MAX_TOKENS = 64
"""Top-1 inference gathers each token's chosen head, (tokens, r, out) values, up to this many tokens (decoding,
small batches); a longer input (a prompt) scatters its gates and mixes all heads, as dense gates."""


def _add_scaled(result: torch.Tensor, h: torch.Tensor, b_t: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling * h @ b_t``: one ``addmm`` when the dtypes agree; else as the training path (the product
    in the adapter's dtype, cast, added)."""
    if result.dtype == h.dtype:
        return torch.addmm(result, h, b_t, alpha=scaling)
    return torch.add(result, torch.mm(h, b_t).to(result.dtype), alpha=scaling)


def _add_to(result: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.add(result, delta if delta.dtype == result.dtype else delta.to(result.dtype), alpha=scaling)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def active_dropout(dropout):
    """``dropout`` when it changes its input (a training-mode ``nn.Dropout`` with p > 0 or an unknown module)."""
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return None
    if isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training):
        return None
    return dropout


def gated_heads(B: torch.Tensor, gates: torch.Tensor, shared_a: bool) -> torch.Tensor:
    """The heads (out, N, r) with FIXED gates folded in, so that the merged update is ``gated_heads(B, g) @ A``:
    ``sum_i g_i B_i`` (out, r) for a shared A; ``[g_1 B_1 | ... | g_N B_N]`` (out, N*r) for one A per head."""
    out_features, n, r = B.shape
    gates = gates.to(B.dtype)
    if shared_a:
        return torch.einsum("n,onr->or", gates, B)
    return (B * gates[None, :, None]).reshape(out_features, n * r)


def delta_weight(A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) weight ``scaling * sum_i g_i B_i A_i`` for FIXED gates (merge / LoRA export)."""
    return scaling * gated_heads(B, gates, shared_a=A.shape[0] == B.shape[-1]) @ A


def load_balancing_loss(probs: torch.Tensor, gates: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` over all tokens (1 when perfectly balanced).

    ``f_i``: the fraction of routing slots that go to head i (the argmax with dense gates, the kept heads with
    top-k), not differentiable; ``P_i``: the mean router probability of head i, which carries the gradient.
    """
    n = probs.shape[-1]
    return load_balancing_losses(probs.reshape(-1, n), gates.reshape(-1, n), top_k)


def load_balancing_losses(probs: torch.Tensor, gates: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """:func:`load_balancing_loss` of L layers at once: ``probs`` / ``gates`` (L, T, N) -> (L,) (the same ops for
    every layer, so a model's balance loss costs a handful of kernels, not a handful per layer)."""
    n = probs.shape[-1]
    if top_k is None or top_k >= n:
        chosen = F.one_hot(probs.argmax(dim=-1), n).to(probs.dtype)
    else:
        chosen = (gates > 0).to(probs.dtype) / top_k
    f = chosen.mean(dim=-2)
    return n * (f.detach() * probs.mean(dim=-2)).sum(dim=-1)


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the router distribution (nats), shape (...,)."""
    return torch.special.entr(probs).sum(dim=-1)


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


def aux_loss_warmup_coef(coef: float, step: Optional[int], warmup_steps: int) -> float:
    """The balance-loss coefficient at optimizer step ``step``: ``coef * min(1, step / warmup_steps)`` (a linear ramp
    from 0 at step 0; ``coef`` itself when ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return coef
    if step is None:
        raise ValueError(
            f"router_aux_loss_warmup_steps={warmup_steps} ramps the balance loss with the optimizer step: pass it, "
            "model.base_model.hydra_aux_loss(step=optimizer_steps_done) (peft_hydra.prepare_trainer passes "
            "trainer.state.global_step)."
        )
    return coef * min(1.0, max(int(step), 0) / warmup_steps)
