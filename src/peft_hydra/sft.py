"""``peft-hydra train``: supervised fine-tuning of a causal LM with a HydraLoRA adapter through TRL's ``SFTTrainer``.

The command (``peft-hydra train --help`` lists every option; docs/training.md has examples)::

    peft-hydra train --model PATH_OR_ID --data FILE_OR_DATASET --output-dir OUT [--preset paper] [options]
    accelerate launch --config_file configs/accelerate_ddp.yaml -m peft_hydra.cli train ...

What it does, in order:

1. Reads the options (command line > ``--config`` file > ``--preset`` > defaults, see :data:`DEFAULTS`).
2. Loads the training data: a JSON / JSONL file, a ``datasets`` folder written by ``save_to_disk``, or a dataset name
   for ``datasets.load_dataset``. Records are prompt/answer pairs (fields configurable; the prompt tokens are masked
   from the loss, TRL's ``completion_only_loss``), chat ``messages`` (TRL's conversational format) or plain ``text``.
3. Chooses N (``--num-experts auto``: :func:`peft_hydra.suggest_num_experts` over the training texts).
4. Loads the model (``--bf16``; ``--load-in-4bit``: QLoRA, bitsandbytes NF4 + ``prepare_model_for_kbit_training``),
   builds the :class:`~peft_hydra.HydraLoraConfig` and hands both to ``SFTTrainer``, which wraps the model.
5. :func:`peft_hydra.prepare_trainer` adds the router balance loss and logs router statistics; trains; saves the
   adapter (with its model card) and the tokenizer to ``--output-dir`` on the main process.

TRL, ``datasets`` and ``accelerate`` (the ``[train]`` extra) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from typing import Any, Optional

__all__ = ["DEFAULTS", "PAPER_TRAINING", "TrainError", "build_parser", "build_trainer", "main", "resolve_options", "train"]

INSTALL_HINT = "pip install 'peft-hydra[train]'"
#: import name -> distribution of the [train] extra (setup.cfg)
TRAIN_EXTRA = {"trl": "trl", "datasets": "datasets", "accelerate": "accelerate"}
PRESETS = ("none", "paper")

#: Training defaults without a preset (adapter defaults: those of HydraLoraConfig).
DEFAULTS: dict[str, Any] = dict(
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03, weight_decay=0.0, epochs=1.0, max_steps=None,
    batch_size=4, grad_accum=1, max_length=1024, seed=42, bf16=False, logging_steps=10, save_steps=None,
    gradient_checkpointing=False, load_in_4bit=False, format="auto", prompt_template=None, data_split="train",
    data_config=None, max_examples=None, completion_only_loss=True, auto_max_texts=2000, num_experts=None,
)  # fmt: skip

#: The HydraLoRA authors' training arguments (``HydraLoraConfig.paper_preset`` docstring: ``HydraLoRA/fine-tuning.sh``
#: and ``fine-tuning.py``), in this command's option names. Their 4-GPU script multiplies the batch by 4 processes.
PAPER_TRAINING: dict[str, Any] = dict(
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03, weight_decay=0.0, epochs=1.0, bf16=True,
    batch_size=1, grad_accum=8, max_length=1024, seed=41,
)  # fmt: skip

#: Options that belong to the adapter (HydraLoraConfig fields), in option names.
ADAPTER_OPTIONS = ("r", "lora_alpha", "lora_dropout", "num_experts", "target_modules", "router_aux_loss_coef", "top_k")

#: Optional fields appended to an 'instruction' prompt (Alpaca's 'input', Dolly's 'context') unless --context-field.
CONTEXT_FIELDS = ("input", "context")
#: (prompt field, answer field) pairs recognised without --prompt-field / --answer-field, in this order.
KNOWN_PAIRS = (
    ("prompt", "completion"), ("prompt", "answer"), ("prompt", "response"), ("instruction", "output"),
    ("instruction", "response"), ("question", "answer"), ("input", "output"),
)  # fmt: skip


class TrainError(ValueError):
    """Bad input to ``peft-hydra train``; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------------- options
