"""`peft-hydra train` (src/peft_hydra/sft.py): TRL SFTTrainer fine-tuning from a JSONL file, end to end on a tiny
Llama with a byte-level tokenizer saved to a folder (no Hub).

One run goes through the installed console script in a fresh interpreter (as a user runs it); the others call the
command's functions in this process, to keep the module's time low on the 2-core CI machine.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import make_tiny_llama  # noqa: E402

from peft_hydra import HydraLoraConfig, sft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A chat template without generation markers, enough for TRL's conversational formats.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TASKS = {  # three kinds of instruction with different words, so that --num-experts auto has clusters to find
    "add": ("Add {a} and {b}.", lambda a, b: a + b),
    "times": ("What is the product of {a} times {b}?", lambda a, b: a * b),
    "bigger": ("Which number is bigger, {a} or {b}? Answer with that number", max),
}


def _byte_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        out.chat_template = chat_template
    return out


def _save_base(path, chat_template=None):
    tokenizer = _byte_tokenizer(chat_template)
    tokenizer.save_pretrained(path)
    # hidden 64: a multiple of bitsandbytes' 4-bit block size, for the QLoRA test
    make_tiny_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and its byte-level tokenizer (no chat template), saved as a user's model folder."""
    return _save_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def chat_base_dir(tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp("tiny_chat"), CHAT_TEMPLATE)


def _records(n=48, seed=0):
    import random

    rng = random.Random(seed)
    names = list(TASKS)
    out = []
    for i in range(n):
        template, fn = TASKS[names[i % 3]]
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"instruction": template.format(a=a, b=b), "output": str(fn(a, b))})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return str(path)


def _options(base, data, out, *extra):
    return sft.resolve_options(["--model", base, "--data", data, "--output-dir", str(out), "--max-length", "64",
                                "--logging-steps", "1", *extra])  # fmt: skip


