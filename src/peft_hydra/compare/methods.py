"""The compared methods, their PEFT configs, and equal-budget solving of their ranks.

Every method except HydraLoRA comes from PEFT's own classes. Trainable parameters are counted by building the
adapter on a meta-device copy of the model (no memory, no weights), so a method's count is exactly what training
will see.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import ConfigError

#: name -> (kind, fixed options, what it is)
METHODS: dict[str, tuple[str, dict, str]] = {
    "lora": ("lora", {}, "PEFT LoRA: W + (alpha/r) B A, one pair (A, B) per module."),
    "lora_split": (
        "hydra",
        {"share_a": False},
        "LoRA-split (the paper's Observation I, routed): N independent LoRAs (A_i, B_i) of rank r per module, mixed by "
        "HydraLoRA's router (HydraLoraConfig(share_a=False)).",
    ),
    "loha": ("loha", {}, "PEFT LoHa: Hadamard product of two rank-r factorisations."),
    "lokr": ("lokr", {}, "PEFT LoKr: Kronecker product W1 (x) (W2a W2b), W2 of rank r, W1 full of size set by `factor`."),
    "hydralora": (
        "hydra",
        {},
        "HydraLoRA: one shared A (rank r), N heads B_i, a learned softmax router per module (HydraLoraConfig).",
    ),
    "hydralora_uniform": (
        "hydra",
        {"fixed_gates": "uniform"},
        "HydraLoRA ablation: uniform fixed gates 1/N, no router (HydraLoraConfig(fixed_gates='uniform')).",
    ),
    "hydralora_n1": ("hydra", {"num_experts": 1}, "HydraLoRA ablation: N = 1 head (no router; equals LoRA)."),
    "hydralora_oracle": (
        "hydra",
        {"fixed_gates": "uniform", "oracle": True},
        "HydraLoRA with oracle task routing, the upper bound of routing by task: no router (fixed gates, so no unused "
        "router parameters in its budget); every sample's gates are the one-hot of its category's head, given through "
        "`override_gates` in training, evaluation and generation (the category -> head map is in the report).",
    ),
    "lily": (
        "lily",
        {},
        "PEFT Lily (LilyConfig): A shared by every `stride_A` adjacent layers, `num_B` B experts shared by all adapted "
        "layers of a module type and mixed by a router; r solved, stride_A = 2 and num_B = max(2, layers / stride_A) "
        "unless set, scaling = alpha_over_r (LoRA's alpha / r).",
    ),
    "ia3": ("ia3", {}, "PEFT IA3: learned scaling vectors (fixed parameter count, not budget-matched)."),
    "adalora": ("adalora", {}, "PEFT AdaLoRA: SVD-form LoRA with rank allocation (init_r solved, target_r = init_r/2)."),
    "full": ("full", {}, "Full fine-tuning of the adapted layers' target modules (not budget-matched)."),
}

BUDGETED_KINDS = ("lora", "hydra", "loha", "lokr", "adalora", "lily")
LOKR_FACTORS = (-1, 2, 4, 8, 16, 32)


@dataclass
class MethodSpec:
    name: str
    kind: str
    options: dict = field(default_factory=dict)
    description: str = ""
    base: str = ""
    #: gates given per sample from the example's category (one-hot of its head) instead of the router's
    oracle: bool = False


#: options of a method that the harness itself handles (never passed to the PEFT config)
HARNESS_OPTIONS = ("oracle",)


def method_specs(methods: list, method_options: dict) -> list[MethodSpec]:
    """Resolve the config's ``methods`` list: names of :data:`METHODS` or ``{name, base, <options>}`` variants."""
    specs = []
    seen = set()
    for m in methods:
        if isinstance(m, str):
            name, base, extra = m, m, {}
        elif isinstance(m, dict) and "name" in m:
            extra = {k: v for k, v in m.items() if k not in ("name", "base")}
            name, base = m["name"], m.get("base", m["name"])
        else:
            raise ConfigError(f"methods: entry {m!r} must be a method name or a mapping with `name` (and `base`).")
        if base not in METHODS:
            raise ConfigError(f"Unknown method {base!r} in `methods`; known methods: {sorted(METHODS)}.")
        if name in seen:
            raise ConfigError(f"Method {name!r} is listed twice in `methods`.")
        seen.add(name)
        kind, fixed, desc = METHODS[base]
        opts = {**dict(method_options.get(base, {}) or {}), **dict(method_options.get(name, {}) or {}), **extra, **fixed}
        if extra:
            desc = f"{desc} Options: {extra}."
        oracle = opts.pop("oracle", False)
        if not isinstance(oracle, bool) or (oracle and kind != "hydra"):
            raise ConfigError(f"Method {name!r}: `oracle` must be true or false, and only a HydraLoRA method "
                              f"(base hydralora...) can be routed by category; got oracle={oracle!r} on {base!r}.")
        if oracle and int(opts.get("num_experts", 2)) < 2:
            raise ConfigError(f"Method {name!r}: oracle routing needs num_experts >= 2 (one head per group of categories).")
        if oracle and not fixed.get("oracle"):
            desc += (" Routed by the oracle: every sample's gates are the one-hot of its category's head (its router, "
                     "if any, is not used and gets no gradient; its parameters count in the budget).")
        specs.append(MethodSpec(name=name, kind=kind, options=opts, description=desc, base=base, oracle=oracle))
    if not specs:
        raise ConfigError("`methods` is empty: list at least one of " + ", ".join(METHODS) + ".")
    check_peft_supports(specs)
    return specs


