"""``peft-hydra train``: TRL's SFT script (``trl/scripts/sft.py``) with a HydraLoRA adapter.

TRL's ``trl sft`` builds only a ``LoraConfig``. This command takes its options and its YAML (``--config``, read by
``TrlParser``) plus HydraLoraConfig's fields, and hands ``SFTTrainer`` a :class:`~peft_hydra.HydraLoraConfig`.
Precedence: command line > ``--config`` file > ``--preset`` > :data:`DEFAULTS`. Data in TRL's formats is used as it is;
prompt/answer pairs in other fields become prompt-completion (:func:`pairs_to_prompt_completion`). TRL, ``datasets``
and ``accelerate`` (the ``[train]`` extra) are imported only when the command runs. docs/training.md has the details.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import random
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["DEFAULTS", "PAPER_TRAINING", "TrainArguments", "TrainError", "build_parser", "build_trainer", "main",
           "pairs_to_prompt_completion"]  # fmt: skip

INSTALL_HINT = "pip install 'peft-hydra[train]'"
#: import name -> distribution of the [train] extra (setup.cfg)
TRAIN_EXTRA = {"trl": "trl", "datasets": "datasets", "accelerate": "accelerate"}
PRESETS = ("none", "paper")

#: This command's defaults where they differ from TRL's (TRL's SFT defaults are for full fine-tuning).
DEFAULTS: dict[str, Any] = dict(
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1.0,
    per_device_train_batch_size=4, gradient_checkpointing=None, bf16=False, dtype=None, use_bnb_nested_quant=True,
)  # fmt: skip
#: The HydraLoRA authors' training arguments (``HydraLoraConfig.paper_preset``'s docstring: ``HydraLoRA/fine-tuning.sh``
#: and ``fine-tuning.py``); their 4-GPU script multiplies the batch by 4 processes. The adapter: ``paper_preset()``.
PAPER_TRAINING: dict[str, Any] = dict(
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, num_train_epochs=1.0,
    bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=8, max_length=1024, seed=41,
)  # fmt: skip
#: ModelConfig's LoRA options that mean the same for HydraLoRA -> the HydraLoraConfig field they set.
LORA_OPTIONS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
                "use_rslora": "use_rslora", "lora_task_type": "task_type"}  # fmt: skip
#: Option names of earlier releases of this command -> the option they set.
OLD_NAMES = {"model": "model_name_or_path", "data": "dataset_name", "data_split": "dataset_train_split",
             "data_config": "dataset_config", "text_field": "dataset_text_field", "tokenizer": "tokenizer_name_or_path",
             "r": "lora_r", "target_modules": "lora_target_modules", "lr": "learning_rate",
             "epochs": "num_train_epochs",
             "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
             "warmup_ratio": "warmup_steps"}  # fmt: skip
#: Prompt/answer field pairs turned into TRL's prompt-completion format without --prompt_field / --answer_field.
KNOWN_PAIRS = (("prompt", "answer"), ("prompt", "response"), ("instruction", "output"), ("instruction", "response"),
               ("question", "answer"), ("input", "output"))  # fmt: skip
#: Data file extension -> the datasets builder that reads it.
DATA_FILES = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
#: Optional fields joined to an 'instruction' prompt (Alpaca's 'input', Dolly's 'context') unless --context_field.
CONTEXT_FIELDS = ("input", "context")


class TrainError(ValueError):
    """Bad input to ``peft-hydra train``; the message names the problem and the fix."""


@dataclass
class TrainArguments:
    """What ``peft-hydra train`` adds to TRL's script arguments."""

    _argument_group_name = "peft-hydra train: model and data"
    gguf_file: Optional[str] = field(default=None, metadata={"help": "Load the model and tokenizer from this GGUF "
                                     "file inside --model_name_or_path (de-quantized on load)."})  # fmt: skip
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    max_examples: Optional[int] = field(default=None, metadata={"help": "Train on the first N examples only."})
    prompt_field: Optional[str] = field(default=None, metadata={"help": "Field of the prompt, for data that is not in "
                                        "a TRL format (default: detected, e.g. instruction/output)."})  # fmt: skip
    answer_field: Optional[str] = field(default=None, metadata={"help": "Field of the answer (see --prompt_field)."})
    context_field: Optional[str] = field(default=None, metadata={"help": "Field joined to the prompt after a blank "
                                         "line (default: 'input' or 'context' next to 'instruction')."})  # fmt: skip
    messages_field: Optional[str] = field(default=None, metadata={"help": "Field of chat messages (TRL: 'messages')."})
    format: Literal["auto", "plain", "chat"] = field(default="auto", metadata={"help": "Prompt/answer pairs become "
        "'chat' (user and assistant turns) or 'plain' (prompt template + answer) prompt-completion; auto: chat when "
        "the tokenizer has a chat template."})  # fmt: skip
    prompt_template: Optional[str] = field(default=None, metadata={"help": "Template of a prompt with {prompt} "
                                           "(default: '{prompt}\\n' for plain, '{prompt}' for chat)."})  # fmt: skip


