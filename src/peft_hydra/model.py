"""`HydraLoraModel`: HydraLoRA as a PEFT ``BaseTuner`` (the routers' observation and balance loss: ``observation.py``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn

from .standalone.compat import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    BaseTuner,
    BaseTunerLayer,
    _get_tuner_state_dict_key_prefixes,
    get_pattern_key,
)
from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit, refuse_unsupported_quantized
from .config import LLAMA_LIKE_MODEL_TYPES, LLAMA_LIKE_TARGET_MODULES, PREFIX, GatesArg, HydraLoraConfig
from .config import check_gate_layers, no_exact_merge_message
from .layer import HydraLoraLayer, Linear
from . import functional as HF
from .observation import RouterObservation
from .router import STALE_CACHE, SequenceContext

TARGET_MODULE_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{model_type: list(LLAMA_LIKE_TARGET_MODULES) for model_type in LLAMA_LIKE_MODEL_TYPES},
}


def dispatch_default(target: nn.Module, adapter_name: str, config: HydraLoraConfig, **kwargs) -> Optional[nn.Module]:
    """The HydraLoRA layer for an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style, fan_in_fan_out=True)."""
    from transformers.pytorch_utils import Conv1D

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    refuse_unsupported_quantized(base)  # any quantized layer bnb.py does not handle: a TypeError naming the fix
    if isinstance(base, nn.Linear) or isinstance(base, Conv1D):
        fan_in_fan_out = isinstance(base, Conv1D)
        if config.fan_in_fan_out != fan_in_fan_out:
            warnings.warn(f"The target is {type(base).__name__}: setting fan_in_fan_out={fan_in_fan_out}.")
            config.fan_in_fan_out = fan_in_fan_out
        return Linear(target, adapter_name, config, fan_in_fan_out=fan_in_fan_out, **kwargs)
    return None


class HydraLoraModel(RouterObservation, BaseTuner):
    """Wraps a model with HydraLoRA layers; use it through PEFT: ``get_peft_model(base, HydraLoraConfig(...))``.
    Beyond PEFT's tuner API: ``merge_and_unload(gates=...)`` / ``merge_adapter(gates=...)``, and the routers'
    observation (statistics, log, balance loss: :class:`~peft_hydra.observation.RouterObservation`)."""

    prefix: str = PREFIX
    tuner_layer_cls = HydraLoraLayer
    target_module_mapping = TARGET_MODULE_MAPPING

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        self._init_observation()
        self._sequence_hooks: list = []
        self._sequence_routers: list = []
        self._pooled_done: Optional[torch.Tensor] = None  # real tokens per sample so far (sequence scope)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _create_and_replace(self, config: HydraLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:  # fmt: skip
        if current_key is None:
            raise ValueError("current_key must not be None")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        if isinstance(target, HydraLoraLayer):
            target.update_layer(adapter_name, r, alpha, config, layer_name=current_key)
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, lora_alpha=alpha, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: HydraLoraConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        for dispatch in (dispatch_bnb_8bit, dispatch_bnb_4bit, dispatch_default):
            new_module = dispatch(target, adapter_name, config, **kwargs)
            if new_module is not None:
                return new_module
        raise TypeError(
            f"HydraLoRA cannot adapt module {type(target).__name__}: supported are torch.nn.Linear, "
            "transformers.pytorch_utils.Conv1D and bitsandbytes Linear8bitLt / Linear4bit. Remove it from "
            "target_modules (or use exclude_modules)."
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = [n for n, m in model.named_modules() if isinstance(m, HydraLoraLayer) and adapter_name in m.hydra_A]
        check_gate_layers(self.peft_config[adapter_name].fixed_gates, layers, "HydraLoraConfig.fixed_gates")
        self._sync_hooks()
        self._sync_sequence_hooks()

    def _check_new_adapter_config(self, config: HydraLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        config.__post_init__()  # the config's checks again: a field may have been changed since it was built

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sync_hooks()
        self._sync_sequence_hooks()

    def _hydra_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, HydraLoraLayer)]

    def _known_adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            return self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter '{adapter_name}'; this model has {sorted(self.peft_config)}.")
        return adapter_name

    # ------------------------------------------------------------------------------- mixed adapter batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if self._sequence_routers:
            self._check_sequence_generate(kwargs)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval().")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"Unknown adapter name(s) {unknown} in `adapter_names`; known: {sorted(self.peft_config)}.")
        if self._sequence_routers:
            raise ValueError(
                "`adapter_names` (one adapter per sample) cannot be combined with an adapter of "
                "router_scope='sequence', whose routers follow the whole batch's sequences: run one batch per adapter "
                "(model.set_adapter(name)) instead."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def pre_hook(module, args, kw):
            kw["adapter_names"] = adapter_names
            return args, kw

        handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for _, m in self._hydra_layers()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------ sequence routers
    def _sync_sequence_hooks(self) -> None:
        """With an adapter of ``router_scope="sequence"``: a pre-hook on the wrapped model that tells its sequence
        routers the forward's sequences (padding from ``attention_mask``; a new sequence, or a decode step that
        continues the KV cache), and a hook after it that takes that away again (a layer called outside the model's
        forward sees each call as new sequences of real tokens). Nothing at all without such an adapter."""
        for handle in self._sequence_hooks:
            handle.remove()
        self._sequence_hooks = []
        self._sequence_routers = [router for _, layer in self._hydra_layers() for router in layer.hydra_router.values()
                                  if router.learned and router.scope == "sequence"]  # fmt: skip
        if not self._sequence_routers:
            return
        model = self.model  # partial, not a closure: a deep copy of the model gets hooks on the copy
        self._sequence_hooks.append(model.register_forward_pre_hook(partial(_sequence_enter_hook, self), with_kwargs=True))
        self._sequence_hooks.append(model.register_forward_hook(partial(_sequence_exit_hook, self), always_call=True))

    def _sequence_enter(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if tokens is None:
            return
        batch, length = tokens.shape[0], tokens.shape[1]
        continuing = _continues_cache(kwargs)
        mask = kwargs.get("attention_mask")
        real = None
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dim() != 2:
                raise ValueError(
                    "router_scope='sequence' reads which tokens are real from a 2-D attention_mask (batch, length); "
                    f"this forward got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}. Pass the "
                    "usual 2-D padding mask (or none), or use router_scope='token'."
                )
            real = mask[:, -length:].to(torch.bool)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and not continuing and length > 1 and position_ids.dim() == 2:
            both = (real[:, 1:] & real[:, :-1]) if real is not None else True
            if ((position_ids[:, 1:] < position_ids[:, :-1]) & both).any():
                raise ValueError(
                    "router_scope='sequence' found several sequences packed into one row (position_ids restart inside "
                    "a row): its routers pool the first tokens of each row. Train without packing / padding-free "
                    "batches (e.g. TRL's padding_free=False, packing=False), or use router_scope='token'."
                )
        done = None
        if continuing:
            done = self._pooled_done
            if done is None or done.shape[0] != batch:
                raise ValueError(STALE_CACHE)
        if real is not None and bool(real.all()) and done is None:
            real = None  # no padding: the sync-free path of pool_weights
        contexts: dict[int, SequenceContext] = {}  # one per pool size (adapters may differ in router_pool_tokens)
        for router in self._sequence_routers:
            pool = router.pool_tokens
            if pool not in contexts:
                weights, counts = HF.pool_weights(real, pool, done, batch, length, tokens.device)
                contexts[pool] = SequenceContext(batch, length, weights, counts, continuing)
            router.sequence = contexts[pool]
        seen = torch.full((batch,), length, device=tokens.device) if real is None else real.sum(1)
        self._pooled_done = seen if done is None else done + seen  # real tokens so far (any pool size reads it)

    def _sequence_exit(self) -> None:
        model = self.model
        if model.training and torch.is_grad_enabled() and _checkpointing(model):
            return  # a gradient-checkpointing recompute inside backward() runs the layers again: same sequences
        for router in self._sequence_routers:
            router.sequence = None

    def _check_sequence_generate(self, kwargs: dict) -> None:
        """Beam search reorders the KV cache between steps; the pooled state follows only when it no longer changes
        (every prompt has at least router_pool_tokens real tokens)."""
        config = kwargs.get("generation_config")
        beams = kwargs.get("num_beams", getattr(config, "num_beams", None) if config is not None else None)
        if not (isinstance(beams, int) and beams > 1):
            return
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None:
            return
        lengths = mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[-1])
        pool = max(router.pool_tokens for router in self._sequence_routers)
        if int(lengths.min()) < pool:
            raise ValueError(
                f"Beam search (num_beams={beams}) with router_scope='sequence' needs every prompt to have at least "
                f"router_pool_tokens={pool} real tokens (the shortest has {int(lengths.min())}): the pooled router "
                "state would have to follow the beams' reordering. Use num_beams=1 or longer prompts."
            )

    # ------------------------------------------------------------------------------------------ gates given
    @contextmanager
    def override_gates(self, gates: torch.Tensor, adapter_name: Optional[str] = None):
        """Inside the block, every router of ``adapter_name`` (default: the first active adapter) returns ``gates``
        instead of its own: an (N,) tensor for every token, or (batch, N), one row per sample for all its tokens
        (``generate()`` included: its prompt and every generated token; with ``num_beams=k`` each row repeated k times,
        as its beams). For routing from a known task (the comparison harness's ``oracle``: one-hot by category),
        ablations and debugging. The learned routers are not run inside the block, so they get no gradient from it.

            with model.override_gates(torch.eye(4)[task_ids]):
                loss = model(**batch).loss
        """
        adapter = self._known_adapter(adapter_name)
        n = self.peft_config[adapter].num_experts
        if not torch.is_tensor(gates) or not gates.is_floating_point() or gates.dim() not in (1, 2) \
                or gates.shape[-1] != n:  # fmt: skip
            shape = tuple(gates.shape) if torch.is_tensor(gates) else type(gates).__name__
            raise ValueError(
                f"override_gates needs a float tensor of shape (N,) or (batch, N) with N = {n} (the heads of adapter "
                f"'{adapter}'); got {shape}."
            )
        if not torch.isfinite(gates).all():
            raise ValueError("override_gates: the gates contain NaN or inf.")
        if n == 1:
            raise ValueError(f"Adapter '{adapter}' has one head (num_experts=1): it has no gates to override.")
        layers = [(name, m) for name, m in self._hydra_layers() if adapter in m.hydra_router]
        merged = [name for name, m in layers if adapter in m.merged_adapters]
        if merged:
            raise ValueError(
                f"override_gates: adapter '{adapter}' is merged into {len(merged)} layer(s) (e.g. {merged[0]}), "
                "where its gates are fixed in the weights: call unmerge_adapter() first."
            )
        routers = [m.hydra_router[adapter] for _, m in layers]
        previous = [r.gate_override for r in routers]
        for router, (_, m) in zip(routers, layers):
            router.gate_override = gates.detach().to(m.hydra_B[adapter].weight.device, torch.float32)
        try:
            yield
        finally:
            for router, old in zip(routers, previous):
                router.gate_override = old

    # ------------------------------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                      gates: GatesArg = None) -> None:  # fmt: skip
        """Merge into the base weights. ``gates`` (``"uniform"``, N numbers, or ``{layer_name: N numbers}`` as
        :func:`peft_hydra.measure_mean_gates` returns) is needed with a learned router: it merges ``sum_i g_i B_i
        A``, the model with those gates fixed. Without ``gates`` only N = 1 / fixed-gate adapters merge (exactly)."""
        self._check_merge_allowed()
        if gates is None:
            self._check_exact_merge(adapter_names)
        check_gate_layers(gates, [name for name, _ in self._hydra_layers()])
        for name, module in self._hydra_layers():
            module.merge(safe_merge=safe_merge, adapter_names=adapter_names, gates=gates, layer_name=name)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, gates: GatesArg = None) -> nn.Module:  # fmt: skip
        """Merge and return the base model; ``gates`` as for :meth:`merge_adapter`."""
        if gates is None:
            self._check_exact_merge(adapter_names)
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge, gates=gates)
        return self.unload()

    def _check_exact_merge(self, adapter_names: Optional[list[str]]) -> None:
        for name in adapter_names or self.active_adapters:
            if self.peft_config[name].has_router:
                raise ValueError(no_exact_merge_message(name, self.peft_config[name].num_experts))

    # ------------------------------------------------------------------------- saving and strict loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoints of peft-hydra 0.1 load (:func:`upgrade_state_dict`); every tensor must fit the config."""
        legacy = any(k.endswith(f".{PREFIX}B") for k in state_dict)
        state_dict = upgrade_state_dict(state_dict, config)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict(cls, model, config, adapter_name, remapped, legacy)
        return remapped


def _continues_cache(kwargs: dict) -> bool:
    """Whether a forward of the model continues a KV cache (a decode step of ``generate()``)."""
    position = kwargs.get("cache_position")
    if torch.is_tensor(position) and position.numel():
        return int(position.reshape(-1)[0]) > 0
    past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.x names it `cache`
    if past is None:
        return False
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) > 0
    return len(past) > 0 and past[0] is not None and len(past[0]) > 0 and past[0][0].shape[-2] > 0


