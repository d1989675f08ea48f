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
        "results.json and PNG plots to runs/<config name>/ (git-ignored; or --output).",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/smoke.yaml, default.yaml, full.yaml")
    p.add_argument("--output", default=None, help="Output folder (default: runs/<config name>, git-ignored; the committed reference runs live in results/)")
    p.add_argument("--steps", type=int, default=None, help="Override `steps` of the config")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override `seeds` of the config")
    p.add_argument("--methods", nargs="+", default=None, help="Override `methods` of the config")
    p.add_argument("--generate", action="store_true", default=None,
                   help="Also score BBH / GSM8K by greedy generation (`generate: true`; full forward, slow on CPU)")
    a = sub.add_parser(
        "analyze",
        help="Observation II: train one LoRA per group of categories and compare their A's and B's.",
        description="Train one PEFT LoRA per group of categories (the config's model, data, modules, layers, steps) "
        "and measure how alike their A matrices are across groups vs their B matrices (principal angles, cosine, "
        "random baseline, t-SNE). Options in the config's `analysis:` mapping: groups (source | category | "
        "{name: [categories]}), inits ([same, different]), steps, lr, seed.",
    )
    a.add_argument("--config", required=True, help="YAML config (the same format as `compare`)")
    a.add_argument("--output", default=None, help="Output folder (default: runs/<config name>_analysis, git-ignored)")
    a.add_argument("--steps", type=int, default=None, help="Override `analysis.steps`")
    r = sub.add_parser("report", help="Rewrite results.md and the plots of a comparison from its results.json.")
    r.add_argument("dir", nargs="+", help="Comparison output folder(s) holding results.json")
    r.add_argument("--table", action="store_true",
                   help="Print one markdown table of all the given folders instead of rewriting their reports")
    r.add_argument("--merge", metavar="OUT",
                   help="Merge the given runs of one config with disjoint seeds (e.g. run as parallel processes "
                        "with --seeds) into one comparison written to OUT")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "report":
        import json

        from .report import rewrite, runs_table, summary_lines

        for d in args.dir:
            if not os.path.exists(os.path.join(d, "results.json")):
                print(f"peft-hydra report: {os.path.join(d, 'results.json')} does not exist.", file=sys.stderr)
                return 2
        if args.table:
            print(runs_table(args.dir))
            return 0
        if args.merge:
            from .report import merge_runs

            try:
                merged = merge_runs(args.dir, args.merge)
            except ValueError as e:
                print(f"peft-hydra report: {e}", file=sys.stderr)
                return 2
            print("\n".join(summary_lines(merged)))
            print(f"wrote {args.merge}/results.md, results.json and plots")
            return 0
        for d in args.dir:
            files = rewrite(d)
            with open(os.path.join(d, "results.json")) as f:
                print(f"{d}:\n" + "\n".join(summary_lines(json.load(f))))
            print("rewrote " + ", ".join(files))
        return 0
    if args.cmd == "analyze":
        from .analyze import run_analysis

        return _run_config(args, argv, {}, run_analysis, "_analysis")
    overrides = {key: getattr(args, key) for key in ("steps", "seeds", "methods", "generate")
                 if getattr(args, key) is not None}
    from .run import run_comparison

    return _run_config(args, argv, overrides, run_comparison, "")


def _run_config(args, argv, overrides: dict, run, suffix: str) -> int:
    """Load the config (with ``overrides``), run ``run(cfg, output, command, log)``, map errors to exit codes: 2 for
    a bad config or data, 3 for a model that cannot be loaded."""
    from .settings import ConfigError, load_config
    from .train import ModelUnavailable

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"peft-hydra {args.cmd}: bad config: {e}", file=sys.stderr)
        return 2
    if args.cmd == "analyze" and args.steps is not None:  # checked with the other analysis options by the run
        cfg["analysis"] = {**(cfg.get("analysis") or {}), "steps": args.steps}
    output = args.output or os.path.join("runs", cfg["name"] + suffix)
    command = "peft-hydra " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        run(cfg, output, command, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ModelUnavailable as e:
        print(f"peft-hydra {args.cmd}: the model cannot be loaded.\n{e}", file=sys.stderr)
        return 3
    except ValueError as e:  # config problems found while building data / budgets / analysis options
        print(f"peft-hydra {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