def _as_option(hint) -> bool:
    """Whether a HydraLoraConfig field's type is an option type as it is; others are strings read as JSON."""
    return hint in (int, float, str, bool, Optional[int], Optional[float])


def _hydra_arguments(taken: set[str]) -> type:
    """HydraLoraConfig's fields as a dataclass of options (their help, their defaults), less those ModelConfig
    carries and those ``taken`` by TRL (``router_aux_loss_coef`` in SFTConfig since TRL 1.x, which then sets
    HydraLoRA's); types an argument parser cannot take become strings read as JSON."""
    from peft.config import PeftConfig

    from .config import HydraLoraConfig

    hints = typing.get_type_hints(HydraLoraConfig)
    skip = {f.name for f in dataclasses.fields(PeftConfig)} | set(LORA_OPTIONS.values()) | taken
    skip |= {"target_parameters", "num_experts"}  # a LoRA-only field; N is an option of its own (N or 'auto')
    specs: list = [
        ("preset", Literal[PRESETS], field(default="none", metadata={"help": "'paper': the HydraLoRA authors' adapter "
         "(HydraLoraConfig.paper_preset) and training arguments; options given explicitly win."})),
        ("num_experts", Optional[str], field(default=None, metadata={"help": HydraLoraConfig.__dataclass_fields__[
         "num_experts"].metadata["help"] + " Or 'auto': peft_hydra.suggest_num_experts over the training texts."})),
        ("auto_max_texts", int, field(default=2000, metadata={"help": "--num_experts auto clusters at most this many "
         "training texts (a seeded sample)."})),
    ]  # fmt: skip
    for f in dataclasses.fields(HydraLoraConfig):
        if f.name in skip or f.init is False:
            continue
        simple = _as_option(hints[f.name])
        specs.append((f.name, hints[f.name] if simple else Optional[str],
                      field(default=f.default if simple else None,
                            metadata={"help": f.metadata["help"] + ("" if simple else " (JSON or a string)")})))
    cls = dataclasses.make_dataclass("HydraLoraArguments", specs)
    cls._argument_group_name = "HydraLoRA (HydraLoraConfig; r, alpha, dropout, targets: the lora_* options)"
    return cls


