"""peft-hydra: HydraLoRA as a first-class Hugging Face PEFT method.

``import peft_hydra`` registers the PEFT type ``HYDRALORA`` (prefix ``hydra_``) with PEFT, so that
``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with HydraLoRA adapters.
"""

from . import _registry
from .config import LLAMA_LIKE_TARGET_MODULES, HydraLoraConfig
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel

_registry.register()

__version__ = "0.1.0"

__all__ = [
    "HydraLoraConfig",
    "HydraLoraLayer",
    "HydraLoraModel",
    "LLAMA_LIKE_TARGET_MODULES",
    "Linear",
    "__version__",
]
