"""Every PEFT internal that peft-hydra relies on, feature-detected in this one module (the tuner files import these
names from here; copied into a peft source tree they import them from peft itself).

Supported: peft 0.18.0 and newer (tested 0.18.0 through :data:`TESTED_PEFT_MAX`). What differs across that range, and
what this module does about it (checked in each release's source):

- ``_get_tuner_state_dict_key_prefixes``, ``BaseTuner._remove_adapter_name_from_key`` and the load hook
  ``BaseTuner._remap_adapter_state_dict_for_load`` appeared in 0.21.0: on older peft the first two are replaced by
  the equivalent functions below, and the upgrade and strict check of a checkpoint run from ``_load_from_state_dict``
  while :func:`peft.set_peft_model_state_dict` is loading (see :func:`enclosing_peft_load`), since PEFT < 0.21
  never calls the tuner on load.
- Before 0.20.0 (``_filter_state_dict_for_adapter_name``, PEFT PR #3282) PEFT saved every adapter's tensors into each
  adapter's file: on that peft the tuner drops the other adapters' tensors from the state dict that
  :func:`peft.get_peft_model_state_dict` reads (see :func:`enclosing_peft_save`).

The tuner subclass that applies these on older peft is ``peft_hydra.standalone.tuner``.

A private name that a future peft drops fails here, at ``import peft_hydra``, with an ImportError that names the
installed peft version and the supported range, instead of a bare ImportError/AttributeError deep in a forward.
On a peft newer than :data:`TESTED_PEFT_MAX` the import emits ONE :class:`UntestedPeftVersionWarning` and everything
whose checks pass here works.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from typing import Any, Optional

import peft
from packaging.version import Version
from torch import nn

#: The oldest peft peft-hydra supports (BaseTuner's prefix-driven default plumbing appeared in 0.18.0).
MIN_PEFT = "0.18.0"
#: The newest peft release peft-hydra was tested against (CI's `make test-newest` tries newer ones as they appear).
TESTED_PEFT_MAX = "0.21.2"

PEFT_VERSION = Version(peft.__version__)
SUPPORTED_RANGE = f"peft>={MIN_PEFT} (tested {MIN_PEFT} through {TESTED_PEFT_MAX})"


class UntestedPeftVersionWarning(UserWarning):
    """The installed peft is newer than any version peft-hydra was tested with."""


def unsupported(what: str) -> ImportError:
    """The error for a PEFT internal that the installed peft lacks: names it, the version and the supported range."""
    return ImportError(
        f"peft-hydra needs {what}, which the installed peft {peft.__version__} does not provide. Supported: "
        f"{SUPPORTED_RANGE}. Install a supported peft (e.g. `pip install \"peft>={MIN_PEFT},<={TESTED_PEFT_MAX}\"`) "
        "or a peft-hydra release that supports this peft."
    )


if PEFT_VERSION < Version(MIN_PEFT):
    raise unsupported(f"peft>={MIN_PEFT} (BaseTuner's prefix-driven tuner API)")


def _import(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise unsupported(f"`{module}.{name}`") from None


# ------------------------------------------------------------------------------------ names needed on every peft
BaseTuner = _import("peft.tuners.tuners_utils", "BaseTuner")
BaseTunerLayer = _import("peft.tuners.tuners_utils", "BaseTunerLayer")
check_adapters_to_merge = _import("peft.tuners.tuners_utils", "check_adapters_to_merge")
_get_in_out_features = _import("peft.tuners.tuners_utils", "_get_in_out_features")
transpose = _import("peft.utils.other", "transpose")
get_pattern_key = _import("peft.utils.other", "get_pattern_key")
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = _import(
    "peft.utils", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
)
_save_and_load = _import("peft.utils", "save_and_load")
dequantize_bnb_weight = _import("peft.utils.integrations", "dequantize_bnb_weight")  # merging into bitsandbytes 8-bit

#: BaseTuner / BaseTunerLayer methods the tuner overrides or calls (private, stable since 0.18.0).
REQUIRED_METHODS = {
    BaseTuner: ("_create_and_replace", "_check_new_adapter_config", "_replace_module", "_check_merge_allowed",
                "_mark_only_adapters_as_trainable",
                "inject_adapter", "merge_and_unload", "unload"),
    BaseTunerLayer: ("_cast_input_dtype", "_move_adapter_to_device_of_base_layer", "set_adapter", "delete_adapter",
                     "get_base_layer"),
}  # fmt: skip
for _cls, _names in REQUIRED_METHODS.items():
    for _name in _names:
        if not hasattr(_cls, _name):
            raise unsupported(f"`{_cls.__module__}.{_cls.__name__}.{_name}`")

#: peft >= 0.21: PEFT calls ``BaseTuner._remap_adapter_state_dict_for_load`` on every adapter load.
NATIVE_LOAD_HOOK = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")
#: peft >= 0.20: PEFT saves only the saved adapter's tensors into its file.
NATIVE_SAVE_FILTER = hasattr(_save_and_load, "_filter_state_dict_for_adapter_name")

if PEFT_VERSION > Version(TESTED_PEFT_MAX):
    warnings.warn(
        f"peft-hydra was tested with peft {MIN_PEFT} through {TESTED_PEFT_MAX}; the installed peft {peft.__version__} "
        "is newer and untried. Every PEFT internal peft-hydra uses was found, so it should work; if something breaks, "
        f"install `peft<={TESTED_PEFT_MAX}` and report it.",
        UntestedPeftVersionWarning,
        stacklevel=2,
    )


# ------------------------------------------------------------------------- names with a fallback on older peft
def _remove_adapter_name_from_key_fallback(key: str, adapter_name: str) -> str:
    """The checkpoint key of a model key (adapter name removed), as ``BaseTuner._remove_adapter_name_from_key`` of
    peft >= 0.21 and the key rule of ``get_peft_model_state_dict`` before it."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):  # a parameter held directly in a per-adapter dict
        return key.removesuffix(f".{adapter_name}")
    key, _, suffix = key.rpartition(".")  # e.g. q_proj.hydra_A.default + weight
    return f"{re.sub(re.escape(f'.{adapter_name}') + r'$', '', key)}.{suffix}"


