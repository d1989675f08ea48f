"""Export a HydraLoRA adapter as a plain PEFT LoRA adapter, for serving engines that know nothing of routers.

With FIXED gates ``g`` the HydraLoRA update of a layer is linear and low-rank:

    scaling * sum_i g_i B_i A x = scaling * (sum_i g_i B_i) A x          (shared A, rank r)

so it is a LoRA with ``lora_A = A`` and ``lora_B = sum_i g_i B_i``. With a learned router the exported adapter is the
model with those gates fixed (uniform, a vector, or the mean gates the router produced on a dataset, per layer): an
approximation of the routed model, exact for the fixed-gate model.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional

import torch

from . import functional as HF
from .config import PEFT_TYPE_NAME, PREFIX, GatesArg, check_gate_layers, resolve_gates
from .layer import HydraLoraLayer

__all__ = ["export_lora", "measure_mean_gates"]


def _tuner(model):
    from .integrations import unwrap_hydra_tuner

    return unwrap_hydra_tuner(model)


def measure_mean_gates(model, batches: Iterable, adapter_name: Optional[str] = None) -> dict[str, list[float]]:
    """Run ``model`` (eval mode, no grad) on ``batches`` (dicts of model inputs, or input-id tensors) and return the
    mean gate of every routed layer over all their tokens: ``{layer_name: [N floats]}``, ready for
    ``export_lora(gates=...)`` and ``merge_and_unload(gates=...)``. The model's router-statistics state and training
    mode are restored afterwards (:func:`peft_hydra.observe_routing`)."""
    from .routing import observe_routing

    batches = list(batches)
    if not batches:
        raise ValueError("measure_mean_gates got no batches: pass a non-empty iterable of model inputs.")
    observed = observe_routing(model, batches, adapter_name=adapter_name)
    if not observed:
        raise ValueError("No routed layer saw a token: the adapter has no learned router (use fixed gates).")
    return {name: per_cat[None]["mean_gate"] for name, per_cat in observed.items()}


def _layer_gates(layer: HydraLoraLayer, name: str, adapter: str, gates: GatesArg) -> torch.Tensor:
    """The fixed gates of ``layer`` for the export: ``gates`` parsed by the one parser (``resolve_gates``), or the
    adapter's own fixed gates; a learned router without gates raises :func:`no_exact_merge_message`'s error."""
    return layer._fixed_gates(adapter, gates, layer_name=name).detach().float().cpu()


def export_lora(
    model,
    save_directory: str,
    gates: GatesArg = None,
    adapter_name: Optional[str] = None,
    safe_serialization: bool = True,
) -> "peft.LoraConfig":  # noqa: F821
    """Write the HydraLoRA adapter of ``model`` (a PeftModel) as a plain PEFT LoRA adapter with FIXED gates.

    Args:
        model: the PeftModel with the HydraLoRA adapter.
        save_directory: where ``adapter_config.json`` and ``adapter_model.safetensors`` go; load them with
            ``peft.PeftModel.from_pretrained(base, save_directory)`` (no ``peft_hydra`` needed) or a serving engine.
        gates: ``"uniform"``; N numbers (all layers); ``{layer_name: N numbers}`` per layer, e.g. the mean gates
            measured on a dataset by :func:`measure_mean_gates`; or None for an adapter with ``fixed_gates`` / N=1.
        adapter_name: the adapter to export (default: the active one).

    Per layer ``lora_A = A`` and ``lora_B = c * sum_i g_i B_i`` (rank r), where ``c`` = HydraLoRA's scaling divided
    by LoRA's for the exported rank (1 for a shared A, so ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` carry over unchanged).

    With ``share_a=False`` (one A per head, the LoRA-split ablation) no rank-r LoRA is exact: the export is rank N*r,
    ``lora_A = [A_1; ...; A_N]`` (stacked rows) and ``lora_B = c * [g_1 B_1, ..., g_N B_N]`` (side by side), which is
    exact; ``r`` and ``rank_pattern`` are multiplied by N. Tensors other than HydraLoRA's (``modules_to_save``) are
    copied as they are. Returns the written ``peft.LoraConfig``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tuner = _tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    if adapter not in tuner.peft_config:
        raise ValueError(f"Unknown adapter '{adapter}'; the model has {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter]
    if str(getattr(config.peft_type, "value", config.peft_type)) != PEFT_TYPE_NAME:
        raise ValueError(f"Adapter '{adapter}' is a {config.peft_type} adapter, not HydraLoRA.")
    if isinstance(gates, Mapping) and not gates:
        resolve_gates(gates, config.num_experts)  # raises the one gates error
    factor = 1 if config.share_a else config.num_experts
    peft_model = model.module if hasattr(model, "module") else model
    prefix = "base_model.model."

    state: dict[str, torch.Tensor] = {}
    used_names = set()
    for name, layer in tuner.model.named_modules():
        if not isinstance(layer, HydraLoraLayer) or adapter not in layer.hydra_A:
            continue
        if layer.merged and adapter in layer.merged_adapters:
            raise ValueError(f"Layer '{name}' has adapter '{adapter}' merged: call model.unmerge_adapter() first.")
        g = _layer_gates(layer, name, adapter, gates)
        used_names.add(name)
        A = layer.hydra_A[adapter].weight[: layer._a_rows(adapter)].detach().float().cpu()  # (r or N*r, in)
        B = layer.hydra_B[adapter].weight.detach().float().cpu()  # (out, N*r)
        r = layer.r[adapter]
        lora_r = r * factor
        lora_scaling = layer.lora_alpha[adapter] / (lora_r**0.5 if config.use_rslora else lora_r)
        c = layer.scaling[adapter] / lora_scaling
        lora_B = c * HF.merged_heads(B, g, r, shared_a=config.share_a)
        dtype = layer.hydra_B[adapter].weight.dtype
        state[f"{prefix}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"{prefix}{name}.lora_B.weight"] = lora_B.to(dtype).contiguous()
    if not state:
        raise ValueError(f"Adapter '{adapter}' has no HydraLoRA layer to export.")
    check_gate_layers(gates, used_names)

    # Non-HydraLoRA trainable tensors (modules_to_save) keep PEFT's saved layout. Only read when there are any: the
    # model's state_dict() runs bitsandbytes' own, which rewrites CPU-packed 4-bit weights in place (docs/quantized.md)
    if config.modules_to_save:
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter).items():
            if f".{PREFIX}" not in key:
                state[key] = value.detach().cpu().contiguous()

    target_modules = config.target_modules
    lora_config = LoraConfig(
        r=config.r * factor,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=sorted(target_modules) if isinstance(target_modules, set) else target_modules,
        exclude_modules=sorted(config.exclude_modules) if isinstance(config.exclude_modules, set) else config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=config.fan_in_fan_out,
        use_rslora=config.use_rslora,
        rank_pattern={k: v * factor for k, v in config.rank_pattern.items()},
        alpha_pattern=dict(config.alpha_pattern),
        bias="none",
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    os.makedirs(save_directory, exist_ok=True)
    lora_config.save_pretrained(save_directory)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(save_directory, "adapter_model.bin"))
    with open(os.path.join(save_directory, "hydralora_export.json"), "w", encoding="utf-8") as f:
        described = gates if isinstance(gates, (str, type(None))) else ("per-layer" if isinstance(gates, Mapping) else [float(x) for x in torch.as_tensor(gates).flatten()])
        json.dump({"exported_from": PEFT_TYPE_NAME, "num_experts": config.num_experts, "share_a": config.share_a,
                   "gates": described, "lora_rank": config.r * factor}, f, indent=2)  # fmt: skip
    return lora_config
