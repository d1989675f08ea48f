"""The ``peft-hydra`` command: ``convert`` (authors' checkpoints, core install), ``train`` (TRL SFTTrainer, the
``[train]`` extra) and the comparison harness's ``compare`` / ``report`` / ``analyze`` (the ``[compare]`` extra).

The console script's module sits next to the package, not in it: ``import peft_hydra`` registers the PEFT type and so
imports peft, transformers and torch (seconds), which ``peft-hydra --help`` or a mistyped command should not wait for.
Every command imports what it needs when it runs. ``peft_hydra.cli`` is the same command (``python -m peft_hydra.cli``,
e.g. under ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

INSTALL_HINT = "pip install 'peft-hydra[compare]'"
#: import name -> distribution of the [compare] extra (setup.cfg)
COMPARE_EXTRA = {"numpy": "numpy", "scipy": "scipy", "yaml": "pyyaml", "tqdm": "tqdm", "datasets": "datasets",
                 "sklearn": "scikit-learn", "matplotlib": "matplotlib", "gguf": "gguf"}  # fmt: skip


def missing_compare_extra() -> list[str]:
    """The distributions of the [compare] extra that are not installed."""
    import importlib.util

    return [dist for module, dist in COMPARE_EXTRA.items() if importlib.util.find_spec(module) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-hydra", description="HydraLoRA as a Hugging Face PEFT method: "
                                     "train an adapter, compare it side by side with PEFT's methods, convert "
                                     "checkpoints. `peft-hydra COMMAND --help` for the options of a command.")  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{convert,train,compare,report,analyze}")
    sub.add_parser("convert", add_help=False,
                   help="convert a checkpoint of the HydraLoRA authors' code into a PEFT HydraLoRA adapter")
    sub.add_parser("train", add_help=False,
                   help="fine-tune a causal LM with a HydraLoRA adapter (TRL SFTTrainer; the [train] extra)")
    p = sub.add_parser(
        "compare",
        help="train HydraLoRA, LoRA, LoHa, LoKr, ... side by side and write a report (the [compare] extra)",
        description="Train every method of the config on the same data, order, steps and seeds; write results.md, "
        "results.json and PNG plots to runs/<config name>/ (git-ignored; or --output).",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/smoke.yaml, default.yaml, full.yaml")
    p.add_argument("--output", default=None, help="output folder (default: runs/<config name>, git-ignored; the "
                   "committed reference runs live in results/)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="override `steps` of the config")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override `seeds` of the config")
    p.add_argument("--methods", nargs="+", default=None, help="override `methods` of the config")
    p.add_argument("--generate", action="store_true", default=None,
                   help="also score BBH / GSM8K by greedy generation (`generate: true`; full forward, slow on CPU)")
    r = sub.add_parser("report", help="rewrite a comparison's results.md and plots from its results.json",
                       description="Recompute the statistics of a comparison from its results.json and rewrite "
                       "results.md and the plots.")  # fmt: skip
    r.add_argument("dir", nargs="+", help="comparison output folder(s) holding results.json")
    r.add_argument("--table", action="store_true",
                   help="print one markdown table of all the given folders instead of rewriting their reports")
    r.add_argument("--merge", metavar="OUT",
                   help="merge the given runs of one config with disjoint seeds (e.g. run as parallel processes "
                        "with --seeds) into one comparison written to OUT")  # fmt: skip
    a = sub.add_parser(
        "analyze",
        help="the paper's Observation II: are the A matrices alike and the B different?",
        description="Train one PEFT LoRA per group of categories (the config's model, data, modules, layers, steps) "
        "and measure how alike their A matrices are across groups vs their B matrices (principal angles, cosine, "
        "random baseline, t-SNE). Options in the config's `analysis:` mapping: groups (source | category | "
        "{name: [categories]}), inits ([same, different]), steps, lr, seed.",
    )
    a.add_argument("--config", required=True, help="YAML config (the same format as `compare`)")
    a.add_argument("--output", default=None, help="output folder (default: runs/<config name>_analysis, git-ignored)")
    a.add_argument("--steps", type=int, default=None, help="override `analysis.steps`")
    return parser


#: the usage line and the commands with their one-line help (`peft-hydra --help`)
USAGE = build_parser().format_help()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = build_parser().parse_known_args(argv)
    except SystemExit as e:  # --help, or a bad command / option (argparse printed why)
        return int(e.code or 0)
    if args.cmd == "convert":
        from peft_hydra.convert import main as convert_main

        return convert_main(rest)
    if args.cmd == "train":
        from peft_hydra.sft import main as train_main

        return train_main(rest)
    if rest:
        print(f"peft-hydra {args.cmd}: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    missing = missing_compare_extra()
    if missing:
        print(f"peft-hydra {args.cmd}: needs the comparison extra (missing: {', '.join(missing)}): {INSTALL_HINT}",
              file=sys.stderr)  # fmt: skip
        return 2
    from peft_hydra.compare.errors import ConfigError

    try:
        if args.cmd == "report":
            return _report(args)
        return _run_config(args, argv)
    except ConfigError as e:
        print(f"peft-hydra {args.cmd}: {e}", file=sys.stderr)
        return 2


def _report(args) -> int:
    import json

    from peft_hydra.compare.report import merge_runs, rewrite
    from peft_hydra.compare.tables import runs_table, summary_lines

    for d in args.dir:
        if not os.path.exists(os.path.join(d, "results.json")):
            print(f"peft-hydra report: {os.path.join(d, 'results.json')} does not exist.", file=sys.stderr)
            return 2
    if args.table:
        print(runs_table(args.dir))
        return 0
    if args.merge:
        merged = merge_runs(args.dir, args.merge)
        print("\n".join(summary_lines(merged)))
        print(f"wrote {args.merge}/results.md, results.json and plots")
        return 0
    for d in args.dir:
        files = rewrite(d)
        with open(os.path.join(d, "results.json")) as f:
            print(f"{d}:\n" + "\n".join(summary_lines(json.load(f))))
        print("rewrote " + ", ".join(files))
    return 0


def _run_config(args, argv: list[str]) -> int:
    """``compare`` / ``analyze``: load the config (with the command line's overrides) and run it."""
    from peft_hydra.compare.settings import load_config

    overrides = {k: getattr(args, k) for k in ("steps", "seeds", "methods", "generate")
                 if args.cmd == "compare" and getattr(args, k) is not None}  # fmt: skip
    cfg = load_config(args.config, overrides)
    if args.cmd == "analyze":
        from peft_hydra.compare.analyze import run_analysis as run

        if args.steps is not None:  # checked with the other analysis options by the run
            cfg["analysis"] = {**(cfg.get("analysis") or {}), "steps": args.steps}
        output = args.output or os.path.join("runs", cfg["name"] + "_analysis")
    else:
        from peft_hydra.compare.run import run_comparison as run

        output = args.output or os.path.join("runs", cfg["name"])
    command = "peft-hydra " + " ".join(shlex.quote(a) for a in argv)
    run(cfg, output, command, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
