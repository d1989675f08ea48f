"""Speed and activation memory of a HydraLoRA training step (CPU, fp32).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_layer.py            # or: make bench
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_layer.py --quick    # 2 layers, batch 2, fewer repeats

A Llama-like stack at SmolLM2-135M width (hidden 576, intermediate 1536, 9 heads, 3 kv heads; random weights, a
small vocabulary so the embedding does not dominate), all 7 linears of every layer targeted, batch 8 x seq 128.
One training step = forward + loss + backward (no optimizer step: it is the same for every method).

Compared:
  1. HydraLoRA r=8 N=3 vs PEFT LoRA r=16: about the same number of trainable parameters (both counts printed).
  2. HydraLoRA r=8 N=4 vs a per-head loop in the authors' style (each head recomputes ``A x`` and adds its gated
     ``B_i A x`` in a Python loop, ``LoopHydraLinear`` below, swapped into the same layers).

Time: the median of ``--repeats`` steps after ``--warmup`` steps; the methods are measured round-robin (one step of
each in turn), so that load from other processes on a shared machine hits them alike. Besides the whole-step
ratio, the adapter *overhead* (step time minus the frozen base model's step time) is compared, since that is the
part an adapter implementation controls.

Memory: the bytes of the tensors autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once, parameters excluded), i.e. the activation memory of a step, which is what differs
between the methods and grows with batch x sequence. Why not the others: ``tracemalloc`` does not see torch's
allocator; ``resource.getrusage`` ru_maxrss is a process-wide high-water mark that cannot be reset between methods
and includes allocator caching; the profiler's memory view depends on allocator timing. Saved-tensor bytes are
exact and do not change with machine load. Parameter memory follows from the printed parameter counts.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time

import torch
from torch import nn


def build_base(layers: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaModel(config)
    model.requires_grad_(False)
    return model


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoopHydraLinear(nn.Module):
    """HydraLoRA as in the authors' code: a Python loop over the heads, each recomputing ``A dropout(x)``."""

    def __init__(self, base: nn.Linear, r: int, num_experts: int, lora_alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_experts))
        self.lora_route = nn.Linear(base.in_features, num_experts, bias=False)
        self.lora_dropout = nn.Identity()
        self.scaling = lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for b in self.lora_B:  # random (not zero) so that every path carries gradient, as after some training
            nn.init.uniform_(b.weight, -1 / math.sqrt(r), 1 / math.sqrt(r))

    def forward(self, x):
        result = self.base_layer(x)
        route_weight = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(len(self.lora_B)):
            result = result + route_weight[..., i : i + 1] * self.lora_B[i](self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def swap_in_loop(model: nn.Module, r: int, num_experts: int, lora_alpha: float) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, LoopHydraLinear(child, r, num_experts, lora_alpha))
    return model


def make_methods(layers: int):
    from peft import LoraConfig, get_peft_model

    import peft_hydra

    def hydra(n):
        torch.manual_seed(1)
        config = peft_hydra.HydraLoraConfig(r=8, lora_alpha=16, num_experts=n, target_modules=TARGETS,
                                            init_weights=False)  # fmt: skip
        return get_peft_model(build_base(layers), config)

    def lora():
        torch.manual_seed(1)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        return get_peft_model(build_base(layers), config)

    def loop(n):
        torch.manual_seed(1)
        return swap_in_loop(build_base(layers), r=8, num_experts=n, lora_alpha=16)

    return {
        "base (frozen)": build_base(layers),
        "PEFT LoRA r=16": lora(),
        "HydraLoRA r=8 N=3": hydra(3),
        "HydraLoRA r=8 N=4": hydra(4),
        "loop (authors) r=8 N=4": loop(4),
    }


def step(model: nn.Module, input_ids: torch.Tensor) -> None:
    hidden = model(input_ids=input_ids).last_hidden_state
    hidden.float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def base_step(model: nn.Module, input_ids: torch.Tensor) -> None:
    # frozen base: make the embeddings require grad so that the backward runs through every layer, as with adapters
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    hidden = model(inputs_embeds=embeds).last_hidden_state
    hidden.float().pow(2).mean().backward()


