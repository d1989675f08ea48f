"""Side-by-side comparison of HydraLoRA with PEFT's LoRA, LoHa, LoKr (and ablations) on real multi-task data.

Run ``peft-hydra compare --config configs/smoke.yaml`` (or ``python -m peft_hydra.compare --config ...``).
Programmatic use: ``load_config(path)`` then ``run_comparison(cfg, output_dir, command)``; the paper's Observation II:
``run_analysis(cfg, output_dir, command)`` (``peft-hydra analyze``).
"""

from .analyze import run_analysis
from .run import run_comparison
from .settings import ConfigError, load_config

__all__ = ["ConfigError", "load_config", "run_analysis", "run_comparison"]
