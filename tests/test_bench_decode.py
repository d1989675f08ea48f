"""Smoke test of benchmarks/bench_decode.py: ``--quick`` on the tiny size runs every method and writes the figures
and ratios in the documented structure (no timing assertion: speed is what the benchmark prints)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_tiny_run_prints_and_writes_every_method(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "decode.json"
    argv = ["--quick", "--sizes", "tiny", "--batches", "1", "2", "--new-tokens", "3", "--repeats", "1", "--json",
            str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [(row["size"], row["batch"]) for row in report["rows"]] == [("tiny", 1), ("tiny", 2)]
    for row in report["rows"]:
        assert list(row["ms_per_token"]) == bench.METHODS
        assert all(math.isfinite(v) and v > 0 for v in row["ms_per_token"].values())
        ms = row["ms_per_token"]
        assert math.isclose(row["ratios"]["HydraLoRA / LoRA"], ms[bench.HYDRA] / ms[bench.LORA])
        for method in bench.METHODS[1:]:
            assert math.isclose(row["ratios"][f"{method} / base"], ms[method] / ms[bench.BASE])
    assert printed.count("HydraLoRA / LoRA:") == 2 and "summary:" in printed
    for method in bench.METHODS:
        assert printed.count(f"  {method} ") >= 2