def _script():
    """The installed console script (`peft-hydra`), else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "peft-hydra")
    return [script] if os.path.exists(script) else ["-m", "peft_hydra.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_command_end_to_end_under_accelerate_ddp(base_dir, data_file, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate_ddp.yaml peft-hydra train ...` with 2 CPU processes (gloo),
    the installed console script, fresh interpreters: trains, logs router statistics, saves adapter + card +
    tokenizer, reloads."""
    pytest.importorskip("sklearn")
    pytest.importorskip("accelerate")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_hydra

    shipped = open(os.path.join(ROOT, "configs", "accelerate_ddp.yaml")).read()
    assert "\nuse_cpu: false\n" in shipped
    launch_config = tmp_path / "ddp_cpu.yaml"  # the shipped DDP config, with its documented CPU setting
    launch_config.write_text(shipped.replace("\nuse_cpu: false\n", "\nuse_cpu: true\n"))
    out = tmp_path / "out" / "adapter"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
           "--main_process_port", str(_free_port()), *_script(), "train", "--model", base_dir, "--data", data_file,
           "--output-dir", str(out), "--num-experts", "auto", "--router-aux-loss-coef", "0.01",
           "--target-modules", "q_proj,v_proj,up_proj", "--max-steps", "6", "--batch-size", "4", "--lr", "3e-2",
           "--lr-scheduler-type", "constant", "--logging-steps", "1", "--max-length", "64", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loss on the answer tokens only" in proc.stdout

    summary = json.loads((out / "train_summary.json").read_text())
    assert "2 process(es), DDP" in proc.stdout  # data parallel, not two separate trainings
    assert summary["steps"] == 6 and summary["log_history"][0]["epoch"] == pytest.approx(8 / 48)  # 2 ranks x 4
    losses = summary["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # it learns (answer tokens of 3 simple tasks)
    # --num-experts auto: suggest_num_experts over the training texts finds the three kinds of instruction
    n = len(TASKS)
    assert summary["adapter"]["num_experts"] == n and f"--num-experts auto: N = {n} from 48 texts (clear" in proc.stdout
    for log in (h for h in summary["log_history"] if "loss" in h):  # router statistics with every training log
        gates = [log[f"router_gate_{i}"] for i in range(n)]
        assert abs(sum(gates) - 1) < 1e-3 and math.isfinite(log["router_entropy"]) and log["router_aux_loss"] > 0

    card = (out / "README.md").read_text()
    assert "hydralora" in card and "import peft_hydra" in card and "Training with `peft-hydra train`" in card
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYDRALORA" and set(config["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    assert AutoTokenizer.from_pretrained(out).decode([3 + 40]) == _byte_tokenizer().decode([3 + 40])

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = _byte_tokenizer()("Add 3 and 4.\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(out)).eval()
        after = model(ids).logits
    assert isinstance(model.base_model, peft_hydra.HydraLoraModel)
    assert (after - before).abs().max() > 1e-3  # the trained adapter, not the identity it starts as

    monkeypatch.chdir(tmp_path)  # docs/training.md's loading snippet, as written there
    import peft_hydra  # registers the HydraLoRA PEFT type
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained("out/adapter")
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, after, atol=1e-5)


def test_paper_preset_and_overrides(chat_base_dir, data_file, tmp_path):
    """--preset paper: HydraLoraConfig.paper_preset() and the authors' training arguments; explicit options win."""
    trainer, info = sft.build_trainer(_options(chat_base_dir, data_file, tmp_path, "--preset", "paper", "--max-steps",
                                               "1", "--max-length", "48"))  # fmt: skip
    args, config = trainer.args, trainer.model.peft_config["default"]
    paper = HydraLoraConfig.paper_preset()
    assert (config.r, config.lora_alpha, config.num_experts, config.lora_dropout) == (4, 32, 4, 0.05)
    assert set(config.target_modules) == set(paper.target_modules) and config.dropout_per_head
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.num_train_epochs) == (2e-4, 0.03, 0.0, 1.0)
    assert args.lr_scheduler_type == "cosine" and args.bf16 and args.seed == 41
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 8)
    assert args.max_length == 48  # explicit option over the preset's 1024
    # the tokenizer has a chat template: prompt/answer become conversational prompt-completion, answer tokens only
    assert "chat format" in info["data"]
    row = trainer.train_dataset[0]
    n_masked = sum(1 for label in row["labels"] if label == -100)
    answer = _records()[0]["output"]
    assert 0 < n_masked < len(row["labels"]) and len(row["labels"]) - n_masked >= len(answer)
    result = trainer.train()  # one optimizer step of 8 bf16 micro-batches on CPU
    assert math.isfinite(result.training_loss)
    assert next(p for p in trainer.model.parameters() if not p.requires_grad).dtype == torch.bfloat16

    options = _options(chat_base_dir, data_file, tmp_path, "--preset", "paper", "--r", "2", "--num-experts", "2",
                       "--no-bf16", "--grad-accum", "2")  # fmt: skip
    assert sft.adapter_config(options, options["num_experts"]).r == 2
    assert (options["bf16"], options["grad_accum"], options["learning_rate"]) == (False, 2, 2e-4)


