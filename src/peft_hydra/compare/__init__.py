"""Side-by-side comparison of HydraLoRA with PEFT's LoRA, LoHa, LoKr (and ablations) on real multi-task data.

Run ``peft-hydra compare --config configs/smoke.yaml`` (or ``python -m peft_hydra.compare --config ...``).
Programmatic use: ``load_config(path)`` then ``run_comparison(cfg, output_dir, command)``; the paper's Observation II:
``run_analysis(cfg, output_dir, command)`` (``peft-hydra analyze``). Bad input raises :class:`ConfigError`.

Modules: ``settings`` (the config), ``data``, ``methods`` (PEFT configs, equal budgets), ``train`` (model, training
loop, evaluation), ``run`` (orchestration), ``stats`` (statistics), ``tables`` (markdown), ``plots``, ``report``
(results.json / results.md), ``analyze`` (Observation II), ``synthetic`` (the conflicting-task source).
"""

from .analyze import run_analysis
from .errors import ConfigError
from .run import run_comparison
from .settings import load_config

__all__ = ["ConfigError", "load_config", "run_analysis", "run_comparison"]