def _tuner_state_dict_key_prefixes_fallback(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """``peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes`` (peft >= 0.21) for older peft: the state-dict
    key prefixes of everything on a tuner layer except ``base_layer`` (restricted to ``adapter_name``'s entry of
    per-adapter containers), skipping tuner layers inside auxiliary wrappers (``modules_to_save``)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefixes: set[str] = set()
    aux: list[str] = []
    for module_name, module in model.named_modules():
        module_name = module_name.removeprefix("_fsdp_wrapped_module.")
        if isinstance(module, AuxiliaryTrainingWrapper):
            aux.append(module_name)
            continue
        if not isinstance(module, (BaseTuner, BaseTunerLayer)):
            continue
        if any(module_name == a or module_name.startswith(a + ".") for a in aux):
            continue
        names = [n for n, _ in module.named_children()]
        names += [n for n, _ in module.named_parameters(recurse=False)]
        names += [n for n, _ in module.named_buffers(recurse=False)]
        for name in names:
            if name in ("base_layer", "model"):
                continue
            prefix = f"{module_name}.{name}" if module_name else name
            child = getattr(module, name)
            if adapter_name is not None and isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                if adapter_name in child:
                    prefixes.add(f"{prefix}.{adapter_name}")
            else:
                prefixes.add(prefix)
    return prefixes


try:
    from peft.tuners.tuners_utils import _get_tuner_state_dict_key_prefixes
except ImportError:  # peft < 0.21
    _get_tuner_state_dict_key_prefixes = _tuner_state_dict_key_prefixes_fallback


# ------------------------------------------------------- the tuner's save / load hooks on peft without native ones
def _enclosing_call(function, max_depth: int = 32) -> Optional[dict]:
    """The local variables of the innermost running call of ``function`` on this thread's stack (None: not inside
    it). Compares code objects, so it finds exactly that function; it is only used for PEFT releases that are
    published and cannot change (see :func:`enclosing_peft_load` / :func:`enclosing_peft_save`)."""
    code = getattr(function, "__code__", None)
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None or code is None:
            return None
        if frame.f_code is code:
            return frame.f_locals
        frame = frame.f_back
    return None


def _enclosing_model_and_adapter(function) -> Optional[tuple[nn.Module, str]]:
    """``(model, adapter_name)`` from the locals of a running call of PEFT's ``function``, else None."""
    local = _enclosing_call(function)
    if local is None or "adapter_name" not in local or "model" not in local:
        return None
    return local["model"], local["adapter_name"]


def enclosing_peft_load() -> Optional[tuple[nn.Module, str]]:
    """On peft < 0.21 (no load hook): ``(model, adapter_name)`` of the running ``set_peft_model_state_dict`` (the
    function every PEFT adapter load goes through: ``PeftModel.from_pretrained`` / ``load_adapter``), else None."""
    return None if NATIVE_LOAD_HOOK else _enclosing_model_and_adapter(_save_and_load.set_peft_model_state_dict)


def enclosing_peft_save() -> Optional[tuple[nn.Module, str]]:
    """On peft < 0.20 (which saves every adapter's tensors into each file): ``(model, adapter_name)`` of the running
    ``get_peft_model_state_dict`` when it reads ``model.state_dict()`` itself, else None."""
    return None if NATIVE_SAVE_FILTER else _enclosing_model_and_adapter(_save_and_load.get_peft_model_state_dict)
