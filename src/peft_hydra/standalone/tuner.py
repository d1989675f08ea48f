"""The class registered with PEFT as HydraLoRA's tuner: :class:`~peft_hydra.model.HydraLoraModel` plus what a tuner
outside PEFT's source tree needs (see this package's ``__init__``)."""

from __future__ import annotations

from ..config import METHOD_NAME, PREFIX, HydraLoraConfig
from ..model import HydraLoraModel, check_adapter_state_dict, upgrade_state_dict
from . import card, compat, registry


class StandaloneHydraLoraModel(HydraLoraModel):
    """:class:`~peft_hydra.model.HydraLoraModel`, which tags the base model for the Hub and, on peft < 0.21, upgrades
    and checks a checkpoint on load and keeps other adapters out of an adapter's file on save."""

    def __init__(self, model, peft_config, adapter_name: str, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        card.tag_model(self.model)

    def forward(self, *args, **kwargs):
        # peft < 0.21's BaseTuner.forward calls self.model.forward, past the forward hooks through which the model
        # observes its routers and adds the balance loss; peft 0.21 calls self.model as here
        return self.model(*args, **kwargs)

    if not compat.NATIVE_LOAD_HOOK:  # peft < 0.21 never calls the tuner on load

        @classmethod
        def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
            return compat._remove_adapter_name_from_key_fallback(key, adapter_name)

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            """While ``set_peft_model_state_dict`` loads this tuner's part of a PeftModel: upgrade an old checkpoint
            in place (the dict is the one the layers load from next) and check it."""
            loading = compat.enclosing_peft_load()
            if loading is not None:
                model, adapter_name = loading
                config = getattr(model, "peft_config", {}).get(adapter_name)
                if isinstance(config, HydraLoraConfig) and getattr(model, "base_model", None) is self:
                    legacy = any(k.endswith(f".{PREFIX}B.{adapter_name}") for k in state_dict)
                    upgraded = upgrade_state_dict(state_dict, config, adapter_key=f".{adapter_name}")
                    if upgraded is not state_dict:
                        state_dict.clear()
                        state_dict.update(upgraded)
                    check_adapter_state_dict(type(self), model, config, adapter_name, state_dict, legacy)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    if not compat.NATIVE_SAVE_FILTER:  # peft < 0.20 saves every adapter's tensors into each adapter's file

        def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
            result = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            saving = compat.enclosing_peft_save()
            if saving is not None and getattr(saving[0], "base_model", None) is self:
                drop = set()
                for other in (name for name in self.peft_config if name != saving[1]):
                    drop |= {prefix + p for p in compat._get_tuner_state_dict_key_prefixes(self, adapter_name=other)}
                for key in [k for k in result if k.startswith(prefix)]:
                    if any(key == p or key.startswith(p + ".") for p in drop):
                        del result[key]
            return result


def register() -> None:
    """Register HydraLoRA with PEFT (idempotent); runs on ``import peft_hydra``."""
    registry.register(HydraLoraConfig, StandaloneHydraLoraModel, method_name=METHOD_NAME, prefix=PREFIX)
