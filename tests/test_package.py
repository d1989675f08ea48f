"""The package itself: a light import with no side effects, no import circle, the harness on the public API only, the
CLI without the [compare] extra, and adapters that load without ``import peft_hydra`` after a fresh install."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peft_hydra

from conftest import fresh_install, tiny_base_and_adapter

SRC = Path(peft_hydra.__file__).resolve().parent
REPO = SRC.parent.parent
HEAVY = ("matplotlib", "sklearn", "yaml", "tqdm", "gguf", "scipy", "pandas", "bitsandbytes")


def _python(code: str, python=sys.executable, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env=environment)  # fmt: skip


def test_import_adds_no_heavy_module_and_patches_nothing():
    """``import peft_hydra`` imports no module beyond its own that ``import peft`` has not imported already (peft
    itself brings yaml and tqdm), none of the harness's libraries, and changes no attribute of PEFT's classes."""
    proc = _python(
        f"""
        import sys
        import peft, peft.peft_model, peft.tuners.tuners_utils
        classes = [peft.PeftModel, peft.PeftModelForCausalLM, peft.tuners.tuners_utils.BaseTuner]
        before_attrs = [dict(vars(c)) for c in classes]
        before = set(sys.modules)
        import peft_hydra
        added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] not in ("peft_hydra",))
        changed = [c.__name__ for c, attrs in zip(classes, before_attrs) if dict(vars(c)) != attrs]
        print("ADDED", added)
        print("CHANGED", changed)
        print("HEAVY", [m for m in {HEAVY!r} if m in sys.modules and m not in before])
        """,
        PEFT_HYDRA_AUTOLOAD="0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["HEAVY"] == "[]", proc.stdout
    assert lines["CHANGED"] == "[]", proc.stdout
    assert lines["ADDED"] == "[]", proc.stdout


def _package_imports(path: Path) -> set[str]:
    """Modules of peft_hydra that the file at ``path`` imports (module level and inside functions alike)."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "peft_hydra":
                if node.module:
                    found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import functional`: a submodule
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "peft_hydra")
    return found


def test_no_import_circle():
    """No module of the package imports another that imports it back (lazy imports in functions included).
    ``compare`` and ``cli`` sit on top: they may import the package, the package never imports them."""
    files = {p: None for p in SRC.rglob("*.py")}
    names = {}
    for p in files:
        mod = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        names[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = p
    graph = {mod: {t for t in _package_imports(p) if t in names and t != mod} for mod, p in names.items()}
    # importing a submodule runs its package's __init__: `peft_hydra.compare.x` depends on `peft_hydra` too
    cycles = []

    def visit(node, stack, seen):
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for start in sorted(graph):
        visit(start, [start], {start})
    core = {m for m in graph if not m.startswith(("peft_hydra.compare", "peft_hydra.cli"))}
    assert not [c for c in cycles if set(c) <= core | {"peft_hydra"}], cycles[:5]
    assert not any(t.startswith(("peft_hydra.compare", "peft_hydra.cli")) for m in core for t in graph[m]), {
        m: sorted(graph[m]) for m in core if any(t.startswith("peft_hydra.compare") for t in graph[m])
    }


def test_harness_uses_the_public_api_only():
    """compare/ imports the library as `import peft_hydra` (or from its subpackage) and only uses names of
    ``peft_hydra.__all__``."""
    bad = []
    for path in (SRC / "compare").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level >= 2 or (target.startswith("peft_hydra") and not target.startswith("peft_hydra.compare")):
                    if not (target == "peft_hydra" and all(a.name in peft_hydra.__all__ for a in node.names)):
                        bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{target} import ...")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "peft_hydra":
                if node.attr not in peft_hydra.__all__:
                    bad.append(f"{path.name}:{node.lineno} peft_hydra.{node.attr}")
    assert not bad, bad


def test_cli_without_the_compare_extra_says_which_install_fixes_it():
    proc = _python(
        """
        import importlib.util, sys
        real_find_spec = importlib.util.find_spec
        # as if matplotlib and scikit-learn (part of the [compare] extra) were not installed
        importlib.util.find_spec = lambda name, *a: None if name in ("matplotlib", "sklearn") else real_find_spec(name, *a)
        from peft_hydra.cli import main
        sys.exit(main(["compare", "--config", "configs/default.yaml"]))
        """
    )
    assert proc.returncode == 2
    # other libraries may add their own lines (warnings, notices): look for the package's one message
    ours = [line for line in proc.stderr.splitlines() if "peft-hydra" in line]
    assert len(ours) == 1 and "pip install 'peft-hydra[compare]'" in ours[0], proc.stderr
    assert "missing: scikit-learn, matplotlib" in ours[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_cli_unknown_command_and_help():
    from peft_hydra.cli import main

    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2


# ------------------------------------------------------------------------------------- fresh installs
# `pip install peft-hydra` (regular and editable) into a new virtual environment (conftest.fresh_install): a script that
# never imports peft_hydra must load HydraLoRA adapters there, whichever way it imports peft. The loaders test the
# start-up hook's logic, the install kinds how its .pth file gets installed: every loader after a regular install (what
# users do), one after an editable install, and the switch-off once; each in a fresh interpreter (import order is the
# point).
# how a program gets a HydraLoRA adapter without `import peft_hydra`; each prints the largest difference to the logits
# of the model that saved it
LOADERS = {
    "peft": """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)
        """,
    # transformers and lm-eval ask whether peft is installed this way before they import it
    "find_spec-then-peft": """
        import importlib.util
        assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)
        """,
    # transformers' own PEFT integration: the adapter folder as the model (base from adapter_config.json)
    "transformers": """
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(ADAPTER)
        assert any(".hydra_B." in n for n, _ in model.named_parameters())
        """,
}
LOAD = """
    import sys
    import torch
    BASE, ADAPTER, PROBE = {base!r}, {adapter!r}, torch.load({probe!r})
    assert "peft_hydra" not in sys.modules
    try:
{loader}
    except KeyError as e:
        print("KEYERROR", e)
    else:
        with torch.no_grad():
            diff = (model.eval()(input_ids=PROBE["ids"]).logits - PROBE["logits"]).abs().max().item()
        print("LOADED", diff, sys.modules["peft_hydra"].__file__)
    """


CASES = [("regular", loader) for loader in LOADERS] + [("editable", "find_spec-then-peft")]


@pytest.mark.parametrize("kind,loader", CASES)
def test_fresh_install_loads_adapters_without_import(tmp_path_factory, kind, loader):
    """A script that never imports peft_hydra loads a HydraLoRA adapter, each way a program does it, after a regular
    and an editable install; the outputs are those of the saved model. PEFT_HYDRA_AUTOLOAD=0 switches that off."""
    python, site = fresh_install(kind, tmp_path_factory)
    folder = tiny_base_and_adapter(tmp_path_factory)
    code = LOAD.format(base=str(folder / "base"), adapter=str(folder / "adapter"), probe=str(folder / "probe.pt"),
                       loader=textwrap.indent(textwrap.dedent(LOADERS[loader]), " " * 8))  # fmt: skip
    loaded = _python(code, python=python)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr[-3000:]
    assert loaded.stdout.startswith("LOADED"), loaded.stdout + loaded.stderr[-2000:]
    _, diff, installed_file = loaded.stdout.split()
    assert float(diff) < 1e-5, loaded.stdout
    assert (installed_file.startswith(str(SRC)) if kind == "editable" else installed_file.startswith(str(site))), installed_file

    if (kind, loader) == CASES[0]:
        off = _python(code, python=python, PEFT_HYDRA_AUTOLOAD="0")
        assert "KEYERROR" in off.stdout and "HYDRALORA" in off.stdout, off.stdout + off.stderr[-2000:]