def _checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers 5.x renamed the property; the old name warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _sequence_enter_hook(tuner: "HydraLoraModel", module, args, kwargs) -> None:
    tuner._sequence_enter(args, kwargs)


def _sequence_exit_hook(tuner: "HydraLoraModel", module, args, outputs) -> None:
    tuner._sequence_exit()


def upgrade_state_dict(state_dict: dict, config: HydraLoraConfig, adapter_key: str = "") -> dict:
    """A checkpoint of peft-hydra 0.1 in today's layout (other checkpoints are returned as they are): its heads
    ``<module>.hydra_B`` (out, N, r) become ``hydra_B.weight`` (out, N*r), head i in columns ``i*r..``; with a router
    on x, its weight ``hydra_router.weight`` (N, in) becomes the last N rows of ``hydra_A.weight``. ``adapter_key``
    (``".<adapter>"``) for keys that carry the adapter name."""
    old_b = f".{PREFIX}B{adapter_key}"
    if not any(k.endswith(old_b) and v.dim() == 3 for k, v in state_dict.items()):
        return state_dict
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(old_b) and state_dict[k].dim() == 3]:
        B = out.pop(key)
        out[f"{key}.weight"] = B.reshape(B.shape[0], -1)
        module = key[: -len(old_b)]
        a_key, router_key = f"{module}.{PREFIX}A{adapter_key}.weight", f"{module}.{PREFIX}router{adapter_key}.weight"
        fused = config.has_router and config.router_input == "x" and not config.router_cosine
        if fused and a_key in out and router_key in out:
            out[a_key] = torch.cat([out[a_key], out.pop(router_key)])
    return out


