"""What `import peft_hydra` and the installed start-up hook cost (prints figures, asserts nothing).

    .venv/bin/python benchmarks/bench_import.py [--repeats 5]

Each figure is measured in fresh interpreters (minimum and median over the repeats):
- `import peft` alone, and `import peft_hydra` right after it (what the package adds);
- interpreter start-up (`python -c pass`) with the start-up hook on and off (PEFT_HYDRA_AUTOLOAD=0), and the hook
  module's own import time from `python -X importtime`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

TIMED = """
import time
t0 = time.perf_counter(); import peft; t1 = time.perf_counter(); import peft_hydra; t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def run(code: str, autoload: bool, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFT_HYDRA_AUTOLOAD": "1" if autoload else "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    n = parser.parse_args().repeats
    peft_s, hydra_s, on_s, off_s, hook_us = [], [], [], [], []
    for _ in range(n):
        a, b = map(float, run(TIMED, autoload=False).stdout.split())
        peft_s.append(a)
        hydra_s.append(b)
        for autoload, sink in ((True, on_s), (False, off_s)):
            t = time.perf_counter()
            run("pass", autoload)
            sink.append(time.perf_counter() - t)
        trace = run("pass", True, "-X", "importtime").stderr
        hook_us += [int(m) for m in re.findall(r"import time:\s+(\d+) \|\s+\d+ \|\s+_peft_hydra_autoload", trace)]

    def show(name, xs, unit="s", scale=1.0):
        xs = [x * scale for x in xs]
        print(f"{name:55s} min {min(xs):8.3f} {unit}   median {statistics.median(xs):8.3f} {unit}")

    print(f"python {sys.version.split()[0]}, {n} repeats, load average {os.getloadavg()[0]:.2f}")
    show("import peft (fresh interpreter)", peft_s)
    show("import peft_hydra after import peft", hydra_s)
    show("interpreter start-up, hook on (python -c pass)", on_s)
    show("interpreter start-up, hook off (PEFT_HYDRA_AUTOLOAD=0)", off_s)
    if hook_us:
        show("the hook module itself (python -X importtime)", hook_us, "ms", 1e-3)
    else:
        print("the start-up hook is not installed in this environment (no _peft_hydra_autoload in -X importtime)")
    print(f"ratio import peft_hydra / import peft (medians): {statistics.median(hydra_s) / statistics.median(peft_s):.3f}")


if __name__ == "__main__":
    main()
