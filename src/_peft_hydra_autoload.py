"""Start-up hook of peft-hydra: register HydraLoRA with PEFT as soon as ``peft`` is imported.

PEFT has no plugin entry point, so ``PeftModel.from_pretrained`` of a HydraLoRA adapter fails with
``KeyError: 'HYDRALORA'`` unless ``peft_hydra`` was imported first. ``pip install peft-hydra`` puts the one-line file
``peft_hydra-autoload.pth`` (``import _peft_hydra_autoload``) into site-packages; Python runs it at start-up. This
module only puts a finder on ``sys.meta_path`` (standard library only, a few microseconds): nothing is imported until
the program imports ``peft``; right after ``peft`` has loaded, ``peft_hydra`` is imported, which registers the PEFT
type. The finder removes itself once peft's module has run. A lookup that only asks where ``peft`` is
(``importlib.util.find_spec("peft")``, as transformers and lm-eval do to see whether peft is installed) executes
nothing, so the finder answers it and stays: the import that follows is the one that registers. Every other name costs
one string comparison per import (``find_spec`` returns None at once).

Switch it off with the environment variable ``PEFT_HYDRA_AUTOLOAD=0`` (then ``import peft_hydra`` yourself).
"""

import os
import sys

ENV_VAR = "PEFT_HYDRA_AUTOLOAD"


def _register() -> None:
    if "peft_hydra" in sys.modules:  # being imported (it imports peft) or already imported: nothing to do
        return
    try:
        import peft_hydra  # noqa: F401
    except Exception as exc:  # never break the user's `import peft`
        import warnings

        warnings.warn(
            f"peft-hydra could not register HydraLoRA with PEFT automatically ({type(exc).__name__}: {exc}); "
            "`import peft_hydra` before loading a HydraLoRA adapter.",
            stacklevel=2,
        )


class _Loader:
    """Wraps peft's own loader: runs it, then registers HydraLoRA."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        uninstall()  # peft has run (a failed import keeps the finder, so a retry registers too)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


class PeftImportHook:
    """A ``sys.meta_path`` finder that only answers for ``peft``, with peft's own spec and a wrapped loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        for finder in sys.meta_path:
            if isinstance(finder, PeftImportHook):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PeftImportHook)]


def install() -> None:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "peft" in sys.modules:
        _register()
        return
    if not any(isinstance(f, PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())


install()
