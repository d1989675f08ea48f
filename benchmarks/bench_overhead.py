"""Host overhead of a HydraLoRA training step: tiny widths, few tokens, many layers (CPU, 1 thread).

    nice -n 5 .venv/bin/python benchmarks/bench_overhead.py
    nice -n 5 .venv/bin/python benchmarks/bench_overhead.py --choices       # also time the design alternatives
    .venv/bin/python benchmarks/bench_overhead.py --quick                   # smoke run
    nice -n 5 .venv/bin/python benchmarks/bench_overhead.py --router-gemm   # fused vs separate router GEMM by size

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

Target (issue 7): HydraLoRA r=8 N=3 / PEFT LoRA r=16 <= 1.20 (the same trainable-parameter budget).

``--choices`` times the alternatives that were measured for the hot path (``delta_2d`` in
src/peft_hydra/functional.py) against the shipped one, each swapped in for the whole step:

- ``fused A|router GEMM``: one GEMM over x for A and the router, with a ``torch.cat([A, W_router])`` per forward
  and a ``split`` of the result (the shipped path from ``functional.FUSED_ROUTER_MIN_ELEMENTS`` elements of x on,
  forced here by setting that threshold to 0; at these sizes the shipped router is a GEMM of its own);
- ``base layer on (batch, seq, in)``: the base layer called on x as given (the shipped forward calls it, and the
  adapter, on x flattened to (tokens, in): a Linear on 3-D input folds and unfolds it around its GEMM, two more ops
  and autograd nodes per layer);
- ``3-D linears``: the base layer and the adapter's GEMMs all on (batch, seq, in);
- ``parameters as module attributes``: A, the router and B read as ``A.weight`` / ``hydra_B[name]`` (through
  ``nn.Module.__getattr__``) instead of from ``_parameters`` (``layer._param``);
- ``broadcast-multiply head mix``: the gates x ``A x`` outer product as a broadcast multiply (previous; still used
  under torch.compile, where it fuses) instead of a batched GEMM (``bmm``, shipped for eager: its backward is two
  batched GEMMs instead of two multiplies and two reductions);
- ``top-k renormalise``: top-k as softmax -> topk -> renormalise -> scatter (previous) instead of a softmax over
  the k largest logits (shipped);
- ``head mix as autograd.Function``: the gates x ``A x`` broadcast and the B GEMM as one custom
  ``torch.autograd.Function`` with a hand-written backward (``HeadMix`` below, checked with gradcheck in
  tests/test_functional.py).

``--router-gemm`` times ``functional.delta_2d`` alone (forward + backward) with the router fused into A's GEMM
and as a separate GEMM, over sizes from this host-bound case to SmolLM2's widths, and prints fused / separate: the
measurement behind ``functional.FUSED_ROUTER_MIN_ELEMENTS`` (marked: the path the shipped threshold takes).
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
class HeadMix(torch.autograd.Function):
    """``(g[..., :, None] * h).flatten(-2) @ B_flat.T`` with a hand-written backward (2-D: g (T, N), h (T, 1|N, r))."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, h: torch.Tensor, B_flat: torch.Tensor) -> torch.Tensor:
        gated = (g.unsqueeze(-1) * h).flatten(-2)  # (T, N*r)
        ctx.save_for_backward(g, h, B_flat, gated)
        return gated.mm(B_flat.t())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g, h, B_flat, gated = ctx.saved_tensors
        n, r = g.shape[-1], h.shape[-1]
        grad_gated = grad_out.mm(B_flat).view(-1, n, r)  # (T, N, r)
        grad_B = grad_out.t().mm(gated) if ctx.needs_input_grad[2] else None
        if h.shape[1] == 1:  # a shared A: reduce over the heads with batched GEMMs
            grad_g = torch.bmm(grad_gated, h.transpose(1, 2)).squeeze(-1)  # (T, N)
            grad_h = torch.bmm(g.unsqueeze(1), grad_gated)  # (T, 1, r)
        else:
            grad_g = (grad_gated * h).sum(-1)
            grad_h = grad_gated * g.unsqueeze(-1)
        return grad_g, grad_h, grad_B


