"""HydraLoRA in ms-swift (4.6): a tuner plugin (``--tuner_type hydralora``) and a callback that adds the router
balance loss and the router statistics to swift's Trainer.

Command (complete example: ``configs/swift_hydralora.yaml``; docs/training.md)::

    peft-hydra-swift sft config.yaml                 # or: python -m peft_hydra.frameworks.ms_swift sft config.yaml
    peft-hydra-swift sft --model DIR --dataset train.jsonl --num_experts 3 --router_aux_loss_coef 0.01 ...

``peft-hydra-swift`` hands over to ``swift`` (the same sub-commands and arguments) with this file as
``--external_plugins`` (swift imports plugin files in each of its processes and records them in the run's saved
arguments, so ``swift infer --adapters OUT`` later finds the tuner again), ``--tuner_type hydralora`` unless another
is given, ``--callbacks hydralora``, and ``--gradient_checkpointing_kwargs '{"use_reentrant": false}'`` unless given
(swift checkpoints with reentrant checkpointing by default, under which the router balance loss has no effect). swift rejects arguments it does not know, so the HydraLoRA options are taken
out of the arguments (or the YAML) here and passed on in the environment variable ``PEFT_HYDRA_SWIFT_OPTIONS``:

- ``num_experts``: N heads, or ``auto`` (``peft_hydra.suggest_num_experts`` over the local ``--dataset`` files);
- ``router_aux_loss_coef``: the router balance loss, added to the Trainer's loss;
- ``hydra_preset``: ``paper`` (``HydraLoraConfig.paper_preset``; the LoRA arguments given explicitly override it);
- ``hydra_options``: further HydraLoRA fields as a mapping (a JSON string on the command line).

swift's LoRA arguments mean what they mean for LoRA: ``--lora_rank``, ``--lora_alpha``, ``--lora_dropout``,
``--target_modules`` (``all-linear`` by default) / ``--target_regex``, ``--modules_to_save``, ``--use_rslora``.
The adapter is saved as a PEFT adapter in swift's checkpoint folders (``PeftModel.from_pretrained(base, ckpt)`` after
``import peft_hydra``).

``swift export --merge_lora true`` on a HydraLoRA adapter with a learned router stops with this package's error (no
exact merge without fixed gates); merge with fixed gates in Python or use ``peft_hydra.export_lora``
(docs/merging.md).

Without the wrapper: ``swift sft --tuner_type hydralora --callbacks hydralora --external_plugins
"$(python -c 'import peft_hydra.frameworks.ms_swift as m; print(m.__file__)')" ...`` with the options in
``PEFT_HYDRA_SWIFT_OPTIONS`` (e.g. the YAML's ``ENV:`` section).

This file is imported by swift as a standalone module (not as ``peft_hydra.frameworks.ms_swift``): it uses absolute
imports only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import peft_hydra
from peft_hydra.frameworks import _common

ADAPTER = "hydralora"
ENV = "PEFT_HYDRA_SWIFT_OPTIONS"
WHERE = "peft-hydra-swift options"
#: The HydraLoRA arguments the wrapper takes out of swift's arguments.
HYDRA_ARGS = ("num_experts", "router_aux_loss_coef", "hydra_preset", "hydra_options")
#: swift's LoRA arguments and the HydraLoraConfig fields they set.
LORA_ARGS = {
    "lora_rank": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "target_modules",
    "target_regex": "target_modules", "modules_to_save": "modules_to_save", "use_rslora": "use_rslora",
}  # fmt: skip
TRAIN_ROUTES = ("sft", "pt", "rlhf")


def read_options() -> dict[str, Any]:
    """The HydraLoRA options the wrapper passed on (``PEFT_HYDRA_SWIFT_OPTIONS``; empty: the defaults)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} must be a JSON object of HydraLoRA options, got {raw!r} ({e}).") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV} must be a JSON object of HydraLoRA options, got {raw!r}.")
    unknown = sorted(set(options) - set(HYDRA_ARGS) - {"lora_explicit"})
    if unknown:
        raise ValueError(f"{ENV}: unknown key(s) {unknown}; the keys are {list(HYDRA_ARGS)}.")
    return options


def hydra_config(args, model) -> peft_hydra.HydraLoraConfig:
    """The ``HydraLoraConfig`` of swift's arguments and the wrapper's HydraLoRA options."""
    from swift.pipelines.train.tuner import get_modules_to_save, get_target_modules

    options = read_options()
    targets = args.target_regex or get_target_modules(args, model)
    lora = {
        "r": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": targets,
        "modules_to_save": get_modules_to_save(args, model) or None,
        "use_rslora": args.use_rslora,
    }
    if options.get("hydra_preset"):  # swift's defaults must not override the preset: only what was given
        given = {LORA_ARGS[a] for a in options.get("lora_explicit", [])}
        lora = {k: v for k, v in lora.items() if k in given}
    hydra_options = options.get("hydra_options")
    if isinstance(hydra_options, str):
        hydra_options = json.loads(hydra_options)
    return _common.build_config(
        lora,
        num_experts=options.get("num_experts"),
        router_aux_loss_coef=options.get("router_aux_loss_coef"),
        preset=options.get("hydra_preset"),
        options=hydra_options,
        where=WHERE,
    )


# ------------------------------------------------------------------------------------------------ the plugin (swift)
try:
    from swift.callbacks import TrainerCallback, callbacks_map
    from swift.tuner_plugin import PeftTuner, tuners_map
except ImportError:  # pragma: no cover - only without ms-swift
    PeftTuner = TrainerCallback = None