#: kind -> (the PEFT config class it needs, the first peft release that has it)
NEEDS_PEFT = {"lily": ("LilyConfig", "0.19.0")}


def check_peft_supports(specs: list[MethodSpec]) -> None:
    """Refuse, before anything runs, a method whose PEFT class the installed peft lacks (Lily: peft >= 0.19)."""
    import peft

    for spec in specs:
        need = NEEDS_PEFT.get(spec.kind)
        if need is not None and not hasattr(peft, need[0]):
            raise ConfigError(
                f"Method {spec.name!r} needs peft.{need[0]} (peft >= {need[1]}); the installed peft {peft.__version__} "
                f"does not have it. Remove {spec.name!r} from `methods` in the config (every other method works on "
                f"this peft), or install `peft>={need[1]}`."
            )


def build_peft_config(spec: MethodSpec, r: int, factor: int, common: dict, total_steps: int = 1000):
    """The PEFT config of ``spec`` at rank ``r`` (and LoKr ``factor``). ``common`` holds target_modules,
    layers_to_transform, alpha_over_r, num_experts. Options the config class refuses are a :class:`ConfigError`."""
    try:
        return _peft_config(spec, r, factor, common, total_steps)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Method {spec.name!r} with options {spec.options}: {e}") from e


def _peft_config(spec: MethodSpec, r: int, factor: int, common: dict, total_steps: int):
    import peft

    import peft_hydra

    tm = list(common["target_modules"])
    layers = list(common["layers_to_transform"]) if common.get("layers_to_transform") is not None else None
    alpha = float(common.get("alpha_over_r", 2.0)) * r
    opts = dict(spec.options)
    if spec.kind == "lora":
        return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, layers_to_transform=layers, **opts)
    if spec.kind == "hydra":
        n = opts.pop("num_experts", common.get("num_experts", 3))
        return peft_hydra.HydraLoraConfig(
            r=r, lora_alpha=alpha, num_experts=int(n), target_modules=tm, layers_to_transform=layers, **opts
        )
    if spec.kind == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, target_modules=tm, layers_to_transform=layers, **opts)
    if spec.kind == "lokr":
        return peft.LoKrConfig(
            r=r, alpha=alpha, decompose_factor=factor, target_modules=tm, layers_to_transform=layers, **opts
        )
    if spec.kind == "lily":
        stride = int(opts.pop("stride_A", 2))
        n_layers = len(layers) if layers is not None else int(common.get("num_layers", stride))
        num_b = int(opts.pop("num_B", max(2, math.ceil(n_layers / stride))))
        scaling = float(opts.pop("scaling", common.get("alpha_over_r", 2.0)))
        return peft.LilyConfig(r=r, stride_A=stride, num_B=num_b, scaling=scaling, target_modules=tm,
                               layers_to_transform=layers, **opts)  # fmt: skip
    if spec.kind == "adalora":
        return peft.AdaLoraConfig(
            init_r=r, target_r=max(1, r // 2), lora_alpha=alpha, total_step=total_steps,
            tinit=max(1, total_steps // 10), tfinal=max(1, total_steps // 5), target_modules=tm,
            layers_to_transform=layers, **opts,
        )  # fmt: skip
    if spec.kind == "ia3":
        # IA3Config has no layers_to_transform: restrict it to the same layers with a regex
        ff = [m for m in tm if m in ("down_proj", "fc2", "c_proj")]
        lay = "(?:" + "|".join(str(i) for i in layers) + ")" if layers else "\\d+"
        rx = lambda mods: rf".*\.{lay}\.(?:[^.]+\.)*(?:{'|'.join(mods)})$" if mods else None  # noqa: E731
        if ff:
            opts.setdefault("feedforward_modules", rx(ff))
        return peft.IA3Config(target_modules=rx(tm), **opts)
    return None  # full fine-tuning


def count_trainable(meta_model: torch.nn.Module, spec: MethodSpec, r: int, factor: int, common: dict) -> int:
    """Trainable parameters of ``spec`` at (r, factor), counted on a meta-device copy of the model."""
    model = copy.deepcopy(meta_model)
    if spec.kind == "full":
        return sum(p.numel() for n, p in full_ft_parameters(model, common))
    import peft

    if spec.kind == "hydra" and spec.options.get("head_init", "zero") != "zero":
        # the count does not depend on how the heads start, and 'orthogonal' refuses ranks above out / N, which the
        # budget solver probes on its way to the solution
        spec = dataclasses.replace(spec, options={**spec.options, "head_init": "zero"})
    pm = peft.get_peft_model(model, build_peft_config(spec, r, factor, common))
    # AdaLoRA's `ranknum` is a frozen counter, but on the meta device it keeps requires_grad=True
    return sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and ".ranknum" not in n)


def full_ft_parameters(model: torch.nn.Module, common: dict):
    """(name, param) of the target modules of the adapted layers (full fine-tuning)."""
    layers = set(common.get("layers_to_transform") or [])
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        mod_ok = any(t in parts for t in common["target_modules"])
        idx = next((int(x) for x in parts if x.isdigit()), None)
        if mod_ok and (not layers or idx in layers):
            out.append((name, p))
    return out


def max_rank(spec: MethodSpec, r: int, factor: int, common: dict, n: int) -> dict[str, Any]:
    """Upper bound of the rank of the weight update of one (in=out=d) module, as a number and a formula."""
    if spec.kind == "lora":
        return {"value": r, "formula": "r"}
    if spec.kind == "lily":
        return {"value": r, "formula": "r (A shared across stride_A layers, router mix of num_B shared B's)"}
    if spec.kind == "adalora":
        return {"value": r, "formula": "init_r (pruned towards target_r)"}
    if spec.kind == "loha":
        return {"value": r * r, "formula": "r^2"}
    if spec.kind == "lokr":
        if factor > 0:
            return {"value": factor * r, "formula": f"rank(W1) x r <= factor x r (factor={factor})"}
        return {"value": None, "formula": "rank(W1) x r (factor=-1: W1 near sqrt(d) x sqrt(d))"}
    if spec.kind == "hydra":
        n = int(spec.options.get("num_experts", n))
        if spec.options.get("share_a", True) is False:
            return {"value": n * r, "formula": "N*r per token (N*r overall)"}
        return {"value": r, "formula": "r per gate mix, N*r overall" if n > 1 else "r"}
    return {"value": None, "formula": "full" if spec.kind == "full" else "diagonal"}


@dataclass
class Solved:
    r: int
    factor: int
    params: int
    within_tolerance: bool
    note: str = ""
    too_small: bool = False


def solve_budget(meta_model, spec: MethodSpec, target: Optional[int], common: dict, tol: float, r_max: int = 1024,
                 default_r: int = 8) -> Solved:  # fmt: skip
    """Find the rank (and LoKr factor) whose trainable-parameter count is nearest to ``target``.

    When even the smallest adapter (r = 1) is more than ``tol`` above the target, r = 1 is returned with
    ``too_small=True`` (see :func:`check_budgets`). Methods with a fixed size (IA3, full fine-tuning) are counted and reported, never solved.
    """
    if spec.kind not in BUDGETED_KINDS or target is None:
        r = int(spec.options.get("r", default_r)) if spec.kind in BUDGETED_KINDS else 0
        n = count_trainable(meta_model, spec, max(r, 1), -1, common)
        return Solved(r, -1, n, target is None or abs(n - target) <= tol * target, "fixed size, not budget-matched")
    cache: dict = {}

    def count(r, f):
        if (r, f) not in cache:
            cache[(r, f)] = count_trainable(meta_model, spec, r, f, common)
        return cache[(r, f)]

    best: Optional[Solved] = None
    factors = LOKR_FACTORS if spec.kind == "lokr" else (-1,)
    smallest = None
    for f in factors:
        lo, hi = 1, r_max
        c1 = count(1, f)
        smallest = c1 if smallest is None else min(smallest, c1)
        if c1 >= target:
            cands = [1]
        else:
            while lo < hi:  # smallest r with count >= target (count is non-decreasing in r below the full-rank switch)
                mid = (lo + hi) // 2
                if count(mid, f) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            if count(lo, f) < target:  # the count plateaus (LoKr: W2 becomes a full matrix): smallest r of the plateau
                plateau, lo2, hi2 = count(lo, f), 1, lo
                while lo2 < hi2:
                    mid = (lo2 + hi2) // 2
                    if count(mid, f) >= plateau:
                        hi2 = mid
                    else:
                        lo2 = mid + 1
                lo = lo2
            cands = sorted({max(1, lo - 1), lo})
        for r in cands:
            c = count(r, f)
            cand = Solved(r, f, c, abs(c - target) <= tol * target)
            if best is None or abs(c - target) < abs(best.params - target):
                best = cand
    assert best is not None and smallest is not None
    if smallest > target * (1 + tol):
        best.note = f"budget too small: its smallest adapter (r=1) has {smallest:,} params"
        best.too_small = True
    elif not best.within_tolerance:
        best.note = f"nearest achievable: {100 * (best.params - target) / target:+.1f}% off the budget"
    return best


def check_budgets(target: Optional[int], solved: dict[str, Solved], specs: list[MethodSpec], tol: float) -> None:
    """Raise :class:`ConfigError` when no budgeted method can meet ``target`` within ``tol``."""
    budgeted = [s for s in specs if s.kind in BUDGETED_KINDS]
    if target is None or not budgeted or any(solved[s.name].within_tolerance for s in budgeted):
        return
    sizes = ", ".join(f"{s.name}: {solved[s.name].params:,}" for s in budgeted)
    smallest = min(solved[s.name].params for s in budgeted if solved[s.name].too_small) if any(
        solved[s.name].too_small for s in budgeted) else None  # fmt: skip
    hint = f" Raise `budget` to at least {smallest:,}," if smallest else " Change `budget`,"
    raise ConfigError(
        f"No method can meet the budget of {target:,} trainable parameters within {tol:.0%} (nearest: {sizes})."
        f"{hint} or adapt more/fewer modules or layers (`target_modules`, `top_layers`)."
    )




def oracle_head_map(train_examples: list[dict], n: int) -> dict[str, Any]:
    """The category -> head map of the oracle methods, deterministic from the training examples (their order and
    counts) and N:

    - categories <= N: the i-th category (in order of first appearance in the training data) gets head i (heads past
      the last category stay unused);
    - more categories than heads and exactly N sources: one head per source (its categories share it);
    - otherwise: balanced by training-example counts: the categories, largest first (ties: first appearance), each
      go to the head with the fewest training examples so far (ties: the lowest head).

    Returns ``{"heads": {category: head}, "rule": str, "num_experts": n, "load": [training examples per head]}``.
    """
    counts: dict[str, int] = {}
    source: dict[str, str] = {}
    for ex in train_examples:
        counts[ex["category"]] = counts.get(ex["category"], 0) + 1
        source.setdefault(ex["category"], ex.get("source", ""))
    cats = list(counts)
    if not cats:
        raise ConfigError("Oracle routing needs training examples with categories.")
    sources = list(dict.fromkeys(source[c] for c in cats))
    if len(cats) <= n:
        heads, rule = {c: i for i, c in enumerate(cats)}, "one head per category (in order of first appearance)"
    elif len(sources) == n:
        heads = {c: sources.index(source[c]) for c in cats}
        rule = f"{len(cats)} categories > N = {n} heads: one head per source ({n} sources)"
    else:
        load = [0] * n
        heads = {}
        for c in sorted(cats, key=lambda c: (-counts[c], cats.index(c))):
            h = min(range(n), key=lambda i: (load[i], i))
            heads[c] = h
            load[h] += counts[c]
        heads = {c: heads[c] for c in cats}
        rule = (f"{len(cats)} categories > N = {n} heads ({len(sources)} sources): balanced by training-example "
                "counts (largest category first, each to the least-loaded head)")
    load = [sum(counts[c] for c in cats if heads[c] == h) for h in range(n)]
    return {"heads": heads, "rule": rule, "num_experts": n, "load": load}
