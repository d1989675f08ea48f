"""`peft-hydra train` (src/peft_hydra/sft.py): TRL's SFT script with a HydraLoRA adapter, on a tiny Llama with a
byte-level tokenizer saved to a folder (no Hub).

One run goes through the installed console script under `accelerate launch` (two processes, fresh interpreters, as a
user runs it); the others call `sft.main` / `sft.build_trainer` in this process.
"""

from __future__ import annotations

import importlib.util
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

from conftest import CHAT_TEMPLATE, byte_tokenizer, make_tiny_llama  # noqa: E402

from peft_hydra import HydraLoraConfig, sft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = {  # three kinds of instruction with different words, so that --num_experts auto has clusters to find
    "add": ("Add {a} and {b}.", lambda a, b: a + b),
    "times": ("What is the product of {a} times {b}?", lambda a, b: a * b),
    "bigger": ("Which number is bigger, {a} or {b}? Answer with that number", max),
}
#: Options of every in-process run: short sequences, a log per step, a learning rate that moves a tiny model.
FAST = ["--max_length", "64", "--logging_steps", "1", "--learning_rate", "3e-2", "--disable_tqdm", "true"]


def _save_base(path, chat_template=None):
    tokenizer = byte_tokenizer(chat_template)
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


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", _records())


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def _ids(text="Add 3 and 4.\n"):
    return byte_tokenizer()(text, return_tensors="pt")["input_ids"]


def _assert_trained_adapter(base_dir, out):
    """The saved adapter loads with plain PEFT onto the base model and changes its outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_hydra

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = _logits(base, _ids())
    model = PeftModel.from_pretrained(base, str(out))
    assert isinstance(model.base_model, peft_hydra.HydraLoraModel)
    after = _logits(model, _ids())
    assert (after - before).abs().max() > 1e-3  # the trained adapter, not the identity it starts as
    return after


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_script_under_accelerate_ddp(base_dir, data_file, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate_ddp.yaml peft-hydra train ...` with 2 CPU processes (gloo),
    the installed console script and the option names of earlier releases: data parallel, --num-experts auto finds
    the three kinds of instruction, router statistics in the logs, the adapter + card + tokenizer saved and loading
    with AutoPeftModelForCausalLM as docs/training.md shows."""
    pytest.importorskip("sklearn")
    pytest.importorskip("accelerate")
    shipped = open(os.path.join(ROOT, "configs", "accelerate_ddp.yaml")).read()
    assert "\nuse_cpu: false\n" in shipped
    launch_config = tmp_path / "ddp_cpu.yaml"  # the shipped DDP config, with its documented CPU setting
    launch_config.write_text(shipped.replace("\nuse_cpu: false\n", "\nuse_cpu: true\n"))
    out = tmp_path / "out" / "adapter"
    script = os.path.join(os.path.dirname(sys.executable), "peft-hydra")
    script = [script] if os.path.exists(script) else ["-m", "peft_hydra.cli"]  # the console script, else the module
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
           "--main_process_port", str(_free_port()), *script,
           "train", "--model", base_dir, "--data", data_file, "--output-dir", str(out), "--num-experts", "auto",
           "--router-aux-loss-coef", "0.01", "--target-modules", "q_proj,v_proj,up_proj", "--max-steps", "6",
           "--batch-size", "4", "--lr", "3e-2", "--lr-scheduler-type", "constant", "--logging-steps", "1",
           "--max-length", "64", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in proc.stdout  # data parallel, not two separate trainings
    n = len(TASKS)
    assert f"--num_experts auto: N = {n} from 48 texts (clear" in proc.stdout

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["log_history"][0]["epoch"] == pytest.approx(8 / 48)  # 2 ranks x 4
    logs = [h for h in state["log_history"] if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # it learns (answer tokens of 3 simple tasks)
    for log in logs:  # router statistics with every training log; the balance loss is on
        gates = [log[f"router_gate_{i}"] for i in range(n)]
        assert abs(sum(gates) - 1) < 1e-3 and math.isfinite(log["router_entropy"]) and log["router_aux_loss"] > 0

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYDRALORA" and config["num_experts"] == n
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "up_proj"} and config["router_aux_loss_coef"] == 0.01
    card = (out / "README.md").read_text()
    assert "hydralora" in card and "import peft_hydra" in card and "Training with `peft-hydra train`" in card
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).decode([3 + 40]) == byte_tokenizer().decode([3 + 40])
    after = _assert_trained_adapter(base_dir, out)

    monkeypatch.chdir(tmp_path)  # docs/training.md's loading snippet, as written there
    import peft_hydra  # registers the HydraLoRA PEFT type
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained("out/adapter")
    assert isinstance(model.base_model, peft_hydra.HydraLoraModel)
    assert torch.allclose(_logits(model, _ids()), after, atol=1e-5)


