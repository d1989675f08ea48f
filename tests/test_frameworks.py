"""The framework integrations (src/peft_hydra/frameworks; docs/training.md, "In axolotl, ms-swift and LLaMA-Factory").

For each framework: its own command line trains a tiny Llama (byte-level tokenizer, saved to a folder, no Hub) a few
steps with a HydraLoRA adapter, the router statistics and the balance loss appear in the framework's training log, the
saved adapter reloads with plain PEFT and changes the model's outputs, and the framework's merge command refuses the
learned router with this package's error instead of writing an unmerged model.

Each framework has its own virtual environment at its current release with the pins it declares (``make
test-frameworks`` builds .venv-axolotl, .venv-swift, .venv-llamafactory and runs this module in each). The
environment variable PEFT_HYDRA_FRAMEWORK names the framework the environment was built for: that framework's tests
must run (a framework that does not import FAILS them); the other frameworks' tests skip, as does every test in an
environment without PEFT_HYDRA_FRAMEWORK (the main suite).
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import CHAT_TEMPLATE, byte_tokenizer, make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = os.environ.get("PEFT_HYDRA_FRAMEWORK", "")
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CONFIGS = ("axolotl_hydralora.yml", "swift_hydralora.yaml", "llamafactory_hydralora.yaml", "llamafactory_data.yaml")
BIN = os.path.dirname(sys.executable)
MERGE_REFUSED = "Cannot merge or export HydraLoRA adapter"
TASKS = (  # three kinds of instruction with different words: num_experts auto has clusters to find
    ("Add {a} and {b}.", lambda a, b: a + b),
    ("What is the product of {a} times {b}?", lambda a, b: a * b),
    ("Which number is bigger, {a} or {b}?", max),
)


def needs(framework: str, module: str):
    """Run the test where PEFT_HYDRA_FRAMEWORK names ``framework`` (failing if ``module`` does not import); skip it
    elsewhere."""
    if REQUIRED != framework:
        pytest.skip(f"{framework} runs in its own environment: make test-framework-{framework}")
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"PEFT_HYDRA_FRAMEWORK={framework} but `{module}` is not installed in {sys.prefix}")


def records(n=48, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template, fn = TASKS[i % 3]
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"instruction": template.format(a=a, b=b), "input": "", "output": str(fn(a, b))})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama with its tokenizer saved as a user's model folder, and the training data (Alpaca JSON lines)."""
    if not REQUIRED:
        pytest.skip("the framework integrations run in the frameworks' own environments: make test-frameworks")
    root = tmp_path_factory.mktemp("frameworks")
    base = root / "base"
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    tokenizer.save_pretrained(base)
    make_tiny_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                    max_position_embeddings=256).save_pretrained(base)  # fmt: skip
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in records()))  # fmt: skip
    return {"root": root, "base": str(base), "data": str(data), "chat": str(chat)}


def run(cmd, cwd, **env):
    """A framework command as a user runs it (this environment's bin first on PATH, no Hub, no telemetry)."""
    full_env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "AXOLOTL_DO_NOT_TRACK": "1",
                "DO_NOT_TRACK": "1", "WANDB_DISABLED": "true", **env}  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def shipped_config(name: str) -> dict:
    """A config of configs/ (the tests put the tiny model's and their own settings on top)."""
    return yaml_load(os.path.join(ROOT, "configs", name))


def check_saved(adapter_dir, r, lora_alpha, num_experts, coef):
    """The saved adapter is HydraLoRA with the framework's LoRA options and the HydraLoRA ones, on every linear."""
    config = saved_config(adapter_dir)
    assert (config["r"], config["lora_alpha"], config["num_experts"], config["router_aux_loss_coef"]) == (
        r, lora_alpha, num_experts, coef), config
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == LINEAR, config["target_modules"]


