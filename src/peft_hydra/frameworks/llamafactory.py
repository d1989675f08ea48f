"""HydraLoRA in LLaMA-Factory's v1 engine (LLaMA-Factory 0.9.5, ``USE_V1=1``): a ``PeftPlugin`` named ``hydralora``
and the command that imports it before handing over to LLaMA-Factory's launcher.

LLaMA-Factory imports no third-party code (no entry point, no config key), so ``llamafactory-cli`` cannot find the
plugin by itself. ``peft-hydra-llamafactory`` (or ``python -m peft_hydra.frameworks.llamafactory``) is
``USE_V1=1 llamafactory-cli`` with the plugin imported::

    peft-hydra-llamafactory sft config.yaml

Config (complete example: ``configs/llamafactory_hydralora.yaml``; docs/training.md)::

    model: path/or/hub-id
    template: chatml
    train_dataset: data.yaml
    peft_config:
      name: hydralora
      r: 8                          # LLaMA-Factory's LoRA keys mean what they mean for LoRA:
      lora_alpha: 16                #   r, lora_alpha, lora_dropout, target_modules (all: every linear but the head),
      lora_dropout: 0.05            #   use_rslora, modules_to_save, adapter_name_or_path (resume / inference)
      target_modules: all
      num_experts: 3                # N heads, or auto (peft_hydra.suggest_num_experts over train_dataset's texts)
      router_aux_loss_coef: 0.01    # router balance loss, added to the SFT loss
      preset: paper                 # optional: HydraLoraConfig.paper_preset, overridden by the keys given
      top_k: 2                      # optional: any other HydraLoraConfig field

The v1 trainer takes no callbacks from a config, so the command also runs ``sft`` with a subclass of v1's
``SFTTrainer`` that adds the router balance loss to the loss and the router statistics (``router_entropy``,
``router_gate_<i>``, ``router_aux_loss``) to the training log (stdout and ``trainer_log.jsonl``). The adapter is
saved in ``output_dir`` as a PEFT adapter (``PeftModel.from_pretrained(base, output_dir)`` after ``import peft_hydra``).

Merging: ``llamafactory-cli merge`` of the v1 engine merges ``name: lora`` only and stops on ``name: hydralora``; a
HydraLoRA adapter given as ``name: lora`` stops with this package's error (no exact merge of a learned router). With
``adapter_name_or_path`` the plugin loads the adapter unmerged for inference (``chat``). Merge with fixed gates in
Python or export a plain LoRA with ``peft_hydra.export_lora`` (docs/merging.md).

The v0 engine (LLaMA-Factory's default, without ``USE_V1=1``) has no hook for another adapter type.
"""

from __future__ import annotations

import os
import random
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # run as a script (LLaMA-Factory's torchrun re-launch runs this file): this folder must not shadow `llamafactory`
    sys.path.pop(0)

from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402

import peft_hydra  # noqa: E402
from peft_hydra.frameworks import _common  # noqa: E402

ADAPTER = "hydralora"
WHERE = "LLaMA-Factory peft_config (name: hydralora)"
#: peft_config keys LLaMA-Factory itself reads (its LoRA plugin's), besides the HydraLoraConfig fields.
OWN_KEYS = ("name", "adapter_name_or_path", "export_dir", "export_size", "export_hub_model_id", "infer_dtype",
            "export_legacy_format")  # fmt: skip


def hydra_config(model, config: dict, texts=None) -> peft_hydra.HydraLoraConfig:
    """The ``HydraLoraConfig`` of a ``peft_config`` mapping (``name: hydralora``)."""
    config = dict(config)
    preset = config.pop("preset", None)
    lora = {k: config.pop(k) for k in _common.LORA_FIELDS if k in config}
    for key in OWN_KEYS:
        config.pop(key, None)
    if lora.get("target_modules") == "all" or ("target_modules" not in lora and preset is None):
        lora["target_modules"] = "all-linear"  # LLaMA-Factory's "all" (its default): every linear but the output head
    elif isinstance(lora.get("target_modules"), str):
        lora["target_modules"] = [lora["target_modules"]]
    return _common.build_config(
        lora,
        num_experts=config.pop("num_experts", None),
        router_aux_loss_coef=config.pop("router_aux_loss_coef", None),
        preset=preset,
        options=config,
        texts=texts,
        where=WHERE,
    )


def _train_texts() -> list[str]:
    """The texts of ``train_dataset`` (for ``num_experts: auto``), read the way LLaMA-Factory reads its arguments."""
    from llamafactory.v1.config import get_args
    from llamafactory.v1.core.data_engine import DataEngine

    _, data_args, _, _ = get_args()
    if not data_args.train_dataset:
        return []
    engine = DataEngine(data_args.train_dataset)
    n = len(engine)
    idx = range(n) if n <= _common.AUTO_MAX_TEXTS else random.Random(0).sample(range(n), _common.AUTO_MAX_TEXTS)
    return _common.plain_texts([engine[i] for i in idx])