def saved_activation_bytes(model: nn.Module, fn) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr != 0:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _One(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        torch.manual_seed(0)
        self.up_proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.up_proj(x)


def layer_bench(tokens: int, repeats: int, stat) -> dict[str, float]:
    """One up_proj-shaped linear (576 -> 1536), forward + backward of (tokens, 576) inputs: the adapter path alone."""
    from peft import LoraConfig, get_peft_model

    import peft_hydra

    def peft(config):
        return get_peft_model(_One(576, 1536), config).train()

    hydra = dict(r=8, lora_alpha=16, target_modules=["up_proj"], init_weights=False)
    layers = {
        "base (frozen)": _One(576, 1536).requires_grad_(False),
        "PEFT LoRA r=16": peft(LoraConfig(r=16, lora_alpha=32, target_modules=["up_proj"], init_lora_weights=False)),
        "HydraLoRA r=8 N=3": peft(peft_hydra.HydraLoraConfig(num_experts=3, **hydra)),
        "HydraLoRA r=8 N=4": peft(peft_hydra.HydraLoraConfig(num_experts=4, **hydra)),
        "loop (authors) r=8 N=4": swap_in_loop(_One(576, 1536).requires_grad_(False), 8, 4, 16),
    }
    x = torch.randn(tokens, 576, generator=torch.Generator().manual_seed(0))

    def run(m):
        xx = x.detach().requires_grad_(True)
        m(xx).pow(2).mean().backward()
        for p in m.parameters():
            p.grad = None

    for _ in range(3):
        for m in layers.values():
            run(m)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, m in layers.items():
            t0 = time.perf_counter() if stat == "wall" else time.process_time()
            run(m)
            times[name].append((time.perf_counter() if stat == "wall" else time.process_time()) - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="base the ratios on process CPU time instead of wall time (for a loaded machine)")
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2, 1 warm-up, 3 repeats (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.warmup, args.repeats = 2, 2, 1, 3
    torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(f"stack: {args.layers} Llama layers, hidden 576, intermediate 1536, 9 heads / 3 kv heads, fp32, "
          f"batch {args.batch} x seq {args.seq}, all 7 linears targeted")  # fmt: skip

    methods = make_methods(args.layers)
    input_ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runs = {name: (lambda m=m: base_step(m, input_ids)) if name.startswith("base") else (lambda m=m: step(m, input_ids))
            for name, m in methods.items()}  # fmt: skip
    for m in methods.values():
        m.train()

    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(ts) for name, ts in (cpu if args.cpu_time else times).items()}
    mem = {name: saved_activation_bytes(methods[name], fn) for name, fn in runs.items()}

    print(f"\n{'method':26s} {'trainable':>9s} {'wall ms median':>14s} {'min..max':>13s} {'CPU ms median':>13s} "
          f"{'saved act. MiB':>14s}")  # fmt: skip
    for name in runs:
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        print(f"{name:26s} {n_trainable(methods[name]):9,d} {statistics.median(times[name]) * 1e3:14.1f} "
              f"{lo:6.0f}..{hi:<6.0f} {statistics.median(cpu[name]) * 1e3:13.1f} {mem[name] / 2**20:14.2f}")
    print(f"ratios below use the median {'CPU' if args.cpu_time else 'wall'} time"
          f"{' (--cpu-time: process CPU seconds, less sensitive to other processes on a shared machine)' if args.cpu_time else ''}")

    base, lora, h3, h4, loop = (med[k] for k in runs)
    mbase, mlora, mh3, mh4, mloop = (mem[k] for k in runs)
    print("\nratios (targets in brackets)")
    print(f"  HydraLoRA N=3 / LoRA r=16   time   {h3 / lora:5.3f}   [<= 1.10]   "
          f"adapter overhead over base: {(h3 - base) * 1e3:.1f} ms vs {(lora - base) * 1e3:.1f} ms")  # fmt: skip
    print(f"  HydraLoRA N=3 / LoRA r=16   memory {mh3 / mlora:5.3f}   [<= 1.10]   "
          f"adapter activations over base: {(mh3 - mbase) / 2**20:.2f} MiB vs {(mlora - mbase) / 2**20:.2f} MiB")
    print(f"  loop N=4 / HydraLoRA N=4    time   {loop / h4:5.3f}   [>= 2] (whole step)")
    print(f"  loop N=4 / HydraLoRA N=4    adapter-overhead time {(loop - base) / max(h4 - base, 1e-9):5.2f}   (step minus base step)")
    print(f"  loop N=4 / HydraLoRA N=4    memory {mloop / mh4:5.3f}   "
          f"adapter activations: {(mloop - mbase) / 2**20:.2f} MiB vs {(mh4 - mbase) / 2**20:.2f} MiB "
          f"({(mloop - mbase) / max(mh4 - mbase, 1):.2f}x)")

    stat = "cpu" if args.cpu_time else "wall"
    lt = layer_bench(args.batch * args.seq, max(20, 3 * args.repeats), stat)
    base_l = lt["base (frozen)"]
    print(f"\nsingle up_proj layer (576 -> 1536), {args.batch * args.seq} tokens, forward+backward, median {stat} ms:")
    for name, t in lt.items():
        print(f"  {name:26s} {t * 1e3:8.2f}   adapter path (minus base) {(t - base_l) * 1e3:7.2f}")
    over = {k: lt[k] - base_l for k in lt}
    print(f"  HydraLoRA N=3 / LoRA r=16   layer time {lt['HydraLoRA r=8 N=3'] / lt['PEFT LoRA r=16']:5.3f}   "
          f"adapter path {over['HydraLoRA r=8 N=3'] / over['PEFT LoRA r=16']:5.3f}")
    print(f"  loop N=4 / HydraLoRA N=4    layer time {lt['loop (authors) r=8 N=4'] / lt['HydraLoRA r=8 N=4']:5.3f}   "
          f"adapter path {over['loop (authors) r=8 N=4'] / over['HydraLoRA r=8 N=4']:5.3f}   [>= 2]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
