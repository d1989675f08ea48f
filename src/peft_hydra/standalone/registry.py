"""The only place where peft-hydra touches PEFT's registration internals.

PEFT (0.21) has no plugin entry point: ``register_peft_method`` only accepts names that are already members of the
``PeftType`` enum. So we add the member (``HYDRALORA``) ourselves, exactly once, and then register through PEFT's own
function. Everything version-specific about that lives in this module and is covered by ``tests/test_registry.py``
(which also runs :func:`add_str_enum_member` under every Python 3.10-3.13 found on the machine).

This module imports nothing from the package: ``peft_hydra/__init__.py`` passes the classes and names in, as PEFT's
own tuner packages call ``register_peft_method`` from their ``__init__``.
"""

from __future__ import annotations

import enum


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


def register(config_cls: type, model_cls: type, *, method_name: str, prefix: str) -> None:
    """Register ``config_cls`` / ``model_cls`` with PEFT as ``method_name`` (idempotent).

    Adds ``method_name.upper()`` to ``peft.utils.PeftType`` first (PEFT only registers existing members).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    peft_type_name = method_name.upper()
    peft_type = add_str_enum_member(PeftType, peft_type_name)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None and _same_origin(registered, model_cls):
        # The same module was re-executed (importlib.reload, IPython autoreload): follow the new classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return
    if registered is not None:
        raise RuntimeError(
            f"PEFT type {peft_type_name} is already registered to {registered.__module__}.{registered.__qualname__}, "
            f"not to {model_cls.__module__}.{model_cls.__qualname__}. This happens when peft_hydra is imported under "
            "two module paths (e.g. `src.peft_hydra` and `peft_hydra`): install the package (`pip install -e .`) and "
            "always `import peft_hydra`."
        )
    register_peft_method(name=method_name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def _same_origin(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
