"""The notebooks run top to bottom (tiny settings), so they never rot."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _execute(name, env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _outputs(nb):
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_quickstart_notebook_runs(tmp_path):
    nb = _execute("quickstart.ipynb", {"PEFT_HYDRA_NB_TINY": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                                        "HF_HUB_OFFLINE": "1"})  # fmt: skip
    text = _outputs(nb)
    assert "reloaded adapter reproduces the trained model" in text
    assert "LoraConfig rank 8" in text
    assert "router_gate_0" in text


def test_comparison_notebook_runs():
    nb = _execute("comparison.ipynb", {"PEFT_HYDRA_NB_TINY": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                                        "HF_HUB_OFFLINE": "1"})  # fmt: skip
    text = _outputs(nb)
    assert "finished: True" in text
    assert "Against `lora`" in text and "- `lily`: " in text  # the run's own summary, Lily included
    assert "eval_loss.png" in text and "routing_hydralora.png" in text
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert images >= 3