def check_adapter_state_dict(tuner_cls, model: nn.Module, config: HydraLoraConfig, adapter_name: str,
                             state_dict: dict, legacy: bool = False) -> None:  # fmt: skip
    """Refuse a partial or wrongly shaped checkpoint, naming the tensors (PEFT loads non-strictly and only warns):
    every ``hydra_`` tensor of the adapter present with the right shape, none left over."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if f".{PREFIX}" in k and any(k == p or k.startswith(p + ".") for p in prefixes)}  # fmt: skip
    strip = "base_model.model."
    with_prefix = any(k.startswith(strip) for k in expected)
    got = {(k if with_prefix or not k.startswith(strip) else k[len(strip) :]): tuple(v.shape)
           for k, v in state_dict.items() if f".{PREFIX}" in k or k.startswith(PREFIX)}  # fmt: skip
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or mismatched):
        return

    def file_key(key: str) -> str:  # as stored in adapter_model.safetensors (adapter name stripped)
        return tuner_cls._remove_adapter_name_from_key(key, adapter_name)

    lines = [f"The HydraLoRA checkpoint for adapter '{adapter_name}' does not match its config:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"- {len(keys)} {title} tensor(s), e.g. " + ", ".join(file_key(k) for k in keys[:3]))
    if mismatched:
        lines.append(f"- {len(mismatched)} tensor(s) with another shape, e.g.:")
    for k in mismatched[:3]:
        lines.append(f"  {file_key(k)}: shape {got[k]} in the checkpoint, {expected[k]} from the config")
    if legacy:
        lines.append("(A checkpoint of peft-hydra 0.1, whose hydra_B (out, N, r) was converted to (out, N*r).)")
    targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
    lines.append(
        f"The config says r={config.r}, num_experts={config.num_experts}, share_a={config.share_a}, "
        f"router_input={config.router_input!r}, fixed_gates={config.fixed_gates!r}, target_modules={targets}."
        " Load the adapter with the adapter_config.json it was saved with, on the same base model architecture."
    )
    raise ValueError("\n".join(lines))
