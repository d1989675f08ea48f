"""`HydraRouter`: the gates of one HydraLoRA layer, as a module of its own.

Its forward returns the gates and nothing else; a token-scope router keeps no state. A sequence-scope router
(``router_scope="sequence"``) gives every token of a sample the gates of the mean router input over the sample's first
K real tokens (a token before the K-th: the mean up to itself); inside the model's forward it reads the sequences'
structure (padding, whether the forward continues a KV cache) from :class:`SequenceContext`, which the tuner sets, and
carries its pooled sum over the decode steps of ``generate()``. Whoever wants to see the routing (router
statistics, routing reports, the balance loss) registers a forward hook on it: ``HydraLoraModel`` does so only when
asked, so a forward nobody observes does no statistics work. A hook gets the router's input and its gates;
:meth:`HydraRouter.probs` gives the dense distribution (the gates themselves unless ``top_k`` is set).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as HF


#: A decode step whose prompt the sequence routers did not pool (checked by the tuner per forward, by a router for
#: itself: e.g. an adapter added after the prompt ran).
STALE_CACHE = (
    "router_scope='sequence': this forward continues a KV cache whose prompt the routers did not see (no pooled state "
    "for a batch of this size). Run the prompt through the model first (generate() does); beam search reorders the "
    "cache in a way the routers do not follow when a prompt is shorter than router_pool_tokens."
)


class SequenceContext:
    """The sequences of one forward of the wrapped model, shared by its sequence-scope routers (set by the tuner's
    pre-hook on the model): ``batch`` samples of ``length`` positions, the pool ``weights`` and ``counts`` (B, L) of
    :func:`~peft_hydra.functional.pool_weights`, and whether the forward continues a KV cache (a decode step)."""

    __slots__ = ("batch", "length", "weights", "counts", "continuing")

    def __init__(self, batch: int, length: int, weights: torch.Tensor, counts: torch.Tensor, continuing: bool):
        self.batch, self.length, self.weights, self.counts, self.continuing = batch, length, weights, counts, continuing


class HydraRouter(nn.Module):
    """Gates over ``num_experts`` heads, from one of three sources:

    - ``in_features=None`` (the router on the layer input): the input IS the logits, computed by the layer's
      ``hydra_A``, whose last N output rows are the router's weight (one GEMM over x for A and the router);
    - ``in_features=d`` (the router on ``A x``, ``router_input="a"``): a weight (N, d), no bias, applied here;
    - ``fixed_gates`` (N,): no weight; every token gets these gates (a non-saved buffer, rebuilt from the config).

    Learned gates: the fp32 softmax of the logits divided by ``temperature``, restricted to the ``top_k`` largest.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: Optional[int] = None,
        *,
        top_k: Optional[int] = None,
        temperature: float = 1.0,
        fixed_gates: Optional[torch.Tensor] = None,
        scope: str = "token",
        pool_tokens: int = 8,
        cosine: bool = False,
        cosine_init_scale: float = 10.0,
        center: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.scope = scope
        self.pool_tokens = int(pool_tokens)
        self.weight = None
        self.log_scale = None
        self.gate_override: Optional[torch.Tensor] = None  # set by HydraLoraModel.override_gates, never saved
        # sequence scope: the forward's sequences (set by the tuner), the pooled sum carried over decode steps, and the
        # dense probabilities of the last forward (for observers, with top_k)
        self.sequence: Optional[SequenceContext] = None
        self._pooled_sum: Optional[torch.Tensor] = None
        self._last_probs: Optional[tuple] = None
        if cosine and (fixed_gates is not None or in_features is None):
            raise ValueError("A cosine router needs a weight of its own: give in_features and no fixed_gates.")
        if cosine:
            # shape (1,), not a scalar: FSDP2 (fully_shard) refuses 0-d parameters
            self.log_scale = nn.Parameter(torch.tensor([math.log(cosine_init_scale)]))
        if fixed_gates is not None:
            self.register_buffer("fixed_gates", fixed_gates.reshape(num_experts), persistent=False)
        else:
            self.fixed_gates = None
            if in_features is not None:
                self.weight = nn.Parameter(torch.empty(num_experts, in_features))
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init
        if not center:
            self.center = None
        else:  # the running mean of the pooled router inputs (saved: evaluation and generation use it)
            if scope != "sequence" or fixed_gates is not None:
                raise ValueError("A centred router needs sequence scope and a learned router.")
            self.register_buffer("center", torch.zeros(in_features if in_features is not None else num_experts))
            self.register_buffer("center_updates", torch.zeros((), dtype=torch.long))

    @property
    def learned(self) -> bool:
        return self.fixed_gates is None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_scale is not None:
            return HF.cosine_logits(x.to(self.weight.dtype), self.weight, self.log_scale)
        return x if self.weight is None else F.linear(x.to(self.weight.dtype), self.weight)

    def forward(self, x: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
        """(T, d) logits or router input -> (T, N) fp32 gates; with fixed gates, the (N,) gates; inside
        ``override_gates``, the given gates (one row per sample of the ``batch`` samples, repeated over its tokens).
        The T tokens are ``batch`` samples flattened sample-major (``batch=None``: one sequence)."""
        if self.gate_override is not None:
            return HF.sample_gates(self.gate_override, x.shape[0], batch)
        if self.fixed_gates is not None:
            return self.fixed_gates
        if self.scope == "sequence":
            return self._sequence_gates(x, 1 if batch is None else batch)
        return HF.router_gates(self.logits(x), self.top_k, self.temperature)

    def _sequence_gates(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Every token's gates from the running mean of its sample's first ``pool_tokens`` real tokens."""
        length = x.shape[0] // batch
        context, previous = self.sequence, None
        if context is None:  # called outside the model's forward: a new sequence, every token real
            weights, counts = HF.pool_weights(None, self.pool_tokens, None, batch, length, x.device)
        else:
            if (context.batch, context.length) != (batch, length):
                raise ValueError(
                    f"A sequence-scope HydraLoRA router got {batch} x {length} tokens inside a forward of the model on "
                    f"{context.batch} x {context.length}: the layer runs on another batch layout than the model's "
                    "input (mixed-adapter batches, packed or regrouped tokens), which router_scope='sequence' cannot "
                    "route. Use router_scope='token' for such models, or call the model on (batch, sequence) input."
                )
            weights, counts = context.weights, context.counts
            if context.continuing:
                previous = self._pooled_sum
                if previous is None or previous.shape[0] != batch:
                    raise ValueError(STALE_CACHE)
        means, pooled_sum = HF.pool_prefix(x.reshape(batch, length, -1), weights, counts, previous)
        if context is not None:
            self._pooled_sum = pooled_sum.detach()
        if self.center is not None:
            if self.training and torch.is_grad_enabled():
                self._update_center(means[:, -1].detach())
            means = means - self.center
        logits = self.logits(means)  # (B, L, N)
        gates = HF.hold_last(HF.router_gates(logits, self.top_k, self.temperature), length).reshape(-1, self.num_experts)
        if self.top_k is not None and self.top_k < self.num_experts:
            probs = HF.hold_last(HF.router_probs(logits, self.temperature), length).reshape(-1, self.num_experts)
            self._last_probs = (gates, probs)
        return gates

    @torch.no_grad()
    def _update_center(self, pooled: torch.Tensor, momentum: float = 0.1) -> None:
        """The running mean of the pooled inputs (B, d) of training forwards: the first batch's mean, then an
        exponential moving average (as BatchNorm's running mean). Under data parallelism (torch.distributed
        initialised) the mean is over every process's batch (one all-reduce, as SyncBatchNorm), so every rank keeps the
        same centre and training matches one process on the whole batch."""
        total = torch.cat([pooled.float().sum(0), pooled.new_full((1,), pooled.shape[0], dtype=torch.float32)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        batch_mean = total[:-1] / total[-1]
        # the first update takes the batch mean (weight 1), later ones move by momentum: no host sync to decide
        self.center.lerp_(batch_mean, torch.where(self.center_updates == 0, 1.0, momentum))
        self.center_updates += 1

    def probs(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The dense distribution behind ``gates = self(x)`` (for observers: statistics and the balance loss)."""
        if self.top_k is None or self.top_k >= self.num_experts:
            return gates
        if self.scope == "sequence":
            last = self._last_probs
            if last is None or last[0] is not gates:
                raise RuntimeError("HydraRouter.probs of a sequence-scope router needs the gates of its last forward.")
            return last[1]
        return HF.router_probs(self.logits(x), self.temperature)

    def extra_repr(self) -> str:
        source = "fixed" if self.fixed_gates is not None else ("logits" if self.weight is None else "weight")
        extra = f", scope=sequence, pool_tokens={self.pool_tokens}" if self.scope == "sequence" else ""
        extra += ", cosine=True" if self.log_scale is not None else ""
        return f"num_experts={self.num_experts}, gates={source}, top_k={self.top_k}, temperature={self.temperature}{extra}"
