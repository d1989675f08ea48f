"""HydraLoRA vs PEFT LoRA (and vs the authors' per-head loop) training steps on a CUDA GPU: time, kernels, memory.

    .venv/bin/python benchmarks/bench_gpu.py                          # on a CUDA machine: the full table
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --dry-run   # tiny shapes on the CPU: checks the script runs
    .venv/bin/python benchmarks/bench_gpu.py --reduce-overhead        # also: compile mode="reduce-overhead" works

Rows, bf16 base weights, adapters as ``get_peft_model`` makes them, all 7 linears of every layer adapted:

  1. 2 Llama layers at 7B width (hidden 4096, intermediate 11008, 32 heads), batch 4 x 2048 tokens (compute-bound)
  2. the same, batch 1 x 512 tokens
  3. 8 Llama layers at SmolLM2-135M width (576 / 1536, 9 heads, 3 kv heads), batch 8 x 512, eager and compiled

Per row: step time (forward + loss + backward, median of ``--repeats`` after ``--warmup``, methods round-robin,
``torch.cuda.synchronize`` around each step), CUDA kernels per step (``torch.profiler``), peak memory
(``torch.cuda.max_memory_allocated`` over one step, reset before it). Compared: HydraLoRA r=8 N=3 / PEFT LoRA r=16
(about equal trainable parameters) and the authors' per-head loop N=4 / HydraLoRA r=8 N=4.

Targets: every HydraLoRA / LoRA row <= 1.10 (the compute-bound row <= 1.00), compiled <= 1.10; loop / HydraLoRA
>= 2. ``--dry-run`` shrinks every shape (hidden 64, 2 layers, 16 tokens) so that the script can be executed on
a CPU-only machine; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import TARGETS, swap_in_loop  # noqa: E402  (the authors' per-head loop, shared with bench_layer)

ROWS = {
    "7B width, 2 layers, 4 x 2048": dict(hidden=4096, intermediate=11008, heads=32, kv=32, layers=2, batch=4, seq=2048),
    "7B width, 2 layers, 1 x 512": dict(hidden=4096, intermediate=11008, heads=32, kv=32, layers=2, batch=1, seq=512),
    "SmolLM2-135M width, 8 layers, 8 x 512": dict(hidden=576, intermediate=1536, heads=9, kv=3, layers=8, batch=8,
                                                   seq=512),
}  # fmt: skip
DRY = dict(hidden=64, intermediate=128, heads=4, kv=2, layers=2, batch=2, seq=16)


def build_base(shape: dict, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=1024, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        max_position_embeddings=max(shape["seq"], 64), attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config).to(dtype=dtype, device=device)
    model.requires_grad_(False)
    return model


def make_methods(shape: dict, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    import peft_hydra

    def hydra(n):
        torch.manual_seed(1)
        config = peft_hydra.HydraLoraConfig(r=8, lora_alpha=16, num_experts=n, target_modules=TARGETS,
                                            init_weights=False)  # fmt: skip
        return get_peft_model(build_base(shape, dtype, device), config)

    torch.manual_seed(1)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    # the loop's adapters in the base dtype (its forward does not cast its input as PEFT does)
    loop = swap_in_loop(build_base(shape, dtype, device), r=8, num_experts=4, lora_alpha=16).to(device, dtype)
    for name, p in loop.named_parameters():
        p.requires_grad_("lora_" in name)
    methods = {
        "PEFT LoRA r=16": get_peft_model(build_base(shape, dtype, device), lora),
        "HydraLoRA r=8 N=3": hydra(3),
        "HydraLoRA r=8 N=4": hydra(4),
        "loop (authors) r=8 N=4": loop,
    }
    for m in methods.values():
        m.train()
    return methods


def make_step(model: nn.Module, input_ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        hidden = model(input_ids=input_ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kernels_per_step(step, device: str) -> int:
    """CUDA kernels launched by one step (on the CPU: leaf ATen ops, the closest equivalent)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    if device.startswith("cuda"):
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children))