ALPACA = [{"instruction": "Sum these.", "input": "2 3", "output": "5"}, {"instruction": "Say hi.", "input": "",
          "output": "hi"}, {"instruction": "Add 1 and 1.", "input": "", "output": "2"}] * 4  # fmt: skip
DOLLY = [{"instruction": "Who wrote it?", "context": "Ada wrote it.", "response": "Ada"},
         {"instruction": "Name a colour.", "context": "", "response": "blue"}] * 6  # fmt: skip


def _data(kind, root):
    """Training data of each kind a user has, written as a user writes it; returns (path, tokenizer has a template)."""
    import datasets

    recs = _records(12)
    if kind == "text":
        return _jsonl(root / "t.jsonl", [{"text": r["instruction"] + " " + r["output"]} for r in recs]), False
    if kind == "messages":
        return _jsonl(root / "m.jsonl", [{"messages": [{"role": "user", "content": r["instruction"]},
                                                       {"role": "assistant", "content": r["output"]}]}
                                         for r in recs]), True  # fmt: skip
    if kind == "prompt_completion":
        return _jsonl(root / "pc.jsonl", [{"prompt": r["instruction"] + "\n", "completion": r["output"]}
                                          for r in recs]), False  # fmt: skip
    if kind == "alpaca_json_list":
        return _write(root / "alpaca.json", json.dumps(ALPACA)), False
    if kind == "dolly_chat":
        return _jsonl(root / "dolly.jsonl", DOLLY), True
    if kind == "jsonl_folder":
        _jsonl(root / "folder" / "train.jsonl", recs)
        return str(root / "folder"), False
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(root / "saved"))
        return str(root / "saved"), False
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "messages", "prompt_completion", "alpaca_json_list", "dolly_chat",
                                  "jsonl_folder", "save_to_disk"])  # fmt: skip
def test_each_data_format_trains_and_the_adapter_reloads(kind, base_dir, chat_base_dir, tmp_path):
    data, chat = _data(kind, tmp_path)
    base = chat_base_dir if chat else base_dir
    out = tmp_path / "out"
    rc = sft.main(["--model_name_or_path", base, "--dataset_name", data, "--output_dir", str(out), "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--num_experts", "2", *FAST])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "adapter_config.json").read_text())["num_experts"] == 2
    _assert_trained_adapter(base, out)


def test_instruction_context_rows_become_prompt_completion():
    """Alpaca's 'input' / Dolly's 'context' next to 'instruction' joins the prompt (after a blank line), not dropped;
    without a chat template the prompt ends in a newline, with one the pair becomes a user and an assistant turn."""
    from datasets import Dataset

    plain = sft.to_trl_format(Dataset.from_list(ALPACA[:2]), byte_tokenizer(), sft.TrainArguments(), "text")
    assert plain[0] == {"prompt": "Sum these.\n\n2 3\n", "completion": "5"} and plain[1]["prompt"] == "Say hi.\n"
    chat = sft.to_trl_format(Dataset.from_list(DOLLY[:1]), byte_tokenizer(CHAT_TEMPLATE), sft.TrainArguments(), "text")
    assert chat[0] == {"prompt": [{"role": "user", "content": "Who wrote it?\n\nAda wrote it."}],
                       "completion": [{"role": "assistant", "content": "Ada"}]}  # fmt: skip
    named = sft.to_trl_format(Dataset.from_list([{"q": "Why?", "a": "So."}]), byte_tokenizer(),
                              sft.TrainArguments(prompt_field="q", answer_field="a", prompt_template="Q: {prompt}\nA:"),
                              "text")  # fmt: skip
    assert named[0] == {"prompt": "Q: Why?\nA:", "completion": "So."}