def _num_experts(value: str):
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value!r}")
    return n


def _modules(value: str):
    if value == "all-linear":
        return value
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give module names separated by commas, e.g. q_proj,v_proj, or all-linear")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-hydra train",
        description="Fine-tune a causal LM with a HydraLoRA adapter (TRL SFTTrainer). Options given on the command "
        "line override the --config file, which overrides --preset, which overrides the defaults.",
        argument_default=None,
    )
    S = argparse.SUPPRESS  # unset options stay absent, so that presets and the config file can fill them
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="base model: a local folder or a Hugging Face model id (required)")
    g.add_argument("--gguf-file", default=S, help="load the model and tokenizer from this GGUF file inside --model")
    g.add_argument("--tokenizer", default=S, help="tokenizer folder or id (default: --model)")
    g.add_argument("--data", default=S, help="training data (required): a .json/.jsonl file, a folder written by "
                   "datasets' save_to_disk, or a dataset name for datasets.load_dataset")  # fmt: skip
    g.add_argument("--data-split", default=S, help="split of a dataset dict / load_dataset (default: train)")
    g.add_argument("--data-config", default=S, help="configuration name for datasets.load_dataset")
    g.add_argument("--prompt-field", default=S, help="field holding the prompt (default: detected from "
                   + ", ".join("/".join(pair) for pair in KNOWN_PAIRS) + ")")  # fmt: skip
    g.add_argument("--answer-field", default=S, help="field holding the answer (default: detected, see --prompt-field)")
    g.add_argument("--context-field", default=S, help="optional field appended to the prompt after a blank line "
                   "(default: 'input' or 'context' when the prompt field is 'instruction', as in Alpaca / Dolly)")
    g.add_argument("--messages-field", default=S, help="field holding chat messages (default: messages)")
    g.add_argument("--text-field", default=S, help="field holding plain text (loss on every token; default: text)")
    g.add_argument("--format", choices=("auto", "plain", "chat"), default=S,
                   help="prompt/answer rendering: 'chat' through the tokenizer's chat template, 'plain' as prompt "
                   "template + answer; auto (default): chat when the tokenizer has a chat template")  # fmt: skip
    g.add_argument("--prompt-template", default=S, help="template of the prompt, with {prompt} (default: '{prompt}\\n' "
                   "for plain, '{prompt}' for chat)")  # fmt: skip
    g.add_argument("--no-completion-only-loss", dest="completion_only_loss", action="store_false", default=S,
                   help="prompt/answer data: compute the loss on the prompt tokens too (default: answer tokens only)")
    g.add_argument("--max-examples", type=int, default=S, help="use only the first N training examples")

    g = p.add_argument_group("adapter (HydraLoraConfig)")
    g.add_argument("--preset", choices=PRESETS, default=S,
                   help="'paper': the HydraLoRA authors' adapter (HydraLoraConfig.paper_preset) and training "
                   "arguments (lr 2e-4, cosine, warmup 0.03, 1 epoch, bf16, batch 1 x 8 accumulation, length 1024, "
                   "seed 41)")  # fmt: skip
    g.add_argument("--r", type=int, default=S, help="rank of A and of each B head")
    g.add_argument("--lora-alpha", type=float, default=S, help="scaling numerator (scaling = alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=S, help="dropout on the adapter input")
    g.add_argument("--num-experts", type=_num_experts, default=S,
                   help="N, the number of B heads, or 'auto': peft_hydra.suggest_num_experts over the training texts "
                   "(needs scikit-learn: pip install 'peft-hydra[compare]')")  # fmt: skip
    g.add_argument("--auto-max-texts", type=int, default=S,
                   help="--num-experts auto clusters at most this many training texts, a seeded sample (default 2000)")
    g.add_argument("--target-modules", type=_modules, default=S,
                   help="comma-separated module names or 'all-linear' (default: HydraLoraConfig's, the attention "
                   "and MLP projections of Llama-like models)")  # fmt: skip
    g.add_argument("--router-aux-loss-coef", type=float, default=S, help="weight of the router balance loss (0 = off)")
    g.add_argument("--top-k", type=int, default=S, help="keep the k largest gates per token (default: dense)")

    g = p.add_argument_group("training (SFTConfig)")
    g.add_argument("--output-dir", default=S, help="where the adapter, its model card and the tokenizer are saved "
                   "(required)")  # fmt: skip
    g.add_argument("--config", default=S, help="a YAML or JSON file of these options (keys as the option names, "
                   "with - or _)")  # fmt: skip
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=S)
    g.add_argument("--lr-scheduler-type", default=S, help="transformers scheduler name (default: cosine)")
    g.add_argument("--warmup-ratio", type=float, default=S, help="warm-up fraction of the steps, in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--epochs", type=float, default=S, help="training epochs (default 1)")
    g.add_argument("--max-steps", type=int, default=S, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=S, help="per-device (per-process) batch size")
    g.add_argument("--grad-accum", type=int, default=S, help="gradient-accumulation steps")
    g.add_argument("--max-length", type=int, default=S, help="truncate tokenised examples to this many tokens")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=S,
                   help="bfloat16 model weights and mixed precision (default: off; on with --preset paper)")
    g.add_argument("--load-in-4bit", action="store_true", default=S,
                   help="QLoRA: load the base model in 4-bit NF4 with bitsandbytes (double quantization)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=S)
    g.add_argument("--logging-steps", type=int, default=S, help="log loss and router statistics every N steps")
    g.add_argument("--save-steps", type=int, default=S, help="also save a checkpoint every N steps (default: only "
                   "the final adapter)")  # fmt: skip
    return p


def _load_config_file(path: str, known: set[str]) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise TrainError(f"--config {path!r}: no such file. Give a YAML or JSON file of options.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainError(f"--config {path!r} is not valid JSON: {e}.") from None
    else:
        try:
            import yaml
        except ImportError:
            raise TrainError(
                f"--config {path!r}: reading YAML needs pyyaml (pip install pyyaml, or 'peft-hydra[compare]'); "
                "or write the options as a .json file."
            ) from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TrainError(f"--config {path!r} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise TrainError(f"--config {path!r} must hold a mapping of option names to values, got {type(values).__name__}.")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config":
            raise TrainError(
                f"--config {path!r}: unknown option {key!r}. Known options: {', '.join(sorted(known - {'config'}))}."
            )
        out[name] = value
    return out


def resolve_options(argv: list[str]) -> dict[str, Any]:
    """All options as one dict: command line > --config file > --preset > :data:`DEFAULTS`."""
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    known = {a.dest for a in parser._actions if a.dest != "help"}
    from_file = _load_config_file(cli["config"], known) if "config" in cli else {}
    merged = {**from_file, **cli}
    preset = merged.get("preset", "none")
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}.")
    options = {**DEFAULTS, **(PAPER_TRAINING if preset == "paper" else {}), **merged, "preset": preset}
    for name in ("model", "data", "output_dir"):
        if not options.get(name):
            raise TrainError(f"--{name.replace('_', '-')} is required (on the command line or in the --config file).")
    if options["num_experts"] is not None and not isinstance(options["num_experts"], int):
        options["num_experts"] = _num_experts(str(options["num_experts"]))
    if isinstance(options.get("target_modules"), str):
        options["target_modules"] = _modules(options["target_modules"])
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "auto_max_texts"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {options[name]!r}.")
    if not 0.0 <= float(options["warmup_ratio"]) < 1.0:
        raise TrainError(f"--warmup-ratio must be in [0, 1), got {options['warmup_ratio']!r}.")
    return options


# ---------------------------------------------------------------------------------------------------------- data
def _read_json_records(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise TrainError(f"--data {path!r} is empty: it needs one JSON object per line (JSONL) or a JSON list of "
                         "objects, e.g. {\"prompt\": \"...\", \"answer\": \"...\"}.")  # fmt: skip
    stripped = text.lstrip()
    if path.endswith(".json") and stripped[:1] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines after all
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise TrainError(f"--data {path!r} holds a JSON object; expected a list of records (or an object "
                                 "with exactly one list of records).")  # fmt: skip
            data = lists[0]
        if data is not None:
            return data
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TrainError(f"--data {path!r} line {i} is not valid JSON ({e.msg}): each line of a JSONL file must "
                             "be one JSON object.") from None  # fmt: skip
    return records


def load_records(options: dict[str, Any]):
    """The training data as a ``datasets.Dataset`` (columns as in the source)."""
    import datasets

    source, split = options["data"], options["data_split"]
    if os.path.isfile(source):
        if not source.endswith((".json", ".jsonl")):
            raise TrainError(f"--data {source!r}: a file must be .json or .jsonl (or give a datasets folder / name).")
        records = _read_json_records(source)
        bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
        if bad:
            raise TrainError(f"--data {source!r}: record {bad[0] + 1} is a {type(records[bad[0]]).__name__}, not an "
                             "object; every record must be a JSON object of fields.")  # fmt: skip
        if not records:
            raise TrainError(f"--data {source!r} holds no records.")
        ds = datasets.Dataset.from_list(records)
    elif os.path.isdir(source):
        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError as e:
            raise TrainError(f"--data {source!r} is a folder but not one written by datasets' save_to_disk ({e}). "
                             "Give a .json/.jsonl file, a save_to_disk folder or a dataset name.") from None  # fmt: skip
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise TrainError(f"--data {source!r} has splits {sorted(ds)}, not {split!r}: pass --data-split.")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, options["data_config"], split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is kept
            raise TrainError(f"--data {source!r} is neither a file nor a folder, and datasets.load_dataset could not "
                             f"load it: {type(e).__name__}: {e}") from None  # fmt: skip
    if options["max_examples"]:
        ds = ds.select(range(min(int(options["max_examples"]), len(ds))))
    if len(ds) == 0:
        raise TrainError(f"--data {source!r} (split {split!r}) has no examples.")
    return ds


def detect_format(columns: list[str], options: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """('pair', (prompt, answer)) | ('messages', (field,)) | ('text', (field,)), or a TrainError naming the fix."""
    prompt, answer = options.get("prompt_field"), options.get("answer_field")
    if prompt or answer:
        if not (prompt and answer):
            raise TrainError("give both --prompt-field and --answer-field (or neither, to detect them).")
        missing = [f for f in (prompt, answer) if f not in columns]
        if missing:
            raise TrainError(f"the data has no field {missing[0]!r} (its fields: {', '.join(columns)}): fix "
                             "--prompt-field / --answer-field.")  # fmt: skip
        return "pair", (prompt, answer)
    for name, kind in (("messages_field", "messages"), ("text_field", "text")):
        if options.get(name):
            if options[name] not in columns:
                raise TrainError(f"the data has no field {options[name]!r} (its fields: {', '.join(columns)}): fix "
                                 f"--{name.replace('_', '-')}.")  # fmt: skip
            return kind, (options[name],)
    for pair in KNOWN_PAIRS:
        if all(f in columns for f in pair):
            return "pair", pair
    if "messages" in columns:
        return "messages", ("messages",)
    if "text" in columns:
        return "text", ("text",)
    known = ", ".join("/".join(p) for p in KNOWN_PAIRS)
    raise TrainError(f"cannot tell the prompt and answer apart: the data has fields {', '.join(columns)}. Name them "
                     f"with --prompt-field and --answer-field (recognised without them: {known}; or 'messages' for "
                     "chat data, 'text' for plain text).")  # fmt: skip


def _context_field(columns: list[str], fields: tuple[str, ...], options: dict[str, Any]) -> Optional[str]:
    """The field appended to the prompt: --context-field, else 'input'/'context' next to an 'instruction' prompt."""
    explicit = options.get("context_field")
    if explicit:
        if explicit not in columns:
            raise TrainError(f"the data has no field {explicit!r} (its fields: {', '.join(columns)}): fix "
                             "--context-field.")  # fmt: skip
        return explicit
    if fields[0] != "instruction":
        return None
    return next((c for c in CONTEXT_FIELDS if c in columns and c not in fields), None)


def _check_messages(messages, index: int) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise TrainError(f"example {index + 1}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": "
                         f"...}} objects with string values, got {messages!r:.200}.")  # fmt: skip


def to_sft_dataset(ds, tokenizer, options: dict[str, Any]):
    """The dataset in one of TRL's formats and the texts for ``--num-experts auto``: ``(dataset, texts, summary)``.

    prompt/answer -> TRL prompt-completion (``completion_only_loss`` masks the prompt): conversational through the
    tokenizer's chat template (``--format chat``) or plain strings (``--format plain``); messages -> TRL
    conversational; text -> TRL language modelling."""
    kind, fields = detect_format(list(ds.column_names), options)
    fmt = options["format"]
    if kind == "pair":
        if fmt == "auto":
            fmt = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise TrainError("--format chat needs a tokenizer with a chat template; this one has none. Use --format "
                             "plain (prompt template + answer) or a tokenizer with a chat template.")  # fmt: skip
        template = options["prompt_template"] or ("{prompt}\n" if fmt == "plain" else "{prompt}")
        if "{prompt}" not in template:
            raise TrainError(f"--prompt-template must contain {{prompt}}, got {template!r}.")
        prompt_field, answer_field = fields
        context_field = _context_field(list(ds.column_names), fields, options)
        rows, texts = [], []
        for i, rec in enumerate(ds):
            p, a = rec[prompt_field], rec[answer_field]
            for name, value in ((prompt_field, p), (answer_field, a)):
                if not isinstance(value, str) or not value.strip():
                    raise TrainError(f"example {i + 1}: field {name!r} must be a non-empty string, got {value!r:.80}. "
                                     "Fix or drop that record.")  # fmt: skip
            context = rec[context_field] if context_field else None
            if context is not None and not isinstance(context, str):
                raise TrainError(f"example {i + 1}: field {context_field!r} must be a string, got {context!r:.80}.")
            if context and context.strip():
                p = f"{p}\n\n{context}"
            prompt = template.replace("{prompt}", p)
            if fmt == "chat":
                rows.append({"prompt": [{"role": "user", "content": prompt}],
                             "completion": [{"role": "assistant", "content": a}]})  # fmt: skip
            else:
                rows.append({"prompt": prompt, "completion": a})
            texts.append(p + "\n" + a)
        with_context = f" (+ context {context_field!r})" if context_field else ""
        summary = f"prompt/answer fields {prompt_field!r}{with_context}/{answer_field!r}, {fmt} format, " + (
            "loss on the answer tokens only" if options["completion_only_loss"] else "loss on prompt and answer"
        )
    elif kind == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise TrainError("chat 'messages' data needs a tokenizer with a chat template; this one has none. Use a "
                             "chat model's tokenizer (--tokenizer) or prompt/answer data.")  # fmt: skip
        rows, texts = [], []
        for i, rec in enumerate(ds):
            _check_messages(rec[fields[0]], i)
            rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in rec[fields[0]]]})
            texts.append("\n".join(m["content"] for m in rec[fields[0]]))
        summary = f"chat messages (field {fields[0]!r}), loss on every token"
    else:
        rows, texts = [], []
        for i, rec in enumerate(ds):
            if not isinstance(rec[fields[0]], str) or not rec[fields[0]].strip():
                raise TrainError(f"example {i + 1}: field {fields[0]!r} must be a non-empty string.")
            rows.append({"text": rec[fields[0]]})
            texts.append(rec[fields[0]])
        summary = f"plain text (field {fields[0]!r}), loss on every token"
    import datasets

    return datasets.Dataset.from_list(rows), texts, summary


def choose_num_experts(texts: list[str], options: dict[str, Any], log) -> Optional[int]:
    """N from the options; ``auto``: :func:`peft_hydra.suggest_num_experts` over (a seeded sample of) ``texts``."""
    if options["num_experts"] != "auto":
        return options["num_experts"]
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise TrainError("--num-experts auto needs scikit-learn (peft_hydra.suggest_num_experts clusters the training "
                         "texts): pip install 'peft-hydra[compare]'; or give a number, e.g. --num-experts 3.")  # fmt: skip
    from .heads import suggest_num_experts

    limit = int(options["auto_max_texts"])
    sample = texts if len(texts) <= limit else random.Random(options["seed"]).sample(texts, limit)
    if len(set(sample)) < 3:
        raise TrainError(f"--num-experts auto needs at least 3 distinct training texts, got {len(set(sample))}; give "
                         "a number instead, e.g. --num-experts 3.")  # fmt: skip
    k_max = min(10, len(set(sample)))
    if k_max < 3:
        raise TrainError("--num-experts auto needs at least 3 distinct training texts; give --num-experts N.")
    n, curve = suggest_num_experts(sample, k_max=k_max, random_state=options["seed"], return_curve=True)
    log(f"--num-experts auto: N = {n} from {len(sample)} texts ({curve['reason']})")
    return n


# ---------------------------------------------------------------------------------------------------------- model
def adapter_config(options: dict[str, Any], num_experts: Optional[int]):
    from .config import HydraLoraConfig

    overrides = {k: options[k] for k in ADAPTER_OPTIONS if k != "num_experts" and options.get(k) is not None}
    if num_experts is not None:
        overrides["num_experts"] = num_experts
    if options["preset"] == "paper":
        return HydraLoraConfig.paper_preset(**overrides)
    return HydraLoraConfig(task_type="CAUSAL_LM", **overrides)


def load_tokenizer(options: dict[str, Any]):
    from transformers import AutoTokenizer

    source = options.get("tokenizer") or options["model"]
    kw = {"gguf_file": options["gguf_file"]} if options.get("gguf_file") and not options.get("tokenizer") else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise TrainError(f"the tokenizer of {source!r} has neither a pad nor an EOS token; give a tokenizer with "
                         "one (--tokenizer).")  # fmt: skip
    return tokenizer


def load_model(options: dict[str, Any]):
    """The base model: bf16 or fp32 weights; ``--load-in-4bit``: NF4 (double quantization) + PEFT's
    ``prepare_model_for_kbit_training`` (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if options["bf16"] else torch.float32
    kw: dict[str, Any] = {"dtype": dtype}
    if options.get("gguf_file"):
        if options["load_in_4bit"]:
            raise TrainError("--gguf-file and --load-in-4bit cannot be combined (transformers de-quantizes a GGUF file "
                             "on load): drop one of them.")  # fmt: skip
        kw["gguf_file"] = options["gguf_file"]
        import transformers

        if hasattr(transformers, "GgufConfig"):  # transformers 5: otherwise the model stays marked as GGUF-quantized
            kw["quantization_config"] = transformers.GgufConfig(dequantize=True)  # and the Trainer refuses to train it
    if options["load_in_4bit"]:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError("--load-in-4bit needs bitsandbytes: pip install 'bitsandbytes>=0.47'.")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kw["device_map"] = _device_map()
    model = AutoModelForCausalLM.from_pretrained(options["model"], **kw)
    if options["load_in_4bit"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options["gradient_checkpointing"])
    return model


def _device_map():
    """A quantized model is loaded onto this process's device (accelerate's LOCAL_RANK under a launcher)."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def _has_accelerator() -> bool:
    import torch

    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _warmup(ratio: float) -> dict[str, float]:
    """transformers 5 takes the warm-up ratio as ``warmup_steps`` (a float in [0, 1)); 4.x has ``warmup_ratio``."""
    import dataclasses

    from transformers import TrainingArguments

    has_ratio = any(f.name == "warmup_ratio" for f in dataclasses.fields(TrainingArguments))
    return {"warmup_ratio": ratio} if has_ratio else {"warmup_steps": ratio}