def peak_memory(step, device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def measure(steps: dict, device: str, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def reduce_overhead_check(shape: dict, dtype: torch.dtype, device: str) -> None:
    """Training steps and ``generate()`` under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on CUDA)."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_hydra

    config = LlamaConfig(vocab_size=1024, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv"], max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype=dtype, device=device)
    model = get_peft_model(base, peft_hydra.HydraLoraConfig(r=8, num_experts=3, target_modules=TARGETS,
                                                            init_weights=False, router_aux_loss_coef=0.01))
    model.train()
    compiled = torch.compile(model, mode="reduce-overhead")
    ids = torch.randint(0, 1024, (2, 32), device=device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        out = compiled(input_ids=ids, labels=ids)
        loss = out.loss  # the balance loss joins outputs.loss inside the model's forward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    print(f"  reduce-overhead training: 4 steps ran, losses {' '.join(f'{v:.4f}' for v in losses)}")
    model.eval()
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    with torch.no_grad():
        gen = model.generate(input_ids=ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"  reduce-overhead generate(): {tuple(gen.shape)} tokens")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", nargs="*", default=None, help="a subset of the row names (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled measurement of the last row")
    parser.add_argument("--reduce-overhead", action="store_true", help="check compile mode='reduce-overhead'")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (for a CPU machine: runs, no figures)")
    args = parser.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --device cpu --dry-run to check the script")
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, device {name}, dtype {args.dtype}, load average {os.getloadavg()}")
    if args.dry_run:
        print("DRY RUN: tiny shapes; the figures below say nothing about GPU performance")
        args.warmup, args.repeats = 1, 2

    rows = {k: v for k, v in ROWS.items() if not args.rows or k in args.rows}
    results = []
    for row, shape in rows.items():
        shape = dict(DRY) if args.dry_run else shape
        methods = make_methods(shape, dtype, device)
        input_ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), device=device)
        modes = ["eager"] + ([] if args.no_compile or not row.startswith("SmolLM2") else ["compiled"])
        for mode in modes:
            if mode == "compiled":
                torch._dynamo.reset()
                models = {k: torch.compile(m) for k, m in methods.items()}
            else:
                models = methods
            steps = {k: make_step(m, input_ids) for k, m in models.items()}
            med = measure(steps, device, args.warmup, args.repeats)
            kern = {k: kernels_per_step(fn, device) for k, fn in steps.items()}
            mem = {k: peak_memory(fn, device) for k, fn in steps.items()}
            print(f"\n{row} ({mode}; {shape['batch']} x {shape['seq']} tokens)")
            print(f"  {'method':24s} {'ms/step':>8s} {'kernels':>8s} {'peak MiB':>9s}")
            for k in steps:
                print(f"  {k:24s} {med[k] * 1e3:8.2f} {kern[k]:8d} {mem[k]:9.0f}")
            h3, lora = med["HydraLoRA r=8 N=3"], med["PEFT LoRA r=16"]
            loop, h4 = med["loop (authors) r=8 N=4"], med["HydraLoRA r=8 N=4"]
            target = 1.00 if "4 x 2048" in row else 1.10
            print(f"  HydraLoRA N=3 / LoRA r=16: time {h3 / lora:.3f} [<= {target:.2f}], kernels "
                  f"{kern['HydraLoRA r=8 N=3'] / kern['PEFT LoRA r=16']:.3f}, memory "
                  f"{mem['HydraLoRA r=8 N=3'] / mem['PEFT LoRA r=16']:.3f}")  # fmt: skip
            print(f"  loop N=4 / HydraLoRA N=4: time {loop / h4:.3f} [>= 2], memory "
                  f"{mem['loop (authors) r=8 N=4'] / mem['HydraLoRA r=8 N=4']:.3f}")
            results.append((row, mode, h3 / lora, loop / h4))
        del methods
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    print("\nsummary: row | mode | HydraLoRA N=3 / LoRA r=16 | loop N=4 / HydraLoRA N=4")
    for row, mode, ratio, loop_ratio in results:
        print(f"  {row:40s} {mode:8s} {ratio:6.3f} {loop_ratio:6.2f}")
    if args.reduce_overhead:
        print("\ntorch.compile(mode='reduce-overhead'):")
        reduce_overhead_check(dict(DRY) if args.dry_run else ROWS["SmolLM2-135M width, 8 layers, 8 x 512"], dtype,
                              device)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