def test_trl_sft_yaml(base_dir, data_file, tmp_path):
    """configs/trl_sft.yaml, TRL's `trl sft` keys plus HydraLoRA's: ModelConfig's LoRA keys and the HydraLoRA keys
    reach the HydraLoraConfig, SFTConfig's reach the trainer, and the command line wins over the file."""
    trainer = sft.build_trainer(["--config", os.path.join(ROOT, "configs", "trl_sft.yaml"), "--model_name_or_path",
                                 base_dir, "--dataset_name", data_file, "--output_dir", str(tmp_path / "o"),
                                 "--lora_r", "4", "--max_steps", "1"])  # fmt: skip
    config, args = trainer.model.peft_config["default"], trainer.args
    assert (config.r, config.lora_alpha, config.lora_dropout, config.num_experts) == (4, 16, 0.05, 3)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"} and config.router_aux_loss_coef == 0.001
    assert getattr(args, "router_aux_loss_coef", None) is None  # TRL's own (for a Mixture-of-Experts base) unset
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (2e-4, "cosine", 0.03)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (4, 2, 1)
    # a YAML in the option names of earlier releases of the command still works
    old = _write(tmp_path / "old.yaml", f"model: {base_dir}\ndata: {data_file}\noutput-dir: {tmp_path / 'o2'}\n"
                 "num_experts: 2\nr: 2\nbatch-size: 2\nepochs: 2\ntarget-modules: q_proj,v_proj\n")  # fmt: skip
    trainer = sft.build_trainer(["--config", old])
    config = trainer.model.peft_config["default"]
    assert (config.r, config.num_experts, config.target_modules) == (2, 2, {"q_proj", "v_proj"})
    assert (trainer.args.per_device_train_batch_size, trainer.args.num_train_epochs) == (2, 2.0)


def test_hydralora_options_reach_the_config(base_dir, data_file, tmp_path):
    """HydraLoraConfig's own options from the command line (lists and mappings as JSON) and the YAML (as YAML)."""
    trainer = sft.build_trainer(["--model", base_dir, "--data", data_file, "--output_dir", str(tmp_path / "o"),
                                 "--num_experts", "2", "--top_k", "1", "--router_temperature", "0.5", "--head_init",
                                 "centered", "--router_aux_loss_coef", "0.01", "--router_aux_loss_warmup_steps", "3",
                                 "--layers_to_transform", "[1]", "--rank_pattern", '{"q_proj": 2}',
                                 "--no-completion-only-loss", "--eval_strategy", "steps", "--dataset_test_split",
                                 "train"])  # fmt: skip
    config = trainer.model.peft_config["default"]
    assert (config.top_k, config.router_temperature, config.head_init, config.router_aux_loss_coef) == (
        1, 0.5, "centered", 0.01)  # fmt: skip
    assert (config.router_aux_loss_warmup_steps, config.layers_to_transform, config.rank_pattern) == (
        3, [1], {"q_proj": 2})  # fmt: skip
    adapted = {n.split(".hydra_")[0] for n, _ in trainer.model.named_parameters() if ".hydra_" in n}
    assert adapted and all(".layers.1." in n for n in adapted)
    assert trainer.args.completion_only_loss is False and len(trainer.eval_dataset) == 48
    cfg = _write(tmp_path / "c.yaml", f"model: {base_dir}\ndata: {data_file}\noutput_dir: {tmp_path / 'o2'}\n"
                 "num_experts: 2\nfixed_gates: [0.25, 0.75]\nexclude_modules: [down_proj]\n")  # fmt: skip
    config = sft.build_trainer(["--config", cfg]).model.peft_config["default"]
    assert config.fixed_gates == [0.25, 0.75] and config.exclude_modules == {"down_proj"}


