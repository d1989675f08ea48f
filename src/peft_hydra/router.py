"""`HydraRouter`: the gates of one HydraLoRA layer, as a module of its own.

Its forward returns the gates and nothing else; it keeps no state. Whoever wants to see the routing (router
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
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.weight = None
        self.gate_override: Optional[torch.Tensor] = None  # set by HydraLoraModel.override_gates, never saved
        if fixed_gates is not None:
            self.register_buffer("fixed_gates", fixed_gates.reshape(num_experts), persistent=False)
        else:
            self.fixed_gates = None
            if in_features is not None:
                self.weight = nn.Parameter(torch.empty(num_experts, in_features))
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init

    @property
    def learned(self) -> bool:
        return self.fixed_gates is None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.weight is None else F.linear(x.to(self.weight.dtype), self.weight)

    def forward(self, x: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
        """(T, d) logits or router input -> (T, N) fp32 gates; with fixed gates, the (N,) gates; inside
        ``override_gates``, the given gates (one row per sample of the ``batch`` samples, repeated over its tokens)."""
        if self.gate_override is not None:
            return HF.sample_gates(self.gate_override, x.shape[0], batch)
        if self.fixed_gates is not None:
            return self.fixed_gates
        return HF.router_gates(self.logits(x), self.top_k, self.temperature)

    def probs(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The dense distribution behind ``gates = self(x)`` (for observers: statistics and the balance loss)."""
        if self.top_k is None or self.top_k >= self.num_experts:
            return gates
        return HF.router_probs(self.logits(x), self.temperature)

    def extra_repr(self) -> str:
        source = "fixed" if self.fixed_gates is not None else ("logits" if self.weight is None else "weight")
        return f"num_experts={self.num_experts}, gates={source}, top_k={self.top_k}, temperature={self.temperature}"
