"""``python -m peft_hydra.compare --config ...`` is ``peft-hydra compare --config ...``."""

import runpy
import sys

sys.argv[1:1] = ["compare"]
runpy.run_module("_peft_hydra_cli", run_name="__main__")
