"""Metadata lives in setup.cfg. This file only adds the start-up hook ``peft_hydra-autoload.pth`` (one line:
``import _peft_hydra_autoload``) to the top level of the wheel, for regular and editable installs alike: setuptools
has no declarative way to ship a .pth file. See src/_peft_hydra_autoload.py for what the hook does."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "peft_hydra-autoload.pth"
PTH_LINE = "import _peft_hydra_autoload\n"


class BuildPyWithPth(build_py):
    """Regular installs: write the .pth next to the packages in build_lib, so it lands in site-packages."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, os.path.join(self.build_lib, PTH_NAME)]


cmdclass = {"build_py": BuildPyWithPth}

try:  # editable installs (PEP 660): setuptools builds the wheel itself; add the .pth to it
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None


class _StrategyWithPth:
    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
