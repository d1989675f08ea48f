"""The oracle method of the comparison harness: HydraLoRA whose gates are the one-hot of each sample's category head
(given through the public ``override_gates``), its category -> head map, and its place in the report."""

import json

import peft
import pytest
import torch

import peft_hydra
from peft_hydra.cli import main
from peft_hydra.compare import ConfigError
from peft_hydra.compare.methods import METHODS, method_specs, oracle_head_map
from peft_hydra.compare.train import compute_cache, load_model, oracle_gates, token_losses
from test_compare import TINY, tuner_internals_hidden_from_the_harness, write_cfg  # noqa: F401  (the fixture)


def examples(spec):
    """Training examples from ``[(source, category, count)]``, in that order."""
    return [{"source": s, "category": c} for s, c, k in spec for _ in range(k)]


def test_map_one_head_per_category_when_they_fit():
    m = oracle_head_map(examples([("a", "x", 3), ("a", "y", 1), ("b", "z", 2)]), 4)
    assert m["heads"] == {"x": 0, "y": 1, "z": 2} and m["load"] == [3, 1, 2, 0]


def test_map_groups_by_source_when_sources_equal_heads():
    m = oracle_head_map(examples([("a", "x", 3), ("b", "y", 1), ("a", "z", 2), ("b", "w", 5)]), 2)
    assert m["heads"] == {"x": 0, "y": 1, "z": 0, "w": 1} and "per source" in m["rule"]


def test_map_balances_training_counts_otherwise():
    # 5 categories of one source, 2 heads: largest first to the least-loaded head: w(9)->0, x(5)->1, y(4)->1, z(3)->0,
    # v(1)->1 (loads 12 / 10)
    m = oracle_head_map(examples([("a", "x", 5), ("a", "y", 4), ("a", "z", 3), ("a", "w", 9), ("a", "v", 1)]), 2)
    assert m["heads"] == {"x": 1, "y": 1, "z": 0, "w": 0, "v": 1} and m["load"] == [12, 10]
    assert m == oracle_head_map(examples([("a", "x", 5), ("a", "y", 4), ("a", "z", 3), ("a", "w", 9), ("a", "v", 1)]), 2)


def test_oracle_spec_is_router_free_and_refused_on_other_kinds():
    (spec,) = method_specs(["hydralora_oracle"], {})
    assert spec.oracle and spec.options == {"fixed_gates": "uniform"} and "oracle" not in spec.options
    with pytest.raises(ConfigError, match="only a HydraLoRA method"):
        method_specs([{"name": "x", "base": "lora", "oracle": True}], {})
    assert "hydralora_oracle" in METHODS


def test_per_sample_categories_reach_the_forward_through_the_cached_path():
    """A batch mixing categories: each example's loss equals the loss of that example alone with its head's one-hot
    gates, differs from another head's, and the heads of absent categories get no gradient."""
    base, tok, _ = load_model(TINY)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft_hydra.HydraLoraConfig(
        r=2, num_experts=3, fixed_gates="uniform", target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2],
        init_weights=False))  # fmt: skip
    exs = [{"input_ids": tok(f"sample {i} text")["input_ids"] + [2], "n_prompt": 4, "category": c, "_i": i}
           for i, c in enumerate(["p", "q", "p", "q"])]  # fmt: skip
    inner = model.get_base_model()
    cache = compute_cache(inner, exs, 1, 4, "cpu")
    oracle = {"heads": {"p": 0, "q": 1}, "num_experts": 3}
    with oracle_gates(model, exs, oracle):
        ce, _, rows = token_losses(inner, exs, cache, 1, "cpu")
    (-ce.mean()).backward()
    with torch.no_grad():
        for j, ex in enumerate(exs):
            alone = {"heads": {"p": 0, "q": 1}, "num_experts": 3}
            with oracle_gates(model, [ex], alone):
                own, _, _ = token_losses(inner, [ex], cache, 1, "cpu")
            torch.testing.assert_close(own, ce[rows == j].detach(), atol=1e-5, rtol=1e-5)
            with oracle_gates(model, [ex], {"heads": {ex["category"]: 2}, "num_experts": 3}):
                other, _, _ = token_losses(inner, [ex], cache, 1, "cpu")
            assert not torch.allclose(own, other)
    B = next(p for n, p in model.named_parameters() if "hydra_B" in n)
    assert B.grad[:, :4].abs().sum() > 0 and B.grad[:, 4:].abs().sum() == 0  # heads 0, 1 (r=2 each), not head 2
    with pytest.raises(ConfigError, match="have no head"):
        oracle_gates(model, [{"category": "new"}], oracle)


