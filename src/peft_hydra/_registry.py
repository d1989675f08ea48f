"""The only place where peft-hydra touches PEFT's registration internals.

PEFT (0.21) has no plugin entry point: ``register_peft_method`` only accepts names that are already members of the
``PeftType`` enum. So we add the member ``HYDRALORA`` ourselves, exactly once, and then register through PEFT's own
function. Everything version-specific about that lives in this module and is covered by ``tests/test_registry.py``
(which also runs :func:`add_str_enum_member` under every Python 3.10-3.13 found on the machine).
"""

from __future__ import annotations

import enum

PEFT_TYPE_NAME = "HYDRALORA"
METHOD_NAME = "hydralora"
PREFIX = "hydra_"


def add_str_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add the member ``name`` (with value == name) to the ``str`` enum ``enum_cls``; idempotent.

    It builds the member the way ``enum`` itself does for a class body entry (``_name_``, ``_value_``,
    ``__objclass__``, ``_sort_order_``) and records it in the three lookup tables, so that attribute access
    (``E.NAME``), value lookup (``E("NAME")``), iteration / ``in`` and pickling all behave as for a native member.
    Name == value matters: ``Enum.__hash__`` hashes the *name*, and PEFT looks its mappings up with the plain string
    read from ``adapter_config.json``.
    """
    if not (issubclass(enum_cls, str) and issubclass(enum_cls, enum.Enum)):
        raise TypeError(f"{enum_cls!r} is not a str Enum")
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != name:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r} != {name!r}")
        return existing
    if name in enum_cls._value2member_map_:
        raise ValueError(f"value {name!r} already belongs to {enum_cls._value2member_map_[name]!r}")

    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which refuses to (re)assign members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    return member


def register() -> None:
    """Register HydraLoRA with PEFT (idempotent). Called on ``import peft_hydra``."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    from .config import HydraLoraConfig
    from .model import HydraLoraModel

    peft_type = add_str_enum_member(PeftType, PEFT_TYPE_NAME)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is HydraLoraModel:
        return
    if registered is not None and _same_origin(registered, HydraLoraModel):
        # The same module was re-executed (importlib.reload, IPython autoreload): follow the new classes.
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = HydraLoraConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = HydraLoraModel
        return
    if registered is not None:
        raise RuntimeError(
            f"PEFT type {PEFT_TYPE_NAME} is already registered to {registered.__module__}.{registered.__qualname__}, "
            f"not to {HydraLoraModel.__module__}.HydraLoraModel. This happens when peft_hydra is imported under two "
            "module paths (e.g. `src.peft_hydra` and `peft_hydra`): install the package (`pip install -e .`) and "
            "always `import peft_hydra`."
        )
    register_peft_method(name=METHOD_NAME, config_cls=HydraLoraConfig, model_cls=HydraLoraModel, prefix=PREFIX)


def _same_origin(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