def test_plain_prompt_masking_and_config_file(base_dir, data_file, tmp_path):
    """Without a chat template the prompt is '{prompt}\\n' + answer; its tokens are masked; a JSON config file works."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"model": base_dir, "data": data_file, "output-dir": str(tmp_path / "o"),
                               "num_experts": 2, "max_steps": 1, "max_length": 64}))  # fmt: skip
    trainer, info = sft.build_trainer(sft.resolve_options(["--config", str(cfg), "--batch-size", "2"]))
    assert "plain format" in info["data"] and trainer.args.per_device_train_batch_size == 2
    assert trainer.model.peft_config["default"].num_experts == 2
    tok = _byte_tokenizer()
    rec = _records()[0]
    n_prompt = len(tok(rec["instruction"] + "\n")["input_ids"])
    row = trainer.train_dataset[0]
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == tok(rec["output"])["input_ids"] + [tok.eos_token_id]


def test_qlora_4bit(base_dir, data_file, tmp_path):
    """--load-in-4bit: NF4 base layers (bitsandbytes CPU backend) under the HydraLoRA layers; a training step."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_hydra.bnb import Linear4bit

    trainer, _ = sft.build_trainer(_options(base_dir, data_file, tmp_path, "--load-in-4bit", "--num-experts", "2",
                                            "--max-steps", "2", "--batch-size", "4", "--target-modules",
                                            "q_proj,down_proj"))  # fmt: skip
    layers = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 4 and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items() if "hydra_B" in n)


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "is empty"),
        ("bad_line", "line 2 is not valid JSON"),
        ("missing_field", "has no field 'question'"),
        ("unknown_fields", "cannot tell the prompt and answer apart"),
        ("empty_answer", "field 'output' must be a non-empty string"),
        ("unknown_preset", "unknown preset 'authors'"),
        ("unknown_config_key", "unknown option 'lerning_rate'"),
        ("messages_without_template", "needs a tokenizer with a chat template"),
    ],
)
def test_bad_input_errors(case, message, base_dir, data_file, tmp_path, capsys):
    data, extra = data_file, []
    if case == "empty":
        data = _write(tmp_path / "e.jsonl", "\n")
    elif case == "bad_line":
        data = _write(tmp_path / "b.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n')
    elif case == "missing_field":
        extra = ["--prompt-field", "question", "--answer-field", "output"]
    elif case == "unknown_fields":
        data = _write(tmp_path / "u.jsonl", '{"q": "a", "a": "b"}\n')
    elif case == "empty_answer":
        data = _write(tmp_path / "n.jsonl", '{"instruction": "a", "output": ""}\n')
    elif case in ("unknown_preset", "unknown_config_key"):
        key = {"unknown_preset": "preset", "unknown_config_key": "lerning_rate"}[case]
        extra = ["--config", _write(tmp_path / "c.json", json.dumps({key: "authors"}))]
    elif case == "messages_without_template":
        data = _write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rc = sft.main(["--model", base_dir, "--data", data, "--output-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "peft-hydra train: error: " in err and message in err, err
    assert "Loading weights" not in err  # the data are checked before the model is loaded
    assert not (tmp_path / "o").exists()


def test_num_experts_auto_without_scikit_learn(base_dir, data_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    rc = sft.main(["--model", base_dir, "--data", data_file, "--output-dir", str(tmp_path / "o"),
                   "--num-experts", "auto"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "needs scikit-learn" in err and "pip install 'peft-hydra[compare]'" in err


def test_cli_lists_train_and_rejects_bad_values(capsys):
    from peft_hydra.cli import USAGE, main

    assert "train" in USAGE
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "m", "--data", "d", "--output-dir", "o", "--num-experts", "0"])
    assert e.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err


def test_alpaca_and_dolly_context_joins_the_prompt():
    """Alpaca's 'input' / Dolly's 'context' next to 'instruction' is part of the prompt, not silently dropped."""
    from datasets import Dataset

    options = {**sft.DEFAULTS, "format": "plain"}
    alpaca = Dataset.from_list([{"instruction": "Sum these.", "input": "2 3", "output": "5"},
                                {"instruction": "Say hi.", "input": "", "output": "hi"}])  # fmt: skip
    ds, texts, summary = sft.to_sft_dataset(alpaca, _byte_tokenizer(), options)
    assert [r["prompt"] for r in ds] == ["Sum these.\n\n2 3\n", "Say hi.\n"] and "context 'input'" in summary
    dolly = Dataset.from_list([{"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada"}])
    ds, texts, _ = sft.to_sft_dataset(dolly, _byte_tokenizer(), options)
    assert ds[0]["prompt"] == "Who?\n\nAda wrote it.\n" and ds[0]["completion"] == "Ada"
    assert texts == ["Who?\n\nAda wrote it.\nAda"]
