"""Registration of HYDRALORA with PEFT (src/peft_hydra/standalone/registry.py).

``add_str_enum_member`` pokes at ``enum`` internals, which changed between Python 3.10 and 3.13, so it is checked on
a toy ``class E(str, Enum)`` under every pyenv interpreter present, in a subprocess that loads ``registry.py`` by
file path (it imports only ``enum`` at module level). The rest runs in-process against the real ``PeftType``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peft_hydra
from peft_hydra.standalone import registry as _registry
from peft_hydra.standalone.tuner import StandaloneHydraLoraModel

REGISTRY_FILE = Path(_registry.__file__).resolve()
PYENV_VERSIONS = ["3.10.13", "3.11.7", "3.12.1", "3.13.0"]

ENUM_CHECK = textwrap.dedent(
    r"""
    import copy, enum, importlib.util, json, pickle, sys

    spec = importlib.util.spec_from_file_location("_hydra_registry_under_test", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class E(str, enum.Enum):
        A = "A"
        B = "B"

    m = mod.add_str_enum_member(E, "NEW")
    res = {}
    res["attribute"] = E.NEW is m and E["NEW"] is m and E.__members__["NEW"] is m
    res["value_lookup"] = E("NEW") is m
    res["in_list"] = m in list(E) and list(E)[-1] is m and len(E) == 3 and "NEW" in [e.value for e in E]
    res["name_value"] = isinstance(m, E) and isinstance(m, str) and m.name == "NEW" and m.value == "NEW"
    res["hash_eq"] = hash(m) == hash("NEW") and m == "NEW" and "NEW" == m
    d = {E.A: 1, m: 2}
    res["dict_lookup"] = d["NEW"] == 2 and {"NEW": 3}[m] == 3 and "NEW" in d
    res["pickle"] = all(pickle.loads(pickle.dumps(m, protocol=p)) is m for p in range(pickle.HIGHEST_PROTOCOL + 1))
    res["copy"] = copy.copy(m) is m and copy.deepcopy(m) is m
    res["json"] = json.dumps({"t": m}) == '{"t": "NEW"}'
    res["idempotent"] = mod.add_str_enum_member(E, "NEW") is m and len(E) == 3
    res["old_members_intact"] = E("A") is E.A and list(E)[:2] == [E.A, E.B]

    class F(str, enum.Enum):
        X = "CLASH"
    try:
        mod.add_str_enum_member(F, "CLASH")
        res["value_clash_refused"] = False
    except ValueError as e:
        res["value_clash_refused"] = "CLASH" in str(e) and len(F) == 1

    class G(str, enum.Enum):
        NEW = "something-else"
    try:
        mod.add_str_enum_member(G, "NEW")
        res["name_clash_refused"] = False
    except ValueError as e:
        res["name_clash_refused"] = "NEW" in str(e) and G.NEW.value == "something-else"

    class H(enum.Enum):
        X = "X"
    try:
        mod.add_str_enum_member(H, "Y")
        res["non_str_enum_refused"] = False
    except TypeError:
        res["non_str_enum_refused"] = True
    print(json.dumps(res))
    """
)


@pytest.mark.parametrize("version", PYENV_VERSIONS)
def test_add_str_enum_member_across_pythons(version):
    python = Path(f"/root/.pyenv/versions/{version}/bin/python")
    if not python.exists():
        pytest.skip(f"Python {version} is not installed at {python} (pyenv); cannot check enum internals there")
    proc = subprocess.run(
        [str(python), "-I", "-c", ENUM_CHECK, str(REGISTRY_FILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [k for k, ok in results.items() if not ok]
    assert not failed, f"Python {version}: checks failed: {failed}"
    assert len(results) == 14


def test_add_str_enum_member_in_process():
    import enum

    class E(str, enum.Enum):
        A = "A"

    m = _registry.add_str_enum_member(E, "NEW")
    assert E("NEW") is m and E.NEW is m and hash(m) == hash("NEW") and {m: 1}["NEW"] == 1


# ----------------------------------------------------------------------------------------- real PEFT registry
def test_peft_type_member():
    from peft.utils import PeftType

    member = PeftType("HYDRALORA")
    assert member is PeftType.HYDRALORA
    assert member == "HYDRALORA" and member.value == "HYDRALORA" and member.name == "HYDRALORA"
    assert member in list(PeftType)
    assert [m for m in PeftType if m.value == "HYDRALORA"] == [member]  # registered once
    assert peft_hydra.HydraLoraConfig().peft_type is member


def test_peft_mappings_point_to_our_classes():
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import PeftType

    # PEFT looks these up with the plain string read from adapter_config.json as well as with the member
    for key in (PeftType.HYDRALORA, "HYDRALORA"):
        assert PEFT_TYPE_TO_CONFIG_MAPPING[key] is peft_hydra.HydraLoraConfig
        assert PEFT_TYPE_TO_TUNER_MAPPING[key] is StandaloneHydraLoraModel
        assert PEFT_TYPE_TO_PREFIX_MAPPING[key] == "hydra_"
    assert PeftType.HYDRALORA not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING  # PeftMixedModel is not open to us
    # our prefix is used by nobody else
    assert list(PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("hydra_") == 1


def test_peft_config_from_dict_finds_hydralora():
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    d = peft_hydra.HydraLoraConfig(r=4, num_experts=2).to_dict()
    d = json.loads(json.dumps(d, default=list))  # what adapter_config.json gives back: plain strings
    assert d["peft_type"] == "HYDRALORA"
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig.from_peft_type(**d).peft_type]
    assert cls is peft_hydra.HydraLoraConfig


def test_import_twice_and_reload_register_once():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    n_members = len(PeftType)
    import peft_hydra as again  # noqa: F401

    importlib.reload(peft_hydra)
    peft_hydra._register()
    peft_hydra._register()
    assert len(PeftType) == n_members
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HYDRALORA] is StandaloneHydraLoraModel


def test_reload_of_the_tuner_modules_follows_the_new_classes():
    """A reload of config/model (e.g. IPython autoreload) re-points PEFT to the new classes instead of refusing.

    In a subprocess: reloading here would leave the other test modules holding stale classes.
    """
    code = textwrap.dedent(
        """
        import importlib
        import peft_hydra
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        old = peft_hydra.HydraLoraModel
        for name in ("config", "router", "layer", "model", "standalone.tuner"):
            importlib.reload(importlib.import_module("peft_hydra." + name))
        importlib.reload(peft_hydra)
        assert peft_hydra.HydraLoraModel is not old
        registered = PEFT_TYPE_TO_TUNER_MAPPING["HYDRALORA"]
        assert registered is peft_hydra.standalone.tuner.StandaloneHydraLoraModel
        assert issubclass(registered, peft_hydra.HydraLoraModel)
        assert PEFT_TYPE_TO_CONFIG_MAPPING["HYDRALORA"] is peft_hydra.HydraLoraConfig
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_second_module_path_raises_clear_error():
    """The package imported under another name (e.g. ``src.peft_hydra``) must not silently half-register."""
    package_dir = Path(peft_hydra.__file__).parent
    alias = "peft_hydra_second_copy"
    spec = importlib.util.spec_from_file_location(
        alias, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        with pytest.raises(RuntimeError, match=r"two module paths.*import peft_hydra"):
            spec.loader.exec_module(module)
    finally:
        for name in [n for n in sys.modules if n == alias or n.startswith(alias + ".")]:
            del sys.modules[name]
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING["HYDRALORA"] is StandaloneHydraLoraModel
