"""What the framework integrations share: the HydraLoRA option names, the one builder of a ``HydraLoraConfig`` from a
framework's options, ``num_experts: auto`` over the training texts, and the refusal of a framework's merge command.

Imports no framework (each integration module imports its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Mapping, Optional, Sequence

from ..config import HydraLoraConfig, no_exact_merge_message

#: The presets ``hydra_preset`` (``preset`` in LLaMA-Factory's ``peft_config``) accepts: ``paper`` is
#: ``HydraLoraConfig.paper_preset`` (the authors' settings), which the options given explicitly override.
PRESETS = ("paper",)

#: The ``HydraLoraConfig`` fields that a framework's own LoRA options set (axolotl's ``lora_r``, ms-swift's
#: ``--lora_rank``, ...): they are not HydraLoRA options of their own.
LORA_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern",
)  # fmt: skip

#: ``num_experts: auto`` clusters at most this many training texts (a seeded sample).
AUTO_MAX_TEXTS = 2000


def hydra_only_fields() -> tuple[str, ...]:
    """The HydraLoRA options a framework has no option for (``num_experts``, ``router_aux_loss_coef``, ``top_k``, ...):
    the fields ``HydraLoraConfig`` adds to PEFT's ``PeftConfig``, less the LoRA ones and the unsupported one."""
    from peft.config import PeftConfig

    base = {f.name for f in dataclasses.fields(PeftConfig)}
    skip = set(LORA_FIELDS) | {"target_parameters", "init_weights"}
    return tuple(f.name for f in dataclasses.fields(HydraLoraConfig) if f.name not in base and f.name not in skip)


def choose_num_experts(texts: Optional[Sequence[str]], where: str, seed: int = 0) -> int:
    """``num_experts: auto``: :func:`peft_hydra.suggest_num_experts` over (a seeded sample of) the training texts."""
    import importlib.util

    if texts is None:
        raise ValueError(f"{where}: num_experts 'auto' needs the training texts, which this command does not load; "
                         "give a number, e.g. num_experts: 3.")  # fmt: skip
    if importlib.util.find_spec("sklearn") is None:
        raise ImportError(f"{where}: num_experts 'auto' needs scikit-learn (peft_hydra.suggest_num_experts clusters "
                          "the training texts): pip install scikit-learn; or give a number, e.g. num_experts: 3.")  # fmt: skip
    from ..heads import suggest_num_experts

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    sample = texts if len(texts) <= AUTO_MAX_TEXTS else random.Random(seed).sample(texts, AUTO_MAX_TEXTS)
    if len(set(sample)) < 3:
        raise ValueError(f"{where}: num_experts 'auto' needs at least 3 distinct training texts, got "
                         f"{len(set(sample))}; give a number instead, e.g. num_experts: 3.")  # fmt: skip
    n, curve = suggest_num_experts(sample, k_max=min(10, len(set(sample))), random_state=seed, return_curve=True)
    print(f"[peft-hydra] num_experts auto: N = {n} from {len(sample)} training texts ({curve['reason']})", flush=True)
    return n


