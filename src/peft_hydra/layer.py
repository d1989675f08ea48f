"""HydraLoRA tuner layer. Per adapter (every container keyed by the adapter name, under the ``hydra_`` prefix):

- ``hydra_A[name]``: ``nn.Linear(in, r)``, the shared down-projection (``N*r`` rows with ``share_a=False``); with a
  learned router on the layer input (``router_input="x"``, the default) N more rows: the router's weight;
- ``hydra_B[name]``: ``nn.Linear(N*r, out)``, the N heads side by side (head i = columns ``i*r .. (i+1)*r - 1``);
- ``hydra_router[name]``: :class:`~peft_hydra.router.HydraRouter`, logits -> gates (N > 1 only);
- ``hydra_dropout[name]``: the dropout on the adapter input.

Why A and the router share one ``nn.Linear``: both read the same x, so one GEMM over x serves both, and a layer has
two parameter tensors as LoRA's. The router still sees x as given: when a dropout is active, ``hydra_A`` is called a
second time on the un-dropped x for the router's logits (the authors' layout). The adapter runs on the tokens as a
2-D view (tokens, in): a Linear on 3-D input folds and unfolds it around its GEMM. Measured as training steps of a
tiny Llama, HydraLoRA r=8 N=3 / LoRA r=16, medians of 5 rounds in one run (benchmarks/bench_overhead.py --choices,
docs/performance.md): this layout 1.25, the router's logits from a GEMM of their own 1.30, the adapter on 3-D x 1.29.
The base layer gets x as the model gave it (on a 2-D view it measured the same).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import functional as HF
from .standalone.compat import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge, transpose
from .config import COSINE_INIT_SCALE, HydraLoraConfig, no_exact_merge_message, resolve_gates
from .router import HydraRouter


class HydraLoraLayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("hydra_A", "hydra_B", "hydra_router")
    other_param_names: tuple[str, ...] = (
        "r", "lora_alpha", "scaling", "num_experts", "share_a", "router_input", "dropout_per_head", "hydra_dropout",
        "hydra_layout",
    )  # fmt: skip

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.share_a: dict[str, bool] = {}
        self.router_input: dict[str, str] = {}
        self.dropout_per_head: dict[str, bool] = {}
        # adapter -> (rows of A, N, r, router in hydra_A, has a dropout, one dropout mask per head, router of its own
        # on x): static layout
        self.hydra_layout: dict[str, tuple[int, int, int, bool, bool, bool, bool]] = {}
        self.hydra_dropout = nn.ModuleDict({})
        self.hydra_A = nn.ModuleDict({})
        self.hydra_B = nn.ModuleDict({})
        self.hydra_router = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_gates: dict[str, torch.Tensor] = {}
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: HydraLoraConfig,
                     layer_name: Optional[str] = None, **kwargs) -> None:  # fmt: skip
        """Add (or replace) the adapter ``adapter_name``; ``layer_name`` (the module's name in the model) picks this
        layer's entry when ``config.fixed_gates`` is a per-layer mapping."""
        n = config.num_experts
        if config.head_init == "orthogonal" and self.out_features < n * r:
            raise ValueError(
                f"HydraLoraConfig.head_init='orthogonal' needs out_features >= num_experts * r in every adapted layer; "
                f"layer {layer_name or type(self.get_base_layer()).__name__} has out_features={self.out_features} < "
                f"{n} x {r}. Use head_init='centered', a smaller r / num_experts, or exclude_modules for this layer."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.num_experts[adapter_name] = n
        self.share_a[adapter_name] = config.share_a
        self.router_input[adapter_name] = config.router_input
        self.dropout_per_head[adapter_name] = config.dropout_per_head
        self.hydra_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        rows = r if config.share_a else n * r
        on_x = config.has_router and config.router_input == "x"
        fused = on_x and not config.router_cosine  # a cosine router needs x itself, not only its logits
        self.hydra_A[adapter_name] = nn.Linear(self.in_features, rows + (n if fused else 0), bias=False)
        self.hydra_B[adapter_name] = nn.Linear(n * r, self.out_features, bias=False)
        self.hydra_layout[adapter_name] = (
            rows, n, r, fused, config.lora_dropout > 0, config.dropout_per_head and n > 1, on_x and not fused
        )  # fmt: skip
        if config.has_router:
            self.hydra_router[adapter_name] = HydraRouter(
                n, None if fused else (self.in_features if on_x else rows), top_k=config.top_k,
                temperature=config.router_temperature, scope=config.router_scope, pool_tokens=config.router_pool_tokens,
                cosine=config.router_cosine, cosine_init_scale=COSINE_INIT_SCALE, center=config.router_center,
            )  # fmt: skip
        elif n > 1:
            self.hydra_router[adapter_name] = HydraRouter(n, fixed_gates=config.layer_gates(layer_name))
        self.reset_hydra_parameters(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        router = self.hydra_router[adapter_name] if adapter_name in self.hydra_router else None
        if router is not None and router.center is not None:  # a running mean stays fp32 on a bf16/fp16 base
            router.center.data = router.center.data.float()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_hydra_parameters(self, adapter_name: str, config: HydraLoraConfig) -> None:
        """A (and the router rows of ``hydra_A``) Kaiming-uniform as ``nn.Linear``; the router ~ normal(0,
        ``router_init_std``) when that is set; B per ``head_init`` (zero: the adapter starts as the identity), or
        random with ``init_weights=False`` (for tests)."""
        A, B = self.hydra_A[adapter_name].weight, self.hydra_B[adapter_name].weight
        n, r = self.num_experts[adapter_name], self.r[adapter_name]
        with torch.no_grad():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            router = self.hydra_router[adapter_name] if adapter_name in self.hydra_router else None
            if router is not None and router.learned and config.router_init_std is not None:
                w = router.weight if router.weight is not None else A[self._a_rows(adapter_name) :]
                nn.init.normal_(w, 0.0, config.router_init_std)
            if not config.init_weights:
                nn.init.uniform_(B, -1 / math.sqrt(r), 1 / math.sqrt(r))
            elif config.head_init == "zero":
                nn.init.zeros_(B)
            else:
                B.copy_(HF.init_heads(config.head_init, self.out_features, n, r, config.head_init_std).flatten(1))

    def _a_rows(self, adapter: str) -> int:
        """The rows of ``hydra_A`` that are A (the rest, if any, are the router's)."""
        return self.r[adapter] * (1 if self.share_a[adapter] else self.num_experts[adapter])

    # ----------------------------------------------------------------------------------------------- forward
    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``sum_i g_i B_i A x`` of ``adapter`` (unscaled) for ``x`` (..., in) -> (tokens, out). This runs once per
        adapted layer and forward, and in small, host-bound steps its Python is a measurable part of the step: the
        adapter's static layout is one tuple (``hydra_layout``), and each container is read once."""
        rows, n, r, fused, dropout_on, per_head, router_x = self.hydra_layout[adapter]
        A = self.hydra_A[adapter]
        weight = A.weight
        batch = x.shape[0] if x.dim() > 2 else None
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if x.dtype != weight.dtype:
            x = self._cast_input_dtype(x, weight.dtype)
        dropout = self.hydra_dropout[adapter] if dropout_on else None
        logits = None
        if dropout is not None and dropout.training:
            if per_head:  # one mask per head, as the authors' per-head loop
                h = A(dropout(x.unsqueeze(1).expand(-1, n, -1)))[..., :rows]  # (T, N, rows)
                if rows != r:  # one A per head: head i's A on head i's mask
                    h = h.unflatten(-1, (n, r)).diagonal(dim1=1, dim2=2).transpose(1, 2)
            else:
                h = A(dropout(x))[..., :rows] if fused else A(dropout(x))
            if fused:
                logits = A(x)[..., rows:]  # the router sees x as given
        elif fused:
            h, logits = A(x).split([rows, n], dim=-1)
        else:
            h = A(x)
        if n == 1:
            gates = None
        else:
            gates = self.hydra_router[adapter](logits if fused else (x if router_x else h), batch=batch)
        return self.hydra_B[adapter](HF.mix_input(h, gates, r))  # (tokens, out)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        layout, scaling = self.hydra_layout, self.scaling
        for adapter in self.active_adapters:
            if adapter in layout:
                delta = self._delta(adapter, x).view(result.shape)
                if delta.dtype != result.dtype:
                    delta = delta.to(result.dtype)
                result = torch.add(result, delta, alpha=scaling[adapter])
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any):
        if len(adapter_names) != len(x):
            raise ValueError(
                f"`adapter_names` has {len(adapter_names)} entries but the batch has {len(x)} samples: give one "
                "adapter name (or '__base__') per sample."
            )
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` while adapters are merged: call `unmerge_adapter()` first.")
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.hydra_A:
                continue
            index = [i for i, name in enumerate(adapter_names) if name == adapter]
            delta = self._delta(adapter, x[index]).view(result[index].shape)
            result[index] += self.scaling[adapter] * delta.to(result.dtype)
        return result

    # ------------------------------------------------------------------------------------------------ merge
    def _fixed_gates(self, adapter: str, gates: Any = None, layer_name: Optional[str] = None) -> torch.Tensor:
        """The gates to merge ``adapter`` with: ``gates`` (every form of :func:`~peft_hydra.config.resolve_gates`; a
        per-layer mapping needs ``layer_name``), else the adapter's own fixed gates; a learned router needs gates."""
        n, device = self.num_experts[adapter], self.hydra_B[adapter].weight.device
        if gates is not None:
            return resolve_gates(gates, n, layer_name=layer_name).to(device)
        router = self.hydra_router[adapter] if adapter in self.hydra_router else None
        if router is None:
            return torch.ones(1, device=device)
        if router.learned:
            raise ValueError(no_exact_merge_message(adapter, n))
        return router.fixed_gates

    def get_delta_weight(self, adapter: str, gates: Any = None) -> torch.Tensor:
        """``scaling * sum_i g_i B_i A`` in the base weight's layout; exact for N = 1 or fixed gates."""
        return self._delta_weight(adapter, self._fixed_gates(adapter, gates))

    def _delta_weight(self, adapter: str, gates: torch.Tensor) -> torch.Tensor:
        A = self.hydra_A[adapter].weight[: self._a_rows(adapter)]
        B = self.hydra_B[adapter].weight
        dtype = B.dtype
        if A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = HF.delta_weight(A, B, gates.to(B.device, torch.float32), self.scaling[adapter])
        return transpose(delta, self.fan_in_fan_out).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, gates: Any = None,
              layer_name: Optional[str] = None) -> None:  # fmt: skip
        """Merge ``scaling * sum_i g_i B_i A`` into W0; without ``gates`` only N = 1 or fixed-gate adapters merge."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.hydra_A:
                continue
            g = self._fixed_gates(adapter, gates, layer_name)
            self._add_delta_to_base(adapter, g, +1.0, safe_merge=safe_merge)
            self._merged_gates[adapter] = g
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter (with the gates it was merged with) from W0 again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.hydra_A:
                self._add_delta_to_base(adapter, self._merged_gates.pop(adapter), -1.0)

    def _add_delta_to_base(self, adapter: str, gates: torch.Tensor, sign: float, safe_merge: bool = False) -> None:
        """``W0 += sign * delta``; the quantized layers (``bnb.py``) override this one step."""
        base = self.get_base_layer()
        new_weight = base.weight.data + sign * self._delta_weight(adapter, gates).to(base.weight.dtype)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base.weight.data = new_weight


class Linear(nn.Module, HydraLoraLayer):
    """HydraLoRA on ``nn.Linear`` (and on GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HydraLoraConfig, r: int, lora_alpha: float,
                 fan_in_fan_out: bool = False, layer_name: Optional[str] = None, **kwargs) -> None:  # fmt: skip
        super().__init__()
        HydraLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config, layer_name=layer_name)

    forward = HydraLoraLayer.forward  # nn.Module comes first in the MRO

    def __repr__(self) -> str:
        return "hydralora." + super().__repr__()