def test_paper_preset_and_explicit_options(chat_base_dir, data_file, tmp_path):
    """--preset paper: HydraLoraConfig.paper_preset() and the authors' training arguments; explicit options win, on
    the command line and in a config file."""
    trainer = sft.build_trainer(["--model", chat_base_dir, "--data", data_file, "--output_dir", str(tmp_path / "o"),
                                 "--preset", "paper", "--max_steps", "1", "--max_length", "48"])  # fmt: skip
    args, config = trainer.args, trainer.model.peft_config["default"]
    paper = HydraLoraConfig.paper_preset()
    for name in ("r", "lora_alpha", "lora_dropout", "num_experts", "target_modules", "dropout_per_head", "task_type"):
        assert getattr(config, name) == getattr(paper, name), name
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.num_train_epochs) == (2e-4, 0.03, 0.0, 1.0)
    assert args.lr_scheduler_type == "cosine" and args.bf16 and args.seed == 41
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 8)
    assert args.max_length == 48  # explicit option over the preset's 1024
    # the tokenizer has a chat template: instruction/output became conversational prompt-completion, answer tokens only
    row = trainer.train_dataset[0]
    n_masked = row["completion_mask"].count(0) if "completion_mask" in row else row["labels"].count(-100)  # TRL 1.0
    assert 0 < n_masked < len(row["input_ids"]) and len(row["input_ids"]) - n_masked >= len(_records()[0]["output"])
    assert math.isfinite(trainer.train().training_loss)  # one optimizer step of 8 bf16 micro-batches on CPU
    assert next(p for p in trainer.model.parameters() if not p.requires_grad).dtype == torch.bfloat16

    cfg = _write(tmp_path / "c.yaml", "preset: paper\nlora_r: 2\nnum_experts: 2\nbf16: false\n")
    trainer = sft.build_trainer(["--config", cfg, "--model", chat_base_dir, "--data", data_file, "--output_dir",
                                 str(tmp_path / "o2"), "--grad-accum", "2"])  # fmt: skip
    config = trainer.model.peft_config["default"]
    assert (config.r, config.num_experts, config.lora_alpha, config.dropout_per_head) == (2, 2, 32, True)
    assert (trainer.args.bf16, trainer.args.gradient_accumulation_steps, trainer.args.seed) == (False, 2, 41)


