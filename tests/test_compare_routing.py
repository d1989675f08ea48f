"""The comparison report's routing section (peft_hydra.routing per routed method, the MI plot, a caveat when the
gates stay uniform) and its forgetting measurement (loss on held-out general text, base model vs adapter after)."""

import json

import yaml

from peft_hydra.compare import data as D
from peft_hydra.cli import main

TINY = {"name": "tiny-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}}


def test_routing_and_forgetting_in_the_report(tmp_path):
    cfg = {
        "model": TINY,
        "data": {"sources": ["conflict4", "dolly8"], "train_per_category": 2, "val_per_category": 0,
                 "eval_per_category": 2, "max_length": 48, "max_answer_tokens": 8},
        "top_layers": 1, "budget": None, "r": 2, "num_experts": 2, "seeds": [0, 1], "steps": 2, "batch_size": 4,
        "lr": 1e-3, "bootstrap": 50, "cache_dir": None, "forgetting": 4,
        # a zero router with zero heads gets no gradient and identical heads: its gates stay exactly uniform
        "methods": ["lora", "hydralora", {"name": "stuck", "base": "hydralora", "router_init_std": 0.0},
                    "hydralora_uniform"],
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(tmp_path / "cfg.yaml"), "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    # routing: every seed of every method with a learned router, none for LoRA or fixed gates
    assert {r["method"] for r in res["runs"] if "routing" in r} == {"hydralora", "stuck"}
    assert set(res["routing_by_method"]) == {"hydralora", "stuck"}
    stuck = res["routing_by_method"]["stuck"]
    assert stuck["seeds"] == [0, 1] and stuck["mi_normalized_median"] < 1e-9 and stuck["token_entropy_median"] > 0.999
    assert stuck["health"] == {"uniform": [0, 1]} and "uniform" not in res["routing_by_method"]["hydralora"]["health"]
    n_cats = len(res["data"]["categories"])
    for r in res["runs"]:
        if "routing" in r:
            lay = next(iter(r["routing"]["layers"].values()))
            assert len(lay["usage"]) == 2 and abs(sum(lay["usage"]) - 1) < 1e-6 and 0 <= lay["mi_normalized"] <= 1
            assert lay["head_abs_cosine"] is not None  # trained heads are non-zero
            assert len(r["router_by_category"]) == n_cats
    md = (out / "results.md").read_text()
    summary = md[md.index("## Summary") : md.index("## Set-up")]
    assert "`stuck`: the gates stay uniform" in summary and "`hydralora`: the gates stay uniform" not in summary
    assert "## Routing: does the router specialise?" in md and "| stuck | 2 |" in md
    assert (out / "routing_mi.png").exists()
    # forgetting: the base model's loss once, every run's loss after, the change per method with a CI
    fg = res["forgetting"]
    assert fg["n_texts"] == 4 and len(fg["before_example_losses"]) == 4
    for r in res["runs"]:
        assert abs(r["forgetting"] - (r["general_loss"] - fg["before_loss"])) < 1e-9
    uni = res["forgetting_by_method"]["hydralora_uniform"]
    per_seed = [r["forgetting"] for r in res["runs"] if r["method"] == "hydralora_uniform"]
    assert abs(uni["mean"] - sum(per_seed) / 2) < 1e-6 and uni["ci95"][0] <= uni["mean"] <= uni["ci95"][1]
    assert "## Forgetting" in md and "Forgetting (loss per token on 4 held-out" in summary


def test_general_texts_are_not_in_any_prompt():
    splits = D.build_splits({"sources": ["dolly8"], "train_per_category": 20, "val_per_category": 2,
                             "eval_per_category": 20})  # fmt: skip
    used = [ex["prompt"] for exs in splits.values() for ex in exs]
    texts = D.general_texts(40, used)
    assert len(set(texts)) == 40 and all(len(t) >= 300 for t in texts)
    assert not any(t in p for t in texts for p in used)
    assert texts == D.general_texts(40, used)  # deterministic
    with_context = [p for p in used if p.startswith("Context: ")]
    assert with_context  # the run does use Dolly contexts: they are excluded, not absent


def test_budget_of_non_zero_head_inits_is_solved_like_zero_heads():
    """The solver probes ranks far above out / N, which head_init='orthogonal' refuses: the count ignores the init."""
    import torch

    from peft_hydra.compare.methods import method_specs, solve_budget
    from peft_hydra.compare.train import load_model

    base, _, _ = load_model(TINY, "float32")
    with torch.device("meta"):
        meta = type(base)(base.config)
    common = {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [2], "alpha_over_r": 2.0,
              "num_experts": 4}  # fmt: skip
    specs = method_specs(["hydralora", {"name": "o", "base": "hydralora", "head_init": "orthogonal"},
                          {"name": "c", "base": "hydralora", "head_init": "centered"}], {})  # fmt: skip
    solved = [solve_budget(meta, s, 1500, common, 0.05) for s in specs]
    assert len({(s.r, s.params) for s in solved}) == 1 and solved[0].r >= 1


def test_runs_of_disjoint_seeds_merge_into_the_joint_run(tmp_path, capsys):
    cfg = {
        "model": TINY,
        "data": {"sources": ["conflict4"], "train_per_category": 2, "val_per_category": 0, "eval_per_category": 2,
                 "max_length": 40, "max_answer_tokens": 8},
        "top_layers": 1, "budget": None, "r": 2, "num_experts": 2, "steps": 2, "batch_size": 4, "lr": 1e-3,
        "bootstrap": 50, "cache_dir": None, "forgetting": 3, "methods": ["lora", "hydralora"], "seeds": [0, 1],
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for name, extra in (("joint", []), ("s0", ["--seeds", "0"]), ("s1", ["--seeds", "1"])):
        assert main(["compare", "--config", str(path), "--output", str(tmp_path / name), *extra]) == 0
    assert main(["report", "--merge", str(tmp_path / "merged"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    joint = json.loads((tmp_path / "joint" / "results.json").read_text())
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["finished"] and merged["config"]["seeds"] == [0, 1] and len(merged["merged_from"]) == 2
    for key in ("paired_vs_reference", "forgetting_by_method", "routing_by_method"):
        assert merged[key] == joint[key], key
    assert "merged (`peft-hydra report --merge`)" in (tmp_path / "merged" / "results.md").read_text()
    # the same seed twice is refused
    capsys.readouterr()
    assert main(["report", "--merge", str(tmp_path / "bad"), str(tmp_path / "s0"), str(tmp_path / "joint")]) == 2
    assert "already in an earlier run" in capsys.readouterr().err