def test_oracle_end_to_end_with_internals_hidden(tmp_path, tuner_internals_hidden_from_the_harness):  # noqa: F811
    """The harness trains and evaluates the oracle through public API only; with categories == heads its routing
    carries all of the category: MI = H(C) (token-weighted; 1 x log N when the categories have equal token shares),
    and the map is in results.json and results.md."""
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, methods=["lora", "hydralora_oracle"], num_experts=4, seeds=[0], lr_sweep=[1e-2],
                    generate=True, forgetting=0)  # fmt: skip
    assert main(["compare", "--config", cfg, "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    om = res["oracle"]["hydralora_oracle"]
    assert om["heads"] == {"colors": 0, "animals": 1, "numbers": 2, "gsm8k": 3}
    (run,) = [r for r in res["runs"] if r["method"] == "hydralora_oracle"]
    (st,) = run["routing"]["layers"].values()
    shares = torch.tensor([st["usage"][h] for h in range(4)], dtype=torch.float64)  # the categories' token shares
    h_c = float(-(shares * shares.log()).sum()) / torch.tensor(4.0).log().item()
    assert abs(st["mi_normalized"] - h_c) < 1e-6 and 0.9 < h_c < 1 and st["token_entropy"] == 0
    assert run["routing"]["oracle_map"] == om["heads"] and run["gen_accuracy"] is not None
    assert abs(res["routing_by_method"]["hydralora_oracle"]["mi_normalized_median"] - h_c) < 1e-6
    md = (out / "results.md").read_text()
    summary = md[md.index("## Summary") : md.index("## Set-up")]
    assert "- `hydralora_oracle`: " in summary and "colors -> 0, animals -> 1, numbers -> 2, gsm8k -> 3" in summary
    assert f"`hydralora_oracle` {h_c:.3f}" in summary and "## Oracle routing: `hydralora_oracle`" in md


def test_token_routing_figures_reach_the_report(tmp_path):
    """A learned router's and the oracle's per-token figures (token / target / position MI with the shuffled
    baseline) are in results.json and results.md; the oracle's gates depend on the category only, so its figures
    beyond the category are exactly 0."""
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, methods=["lora", "hydralora", "hydralora_oracle"], num_experts=4, seeds=[0],
                    lr_sweep=[1e-2], forgetting=0)  # fmt: skip
    assert main(["compare", "--config", cfg, "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for m in ("hydralora", "hydralora_oracle"):
        (run,) = [r for r in res["runs"] if r["method"] == m]
        for st in run["routing"]["layers"].values():
            for v in ("token", "target", "position"):
                assert st[f"{v}_mi_excess"] == pytest.approx(st[f"{v}_mi"] - st[f"{v}_mi_shuffled"])
                assert st[f"{v}_mi_shuffled"] >= 0 and st[f"{v}_values"] > 1
                if m == "hydralora_oracle":
                    assert abs(st[f"{v}_mi_given_category"]) < 1e-9
        assert res["routing_by_method"][m]["token_mi_excess_median"] is not None
    md = (out / "results.md").read_text()
    assert "| token: plug-in (shuffled) = excess |" in md and "What else the gates track (MI with the input token" in md