def build_parser():
    """TrlParser over TRL's SFT dataclasses, :class:`TrainArguments` and HydraLoraConfig's options; the names of
    earlier releases (:data:`OLD_NAMES`) work on the command line and in a config file."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from .config import HydraLoraConfig

    class Parser(TrlParser):
        config_unknown: list[str] = []  # the config file's keys no option takes ("--key", "value", ...)

        def set_defaults_with_config(self, **kwargs):  # config keys may use - and the old names, as options do
            names = {k: str(k).replace("-", "_") for k in kwargs}
            kwargs = {OLD_NAMES.get(n, n): kwargs[k] for k, n in names.items()}
            self.config_unknown = super().set_defaults_with_config(**kwargs)
            return self.config_unknown

    taken = {f.name for f in dataclasses.fields(SFTConfig)}
    parser = Parser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, TrainArguments,
                     _hydra_arguments(taken)), prog="peft-hydra train")  # fmt: skip
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
        if getattr(action.type, "__name__", "") == "string_to_bool" and action.nargs is None:
            action.nargs, action.const = "?", True  # an optional bool (--bf16) is a flag too, as the others
    if "router_aux_loss_coef" in taken:
        actions["router_aux_loss_coef"].help = HydraLoraConfig.__dataclass_fields__["router_aux_loss_coef"].metadata[
            "help"] + " (HydraLoRA's routers; a Mixture-of-Experts base model keeps its config's own coefficient)"
    for old, new in OLD_NAMES.items():
        if f"--{old}" not in parser._option_string_actions:
            a, names = actions[new], dict.fromkeys([f"--{old}", f"--{old.replace('_', '-')}"])
            parser.add_argument(*names, dest=new, type=a.type, nargs=a.nargs, const=a.const, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)  # fmt: skip
    for flag in ("bf16", "completion_only_loss"):
        parser.add_argument(f"--no-{flag.replace('_', '-')}", dest=flag, action="store_false",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
    defaults = {**DEFAULTS, "use_cpu": not _has_accelerator()}
    defaults.update({k: HydraLoraConfig.__dataclass_fields__[v].default for k, v in LORA_OPTIONS.items()
                     if k in ("lora_r", "lora_alpha", "lora_dropout")})  # fmt: skip
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in actions})  # those this TRL version has
    return parser


def _preset_defaults(argv: list[str]) -> dict[str, Any]:
    """The defaults ``--preset`` (command line or config file) sets: its training arguments and adapter fields."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset")
    peek.add_argument("--config")
    known, _ = peek.parse_known_args(argv)
    if known.config and not os.path.isfile(known.config):
        raise TrainError(f"--config {known.config!r}: no such file. Give a YAML file of options (TRL's format).")
    preset = known.preset
    if preset is None and known.config:
        import yaml

        with open(known.config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        preset = config.get("preset") if isinstance(config, dict) else None
    if preset in (None, "none"):
        return {}
    if preset != "paper":
        raise TrainError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}.")
    from .config import HydraLoraConfig

    paper, default = HydraLoraConfig.paper_preset(), HydraLoraConfig()
    option = {v: k for k, v in LORA_OPTIONS.items()}
    adapter = {option.get(k, k): sorted(v) if isinstance(v, set) else v for k, v in vars(paper).items()
               if v != getattr(default, k) and k in HydraLoraConfig.__dataclass_fields__}  # fmt: skip
    return {**PAPER_TRAINING, **adapter}


def parse(argv: list[str]):
    """``(script, training, model, mixture, train, hydra)`` arguments, or a TrainError naming the fix."""
    parser = build_parser()
    parser.set_defaults(**_preset_defaults(argv))
    try:
        *args, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as e:
        raise TrainError(f"{e}") from None
    known = sorted({s.lstrip("-").replace("-", "_") for s in parser._option_string_actions if s.startswith("--")})
    unknown = [(s, "--config file key") for s in parser.config_unknown[::2]] or [(s, "option") for s in remaining]
    if unknown:
        name, where = unknown[0]
        close = difflib.get_close_matches(name.lstrip("-"), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TrainError(f"unknown {where} {name.lstrip('-')!r}{hint}: `peft-hydra train --help` lists the options "
                         "(TRL's SFTConfig, ModelConfig and ScriptArguments, and HydraLoRA's).")  # fmt: skip
    return args


# ---------------------------------------------------------------------------------------------------------- data
def load_data(script, mixture, train: TrainArguments):
    """``datasets.load_dataset`` over a JSON/JSONL/CSV/Parquet file, a folder (data files, or ``save_to_disk``), a Hub
    name, or TRL's ``datasets:`` mixture; returns the training split."""
    import datasets
    from trl import get_dataset

    name, split = script.dataset_name, script.dataset_train_split
    try:
        if script.dataset_streaming or mixture.streaming:
            raise TrainError("--dataset_streaming / streaming: peft-hydra train reads the data before training "
                             "(format checks, --num_experts auto); drop it, or use SFTTrainer from Python.")
        if mixture.datasets:
            data = get_dataset(mixture)
        elif not name:
            raise TrainError("no training data: give --dataset_name (--data) with a .json/.jsonl file, a folder or a "
                             "Hub dataset name, or `datasets:` in the --config file.")  # fmt: skip
        elif os.path.isfile(name) or name.endswith(tuple("." + e for e in DATA_FILES)):
            if not os.path.isfile(name):
                raise TrainError(f"--dataset_name {name!r}: no such file. Fix the path.")
            builder = DATA_FILES.get(name.rsplit(".")[-1])
            if builder is None:
                raise TrainError(f"--dataset_name {name!r}: a file must be {', '.join(DATA_FILES)}.")
            data = datasets.load_dataset(builder, data_files={split: name})
        elif any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):  # save_to_disk
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, name=script.dataset_config)
    except TrainError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message and its cause are kept
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise TrainError(f"--dataset_name {name!r} could not be loaded: {type(e).__name__}: {e}{cause}. Give a JSON "
                         "file (one object per line, or a list of objects), a folder or a Hub dataset name.") from None
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({split: data})
    if split not in data:
        raise TrainError(f"--dataset_name {name!r} has splits {sorted(data)}, not {split!r}: name one with "
                         "--dataset_train_split.")
    ds = data[split]
    if train.max_examples:
        ds = ds.select(range(min(train.max_examples, len(ds))))
    if len(ds) == 0:
        raise TrainError(f"--dataset_name {name!r} (split {split!r}) has no examples.")
    return ds


