"""Equal-budget solving: every method's rank (and LoKr factor) lands within 5% of the target, counted exactly."""

import peft
import pytest
import torch

import peft_hydra  # noqa: F401
from peft_hydra.compare import ConfigError
from peft_hydra.compare.methods import (
    METHODS,
    build_peft_config,
    count_trainable,
    max_rank,
    method_specs,
    solve_budget,
)

from conftest import make_tiny_llama

ALL = ["lora", "lora_split", "loha", "lokr", "lily", "hydralora", "hydralora_uniform", "hydralora_n1", "adalora"]
TM = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def meta_model():
    base = make_tiny_llama(num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    with torch.device("meta"):
        return type(base)(base.config)


def common(num_experts=3):
    return {"target_modules": TM, "layers_to_transform": [1, 2], "alpha_over_r": 2.0, "num_experts": num_experts}


@pytest.mark.parametrize("name", ALL)
def test_budget_within_tolerance_and_count_is_real(name):
    spec = method_specs([name], {})[0]
    meta = meta_model()
    # a target reachable by the method (its count at r=5, +2%): the solver must land within 5%
    target = int(1.02 * count_trainable(meta, spec, 5, 4 if name == "lokr" else -1, common()))
    s = solve_budget(meta, spec, target, common(), tol=0.05)
    assert s.within_tolerance and abs(s.params - target) <= 0.05 * target, (name, s)
    # nearest achievable: no neighbouring rank is closer
    for r in (s.r - 1, s.r + 1):
        if r >= 1:
            assert abs(count_trainable(meta, spec, r, s.factor, common()) - target) >= abs(s.params - target)
    # the meta-device count equals the count of the adapter really built on a real model
    real = make_tiny_llama(num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    pm = peft.get_peft_model(real, build_peft_config(spec, s.r, s.factor, common()))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == s.params
    # nothing outside the chosen layers is adapted
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert ".layers.0." not in n


def test_hydralora_count_follows_its_structure():
    """HydraLoRA r: A (r x in) + B (out x N x r) + router (N x in) per module; LoRA-split has N A's."""
    m = meta_model()
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # (in, out) per module
    n, r = 3, 4
    spec = method_specs(["hydralora"], {})[0]
    expected = 2 * sum(r * i + n * r * o + n * i for i, o in shapes)
    assert count_trainable(m, spec, r, -1, common(n)) == expected
    split = method_specs(["lora_split"], {})[0]
    assert count_trainable(m, split, r, -1, common(n)) == 2 * sum(n * r * i + n * r * o + n * i for i, o in shapes)
    uni = method_specs(["hydralora_uniform"], {})[0]
    assert count_trainable(m, uni, r, -1, common(n)) == 2 * sum(r * i + n * r * o for i, o in shapes)
    assert max_rank(spec, r, -1, common(n), n)["value"] == r
    assert max_rank(split, r, -1, common(n), n)["value"] == n * r


def test_unreachable_budget_reports_nearest():
    """LoKr's count plateaus once W2 is a full matrix: a larger budget gets the plateau, flagged, at its smallest r."""
    spec = method_specs(["lokr"], {})[0]
    s = solve_budget(meta_model(), spec, 10_000_000, common(), tol=0.05)
    assert not s.within_tolerance and "nearest achievable" in s.note
    assert count_trainable(meta_model(), spec, s.r - 1, s.factor, common()) < s.params


def test_budget_too_small_is_flagged_and_no_method_is_an_error():
    from peft_hydra.compare.methods import check_budgets

    specs = method_specs(["lora", "hydralora"], {})
    solved = {s.name: solve_budget(meta_model(), s, 100, common(), tol=0.05) for s in specs}
    assert all(s.r == 1 and s.too_small and "budget too small" in s.note for s in solved.values())
    with pytest.raises(ConfigError, match="No method can meet the budget of 100.*Raise `budget` to at least"):
        check_budgets(100, solved, specs, 0.05)
    # one method meeting it is enough: the others are reported as the nearest achievable
    lora_size = count_trainable(meta_model(), specs[0], 1, -1, common())
    solved = {s.name: solve_budget(meta_model(), s, lora_size, common(), tol=0.05) for s in specs}
    assert solved["lora"].within_tolerance and solved["hydralora"].too_small
    check_budgets(lora_size, solved, specs, 0.05)


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="Unknown method 'dora'.*known methods"):
        method_specs(["dora"], {})


def test_variants_and_options():
    specs = method_specs(["lora", {"name": "hydra_top1", "base": "hydralora", "top_k": 1}], {"hydralora": {"num_experts": 4}})
    assert specs[1].options == {"num_experts": 4, "top_k": 1}
    cfg = build_peft_config(specs[1], 4, -1, common())
    assert isinstance(cfg, peft_hydra.HydraLoraConfig) and cfg.top_k == 1 and cfg.num_experts == 4
    assert set(METHODS) >= set(ALL)


@pytest.mark.parametrize("name", ["ia3", "full"])
def test_fixed_size_methods_adapt_only_the_chosen_layers(name):
    from peft_hydra.compare.methods import full_ft_parameters

    spec = method_specs([name], {})[0]
    s = solve_budget(meta_model(), spec, None, common(), tol=0.05)
    assert s.params > 0 and "not budget-matched" in s.note
    real = make_tiny_llama(num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    if name == "ia3":
        pm = peft.get_peft_model(real, build_peft_config(spec, 1, -1, common()))
        names = [n for n, p in pm.named_parameters() if p.requires_grad]
    else:
        names = [n for n, _ in full_ft_parameters(real, common())]
    assert names and all(".layers.1." in n or ".layers.2." in n for n in names)
    assert sum(p.numel() for n, p in (pm if name == "ia3" else real).named_parameters() if n in names) == s.params
