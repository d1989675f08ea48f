"""``python -m peft_hydra.compare --config ...`` = ``peft-hydra compare --config ...``."""

import sys

from ..cli import main

sys.exit(main(["compare", *sys.argv[1:]]))
