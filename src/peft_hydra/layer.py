"""HydraLoRA tuner layer: a thin module around :mod:`peft_hydra.functional`.

Per adapter (every container is keyed by the adapter name and carries the ``hydra_`` prefix):

- ``hydra_A[name]``: ``nn.Linear(in, r)`` (``in -> N*r`` with ``share_a=False``), the shared down-projection;
- ``hydra_B[name]``: ONE parameter of shape ``(out, N, r)``: head i is ``hydra_B[name][:, i]``;
- ``hydra_router[name]``: ``nn.Linear(in or r, N, bias=False)``, only when N > 1 and the gates are learned;
- ``hydra_gates[name]``: a (non-saved) buffer with the fixed gates, only with ``fixed_gates``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import functional as HF
from ._compat import BaseTunerLayer, BufferDict, _get_in_out_features, check_adapters_to_merge, transpose
from .config import HydraLoraConfig, no_exact_merge_message, resolve_gates


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _param(container: nn.Module, name: str) -> torch.Tensor:
    """``getattr(container, name)`` for a registered parameter, read from ``_parameters`` directly instead of through
    the ``nn.Module.__getattr__`` fallback (a failed normal lookup, then a Python call, on every access: timed as the
    "parameters as module attributes" alternative of ``benchmarks/bench_overhead.py --choices``). A name that is not
    a registered parameter (a parametrization, FSDP's flat-parameter views) takes the usual attribute path.

    Read by subscript, as ``nn.Module.__getattr__`` does, never with ``dict.get``: DeepSpeed ZeRO-3 replaces
    ``_parameters`` with a ``ZeROOrderedDict`` whose ``__getitem__`` gathers a partitioned parameter during the forward
    and registers it with the running module (DeepSpeed's automatic external-parameter detection); ``.get`` bypasses
    that and returns the empty partition (tests/test_distributed.py)."""
    try:
        return container._parameters[name]
    except KeyError:
        return getattr(container, name)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as (tokens, in): the 2-D layout the base GEMM and the adapter run in (see ``forward``)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _state(t: Optional[torch.Tensor]) -> Optional[tuple[int, int, int]]:
    """What identifies a weight's current values without reading them: the tensor, its storage, its in-place
    write counter."""
    return None if t is None else (id(t), t.data_ptr(), t._version)


def _new_accumulator(num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed router-statistics sums: (2N,) gate and entropy sums, (1,) token count; float64 (exact token counts far
    beyond fp32's 2**24) except on MPS, which has no float64. The count is not 0-dim: torch.compile (2.13) drops
    in-place updates of 0-dim tensors held outside the graph."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros(2 * num_experts, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)


class HydraLoraLayer(BaseTunerLayer):
    inference_path: bool = True
    """Forwards without autograd (``torch.no_grad()`` / ``inference_mode()``: ``generate()``, evaluation) run the
    update from weights prepared once (see :meth:`_inference_update`); False: every forward runs the training path."""

    adapter_layer_names: tuple[str, ...] = ("hydra_A", "hydra_B", "hydra_router")
    other_param_names: tuple[str, ...] = (
        "r",
        "lora_alpha",
        "scaling",
        "num_experts",
        "hydra_dropout",
        "hydra_gates",
        "router_input",
        "top_k",
        "router_temperature",
        "dropout_per_head",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.router_input: dict[str, str] = {}
        self.top_k: dict[str, Optional[int]] = {}
        self.router_temperature: dict[str, float] = {}
        self.hydra_dropout = nn.ModuleDict({})
        self.hydra_A = nn.ModuleDict({})
        self.hydra_B = nn.ParameterDict({})
        self.hydra_router = nn.ModuleDict({})
        self.hydra_gates = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_gates: dict[str, torch.Tensor] = {}
        self.cast_input_dtype_enabled = True
        self.dropout_per_head: dict[str, bool] = {}
        # adapter -> (state of its weights, functional.InferenceWeights, the weights): see _inference_update
        self._inference_cache: dict[str, tuple] = {}
        # Router outputs of the last forward (kept only for adapters with router_aux_loss_coef > 0, for the balance
        # loss) and running statistics (only while collection is on: see reset_router_stats); never saved.
        self._router_out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keep_router_out: dict[str, bool] = {}
        self._collect_stats = False
        self._router_acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kwargs = kwargs
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        config: HydraLoraConfig,
        layer_name: Optional[str] = None,
        **kwargs,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` on this layer. ``layer_name`` (the module's name in the model)
        picks this layer's entry when ``config.fixed_gates`` is a per-layer mapping."""
        if r < 1:
            raise ValueError(f"`r` must be a positive integer, got {r} for adapter '{adapter_name}'.")
        n = config.num_experts
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.num_experts[adapter_name] = n
        self.router_input[adapter_name] = config.router_input
        self.top_k[adapter_name] = config.top_k
        self.dropout_per_head[adapter_name] = bool(config.dropout_per_head)
        self._keep_router_out[adapter_name] = config.has_router and config.router_aux_loss_coef > 0
        self.router_temperature[adapter_name] = float(config.router_temperature)
        self.hydra_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

        a_rows = r if config.share_a else n * r
        self.hydra_A[adapter_name] = nn.Linear(self.in_features, a_rows, bias=False)
        self.hydra_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, n, r))
        if config.has_router:
            router_in = self.in_features if config.router_input == "x" else a_rows
            self.hydra_router[adapter_name] = nn.Linear(router_in, n, bias=False)
        elif n > 1:
            self.hydra_gates[adapter_name] = config.layer_gates(layer_name)
        if config.head_init == "orthogonal" and self.out_features < n * r:
            raise ValueError(
                f"HydraLoraConfig.head_init='orthogonal' needs out_features >= num_experts * r in every adapted layer; "
                f"layer {layer_name or type(self.get_base_layer()).__name__} has out_features={self.out_features} < "
                f"{n} x {r}. Use head_init='centered', a smaller r / num_experts, or exclude_modules for this layer."
            )
        self.reset_hydra_parameters(
            adapter_name,
            config.init_weights,
            head_init=config.head_init,
            head_init_std=config.head_init_std,
            router_init_std=config.router_init_std,
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_hydra_parameters(
        self,
        adapter_name: str,
        init_weights: bool = True,
        *,
        head_init: str = "zero",
        head_init_std: float = 0.01,
        router_init_std: Optional[float] = None,
    ) -> None:
        """A Kaiming-uniform (as LoRA's A); B per ``head_init`` (:func:`functional.init_heads`; "zero": identity
        start) or, with ``init_weights=False``, random; the router ``nn.Linear``'s default init, or normal(0,
        ``router_init_std``). See :class:`~peft_hydra.HydraLoraConfig` for each option."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.hydra_A[adapter_name].weight, a=math.sqrt(5))
            B = self.hydra_B[adapter_name]
            if not init_weights:
                bound = 1.0 / math.sqrt(B.shape[-1])
                B.uniform_(-bound, bound)
            elif head_init == "zero":
                B.zero_()
            else:
                B.copy_(HF.init_heads(head_init, *B.shape, head_init_std))
            router = self.hydra_router[adapter_name] if adapter_name in self.hydra_router else None
            if router is not None and router_init_std is not None:
                nn.init.normal_(router.weight, 0.0, router_init_std)

    # ----------------------------------------------------------------------------------------------- forward
    def _adapter_delta(self, adapter: str, x: torch.Tensor, record: bool = True, scaled: bool = True) -> torch.Tensor:
        """The update ``scaling * sum_i g_i B_i A x`` of ``adapter`` for tokens ``x`` (tokens, in) -> (tokens, out).

        ``record``: keep the router outputs for the balance loss (``router_aux_loss_coef > 0``) and accumulate the
        router statistics while collection is on. ``scaled=False`` leaves the LoRA scaling to the caller (the
        forward folds it into its ``add``).

        This runs once per adapted layer and forward, and at small sizes its Python cost is a large part of the
        step (benchmarks/bench_overhead.py): the adapter's containers and parameters are read from ``_modules`` and
        ``_parameters`` (plain dict lookups; see :func:`_param`).
        """
        modules = self._modules
        A = _param(modules["hydra_A"]._modules[adapter], "weight")
        router = modules["hydra_router"]._modules.get(adapter)
        if router is not None:
            router = _param(router, "weight")
            record = record and (self._collect_stats or self._keep_router_out[adapter])
        else:
            record = False
        x = self._cast_input_dtype(x, A.dtype)
        delta, gates, probs = HF.delta_2d(
            x,
            A,
            _param(modules["hydra_B"], adapter),
            self.scaling[adapter] if scaled else 1.0,
            router_weight=router,
            fixed_gates=modules["hydra_gates"]._buffers.get(adapter),
            router_input=self.router_input[adapter],
            top_k=self.top_k[adapter],
            temperature=self.router_temperature[adapter],
            dropout=HF.active_dropout(modules["hydra_dropout"][adapter]),
            dropout_per_head=self.dropout_per_head[adapter],
            need_probs=record,
        )
        if record:
            self._record_router(adapter, probs, gates)
        return delta

    def _inference_update(self, adapter: str, result: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``result`` + the update of ``adapter`` for tokens ``x`` (tokens, in), computed without autograd from weights
        prepared once (:func:`functional.prepare_inference`: one GEMM over x for A and the router, fixed gates folded
        into B; :func:`functional.inference_update`); None where the training path must run (an active dropout, a
        router in another dtype than A).

        The prepared weights are cached per adapter and prepared again when a weight changes: another tensor, another
        storage (``.to()``, a replaced ``.data``) or an in-place write (its ``_version``: optimizer steps,
        ``load_state_dict``, ``merge``-free edits under ``no_grad``); and every forward with autograd on (training)
        drops the cache. A write through ``.data`` (``p.data.copy_(...)``) bypasses ``_version``: after one made
        outside training, call ``layer._inference_cache.clear()`` or run a forward with grad enabled.
        """
        modules = self._modules
        if HF.active_dropout(modules["hydra_dropout"]._modules[adapter]) is not None:
            return None
        A = _param(modules["hydra_A"]._modules[adapter], "weight")
        router = modules["hydra_router"]._modules.get(adapter)
        if router is not None:
            router = _param(router, "weight")
            if router.dtype != A.dtype:
                return None
        B = _param(modules["hydra_B"], adapter)
        gates = modules["hydra_gates"]._buffers.get(adapter)
        state = (_state(A), _state(B), _state(router), _state(gates))
        entry = self._inference_cache.get(adapter)
        if entry is None or entry[0] != state:
            prepared = HF.prepare_inference(
                A, B, router_weight=router, fixed_gates=gates, router_input=self.router_input[adapter],
                top_k=self.top_k[adapter],
            )  # fmt: skip
            # the entry keeps the weights alive, so that the ids in its state cannot be reused by other tensors
            entry = self._inference_cache[adapter] = (state, prepared, (A, B, router, gates))
        record = router is not None and (self._collect_stats or self._keep_router_out[adapter])
        result, gates, probs = HF.inference_update(
            result,
            self._cast_input_dtype(x, A.dtype),
            entry[1],
            self.scaling[adapter],
            top_k=self.top_k[adapter],
            temperature=self.router_temperature[adapter],
            need_probs=record,
        )
        if record:
            self._record_router(adapter, probs, gates)
        return result

    def _record_router(self, adapter: str, probs: torch.Tensor, gates: torch.Tensor) -> None:
        if _in_backward():
            return  # gradient checkpointing recomputes this forward inside backward(): it was recorded already
        if self._keep_router_out[adapter]:
            self._router_out[adapter] = (probs, gates)
        if self._collect_stats:
            with torch.no_grad():  # on the device, no host sync: [sum of gates | sum of entropy terms], tokens
                acc = self._router_acc.get(adapter)
                if acc is None:  # an adapter added after the reset
                    acc = self._router_acc[adapter] = _new_accumulator(gates.shape[-1], gates.device)
                acc[0].add_(torch.cat([gates, torch.special.entr(probs)], dim=-1).sum(0))
                acc[1].add_(gates.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        modules = self._modules  # plain dict lookups in the hot path (see _adapter_delta)
        if self.merged:
            return modules["base_layer"](x, *args, **kwargs)
        # The base layer and the adapters run on the tokens flattened to 2-D (one view of x, one of the result): a
        # Linear on (batch, seq, in) folds and unfolds its input around the GEMM and records two more autograd nodes
        # (benchmarks/bench_overhead.py). The base layer is a Linear or Conv1D (model.py), for which it is the same.
        x2 = _tokens(x)
        result = modules["base_layer"](x2, *args, **kwargs)
        adapters = modules["hydra_A"]._modules
        inference = False
        if torch.is_grad_enabled():
            if self._inference_cache:  # a training forward: weights may change from here on, prepare them again
                self._inference_cache.clear()
        else:
            inference = self.inference_path and not torch.compiler.is_compiling()
        for adapter in self.active_adapters:
            if adapter in adapters:
                if inference:
                    updated = self._inference_update(adapter, result, x2)
                    if updated is not None:
                        result = updated
                        continue
                delta = self._adapter_delta(adapter, x2, scaled=False)
                if delta.dtype != result.dtype:
                    delta = delta.to(result.dtype)
                result = torch.add(result, delta, alpha=self.scaling[adapter])  # the scaling costs no kernel
        return result if x.dim() == 2 else result.view(*x.shape[:-1], result.shape[-1])

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
            delta = self._adapter_delta(adapter, _tokens(x[index]), record=False)
            result[index] += delta.view(-1, *result.shape[1:]).to(result.dtype)
        return result

    # ------------------------------------------------------------------------------------------------ merge
    def _fixed_gates(self, adapter: str, gates: Any = None, layer_name: Optional[str] = None) -> torch.Tensor:
        """The gates to merge ``adapter`` with: ``gates`` parsed by :func:`~peft_hydra.config.resolve_gates` (a
        per-layer mapping needs ``layer_name``), else the adapter's own fixed gates; a learned router needs gates."""
        B = self.hydra_B[adapter]
        n = B.shape[1]
        if gates is None:
            if adapter in self.hydra_router:
                raise ValueError(no_exact_merge_message(adapter, n))
            if n == 1:
                return torch.ones(1, device=B.device, dtype=B.dtype)
            return self.hydra_gates[adapter]
        return resolve_gates(gates, n, layer_name=layer_name).to(B.device)

    def get_delta_weight(self, adapter: str, gates: Any = None) -> torch.Tensor:
        """``scaling * sum_i g_i B_i A`` in the base weight's layout; exact for N = 1 or fixed gates. ``gates``: every
        form of :func:`~peft_hydra.config.resolve_gates` (None: the adapter's own fixed gates)."""
        return self._delta_weight(adapter, self._fixed_gates(adapter, gates))

    def _delta_weight(self, adapter: str, g: torch.Tensor) -> torch.Tensor:
        """:meth:`get_delta_weight` for gates already resolved by :meth:`_fixed_gates` (merge, unmerge: no re-parse)."""
        A = self.hydra_A[adapter].weight
        B = self.hydra_B[adapter]
        dtype = B.dtype
        if A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = HF.delta_weight(A, B, g.to(B.device), self.scaling[adapter])
        return transpose(delta, self.fan_in_fan_out).to(dtype)

    def merge(
        self,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        gates: Any = None,
        layer_name: Optional[str] = None,
    ) -> None:
        """Merge ``scaling * sum_i g_i B_i A`` into W0. Without ``gates`` only N = 1 or fixed-gate adapters merge;
        ``gates`` takes every form of :func:`~peft_hydra.config.resolve_gates` (``layer_name`` picks this layer's
        entry of a per-layer mapping)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
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
        """``W0 += sign * get_delta_weight(adapter, gates)``; quantized layers (``bnb.py``) override this one step."""
        base = self.get_base_layer()
        new_weight = base.weight.data + sign * self._delta_weight(adapter, gates).to(base.weight.dtype)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base.weight.data = new_weight

    # ---------------------------------------------------------------------------------------- router output
    def router_stats(self, adapter: str) -> Optional[dict[str, Any]]:
        """Mean gate per head and mean entropy over the tokens seen while collection was on since the last
        :meth:`reset_router_stats` (None: nothing collected; collection is off until ``reset_router_stats()``)."""
        acc = self._router_acc.get(adapter)
        if acc is None:
            return None
        tokens = int(acc[1])  # the only host sync: on read
        if tokens == 0:
            return None
        sums = (acc[0] / tokens).tolist()
        n = len(sums) // 2
        return {"mean_gate": sums[:n], "entropy": float(sum(sums[n:])), "tokens": tokens}

    def reset_router_stats(self) -> None:
        """Clear the router statistics and switch collection on (off by default: a forward then does no stats work)."""
        self._router_acc.clear()
        for adapter, router in self.hydra_router.items():  # allocated here, not in a (possibly compiled) forward
            self._router_acc[adapter] = _new_accumulator(router.weight.shape[0], router.weight.device)
        self._collect_stats = True

    def stop_router_stats(self) -> None:
        """Switch statistics collection off; what was collected stays readable with :meth:`router_stats`."""
        self._collect_stats = False

    def _router_stats_state(self) -> tuple[bool, dict]:
        return self._collect_stats, dict(self._router_acc)

    def _restore_router_stats_state(self, state: tuple[bool, dict]) -> None:
        self._collect_stats = state[0]
        self._router_acc.clear()
        self._router_acc.update(state[1])

    def aux_loss(self, adapter: str) -> Optional[torch.Tensor]:
        """Balance loss of the last forward for ``adapter`` (None without a router, a forward, or
        ``router_aux_loss_coef > 0``: the router outputs are only kept when the loss is used)."""
        out = self._router_out.get(adapter)
        if out is None:
            return None
        return HF.load_balancing_loss(out[0], out[1], self.top_k[adapter])

    def clear_router_outputs(self) -> None:
        self._router_out.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._router_out.pop(adapter_name, None)
        self._router_acc.pop(adapter_name, None)
        self._keep_router_out.pop(adapter_name, None)
        self._inference_cache.pop(adapter_name, None)


class Linear(nn.Module, HydraLoraLayer):
    """HydraLoRA on ``nn.Linear`` (and on GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: HydraLoraConfig,
        r: int,
        lora_alpha: float,
        fan_in_fan_out: bool = False,
        layer_name: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        HydraLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config, layer_name=layer_name)

    forward = HydraLoraLayer.forward  # nn.Module comes first in the MRO

    def __repr__(self) -> str:
        return "hydralora." + super().__repr__()
