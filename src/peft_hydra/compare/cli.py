"""``peft-hydra compare --config configs/<name>.yaml [--output DIR]`` (also ``python -m peft_hydra.compare``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-hydra", description="peft-hydra command-line tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "compare",
        help="Train HydraLoRA, LoRA, LoRA-split, LoHa, LoKr (+ ablations) side by side and write a report.",
        description="Train every method of the config on the same data, order, steps and seeds; write results.md, "
        "results.json and PNG plots to results/<config name>/ (or --output).",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/smoke.yaml, default.yaml, full.yaml")
    p.add_argument("--output", default=None, help="Output folder (default: results/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="Override `steps` of the config")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override `seeds` of the config")
    p.add_argument("--methods", nargs="+", default=None, help="Override `methods` of the config")
    r = sub.add_parser("report", help="Rewrite results.md and the plots of a comparison from its results.json.")
    r.add_argument("dir", help="A comparison output folder holding results.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "report":
        from .report import rewrite

        if not os.path.exists(os.path.join(args.dir, "results.json")):
            print(f"peft-hydra report: {args.dir}/results.json does not exist.", file=sys.stderr)
            return 2
        print("\n".join(rewrite(args.dir)))
        return 0
    from .settings import ConfigError, load_config
    from .train import ModelUnavailable

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.methods is not None:
        overrides["methods"] = args.methods
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"peft-hydra compare: bad config: {e}", file=sys.stderr)
        return 2
    output = args.output or os.path.join("results", cfg["name"])
    command = "peft-hydra " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    from .run import run_comparison

    try:
        run_comparison(cfg, output, command, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ModelUnavailable as e:
        print(f"peft-hydra compare: the model cannot be loaded.\n{e}", file=sys.stderr)
        return 3
    except ValueError as e:  # config problems found while building data / budgets
        print(f"peft-hydra compare: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