def sft_config(options: dict[str, Any], completion_only: Optional[bool]):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=options["output_dir"],
        learning_rate=float(options["learning_rate"]),
        lr_scheduler_type=options["lr_scheduler_type"],
        **_warmup(float(options["warmup_ratio"])),
        weight_decay=float(options["weight_decay"]),
        num_train_epochs=float(options["epochs"]),
        max_steps=int(options["max_steps"]) if options["max_steps"] else -1,
        per_device_train_batch_size=int(options["batch_size"]),
        gradient_accumulation_steps=int(options["grad_accum"]),
        max_length=int(options["max_length"]),
        seed=int(options["seed"]),
        bf16=bool(options["bf16"]),  # TRL's SFTConfig defaults to bf16=True; the command decides
        # Without an accelerator say so: transformers then accepts bf16 (CPU autocast) and, under a launcher (accelerate
        # launch / torchrun with WORLD_SIZE > 1), sets up CPU data parallelism (gloo) instead of one process per rank.
        use_cpu=not _has_accelerator(),
        gradient_checkpointing=bool(options["gradient_checkpointing"]),
        logging_steps=int(options["logging_steps"]),
        save_strategy="steps" if options["save_steps"] else "no",
        save_steps=int(options["save_steps"] or 500),
        completion_only_loss=completion_only,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


