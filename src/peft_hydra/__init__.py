"""peft-hydra: HydraLoRA as a first-class Hugging Face PEFT method.

``import peft_hydra`` registers the PEFT type ``HYDRALORA`` (prefix ``hydra_``) with PEFT, so that
``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with HydraLoRA adapters. It
does nothing else: no other library's classes are changed. (After ``pip install peft-hydra`` a small start-up hook
imports this package right after ``peft``, so that adapters also load in a script that never imports it; set
``PEFT_HYDRA_AUTOLOAD=0`` to switch that off. See ``_peft_hydra_autoload.py``.) What exists only because HydraLoRA
lives outside PEFT is in ``peft_hydra.standalone``.
"""

from .config import LLAMA_LIKE_TARGET_MODULES, METHOD_NAME, PEFT_TYPE_NAME, PREFIX, HydraLoraConfig, resolve_gates
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel
from .router import HydraRouter
from .standalone.tuner import register as _register

_register()

from .convert import convert_official_checkpoint  # noqa: E402
from .export import export_lora, measure_mean_gates  # noqa: E402
from .heads import suggest_num_experts  # noqa: E402  (needs the [compare] extra when called: scikit-learn)
from .integrations import router_health, router_metrics  # noqa: E402
from . import routing  # noqa: E402  (the routing statistics: peft_hydra.routing.layer_routing, summarize, ...)
from .routing import format_routing_report, observe_routing, routing_report  # noqa: E402
from .standalone.card import push_to_hub, write_model_card  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    """``HydraLoraCallback`` and ``prepare_trainer`` are imported on first use: the callback subclasses
    ``transformers.TrainerCallback``, whose import pulls in the Trainer's modules (``import peft_hydra`` adds no module
    beyond what ``import peft`` loaded)."""
    if name in ("HydraLoraCallback", "prepare_trainer"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'peft_hydra' has no attribute {name!r}")

__all__ = [
    "HydraLoraCallback",
    "HydraLoraConfig",
    "HydraLoraLayer",
    "HydraLoraModel",
    "HydraRouter",
    "LLAMA_LIKE_TARGET_MODULES",
    "Linear",
    "PEFT_TYPE_NAME",
    "PREFIX",
    "__version__",
    "convert_official_checkpoint",
    "export_lora",
    "format_routing_report",
    "measure_mean_gates",
    "observe_routing",
    "prepare_trainer",
    "push_to_hub",
    "resolve_gates",
    "router_health",
    "router_metrics",
    "routing",
    "routing_report",
    "suggest_num_experts",
    "write_model_card",
]