def _alternative(name: str, shipped: Callable) -> Callable:
    """A stand-in for ``functional.delta_2d`` implementing one alternative."""
    from peft_hydra import functional as HF

    def delta_2d(x, A, B, scaling, *, router_weight, fixed_gates, router_input, top_k, temperature, dropout,
                 dropout_per_head, need_probs):  # fmt: skip
        out_features, n, r = B.shape
        if name == "top-k renormalise" and router_weight is not None and top_k is not None:
            h = F.linear(x, A)
            probs = HF.softmax_gates(F.linear(x, router_weight), temperature)
            gates = HF.top_k_gates(probs, top_k)
            return HF._mix(h.unsqueeze(-2), gates, B, scaling), gates, probs
        if name == "broadcast-multiply head mix" and router_weight is not None and A.shape[0] == r:
            h = F.linear(x, A)
            gates = probs = HF.softmax_gates(F.linear(x, router_weight), temperature)
            g = gates * scaling if scaling != 1.0 else gates
            gated = (g.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
            return F.linear(gated, B.view(out_features, n * r)), gates, probs
        if name == "head mix as autograd.Function" and router_weight is not None and A.shape[0] == r:
            h = F.linear(x, A)
            gates = probs = HF.softmax_gates(F.linear(x, router_weight), temperature)
            g = gates * scaling if scaling != 1.0 else gates
            return HeadMix.apply(g, h.unsqueeze(-2), B.view(out_features, n * r)), gates, probs
        return shipped(x, A, B, scaling, router_weight=router_weight, fixed_gates=fixed_gates,
                       router_input=router_input, top_k=top_k, temperature=temperature, dropout=dropout,
                       dropout_per_head=dropout_per_head, need_probs=need_probs)  # fmt: skip

    return delta_2d


def _forward_3d(adapter_3d: bool) -> Callable:
    """The layer's forward with the base layer on x as given, (batch, seq, in) (the shipped forward flattens x to
    (tokens, in) once for the base layer and the adapter); ``adapter_3d``: the adapter's GEMMs on (batch, seq, in)
    too, else on one flattened view (the shipped ``_adapter_delta``)."""
    from peft_hydra import functional as HF

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.hydra_A:
                continue
            if adapter_3d:
                A, W, B = self.hydra_A[adapter].weight, self.hydra_router[adapter].weight, self.hydra_B[adapter]
                out_features, n, r = B.shape
                h = F.linear(x, A)
                gates = HF.softmax_gates(F.linear(x, W))
                delta = F.linear((gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2), B.view(out_features, n * r))
            else:
                delta = self._adapter_delta(adapter, x.reshape(-1, x.shape[-1]), scaled=False).view_as(result)
            result = torch.add(result, delta, alpha=self.scaling[adapter])
        return result

    return forward


@contextlib.contextmanager
def swapped(choice: Optional[str]):
    """Run the step with one alternative of the hot path swapped in (None: the shipped code)."""
    from peft_hydra import functional as HF
    from peft_hydra.layer import HydraLoraLayer

    if choice is None:
        yield
        return
    if choice == "fused A|router GEMM":  # the shipped fused path, forced below its size threshold
        threshold = HF.FUSED_ROUTER_MIN_ELEMENTS
        HF.FUSED_ROUTER_MIN_ELEMENTS = 0
        try:
            yield
        finally:
            HF.FUSED_ROUTER_MIN_ELEMENTS = threshold
        return
    if choice == "parameters as module attributes":
        from peft_hydra import layer

        shipped = layer._param
        layer._param = getattr  # A.weight, router.weight, hydra_B[name] through nn.Module.__getattr__
        try:
            yield
        finally:
            layer._param = shipped
        return
    if choice in ("base layer on (batch, seq, in)", "3-D linears"):
        from peft_hydra.layer import Linear

        shipped = Linear.forward
        Linear.forward = _forward_3d(adapter_3d=choice == "3-D linears")
        try:
            yield
        finally:
            Linear.forward = shipped
        return
    shipped = HF.delta_2d
    HF.delta_2d = _alternative(choice, shipped)
    try:
        yield
    finally:
        HF.delta_2d = shipped


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
        top2 = hydra(top_k=2)
        for choice in ("fused A|router GEMM", "base layer on (batch, seq, in)", "3-D linears",
                       "parameters as module attributes", "broadcast-multiply head mix",
                       "head mix as autograd.Function"):  # fmt: skip
            methods[f"  alt: {choice}"] = (dense, choice, False)
        methods["  alt: top-k renormalise (top-2)"] = (top2, "top-k renormalise", False)
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
                loss = loss + model.base_model.hydra_aux_loss()
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


ROUTER_GEMM_SHAPES = [(8, 32, 32), (64, 64, 64), (8, 576, 576), (32, 576, 576), (64, 576, 576), (128, 576, 576),
                      (32, 1536, 576), (128, 1536, 576), (16, 2048, 2048), (512, 576, 1536)]  # (tokens, in, out)


def router_gemm_table(threads: int, rounds: int) -> None:
    """fused / separate router GEMM for ``delta_2d`` (r=8, N=3, fp32) at each (tokens, in, out) of ROUTER_GEMM_SHAPES."""
    from peft_hydra import functional as HF

    shipped = HF.FUSED_ROUTER_MIN_ELEMENTS
    print(f"delta_2d forward + backward, r=8 N=3 fp32, {threads} thread(s); shipped threshold: fuse from {shipped} "
          f"elements of x (tokens x in)\n{'tokens':>6s} {'in':>5s} {'out':>5s} {'T*in':>7s} {'separate us':>11s} "
          f"{'fused us':>9s} {'fused/sep':>9s}  shipped path")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for tokens, d_in, d_out in ROUTER_GEMM_SHAPES:
        x = torch.randn(tokens, d_in, generator=gen).requires_grad_(True)
        A = torch.randn(8, d_in, generator=gen).requires_grad_(True)
        W = torch.randn(3, d_in, generator=gen).requires_grad_(True)
        B = torch.randn(d_out, 3, 8, generator=gen).requires_grad_(True)

        def step():
            delta = HF.delta_2d(x, A, B, 1.0, router_weight=W, fixed_gates=None, router_input="x", top_k=None,
                                temperature=1.0, dropout=None, dropout_per_head=False, need_probs=False)[0]  # fmt: skip
            delta.sum().backward()

        n = max(10, int(4e6 // (tokens * d_in)))
        best = {}
        for _ in range(rounds):
            for label, threshold in (("separate", 1 << 62), ("fused", 0)):
                HF.FUSED_ROUTER_MIN_ELEMENTS = threshold
                try:
                    for _ in range(3):
                        step()
                    c0 = time.process_time()
                    for _ in range(n):
                        step()
                    t = (time.process_time() - c0) / n * 1e6
                finally:
                    HF.FUSED_ROUTER_MIN_ELEMENTS = shipped
                best[label] = min(best.get(label, t), t)
        path = "fused" if tokens * d_in >= shipped else "separate"
        print(f"{tokens:6d} {d_in:5d} {d_out:5d} {tokens * d_in:7d} {best['separate']:11.1f} {best['fused']:9.1f} "
              f"{best['fused'] / best['separate']:9.2f}  {path}")  # fmt: skip


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
    parser.add_argument("--router-gemm", action="store_true", help="only the fused vs separate router GEMM table")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.rounds = 3, 20, 3
    torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start {os.getloadavg()}")
    if args.router_gemm:
        router_gemm_table(args.threads, args.rounds)
        print(f"load average at end {os.getloadavg()}")
        return 0
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
            if choice is not None and "top-k" not in choice:
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