def pairs_to_prompt_completion(ds, prompt: str, answer: str, context: Optional[str] = None, chat: bool = False,
                               template: Optional[str] = None):  # fmt: skip
    """Prompt/answer fields as TRL's prompt-completion format: ``context`` (when not empty) joined to the prompt
    after a blank line, the prompt through ``template`` (``{prompt}``; default ``"{prompt}\\n"``, for chat
    ``"{prompt}"``), then a user and an assistant turn (``chat``) or two strings."""
    template = template or ("{prompt}" if chat else "{prompt}\n")
    if "{prompt}" not in template:
        raise TrainError(f"--prompt_template must contain {{prompt}}, got {template!r}.")

    def row(rec, i):
        for name in (prompt, answer):
            if not isinstance(rec[name], str) or not rec[name].strip():
                raise TrainError(f"example {i + 1}: field {name!r} must be a non-empty string, got {rec[name]!r:.80}. "
                                 "Fix or drop that record.")  # fmt: skip
        text = f"{rec[prompt]}\n\n{rec[context]}" if context and rec[context] else rec[prompt]
        text = template.replace("{prompt}", text)
        if chat:
            return {"prompt": [{"role": "user", "content": text}],
                    "completion": [{"role": "assistant", "content": rec[answer]}]}  # fmt: skip
        return {"prompt": text, "completion": rec[answer]}

    return ds.map(row, with_indices=True, remove_columns=ds.column_names)


def to_trl_format(ds, tokenizer, train: TrainArguments, text_field: str):
    """The data in one of TRL's formats: as it is (text, messages, prompt-completion), or prompt/answer pairs through
    :func:`pairs_to_prompt_completion`."""
    from trl.data_utils import is_conversational

    columns = ds.column_names
    named = [f for f in (train.prompt_field, train.answer_field, train.context_field, train.messages_field) if f]
    missing = [f for f in named if f not in columns]
    if missing:
        raise TrainError(f"the data has no field {missing[0]!r} (its fields: {', '.join(columns)}): fix the option "
                         "that names it.")  # fmt: skip
    pair = None
    if train.messages_field:
        ds = ds.rename_column(train.messages_field, "messages") if train.messages_field != "messages" else ds
    elif train.prompt_field or train.answer_field:
        if not (train.prompt_field and train.answer_field):
            raise TrainError("give both --prompt_field and --answer_field (or neither, to detect them).")
        pair = (train.prompt_field, train.answer_field)
    elif not ({"messages", text_field} & set(columns) or {"prompt", "completion"} <= set(columns)):
        pair = next((p for p in KNOWN_PAIRS if set(p) <= set(columns)), None)
        if pair is None:
            raise TrainError(f"the data's fields ({', '.join(columns)}) are in none of TRL's formats ('text', "
                             "'messages', 'prompt' + 'completion'): name them with --prompt_field and --answer_field, "
                             "--messages_field or --dataset_text_field.")  # fmt: skip
    if pair:
        context = train.context_field or next(
            (c for c in CONTEXT_FIELDS if pair[0] == "instruction" and c in columns and c not in pair), None
        )
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if train.format == "chat" and not has_template:
            raise TrainError("--format chat needs a tokenizer with a chat template; this one has none. Use --format "
                             "plain or a tokenizer with a chat template.")  # fmt: skip
        chat = train.format == "chat" or (train.format == "auto" and has_template)
        ds = pairs_to_prompt_completion(ds, *pair, context=context, chat=chat, template=train.prompt_template)
    if is_conversational(ds[0]) and not getattr(tokenizer, "chat_template", None):
        raise TrainError("chat data (lists of messages) needs a tokenizer with a chat template; this one has none. "
                         "Use a chat model's tokenizer (--tokenizer_name_or_path) or plain text.")  # fmt: skip
    return ds


