"""Host overhead of a HydraLoRA training step: tiny widths, few tokens, many layers (CPU, 1 thread).

    nice -n 5 .venv/bin/python benchmarks/bench_overhead.py
    nice -n 5 .venv/bin/python benchmarks/bench_overhead.py --choices       # also time the design alternatives
    .venv/bin/python benchmarks/bench_overhead.py --quick                   # smoke run

At these sizes (8 Llama layers, hidden 32, 8 tokens, all 7 linears adapted) a step is all host overhead: Python,
dispatcher, autograd bookkeeping, kernel launches. Small models, short sequences and small batches are where this
dominates on a GPU too (see benchmarks/bench_gpu.py), so the per-layer cost here is what the implementation controls.

One step = forward + loss + backward (no optimizer: the same for every method). Methods are timed round-robin (one
step of each in turn) so that load from other processes hits them alike; the whole measurement is repeated
``--rounds`` times and the ratio of every round is reported (min / median). Time is process CPU time (one thread:
the step's own work, not time lost to other processes on a shared machine) and wall time.

Printed per method: the step time, the adapter cost per adapted linear layer in microseconds ((step - frozen base
step) / adapted layers), and from ``torch.profiler`` / the autograd graph the number of ATen ops (all, and leaf ops:
the ones that run a kernel), and autograd nodes, per adapted layer, over one forward + backward.

Target: HydraLoRA r=8 N=3 / PEFT LoRA r=16 no worse than the previous layer's ratio (docs/performance.md; the same
trainable-parameter budget).

``--choices`` times the alternatives to the layer's adapter path (``HydraLoraLayer._delta``) that decided its shape,
each swapped in for the whole step (same outputs, checked):

- ``router as its own GEMM``: the router's logits from a second GEMM over x (what a router module holding its own
  weight costs) instead of the last N rows of ``hydra_A``'s one GEMM;
- ``adapter on (batch, seq, in)``: the adapter's modules called on x as given instead of a 2-D view of the tokens
  (a Linear on 3-D input folds and unfolds it around its GEMM: more autograd nodes per call);
- ``broadcast-multiply head mix``: the gates x ``A x`` outer product as a broadcast multiply instead of a batched
  GEMM (``bmm``, shipped for eager: its backward is two batched GEMMs instead of two multiplies and two reductions).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(layers: int, hidden: int, intermediate: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaModel(config)
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- measured alternatives
def _alternative_delta(choice: str) -> Callable:
    """``HydraLoraLayer._delta`` with one design alternative (router on x, shared A, no dropout: the benchmark's)."""
    from peft_hydra import functional as HF

    def delta(self, adapter, x):
        A, B, router = self.hydra_A[adapter], self.hydra_B[adapter], self.hydra_router[adapter]
        rows, n = self._a_rows(adapter), self.num_experts[adapter]
        x = self._cast_input_dtype(x, A.weight.dtype)
        if choice == "router as its own GEMM":  # what a router module of its own costs: a second GEMM over x
            x = x.reshape(-1, x.shape[-1])
            h, logits = F.linear(x, A.weight[:rows]), F.linear(x, A.weight[rows:])
        else:
            if choice != "adapter on (batch, seq, in)":
                x = x.reshape(-1, x.shape[-1])
            h, logits = A(x).split([rows, n], dim=-1)
        gates = router(logits)
        if choice == "adapter on (batch, seq, in)" or choice == "broadcast-multiply head mix":
            mixed = (gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        else:
            mixed = HF.mix_input(h, gates, self.r[adapter])
        return B(mixed)

    return delta


@contextlib.contextmanager
def swapped(choice: Optional[str]):
    """Run the step with one alternative of the layer's adapter path swapped in (None: the shipped code)."""
    from peft_hydra.layer import HydraLoraLayer

    if choice is None:
        yield
        return
    shipped = HydraLoraLayer._delta
    HydraLoraLayer._delta = _alternative_delta(choice)
    try:
        yield
    finally:
        HydraLoraLayer._delta = shipped


# ------------------------------------------------------------------------------------------------ the step
def make_methods(args) -> dict[str, tuple[nn.Module, Optional[str], bool]]:
    """name -> (model, alternative or None, add the balance loss)."""
    from peft import LoraConfig, get_peft_model

    import peft_hydra

    def base():
        return build_base(args.layers, args.hidden, args.intermediate)

    def hydra(**kw):
        torch.manual_seed(1)
        config = peft_hydra.HydraLoraConfig(r=8, lora_alpha=16, num_experts=3, target_modules=TARGETS,
                                            init_weights=False, **kw)  # fmt: skip
        return get_peft_model(base(), config)

    torch.manual_seed(1)
    lora = get_peft_model(base(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    methods = {
        "base (frozen)": (base(), None, False),
        "PEFT LoRA r=16": (lora, None, False),
        "HydraLoRA r=8 N=3": (hydra(), None, False),
    }
    if not args.quick:
        stats = hydra()
        stats.base_model.reset_router_stats()  # statistics collection on
        methods.update({
            "HydraLoRA N=3 top-2": (hydra(top_k=2), None, False),
            "HydraLoRA N=3 stats on": (stats, None, False),
            "HydraLoRA N=3 balance loss": (hydra(router_aux_loss_coef=0.01), None, True),
        })  # fmt: skip
    if args.choices:
        dense = methods["HydraLoRA r=8 N=3"][0]
        for choice in ("router as its own GEMM", "adapter on (batch, seq, in)", "broadcast-multiply head mix"):
            methods[f"  alt: {choice}"] = (dense, choice, False)
    for model, _, _ in methods.values():
        model.train()
    return methods


def step_fn(name: str, model: nn.Module, choice: Optional[str], aux: bool, input_ids: torch.Tensor) -> Callable:
    if name.startswith("base"):

        def run():  # frozen base: the embeddings require grad so that the backward runs through every layer
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds).last_hidden_state.pow(2).mean().backward()

        return run
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        with swapped(choice):
            loss = model(input_ids=input_ids).last_hidden_state.pow(2).mean()
            if aux:
                loss = loss + model.base_model.hydra_aux_loss()  # this step computes its own loss (no labels)
            loss.backward()
        for p in params:
            p.grad = None

    return run


def autograd_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def op_counts(name, model, choice, aux, input_ids) -> tuple[int, int, int]:
    """(ATen ops, leaf ATen ops, autograd nodes) of one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    run = step_fn(name, model, choice, aux, input_ids)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    with swapped(choice):
        if name.startswith("base"):
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds).last_hidden_state.pow(2).mean()
        else:
            loss = model(input_ids=input_ids).last_hidden_state.pow(2).mean()
            if aux:
                loss = loss + model.base_model.hydra_aux_loss()
    return len(events), len(leaves), autograd_nodes(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8, help="sequence length (batch 1)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=100, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--choices", action="store_true", help="also time the measured design alternatives")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 steps, fewer methods (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.rounds = 3, 20, 3
    torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start {os.getloadavg()}")
    print(f"stack: {args.layers} Llama layers, hidden {args.hidden}, intermediate {args.intermediate}, fp32, "
          f"batch 1 x {args.tokens} tokens, all 7 linears adapted ({7 * args.layers} layers)")  # fmt: skip

    methods = make_methods(args)
    input_ids = torch.randint(0, 128, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    runs = {name: step_fn(name, m, c, aux, input_ids) for name, (m, c, aux) in methods.items()}
    n_layers = 7 * args.layers

    # equal outputs: every alternative computes the same function as the shipped code
    with torch.no_grad():
        ref = methods["HydraLoRA r=8 N=3"][0](input_ids=input_ids).last_hidden_state
        for name, (m, choice, _) in methods.items():
            if choice is not None:
                with swapped(choice):
                    diff = (m(input_ids=input_ids).last_hidden_state - ref).abs().max().item()
                assert diff < 1e-4, f"{name} differs from the shipped code by {diff}"

    wall_rounds = {name: [] for name in runs}
    cpu_rounds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        wall = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
        for name in runs:
            wall_rounds[name].append(statistics.median(wall[name]))
            cpu_rounds[name].append(statistics.median(cpu[name]))
    print(f"load average at end {os.getloadavg()}")

    counts = {name: op_counts(name, m, c, aux, input_ids) for name, (m, c, aux) in methods.items()}
    base_name, lora_name = "base (frozen)", "PEFT LoRA r=16"
    b_cpu = statistics.median(cpu_rounds[base_name])
    bc = counts[base_name]
    print(f"\n{'method':36s} {'CPU ms':>7s} {'wall ms':>7s} {'us/layer':>8s} {'/LoRA':>6s}   per adapted layer: "
          f"{'ATen ops':>8s} {'leaf ops':>8s} {'autograd nodes':>14s}")  # fmt: skip
    for name in runs:
        c, w = statistics.median(cpu_rounds[name]), statistics.median(wall_rounds[name])
        per_layer = (c - b_cpu) / n_layers * 1e6
        ratio = c / statistics.median(cpu_rounds[lora_name])
        ops, leaves, nodes = ((counts[name][i] - bc[i]) / n_layers for i in range(3))
        extra = "" if name.startswith("base") else f"{ops:8.1f} {leaves:8.1f} {nodes:14.1f}"
        print(f"{name:36s} {c * 1e3:7.2f} {w * 1e3:7.2f} {per_layer:8.1f} {ratio:6.3f}   {'':19s}{extra}")
    print(f"(median over {args.rounds} rounds of the per-round median of {args.repeats} steps; base step: "
          f"{bc[0]} ATen ops, {bc[1]} leaf ops, {bc[2]} autograd nodes in total)")

    print("\nratios per round, HydraLoRA / PEFT LoRA (min / median over rounds; target HydraLoRA r=8 N=3 <= 1.20)")
    for name in runs:
        if name in (base_name, lora_name):
            continue
        for label, rounds in (("CPU", cpu_rounds), ("wall", wall_rounds)):
            ratios = [a / b for a, b in zip(rounds[name], rounds[lora_name])]
            print(f"  {name:36s} {label:4s} min {min(ratios):5.3f}  median {statistics.median(ratios):5.3f}  "
                  f"all {' '.join(f'{r:.3f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
