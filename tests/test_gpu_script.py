"""benchmarks/gpu_all.py (every GPU measurement in one command): the wheel pieces are joined exactly, a missing piece
is reported, and its CPU dry run runs every step and writes its tables to one folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_all", REPO / "benchmarks" / "gpu_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pieces(tmp_path, data: bytes):
    """The layout of benchmarks/gpu_wheels.sh: a whole wheel and a wheel cut in two, one piece per folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "small-1.0-py3-none-any.whl").write_bytes(b"small")
    name = "big-0.1-py3-none-any.whl"
    half = (len(data) + 1) // 2
    (a / f"{name}.part-0").write_bytes(data[:half])
    (b / f"{name}.part-1").write_bytes(data[half:])
    for folder in (a, b):
        (folder / f"{name}.part-count").write_text("2\n")
    return a, b, name


def test_wheel_pieces_are_joined_in_order(tmp_path):
    gpu_all = _load()
    data = bytes(range(256)) * 41 + b"end"
    a, b, name = _pieces(tmp_path, data)
    wheels, problems = gpu_all.join_parts([str(b), str(a)], tmp_path / "joined")
    assert problems == []
    assert sorted(w.name for w in wheels) == [name, "small-1.0-py3-none-any.whl"]
    assert (tmp_path / "joined" / name).read_bytes() == data


def test_a_missing_piece_is_reported_and_the_other_wheels_still_install(tmp_path):
    gpu_all = _load()
    a, _, name = _pieces(tmp_path, b"0123456789")
    wheels, problems = gpu_all.join_parts([str(a)], tmp_path / "joined")
    assert [w.name for w in wheels] == ["small-1.0-py3-none-any.whl"]
    assert len(problems) == 1 and name in problems[0] and ".gpu_wheels/b" in problems[0] and "--wheels" in problems[0]


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    # a generous budget: on a loaded shared CPU each step's imports alone can take a minute (the GPU run keeps 450 s)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_all.py"), "--dry-run", "--budget", "1500",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=1600)  # fmt: skip
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for step in ("bench_gpu", "decode", "harness"):
        assert f"| {step} | ok |" in summary
        assert (tmp_path / f"{step}.txt").stat().st_size > 0
    assert "| compiled | not run in a dry run |" in summary
    assert "summary: row | mode" in (tmp_path / "bench_gpu.txt").read_text()
    assert '"rows"' in (tmp_path / "decode.json").read_text()
    assert "hydralora" in (tmp_path / "harness_results.md").read_text()
    assert all(p.is_file() for p in tmp_path.iterdir())  # flat: one folder to copy back
