"""The ``peft-hydra`` command: ``convert`` (authors' checkpoints, core install), ``train`` (TRL SFTTrainer, the
``[train]`` extra) and the comparison harness's ``compare`` / ``report`` / ``analyze`` (the ``[compare]`` extra)."""

from __future__ import annotations

import sys

HARNESS_COMMANDS = ("compare", "report", "analyze")
INSTALL_HINT = "pip install 'peft-hydra[compare]'"
#: import name -> distribution of the [compare] extra (setup.cfg)
COMPARE_EXTRA = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "sklearn": "scikit-learn",
                 "matplotlib": "matplotlib", "gguf": "gguf"}  # fmt: skip


def missing_compare_extra() -> list[str]:
    """The distributions of the [compare] extra that are not installed."""
    import importlib.util

    return [dist for module, dist in COMPARE_EXTRA.items() if importlib.util.find_spec(module) is None]

USAGE = """usage: peft-hydra {convert,train,compare,report,analyze} ...

  convert   convert a checkpoint of the HydraLoRA authors' code into a PEFT HydraLoRA adapter
  train     fine-tune a causal LM with a HydraLoRA adapter (TRL SFTTrainer)            (needs the [train] extra)
  compare   train HydraLoRA, LoRA, LoHa, LoKr, ... side by side and write a report   (needs the [compare] extra)
  report    rewrite a comparison's results.md and plots from its results.json        (needs the [compare] extra)
  analyze   the paper's Observation II: are the A matrices alike and the B different? (needs the [compare] extra)

`peft-hydra COMMAND --help` for the options of a command."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    if command == "convert":
        from .convert import main as convert_main

        return convert_main(argv[1:])
    if command == "train":
        from .sft import main as train_main

        return train_main(argv[1:])
    if command not in HARNESS_COMMANDS:
        print(f"peft-hydra: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
        return 2
    missing = missing_compare_extra()
    if missing:
        print(f"peft-hydra {command}: needs the comparison extra (missing: {', '.join(missing)}): {INSTALL_HINT}",
              file=sys.stderr)  # fmt: skip
        return 2
    from .compare.cli import main as harness_main

    return harness_main(argv)


if __name__ == "__main__":
    sys.exit(main())
