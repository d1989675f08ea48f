"""``python -m peft_hydra.cli`` = the ``peft-hydra`` command (``convert``, ``train``, ``compare``, ``report``,
``analyze``; see ``_peft_hydra_cli``, which sits outside the package so that ``peft-hydra --help`` imports no torch)."""

import sys

from _peft_hydra_cli import USAGE, build_parser, main, missing_compare_extra

__all__ = ["USAGE", "build_parser", "main", "missing_compare_extra"]

if __name__ == "__main__":
    sys.exit(main())