# ------------------------------------------------------------------------------------------- the plugin (v1 engine)
try:
    from llamafactory.v1.plugins.model_plugins.peft import PeftPlugin
except ImportError:  # pragma: no cover - only without LLaMA-Factory 0.9.5+
    PeftPlugin = None

if PeftPlugin is not None:

    @PeftPlugin(ADAPTER).register()
    def get_hydralora_model(model, config: dict, is_train: bool = False):
        """``peft_config: {name: hydralora, ...}``: a new HydraLoRA adapter, or the one in ``adapter_name_or_path``
        (unmerged: a learned router has no exact merge)."""
        from peft import PeftModel, get_peft_model

        path = config.get("adapter_name_or_path")
        if path:
            if isinstance(path, (list, tuple)):
                if len(path) != 1:
                    raise ValueError(f"{WHERE}: adapter_name_or_path takes one HydraLoRA adapter, got {len(path)}: "
                                     "a learned router cannot be merged to stack several.")  # fmt: skip
                path = path[0]
            return PeftModel.from_pretrained(model, path, is_trainable=is_train)
        texts = _train_texts() if str(config.get("num_experts", "")).lower() == "auto" else None
        peft_config = hydra_config(model, config, texts=texts)
        peft_config.inference_mode = not is_train
        print(f"[peft-hydra] HydraLoRA adapter: {peft_config.num_experts} heads, r={peft_config.r}, "
              f"targets {_common.describe_targets(peft_config.target_modules)}", flush=True)  # fmt: skip
        model = get_peft_model(model, peft_config)
        if is_train:
            model.print_trainable_parameters()
        return model


# ---------------------------------------------------------------------------------------------- the v1 trainer
def _hydra_tuner(model):
    try:
        return peft_hydra.integrations.unwrap_hydra_tuner(model)
    except ValueError:
        return None


def trainer_class():
    """v1's ``SFTTrainer`` with the router balance loss in ``compute_loss`` and the router statistics in the log."""
    from llamafactory.v1.trainers.sft_trainer import SFTTrainer
    from llamafactory.v1.utils.callbacks import TrainerCallback

    class RouterLogCallback(TrainerCallback):
        """Adds the router statistics to each training log entry (runs before LLaMA-Factory's LoggingCallback)."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_log(self, args, state, logs, **kwargs):
            tuner = _hydra_tuner(self.trainer.model)
            if tuner is None:
                return
            logs.update(peft_hydra.router_metrics(self.trainer.model))
            aux = self.trainer.__dict__.pop("_peft_hydra_aux", None)
            if aux:
                logs["router_aux_loss"] = round(float(torch.stack(aux).float().mean()), 6)

    class HydraSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.callback_handler.callbacks.insert(0, RouterLogCallback(self))
            tuner = _hydra_tuner(self.model)
            if tuner is not None:
                tuner.reset_router_stats()

        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            tuner = _hydra_tuner(self.model)
            if tuner is None or not self.model.training or not torch.is_grad_enabled():
                return loss
            if tuner.peft_config[tuner.active_adapters[0]].router_aux_loss_coef > 0:
                aux = tuner.hydra_aux_loss(step=max(self.global_step - 1, 0))  # optimizer steps done: the warm-up
                if aux.requires_grad:
                    self.__dict__.setdefault("_peft_hydra_aux", []).append(aux.detach())
                    loss = loss + aux.to(loss.dtype)
            return loss

    return HydraSFTTrainer


# ---------------------------------------------------------------------------------------------- the command
def main(argv: Optional[list[str]] = None) -> None:
    """``peft-hydra-llamafactory``: ``USE_V1=1 llamafactory-cli`` with the HydraLoRA plugin (module docstring)."""
    os.environ["USE_V1"] = "1"
    from llamafactory.v1 import launcher
    from llamafactory.v1.trainers import sft_trainer

    sft_trainer.SFTTrainer = trainer_class()  # what run_sft builds: in this process only
    sys.argv = ["llamafactory-cli", *(sys.argv[1:] if argv is None else argv)]
    if "LOCAL_RANK" in os.environ:  # a process started by torchrun: run the command (the launcher's own child path)
        launcher.main()
        return
    # a distributed launch re-runs `launcher.__file__` under torchrun: this file instead, so that every process has
    # the plugin
    launcher.__file__ = os.path.abspath(__file__)
    launcher.launch()


if __name__ == "__main__":
    main()