def test_qlora_4bit(base_dir, data_file, tmp_path):
    """--load_in_4bit: NF4 (nested quantization) base layers under the HydraLoRA layers; a training step."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_hydra.bnb import Linear4bit

    trainer = sft.build_trainer(["--model", base_dir, "--data", data_file, "--output_dir", str(tmp_path / "o"),
                                 "--load_in_4bit", "--num_experts", "2", "--max_steps", "2", "--lora_target_modules",
                                 "q_proj", "down_proj", *FAST])  # fmt: skip
    layers = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 4 and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    quant = trainer.model.base_model.model.config.quantization_config
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert math.isfinite(trainer.train().training_loss)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items() if "hydra_B" in n)


def _write_gguf(path):
    """A tiny Llama and its byte-level tokenizer (with a chat template) as an F32 GGUF file, tensors in llama.cpp's
    layout (q/k permuted, as its converter writes them); returns the model."""
    import gguf
    import numpy as np

    tok = byte_tokenizer(CHAT_TEMPLATE)
    model = make_tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=96)
    c, w = model.config, gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings), w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps), w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_vocab_size(c.vocab_size), w.add_tokenizer_model("gpt2"), w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab)), w.add_token_scores([0.0] * len(vocab)), w.add_token_merges([])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(0), w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        t = t.numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if heads:
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(t))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model


def test_gguf_model(tmp_path):
    """--gguf_file: the model de-quantized on load (transformers would otherwise keep it marked as GGUF-quantized and
    the Trainer refuse it), the tokenizer and its chat template read from the same file; Dolly rows train."""
    pytest.importorskip("gguf")
    (tmp_path / "m").mkdir()
    base = _write_gguf(tmp_path / "m" / "tiny.gguf")
    trainer = sft.build_trainer(["--model", str(tmp_path / "m"), "--gguf_file", "tiny.gguf", "--data",
                                 _jsonl(tmp_path / "dolly.jsonl", DOLLY), "--output_dir", str(tmp_path / "o"),
                                 "--max_steps", "2", "--num_experts", "2", *FAST])  # fmt: skip
    assert trainer.processing_class.chat_template == CHAT_TEMPLATE
    assert trainer.train_dataset[0]["input_ids"][:3] == byte_tokenizer()("<|user|>")["input_ids"][:3]  # chat turns
    ids = _ids()
    assert torch.allclose(_logits(trainer.model, ids), _logits(base, ids), atol=1e-5)  # the same model, adapter at 0
    assert math.isfinite(trainer.train().training_loss)
    assert (_logits(trainer.model, ids) - _logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_option", "unknown option 'lerning_rate' (did you mean learning_rate"),
        ("unknown_config_key", "unknown --config file key 'lerning_rate' (did you mean learning_rate"),
        ("missing_config", "--config 'nope.yaml': no such file"),
        ("missing_data_file", "'nope.jsonl': no such file. Fix the path."),
        ("no_data", "no training data: give --dataset_name"),
        ("bad_line", "could not be loaded"),
        ("unknown_fields", "are in none of TRL's formats ('text', 'messages', 'prompt' + 'completion'): name them"),
        ("missing_field", "the data has no field 'question' (its fields: instruction, output)"),
        ("empty_answer", "field 'output' must be a non-empty string"),
        ("unknown_preset", "unknown preset 'authors': use one of none, paper"),
        ("messages_without_template", "needs a tokenizer with a chat template"),
        ("bad_num_experts", "--num_experts must be a positive integer or 'auto', got 'many'"),
        ("bad_adapter_value", "HydraLoraConfig.router_temperature must be > 0"),
        ("dora", "--use_dora and --lora_target_parameters are LoRA options HydraLoRA does not have"),
    ],
)
def test_bad_input_is_named_with_its_fix(case, message, base_dir, data_file, tmp_path, capsys):
    data, extra = data_file, []
    if case == "unknown_option":
        extra = ["--lerning_rate", "1e-3"]
    elif case == "unknown_config_key":
        extra = ["--config", _write(tmp_path / "c.yaml", "lerning_rate: 0.001\n")]
    elif case == "missing_config":
        extra = ["--config", "nope.yaml"]
    elif case == "missing_data_file":
        data = "nope.jsonl"
    elif case == "no_data":
        data = ""
    elif case == "bad_line":
        data = _write(tmp_path / "b.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n')
    elif case == "unknown_fields":
        data = _jsonl(tmp_path / "u.jsonl", [{"q": "a", "a": "b"}])
    elif case == "missing_field":
        extra = ["--prompt_field", "question", "--answer_field", "output"]
    elif case == "empty_answer":
        data = _jsonl(tmp_path / "n.jsonl", [{"instruction": "a", "output": ""}])
    elif case == "unknown_preset":
        extra = ["--config", _write(tmp_path / "c.yaml", "preset: authors\n")]
    elif case == "messages_without_template":
        data = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    elif case == "bad_num_experts":
        extra = ["--num_experts", "many"]
    elif case == "bad_adapter_value":
        extra = ["--router_temperature", "0"]
    elif case == "dora":
        extra = ["--use_dora"]
    rc = sft.main(["--model", base_dir, "--data", data, "--output_dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "peft-hydra train: error: " in err and message in err, err
    assert not (tmp_path / "o").exists()  # nothing trained or written


def test_num_experts_auto_without_scikit_learn(base_dir, data_file, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    rc = sft.main(["--model", base_dir, "--data", data_file, "--output_dir", str(tmp_path / "o"),
                   "--num_experts", "auto"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "needs scikit-learn" in err and "pip install 'peft-hydra[compare]'" in err


def test_help_lists_hydralora_options_with_their_config_help(capsys):
    """Every HydraLoraConfig field is an option (its own, a ModelConfig lora_* one, or router_aux_loss_coef), with
    the help HydraLoraConfig gives it."""
    import dataclasses

    from peft.config import PeftConfig

    with pytest.raises(SystemExit) as e:
        sft.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    carried = {v: k for k, v in sft.LORA_OPTIONS.items()}
    for f in dataclasses.fields(HydraLoraConfig):
        if f.name in base or f.name == "target_parameters":
            continue
        assert f"--{carried.get(f.name, f.name)} " in text, f.name
        if f.name not in carried:
            assert " ".join(f.metadata["help"].split()) in text, f.name