def yaml_load(path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_yaml(path, config: dict):
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def check_log(entries: list[dict], num_experts: int):
    """The training log has the loss and the router statistics at every step, the balance loss included."""
    steps = [e for e in entries if "loss" in e and "router_entropy" in e]
    assert len(steps) >= 3, f"expected a log entry with router statistics per step, got {entries}"
    losses = [float(e["loss"]) for e in steps]
    assert all(math.isfinite(x) for x in losses), losses
    assert min(losses[1:]) < losses[0], f"the loss did not go down: {losses}"
    for e in steps:
        gates = [float(e[f"router_gate_{i}"]) for i in range(num_experts)]
        assert abs(sum(gates) - 1) < 1e-3, e
        assert float(e["router_aux_loss"]) > 0, e  # the balance loss took part (not silently off)
    print(f"losses {losses}; last router entry {steps[-1]}")
    return losses


def saved_config(adapter_dir) -> dict:
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "HYDRALORA", config
    return config


def load_with_plain_peft(base_model, adapter_dir):
    """docs/training.md's loading block, verbatim."""
    import peft_hydra  # noqa: F401  (registers HydraLoRA with PEFT; automatic after pip install)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model)
    model = PeftModel.from_pretrained(base, adapter_dir)  # axolotl: output_dir; ms-swift: a checkpoint-N folder
    return model


def check_reload(base_model, adapter_dir):
    """The adapter reloads with PeftModel.from_pretrained and changes the outputs of the base model."""
    from transformers import AutoModelForCausalLM

    ids = byte_tokenizer(CHAT_TEMPLATE)("Add 3 and 4.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(base_model).eval()(input_ids=ids).logits
        model = load_with_plain_peft(base_model, adapter_dir)
        adapted = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            unadapted = model(input_ids=ids).logits
    torch.testing.assert_close(unadapted, reference)
    diff = (adapted - reference).abs().max().item()
    assert diff > 1e-4, f"the reloaded adapter does not change the outputs (max |diff| {diff})"
    print(f"reloaded {adapter_dir}: max |logits - base| = {diff:.4f}")


# ------------------------------------------------------------------------------------------------------ axolotl
def test_axolotl_train_reload_and_merge_refused(work):
    needs("axolotl", "axolotl")
    out = work["root"] / "axolotl_out"
    shipped = shipped_config("axolotl_hydralora.yml")
    cfg = write_yaml(work["root"] / "axolotl.yml", {**shipped,
        "base_model": work["base"], "num_experts": "auto",
        "datasets": [{"path": work["data"], "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(work["root"] / "axolotl_prepared"),
        "sequence_len": 256, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4,
        "learning_rate": 0.01, "lr_scheduler": "constant", "warmup_ratio": 0, "logging_steps": 1,
        "save_strategy": "no", "output_dir": str(out), "bf16": False, "fp16": False, "tf32": False,
    })  # fmt: skip
    assert shipped["gradient_checkpointing"]  # the plugin must keep the balance loss working under it
    rc, log = run(["axolotl", "train", cfg], cwd=work["root"])
    assert rc == 0, log[-5000:]
    n = int(re.search(r"num_experts auto: N = (\d+)", log).group(1))
    entries = [ast.literal_eval(m) for m in re.findall(r"\{'loss': .*?\}", log)]
    check_log(entries, n)
    check_saved(out, shipped["lora_r"], shipped["lora_alpha"], n, shipped["router_aux_loss_coef"])
    check_reload(work["base"], str(out))

    rc, log = run(["axolotl", "merge-lora", cfg], cwd=work["root"])
    assert rc != 0 and MERGE_REFUSED in log and "export_lora" in log, log[-3000:]
    assert not glob.glob(str(out / "merged" / "*.safetensors")), "merge-lora wrote a model"

    # an adapter with fixed gates has an exact merge: merge-lora writes it (through axolotl's legacy merger)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import peft_hydra

    fixed = work["root"] / "axolotl_fixed"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work["base"]), peft_hydra.HydraLoraConfig(
        r=4, lora_alpha=8, num_experts=3, fixed_gates=[0.5, 0.3, 0.2], init_weights=False,
        target_modules=sorted(LINEAR)))  # fmt: skip
    model.save_pretrained(fixed)
    cfg = write_yaml(work["root"] / "axolotl_fixed.yml", {**yaml_load(cfg), "lora_model_dir": str(fixed),
                                                           "output_dir": str(fixed)})  # fmt: skip
    rc, log = run(["axolotl", "merge-lora", cfg], cwd=work["root"])
    assert rc == 0, log[-5000:]
    ids = byte_tokenizer(CHAT_TEMPLATE)("Add 3 and 4.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(fixed / "merged").eval()(input_ids=ids).logits
        torch.testing.assert_close(merged, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_axolotl_config_options():
    needs("axolotl", "axolotl")
    from peft_hydra.frameworks import axolotl as plugin

    preset = plugin.hydra_config({"hydra_preset": "paper", "lora_dropout": 0.0})
    assert (preset.r, preset.lora_alpha, preset.num_experts, preset.dropout_per_head) == (4, 32, 4, True)
    assert preset.target_modules == {"gate_proj", "up_proj", "down_proj"} and preset.lora_dropout == 0.0
    custom = plugin.hydra_config({"lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "v_proj"],
                                  "num_experts": 2, "router_aux_loss_coef": 0.001,
                                  "hydra_options": {"top_k": 1, "head_init": "centered"}})  # fmt: skip
    assert (custom.r, custom.num_experts, custom.top_k, custom.head_init) == (16, 2, 1, "centered")
    with pytest.raises(ValueError, match=r"unknown HydraLoRA option\(s\) \['r'\].*framework's own LoRA options"):
        plugin.hydra_config({"hydra_options": {"r": 4}})
    with pytest.raises(ValueError, match="needs the training texts"):
        plugin.hydra_config({"num_experts": "auto"})


# ------------------------------------------------------------------------------------------------------ ms-swift
def test_swift_train_reload_and_export_refused(work):
    needs("swift", "swift")
    out = work["root"] / "swift_out"
    shipped = shipped_config("swift_hydralora.yaml")
    cfg = write_yaml(work["root"] / "swift.yaml", {**shipped,
        "model": work["base"], "model_type": "llama", "template": "default", "dataset": work["chat"],
        "max_length": 128, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4,
        "learning_rate": 0.01, "warmup_ratio": 0, "logging_steps": 1, "save_steps": 4, "output_dir": str(out),
        "torch_dtype": "float32", "dataloader_num_workers": 0, "report_to": "none",
    })  # fmt: skip
    rc, log = run([os.path.join(BIN, "peft-hydra-swift"), "sft", cfg], cwd=work["root"])
    assert rc == 0, log[-5000:]
    [logfile] = glob.glob(str(out / "*" / "logging.jsonl"))
    with open(logfile, encoding="utf-8") as f:
        check_log([json.loads(line) for line in f if line.strip()], shipped["num_experts"])
    [ckpt] = glob.glob(str(out / "*" / "checkpoint-4"))
    check_saved(ckpt, shipped["lora_rank"], shipped["lora_alpha"], shipped["num_experts"],
                shipped["router_aux_loss_coef"])  # fmt: skip
    check_reload(work["base"], ckpt)

    rc, log = run(["swift", "export", "--adapters", ckpt, "--merge_lora", "true",
                   "--output_dir", str(work["root"] / "swift_merged")], cwd=work["root"])  # fmt: skip
    assert rc != 0 and MERGE_REFUSED in log, log[-3000:]
    assert not os.path.exists(work["root"] / "swift_merged" / "model.safetensors")


def test_swift_wrapper_arguments(work):
    needs("swift", "swift")
    from peft_hydra.frameworks import ms_swift

    args, options = ms_swift.swift_argv(["sft", "--model", "m", "--dataset", work["data"], "--num_experts", "auto",
                                         "--router_aux_loss_coef", "0.01", "--hydra_preset", "paper",
                                         "--lora_rank", "16", "--external_plugins", "mine.py"])  # fmt: skip
    assert isinstance(options["num_experts"], int) and options["num_experts"] >= 1
    assert (options["router_aux_loss_coef"], options["hydra_preset"], options["lora_explicit"]) == (
        0.01, "paper", ["lora_rank"])
    assert "--num_experts" not in args and "--hydra_preset" not in args
    i = args.index("--external_plugins")
    assert args[i + 1 : i + 3] == ["mine.py", ms_swift.__file__]
    assert args[args.index("--tuner_type") + 1] == "hydralora" and args[args.index("--callbacks") + 1] == "hydralora"
    assert json.loads(args[args.index("--gradient_checkpointing_kwargs") + 1]) == {"use_reentrant": False}
    args, options = ms_swift.swift_argv(["infer", "--adapters", "ckpt"])
    assert (args, options) == (["infer", "--adapters", "ckpt"], {})
    with pytest.raises(SystemExit, match="apply to training"):
        ms_swift.swift_argv(["export", "--adapters", "ckpt", "--num_experts", "3"])


# ------------------------------------------------------------------------------------------------ LLaMA-Factory
def test_llamafactory_train_reload_and_merge_refused(work):
    needs("llamafactory", "llamafactory")
    out = work["root"] / "llamafactory_out"
    data = write_yaml(work["root"] / "llamafactory_data.yaml",
                      {"train": {**shipped_config("llamafactory_data.yaml")["train"], "path": work["data"]}})
    shipped = shipped_config("llamafactory_hydralora.yaml")
    peft_config = {**shipped["peft_config"], "num_experts": "auto"}
    cfg = write_yaml(work["root"] / "llamafactory.yaml", {**shipped,
        "model": work["base"], "train_dataset": data, "peft_config": peft_config, "output_dir": str(out),
        "micro_batch_size": 4, "global_batch_size": 4, "cutoff_len": 128, "learning_rate": 0.01, "max_steps": 4,
        "logging_steps": 1, "batching_workers": 0,
    })  # fmt: skip
    rc, log = run([os.path.join(BIN, "peft-hydra-llamafactory"), "sft", cfg], cwd=work["root"])
    assert rc == 0, log[-5000:]
    n = int(re.search(r"num_experts auto: N = (\d+)", log).group(1))
    with open(out / "trainer_log.jsonl", encoding="utf-8") as f:
        check_log([json.loads(line) for line in f if line.strip()], n)
    check_saved(out, peft_config["r"], peft_config["lora_alpha"], n, peft_config["router_aux_loss_coef"])
    check_reload(work["base"], str(out))

    merged = work["root"] / "llamafactory_merged"
    cfg = write_yaml(work["root"] / "llamafactory_merge.yaml", {
        "model": work["base"], "template": "chatml",
        "peft_config": {"name": "lora", "adapter_name_or_path": str(out), "export_dir": str(merged)}})
    rc, log = run(["llamafactory-cli", "merge", cfg], cwd=work["root"], USE_V1="1")
    assert rc != 0 and MERGE_REFUSED in log, log[-3000:]
    assert not os.path.exists(merged / "model.safetensors")


def test_llamafactory_config_options():
    needs("llamafactory", "llamafactory")
    from peft_hydra.frameworks import llamafactory as plugin

    model = make_tiny_llama()
    preset = plugin.hydra_config(model, {"name": "hydralora", "preset": "paper", "num_experts": 2})
    assert (preset.r, preset.num_experts, preset.target_modules) == (4, 2, {"gate_proj", "up_proj", "down_proj"})
    default = plugin.hydra_config(model, {"name": "hydralora", "top_k": 1, "router_temperature": 2.0})
    assert (default.target_modules, default.top_k, default.router_temperature) == ("all-linear", 1, 2.0)
    with pytest.raises(ValueError, match=r"unknown HydraLoRA option\(s\) \['use_dora'\]"):
        plugin.hydra_config(model, {"name": "hydralora", "use_dora": True})


# ----------------------------------------------------------------------------------------------- the docs (main suite)
def test_docs_show_the_shipped_configs():
    """docs/training.md shows each framework's config of configs/ as it is (the one the tests above train from)."""
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), flags=re.S)
    for name in CONFIGS:
        with open(os.path.join(ROOT, "configs", name), encoding="utf-8") as f:
            assert f.read() in blocks, f"docs/training.md does not show configs/{name} as it is"