def _texts(ds, text_field: str) -> list[str]:
    """Each example's text (the contents of its messages or fields), for ``--num_experts auto``."""

    def flat(value):
        return "\n".join(m["content"] for m in value) if isinstance(value, list) else str(value)

    fields = [f for f in ("prompt", "completion", "messages", text_field) if f in ds.column_names]
    return ["\n".join(flat(rec[f]) for f in fields) for rec in ds]


def choose_num_experts(value, ds, text_field: str, max_texts: int, seed: int) -> Optional[int]:
    """N from ``--num_experts``; ``auto``: :func:`peft_hydra.suggest_num_experts` over a seeded sample of the
    training texts."""
    if value != "auto":
        try:
            return None if value is None else int(value)
        except ValueError:
            raise TrainError(f"--num_experts must be a positive integer or 'auto', got {value!r}.") from None
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise TrainError("--num_experts auto needs scikit-learn (peft_hydra.suggest_num_experts clusters the "
                         "training texts): pip install 'peft-hydra[compare]'; or give a number, e.g. --num_experts 3.")
    from .heads import suggest_num_experts

    rows = range(len(ds)) if len(ds) <= max_texts else sorted(random.Random(seed).sample(range(len(ds)), max_texts))
    sample = _texts(ds.select(rows), text_field)
    if len(set(sample)) < 3:
        raise TrainError(f"--num_experts auto needs at least 3 distinct training texts, got {len(set(sample))}; give "
                         "a number instead, e.g. --num_experts 3.")  # fmt: skip
    n, curve = suggest_num_experts(sample, k_max=min(10, len(set(sample))), random_state=seed, return_curve=True)
    _log(f"--num_experts auto: N = {n} from {len(sample)} texts ({curve['reason']})")
    return n


# ---------------------------------------------------------------------------------------------------------- model
def adapter_config(model_args, training_args, hydra, num_experts: Optional[int]):
    """The HydraLoraConfig: ModelConfig's LoRA options, ``router_aux_loss_coef`` and the HydraLoRA options."""
    from .config import HydraLoraConfig

    if model_args.use_dora or model_args.lora_target_parameters:
        raise TrainError("--use_dora and --lora_target_parameters are LoRA options HydraLoRA does not have: drop them.")
    values = {v: getattr(model_args, k) for k, v in LORA_OPTIONS.items()}
    targets = values["target_modules"]  # ModelConfig makes one name a string, which PEFT would read as a regex
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.,\s]+", targets):
        values["target_modules"] = [m.strip() for m in targets.split(",") if m.strip()]  # also the old 'a,b' form
    hints = typing.get_type_hints(HydraLoraConfig)
    for name, value in vars(hydra).items():
        if name in ("preset", "num_experts", "auto_max_texts") or value is None:
            continue
        if isinstance(value, str) and not _as_option(hints[name]):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string: a module name, a regex, 'uniform'
        values[name] = value
    if hasattr(training_args, "router_aux_loss_coef"):  # TRL's option sets HydraLoRA's; a Mixture-of-Experts base
        values["router_aux_loss_coef"] = training_args.router_aux_loss_coef or 0.0  # model keeps its config's own
        training_args.router_aux_loss_coef = None
    if num_experts is not None:
        values["num_experts"] = num_experts
    try:
        return HydraLoraConfig(**values)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[peft-hydra train] {message}", flush=True)


