"""HydraLoRA as an axolotl adapter: a plugin named in the config's ``plugins:`` (axolotl 0.19).

Config (complete example: ``configs/axolotl_hydralora.yml``; docs/training.md)::

    plugins:
      - peft_hydra.frameworks.axolotl.HydraLoraPlugin
    adapter: hydralora
    lora_r: 8                      # axolotl's LoRA options mean what they mean for LoRA:
    lora_alpha: 16                 #   lora_r, lora_alpha, lora_dropout, lora_target_modules / lora_target_linear,
    lora_dropout: 0.05             #   lora_modules_to_save, peft_use_rslora, peft_layers_to_transform, ...
    lora_target_linear: true
    num_experts: 3                 # N heads, or auto (peft_hydra.suggest_num_experts over the training texts)
    router_aux_loss_coef: 0.01     # router balance loss, added to the Trainer's loss
    hydra_preset: paper            # optional: HydraLoraConfig.paper_preset, overridden by the options given
    hydra_options: {top_k: 2}      # optional: any other HydraLoRA field

Command: ``axolotl train config.yml``. The adapter is saved in ``output_dir`` as a PEFT adapter
(``PeftModel.from_pretrained(base, output_dir)`` after ``import peft_hydra``). Router statistics
(``router_entropy``, ``router_gate_<i>``, ``router_aux_loss``) go to axolotl's training logs
(``peft_hydra.prepare_trainer``). ``lora_model_dir`` resumes from a saved adapter. With ``gradient_checkpointing``
and no ``gradient_checkpointing_kwargs`` the plugin sets ``use_reentrant: false`` (axolotl's default is reentrant
checkpointing, under which the router balance loss has no effect).

``axolotl merge-lora`` cannot merge a learned router: the plugin stops it with the package's error and the working
alternatives (a fixed-gate merge in Python, ``peft_hydra.export_lora``) instead of letting axolotl's merger write the
unmerged base model. An adapter with fixed gates (or N=1) merges exactly: the plugin switches axolotl to its legacy
merger, which calls PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

import peft_hydra

from . import _common

ADAPTER = "hydralora"
WHERE = "axolotl config (adapter: hydralora)"


class HydraLoraArgs(BaseModel):
    """The HydraLoRA keys of an axolotl config (the LoRA ones are axolotl's own ``lora_*`` keys)."""

    num_experts: Optional[Union[int, Literal["auto"]]] = Field(
        default=None, json_schema_extra={"description": "HydraLoRA: N heads, or 'auto' (from the training texts)."}
    )
    router_aux_loss_coef: Optional[float] = Field(
        default=None, json_schema_extra={"description": "HydraLoRA: weight of the router balance loss (0 = off)."}
    )
    hydra_preset: Optional[Literal["paper"]] = Field(
        default=None, json_schema_extra={"description": "HydraLoRA: 'paper' = HydraLoraConfig.paper_preset."}
    )
    hydra_options: Optional[dict[str, Any]] = Field(
        default=None, json_schema_extra={"description": "HydraLoRA: further HydraLoraConfig fields (top_k, ...)."}
    )


def _get(cfg, key, default=None):
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def lora_options(cfg, model=None) -> dict[str, Any]:
    """axolotl's LoRA keys under ``HydraLoraConfig``'s names (None: not set)."""
    targets = _get(cfg, "lora_target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if _get(cfg, "lora_target_linear") and model is not None:
        from axolotl.loaders.adapter import find_all_linear_names

        targets = sorted(set(targets or []) | set(find_all_linear_names(model)))
    return {
        "r": _get(cfg, "lora_r"),
        "lora_alpha": _get(cfg, "lora_alpha"),
        "lora_dropout": _get(cfg, "lora_dropout"),
        "target_modules": list(targets) if targets else None,
        "exclude_modules": _get(cfg, "lora_exclude_modules"),
        "modules_to_save": _get(cfg, "lora_modules_to_save") or None,
        "layers_to_transform": _get(cfg, "peft_layers_to_transform"),
        "layers_pattern": _get(cfg, "peft_layers_pattern"),
        "fan_in_fan_out": _get(cfg, "lora_fan_in_fan_out"),
        "use_rslora": _get(cfg, "peft_use_rslora"),
        "rank_pattern": _get(cfg, "lora_rank_pattern"),
        "alpha_pattern": _get(cfg, "lora_alpha_pattern"),
    }


def hydra_config(cfg, model=None, texts=None) -> peft_hydra.HydraLoraConfig:
    """The ``HydraLoraConfig`` of an axolotl config."""
    return _common.build_config(
        lora_options(cfg, model),
        num_experts=_get(cfg, "num_experts"),
        router_aux_loss_coef=_get(cfg, "router_aux_loss_coef"),
        preset=_get(cfg, "hydra_preset"),
        options=_get(cfg, "hydra_options"),
        texts=texts,
        where=WHERE,
        seed=int(_get(cfg, "seed", 0)),
    )


try:  # axolotl is needed to run the plugin, not to read this module's helpers
    from axolotl.integrations.base import AdapterCapabilities, BasePlugin
except ImportError:  # pragma: no cover - only without axolotl
    AdapterCapabilities = BasePlugin = None

if BasePlugin is not None:

    class HydraLoraPlugin(BasePlugin):
        """axolotl plugin: ``adapter: hydralora`` builds (or, with ``lora_model_dir``, loads) a HydraLoRA adapter."""

        def __init__(self):
            super().__init__()
            self._texts: Optional[list[str]] = None

        def get_input_args(self) -> str:
            return f"{__name__}.HydraLoraArgs"

        def get_adapter_capabilities(self):
            return [AdapterCapabilities(name=ADAPTER)]

        def register(self, cfg: dict):
            if cfg.get("adapter") != ADAPTER:
                return
            if cfg.get("gradient_checkpointing") and cfg.get("gradient_checkpointing_kwargs") is None:
                # axolotl's default is use_reentrant=True, under which the router outputs carry no gradient and the
                # balance loss silently has no effect: non-reentrant checkpointing unless the user chose
                cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
            # `axolotl merge-lora` loads the config with merge_lora=True: refuse a learned router here, before
            # axolotl's memory-efficient merger (which knows only lora_A/lora_B) writes the unmerged base model.
            if not cfg.get("merge_lora"):
                return
            adapter_dir = cfg.get("lora_model_dir") or cfg.get("output_dir")
            n = _common.saved_num_experts(adapter_dir)
            if n is not None:
                raise ValueError(_common.merge_refusal("axolotl merge-lora", adapter_dir, n))
            # fixed gates or N=1: PEFT's merge_and_unload is exact, and only axolotl's legacy merger calls it
            cfg["merge_method"] = "legacy"

        def load_datasets(self, cfg, preprocess: bool = False):
            # num_experts: auto needs the training texts before the model is built: load the datasets the way
            # `axolotl train` does, keep the decoded texts, and hand the datasets on.
            if preprocess or str(_get(cfg, "num_experts", "")).lower() != "auto" or cfg.get("adapter") != ADAPTER:
                return None
            if _get(cfg, "lora_model_dir") or _get(cfg, "rl"):
                return None
            from axolotl.common.datasets import load_datasets
            from axolotl.loaders import load_tokenizer

            meta = load_datasets(cfg=cfg)
            tokenizer = load_tokenizer(cfg)
            rows = meta.train_dataset
            idx = list(range(len(rows)))
            if len(idx) > _common.AUTO_MAX_TEXTS:
                import random

                idx = sorted(random.Random(int(_get(cfg, "seed", 0))).sample(idx, _common.AUTO_MAX_TEXTS))
            self._texts = [tokenizer.decode(rows[i]["input_ids"], skip_special_tokens=True) for i in idx]
            return meta

        def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
            if _get(cfg, "adapter") != ADAPTER:
                return None
            from peft import PeftModel, get_peft_model

            resume = _get(cfg, "lora_model_dir")
            if resume:
                config = None
                if not config_only:
                    model = PeftModel.from_pretrained(model, resume, is_trainable=not inference)
                    config = model.peft_config["default"]
                else:
                    from peft import PeftConfig

                    config = PeftConfig.from_pretrained(resume)
                return (None if config_only else model), config
            config = hydra_config(cfg, model, texts=self._texts)
            if config_only:
                return None, config
            config.inference_mode = bool(inference)
            model = get_peft_model(model, config)
            if not inference:
                model.print_trainable_parameters()
            return model, config

        def post_trainer_create(self, cfg, trainer):
            if _get(cfg, "adapter") == ADAPTER:
                peft_hydra.prepare_trainer(trainer)