# ----------------------------------------------------------------------------------------------------------- main
def missing_train_extra() -> list[str]:
    """The distributions of the [train] extra that are not installed."""
    import importlib.util

    return [dist for module, dist in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


def _logger():
    main_process = int(os.environ.get("RANK", "0")) == 0

    def log(message: str) -> None:
        if main_process:
            print(f"[peft-hydra train] {message}", flush=True)

    return log


def build_trainer(options: dict[str, Any]):
    """The ``SFTTrainer`` of the command, HydraLoRA model built and :func:`peft_hydra.prepare_trainer` applied, and a
    dict describing the run (``data``, ``examples``, ``adapter_layers``, ``trainable_parameters``)."""
    from trl import SFTTrainer

    from .integrations import prepare_trainer, unwrap_hydra_tuner

    log = _logger()
    tokenizer = load_tokenizer(options)  # the data are checked before the (possibly large) model is loaded
    dataset, texts, data_summary = to_sft_dataset(load_records(options), tokenizer, options)
    log(f"data: {len(dataset)} examples from {options['data']!r}: {data_summary}")
    config = adapter_config(options, choose_num_experts(texts, options, log))
    model = load_model(options)
    completion_only = bool(options["completion_only_loss"]) if "prompt" in dataset.column_names else None
    trainer = SFTTrainer(model=model, args=sft_config(options, completion_only), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=config)  # fmt: skip
    n_layers = sum(1 for _ in unwrap_hydra_tuner(trainer.model)._hydra_layers())
    if n_layers == 0:
        raise TrainError(f"no layer of {options['model']!r} matched target modules {config.target_modules}: fix "
                         "--target-modules.")  # fmt: skip
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    log(f"adapter: HydraLoRA r={config.r} lora_alpha={config.lora_alpha} N={config.num_experts} on {n_layers} layers "
        f"({targets}), router_aux_loss_coef={config.router_aux_loss_coef}, {trainable} trainable parameters; preset "
        f"{options['preset']}; {trainer.args.world_size} process(es), {_parallelism(trainer)}")  # fmt: skip
    _warn_ignored_launcher_setting(trainer, log)
    prepare_trainer(trainer)
    info = {"data": data_summary, "examples": len(dataset), "adapter_layers": n_layers,
            "trainable_parameters": trainable}  # fmt: skip
    return trainer, info


def _parallelism(trainer) -> str:
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return "DDP" if trainer.args.world_size > 1 else "single process"


def _warn_ignored_launcher_setting(trainer, log) -> None:
    """accelerate runs an FSDP / DeepSpeed launch config as plain DDP when it cannot use them (FSDP on CPU): say so."""
    for env, name, active, why in (
        ("ACCELERATE_USE_FSDP", "FSDP", "is_fsdp_enabled", " (accelerate runs FSDP only on GPUs)"),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", "is_deepspeed_enabled", ""),
    ):
        asked = os.environ.get(env, "").lower() in ("1", "true", "yes")
        if asked and not getattr(trainer, active, False):
            log(f"WARNING: the launch config asks for {name} ({env}), but the Trainer runs as "
                f"{_parallelism(trainer)}{why}.")  # fmt: skip


_CARD_BEGIN = "<!-- peft-hydra train: begin -->"
_CARD_END = "<!-- peft-hydra train: end -->"


def _add_training_section(path: str, options: dict[str, Any], summary: dict[str, Any]) -> None:
    """A 'Training' section in the adapter's model card: the command's settings and the final loss (idempotent)."""
    import re

    config = summary["adapter"]
    lines = [
        _CARD_BEGIN, "## Training with `peft-hydra train`", "",
        f"HydraLoRA adapter (shared A, {config['num_experts']} routed B heads, r={config['r']}, "
        f"lora_alpha={config['lora_alpha']}, router_aux_loss_coef={config['router_aux_loss_coef']}) trained with TRL's "
        f"SFTTrainer; preset `{options['preset']}`.", "",
        f"- data: `{options['data']}`, {summary['examples']} examples ({summary['data']})",
        f"- steps: {summary['steps']}, learning rate {options['learning_rate']} ({options['lr_scheduler_type']}, warm-up "
        f"{options['warmup_ratio']}), batch {options['batch_size']} x {options['grad_accum']} accumulation per process, "
        f"max length {options['max_length']}, seed {options['seed']}, bf16 {bool(options['bf16'])}, 4-bit "
        f"{bool(options['load_in_4bit'])}",
        f"- final training loss: {summary['train_loss']:.4f}",
        _CARD_END,
    ]  # fmt: skip
    block = "\n".join(lines)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if _CARD_BEGIN in text and _CARD_END in text:
        text = re.sub(re.escape(_CARD_BEGIN) + r".*?" + re.escape(_CARD_END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def train(options: dict[str, Any]) -> dict[str, Any]:
    """Run the whole command; returns a summary (also written to ``OUTPUT_DIR/train_summary.json``)."""
    log = _logger()
    trainer, info = build_trainer(options)
    result = trainer.train()
    trainer.save_model(options["output_dir"])  # the adapter and its model card (only the main process writes)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    last = next((h for h in reversed(history) if "loss" in h), {})
    config = next(iter(trainer.model.peft_config.values()))
    summary = {
        **info, "output_dir": options["output_dir"], "preset": options["preset"], "steps": trainer.state.global_step,
        "train_loss": result.training_loss, "losses": losses,
        "adapter": {k: getattr(config, k) for k in ("r", "lora_alpha", "num_experts", "router_aux_loss_coef")},
        "last_router_log": {k: v for k, v in last.items() if k.startswith("router_")}, "log_history": history,
    }  # fmt: skip
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(options["output_dir"])
        from .standalone.card import write_model_card

        write_model_card(trainer.model, options["output_dir"])  # PEFT's card + the HydraLoRA usage snippet
        card = os.path.join(options["output_dir"], "README.md")
        if os.path.exists(card):
            _add_training_section(card, options, summary)
        with open(os.path.join(options["output_dir"], "train_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
        finite = all(math.isfinite(x) for x in losses)
        log(f"done: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}"
            f"{'' if finite else ' (NON-FINITE losses logged)'}; adapter, model card and tokenizer in "
            f"{options['output_dir']}")  # fmt: skip
    return summary


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        missing = missing_train_extra()
        if missing:
            print(f"peft-hydra train: needs the training extra (missing: {', '.join(missing)}): {INSTALL_HINT}",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        options = resolve_options(argv)
        train(options)
    except TrainError as e:
        print(f"peft-hydra train: error: {e}", file=sys.stderr)
        return 2
    return 0