def build_config(
    lora: Mapping[str, Any],
    *,
    num_experts: Any = None,
    router_aux_loss_coef: Any = None,
    preset: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    texts: Optional[Sequence[str]] = None,
    where: str = "HydraLoRA options",
    seed: int = 0,
) -> HydraLoraConfig:
    """The ``HydraLoraConfig`` of a framework's options: the one builder every integration calls.

    Args:
        lora: the framework's LoRA options under ``HydraLoraConfig``'s names (``r``, ``lora_alpha``, ...); None
            values are left out (the preset's or ``HydraLoraConfig``'s default applies).
        num_experts: N, or ``"auto"`` (:func:`choose_num_experts` over ``texts``), or None (the default / preset).
        router_aux_loss_coef: the weight of the router balance loss (None: the default, 0).
        preset: None, or ``"paper"`` (``HydraLoraConfig.paper_preset``, overridden by every option given).
        options: further HydraLoRA fields (``top_k``, ``router_temperature``, ``head_init``, ...:
            :func:`hydra_only_fields`).
        where: how the error messages name the options' source (e.g. ``"axolotl config"``).
    """
    values = {k: v for k, v in lora.items() if v is not None}
    options = dict(options or {})
    if not isinstance(options, dict):
        raise ValueError(f"{where}: hydra_options must be a mapping of HydraLoRA fields, got {options!r}.")
    allowed = hydra_only_fields()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        lora_named = [k for k in unknown if k in LORA_FIELDS]
        hint = f" ({', '.join(lora_named)}: set with the framework's own LoRA options)" if lora_named else ""
        raise ValueError(f"{where}: unknown HydraLoRA option(s) {unknown}{hint}; the HydraLoRA options are "
                         f"{list(allowed)}.")  # fmt: skip
    values.update(options)
    if isinstance(num_experts, str) and num_experts.strip().lower() == "auto":
        num_experts = choose_num_experts(texts, where, seed=seed)
    elif num_experts is not None:
        if isinstance(num_experts, str) and num_experts.strip().isdigit():
            num_experts = int(num_experts)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"{where}: num_experts must be an integer >= 1 or 'auto', got {num_experts!r}.")
    if num_experts is not None:
        values["num_experts"] = num_experts
    if router_aux_loss_coef is not None:
        values["router_aux_loss_coef"] = float(router_aux_loss_coef)
    if preset is None:
        values.setdefault("task_type", "CAUSAL_LM")
        return HydraLoraConfig(**values)
    if preset not in PRESETS:
        raise ValueError(f"{where}: unknown HydraLoRA preset {preset!r}; the presets are {list(PRESETS)} (or none).")
    return HydraLoraConfig.paper_preset(**values)


def describe_targets(target_modules: Any) -> str:
    """``target_modules`` for a log line: a regex / ``all-linear`` as given, names sorted."""
    return target_modules if isinstance(target_modules, str) else ", ".join(sorted(target_modules))


def saved_num_experts(adapter_dir: Optional[str]) -> Optional[int]:
    """N of the HydraLoRA adapter saved in ``adapter_dir`` with a learned router, None for anything else."""
    path = os.path.join(adapter_dir or "", "adapter_config.json")
    if not adapter_dir or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if str(config.get("peft_type", "")).upper() != "HYDRALORA" or config.get("fixed_gates") is not None:
        return None
    n = int(config.get("num_experts", 1))
    return n if n > 1 else None


def merge_refusal(command: str, adapter_dir: str, num_experts: int) -> str:
    """The error a framework's merge command stops with on a HydraLoRA adapter with a learned router: the package's
    own text (:func:`peft_hydra.config.no_exact_merge_message`) and the working alternatives."""
    return (
        f"{command}: {no_exact_merge_message(os.path.basename(os.path.normpath(adapter_dir)), num_experts)} This "
        "command cannot pass gates. Merge in Python instead: model = PeftModel.from_pretrained(base, "
        f"{adapter_dir!r}); model.merge_and_unload(gates='uniform') (or the per-layer gates of "
        "peft_hydra.measure_mean_gates); or write a plain LoRA adapter with fixed gates: "
        f"peft_hydra.export_lora(model, 'lora_out', gates='uniform'). Or serve the adapter unmerged "
        "(PeftModel.from_pretrained)."
    )


def plain_texts(records: Sequence[Any]) -> list[str]:
    """The strings of a list of dataset records (dicts of strings / message lists), joined per record: the texts
    that ``num_experts: auto`` clusters."""
    out = []
    for record in records:
        parts: list[str] = []
        _collect(record, parts)
        if parts:
            out.append("\n".join(parts))
    return out


def _collect(value: Any, parts: list[str]) -> None:
    if isinstance(value, str):
        if value.strip():
            parts.append(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if k not in ("role", "from", "name", "type"):
                _collect(v, parts)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, parts)