if PeftTuner is not None:

    class HydraLoraTuner(PeftTuner):
        """``--tuner_type hydralora``: a HydraLoRA adapter from swift's LoRA arguments and the HydraLoRA options."""

        @staticmethod
        def prepare_model(args, model):
            from peft import get_peft_model

            config = hydra_config(args, model)
            print(f"[peft-hydra] HydraLoRA adapter: {config.num_experts} heads, r={config.r}, "
                  f"targets {_common.describe_targets(config.target_modules)}",
                  flush=True)  # fmt: skip
            return get_peft_model(model, config)

    class HydraLoraCallback(TrainerCallback):
        """``--callbacks hydralora``: ``peft_hydra.prepare_trainer`` on swift's Trainer (router statistics in its logs; the balance loss is in the model's loss)."""

        def __init__(self, args, trainer):
            super().__init__(args, trainer)
            self._prepared = False

        def on_train_begin(self, args, state, control, **kwargs):
            if not self._prepared:
                self._prepared = True
                peft_hydra.prepare_trainer(self.trainer)  # a clear error when the model holds no HydraLoRA adapter
                # the callback it added joined after this event was dispatched: hand it the event
                added = next(cb for cb in self.trainer.callback_handler.callbacks
                             if isinstance(cb, peft_hydra.HydraLoraCallback))  # fmt: skip
                added.on_train_begin(args, state, control, **kwargs)

    tuners_map[ADAPTER] = HydraLoraTuner
    callbacks_map[ADAPTER] = HydraLoraCallback


# ------------------------------------------------------------------------------------------ the command (wrapper)
def _take(argv: list[str], name: str) -> Optional[list[str]]:
    """Remove ``--name VALUES...`` (or ``--name=VALUE``) from ``argv``; return the values (None when absent)."""
    values = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = (values or []) + argv[i + 1 : j]
            del argv[i:j]
        elif arg.startswith(f"--{name}="):
            values = (values or []) + [arg.split("=", 1)[1]]
            del argv[i]
        else:
            i += 1
    return values


def _one(values: Optional[list[str]], name: str) -> Optional[str]:
    if values is None:
        return None
    if len(values) != 1:
        raise SystemExit(f"peft-hydra-swift: --{name} takes one value, got {values}.")
    return values[0]


def _dataset_texts(datasets: list[str]) -> list[str]:
    """The texts of the local ``--dataset`` files (JSON lines or a JSON list), for ``num_experts auto``."""
    records = []
    for spec in datasets:
        path = spec.split("#", 1)[0]
        if not os.path.isfile(path) or not path.endswith((".jsonl", ".json")):
            raise SystemExit(f"peft-hydra-swift: num_experts auto reads local .jsonl/.json --dataset files; "
                             f"{spec!r} is not one: give a number, e.g. --num_experts 3.")  # fmt: skip
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            records += json.loads(text)
        else:
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return _common.plain_texts(records)


def swift_argv(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``peft-hydra-swift`` arguments -> (swift's arguments, the HydraLoRA options for ``PEFT_HYDRA_SWIFT_OPTIONS``)."""
    if not argv:
        raise SystemExit("usage: peft-hydra-swift {sft,pt,rlhf,infer,export,...} [config.yaml] [swift arguments] "
                         "[--num_experts N|auto] [--router_aux_loss_coef C] [--hydra_preset paper] "
                         "[--hydra_options JSON]")  # fmt: skip
    route, rest = argv[0], list(argv[1:])
    if rest and rest[0].endswith((".yaml", ".yml", ".json")):
        from swift.cli.main import parse_yaml_args

        parse_yaml_args(rest)  # the YAML's keys as --key value arguments (and its ENV: section into os.environ)
    options: dict[str, Any] = {}
    for name in HYDRA_ARGS:
        value = _one(_take(rest, name), name)
        if value is not None:
            options[name] = value
    if route.replace("_", "-") not in TRAIN_ROUTES:
        if options:
            raise SystemExit(f"peft-hydra-swift {route}: {sorted(options)} apply to training (sft, pt, rlhf) only.")
        return [route, *rest], {}
    if "router_aux_loss_coef" in options:
        options["router_aux_loss_coef"] = float(options["router_aux_loss_coef"])
    if "hydra_options" in options:
        options["hydra_options"] = json.loads(options["hydra_options"])
    options["lora_explicit"] = [a for a in LORA_ARGS if any(x == f"--{a}" or x.startswith(f"--{a}=") for x in rest)]
    if str(options.get("num_experts", "")).lower() == "auto":
        datasets = _take(list(rest), "dataset") or []
        options["num_experts"] = _common.choose_num_experts(_dataset_texts(datasets), WHERE)
    tuner = _one(_take(rest, "tuner_type"), "tuner_type") or ADAPTER
    plugins = (_take(rest, "external_plugins") or []) + [os.path.abspath(__file__)]
    callbacks = _take(rest, "callbacks") or []
    if tuner == ADAPTER and ADAPTER not in callbacks:
        callbacks.append(ADAPTER)
    rest += ["--tuner_type", tuner, "--external_plugins", *plugins]
    if tuner == ADAPTER and _take(list(rest), "gradient_checkpointing_kwargs") is None:
        # swift checkpoints with use_reentrant=True by default on one process, under which the router outputs carry
        # no gradient and the balance loss has no effect: non-reentrant checkpointing unless the user chose
        rest += ["--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": False})]
    if callbacks:
        rest += ["--callbacks", *callbacks]
    return [route, *rest], options


def main(argv: Optional[list[str]] = None) -> None:
    """``peft-hydra-swift``: ``swift`` with the HydraLoRA plugin (see the module docstring)."""
    from swift.cli.main import cli_main

    args, options = swift_argv(list(sys.argv[1:] if argv is None else argv))
    if options:
        os.environ[ENV] = json.dumps(options)
    sys.argv = ["swift", *args]
    cli_main()


if __name__ == "__main__":
    main()
