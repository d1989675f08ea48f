"""peft-hydra: HydraLoRA as a first-class Hugging Face PEFT method.

``import peft_hydra`` registers the PEFT type ``HYDRALORA`` (prefix ``hydra_``) with PEFT, so that
``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with HydraLoRA adapters.
"""

from . import _registry
from .config import LLAMA_LIKE_TARGET_MODULES, HydraLoraConfig
from .heads import suggest_num_experts
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel

_registry.register()

# Ecosystem (Trainer/TRL, Hub card, LoRA export): see docs/ecosystem.md
from .export import export_lora, measure_mean_gates
from .hub import install_hub_hooks
from .integrations import hydra_compute_loss, prepare_trainer, router_metrics

install_hub_hooks()

__version__ = "0.1.0"

__all__ = [
    "HydraLoraConfig",
    "HydraLoraLayer",
    "HydraLoraModel",
    "LLAMA_LIKE_TARGET_MODULES",
    "Linear",
    "__version__",
    "suggest_num_experts",
    "export_lora",
    "hydra_compute_loss",
    "measure_mean_gates",
    "prepare_trainer",
    "router_metrics",
]