def build_trainer(argv: list[str]):
    """The command's ``SFTTrainer``, its HydraLoRA model built and :func:`peft_hydra.prepare_trainer` applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from trl import SFTTrainer, get_quantization_config

    from .callback import prepare_trainer

    script, training_args, model_args, mixture, train, hydra = parse(argv)
    if not model_args.model_name_or_path:
        raise TrainError("--model_name_or_path (--model) is required: a local folder or a Hub model id.")
    model_args.dtype = model_args.dtype or ("bfloat16" if training_args.bf16 else "float32")
    trust = getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False)
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=trust,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
                             **(training_args.model_init_kwargs or {}))  # fmt: skip
    if train.gguf_file and (model_args.load_in_4bit or model_args.load_in_8bit):
        raise TrainError("--gguf_file cannot be combined with --load_in_4bit / --load_in_8bit (transformers "
                         "de-quantizes a GGUF file on load): drop one of them.")  # fmt: skip
    source = train.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model_args.model_revision, trust_remote_code=trust,
            **({"gguf_file": train.gguf_file} if train.gguf_file and not train.tokenizer_name_or_path else {}),
        )  # fmt: skip
    except OSError as e:
        raise TrainError(f"cannot load a tokenizer from {source!r} ({e}): give a local model folder or a Hub model id "
                         "(--model_name_or_path, --tokenizer_name_or_path).") from None  # fmt: skip
    # the data are checked before the (possibly large) model is loaded
    dataset = to_trl_format(load_data(script, mixture, train), tokenizer, train, training_args.dataset_text_field)
    _log(f"data: {len(dataset)} examples from {script.dataset_name!r}, columns {dataset.column_names}")
    n = choose_num_experts(hydra.num_experts, dataset, training_args.dataset_text_field, hydra.auto_max_texts,
                           training_args.seed)  # fmt: skip
    config = adapter_config(model_args, training_args, hydra, n)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_data(dataclasses.replace(script, dataset_train_split=script.dataset_test_split), mixture,
                                 TrainArguments())  # fmt: skip
        eval_dataset = to_trl_format(eval_dataset, tokenizer, train, training_args.dataset_text_field)
    model = model_args.model_name_or_path
    if train.gguf_file:  # TRL reads the model's config without the GGUF file: load it here. transformers 5 keeps a
        # GGUF model marked as quantized (and the Trainer refuses to train it) unless it is de-quantized.
        gguf = dict(gguf_file=train.gguf_file, quantization_config=GgufConfig(dequantize=True))
        model = AutoModelForCausalLM.from_pretrained(model, **gguf, **model_init_kwargs)
    else:
        quantization = get_quantization_config(model_args)  # QLoRA: TRL's own BitsAndBytesConfig from the options
        training_args.model_init_kwargs = {**model_init_kwargs, **({"quantization_config": quantization}
                                                                   if quantization else {})}  # fmt: skip
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=config)  # fmt: skip
    _log(f"adapter: HydraLoRA r={config.r} lora_alpha={config.lora_alpha} N={config.num_experts} on "
         f"{sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules}, "
         f"router_aux_loss_coef={config.router_aux_loss_coef}; preset {hydra.preset}; {trainer.args.world_size} "
         f"process(es), {trainer.accelerator.distributed_type.value}")  # fmt: skip
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not trainer.is_fsdp_enabled:
        _log(f"WARNING: the launch config asks for FSDP, but the Trainer runs as "
             f"{trainer.accelerator.distributed_type.value} (accelerate runs FSDP only on GPUs).")  # fmt: skip
    prepare_trainer(trainer)  # the router balance loss and router statistics in the Trainer's logs
    return trainer


_CARD_BEGIN = "<!-- peft-hydra train -->"


def _add_training_section(path: str, trainer, argv: list[str]) -> None:
    """A 'Training' section in the adapter's model card: the command line and the final loss (replaced on rerun)."""
    with open(path, encoding="utf-8") as f:
        text = f.read().split(_CARD_BEGIN)[0].rstrip()
    loss = next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), float("nan"))
    config = trainer.model.peft_config["default"]
    text += (f"\n\n{_CARD_BEGIN}\n## Training with `peft-hydra train`\n\nHydraLoRA (r={config.r}, "
             f"lora_alpha={config.lora_alpha}, N={config.num_experts}, router_aux_loss_coef="
             f"{config.router_aux_loss_coef}) trained with TRL's SFTTrainer for {trainer.state.global_step} steps, "
             f"final training loss {loss:.4f}:\n\n```\npeft-hydra train {' '.join(argv)}\n```\n")  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def missing_train_extra() -> list[str]:
    """The distributions of the [train] extra that are not installed."""
    import importlib.util

    return [dist for module, dist in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_train_extra()
    if missing:
        print(f"peft-hydra train: needs the training extra (missing: {', '.join(missing)}): {INSTALL_HINT}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        trainer = build_trainer(argv)
    except TrainError as e:
        print(f"peft-hydra train: error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)  # the adapter and its model card (PEFT's, with HydraLoRA's tags and snippet)
    trainer.save_state()  # trainer_state.json: the log history, router statistics included
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(output_dir)
        from .standalone.card import write_model_card

        write_model_card(trainer.model, output_dir)  # the HydraLoRA usage snippet (PEFT has no hook for card text)
        if os.path.exists(os.path.join(output_dir, "README.md")):
            _add_training_section(os.path.join(output_dir, "README.md"), trainer, argv)
        _log(f"done: {trainer.state.global_step} steps; adapter, model card, tokenizer and trainer_state.json in "
             f"{output_dir}")  # fmt: skip
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
    return 0
