"""Import checkpoints of the HydraLoRA authors' code (github.com/Clin0212/HydraLoRA) as HydraLoRA adapters.

Their code is a fork of an early ``peft`` (0.2/0.3) whose ``Linear`` layer replaces the ``nn.Linear`` itself (no
``base_layer``) and holds, per adapted module::

    lora_A      nn.Linear(in, r, bias=False)          shared down-projection
    lora_B{i}   nn.Linear(r, out, bias=False)         one up-projection per head, i = 0 .. lora_nums-1
    lora_route  nn.Linear(in, lora_nums, bias=False)  router on the layer input x

    y = W0 x + sum_i softmax(lora_route(x))_i * lora_B{i}(lora_A(dropout(x))) * lora_alpha / r

(``HydraLoRA/peft/tuners/lora.py``; the dropout is drawn once per head). Their ``PeftModel.save_pretrained`` writes
``adapter_model.bin`` with keys ``base_model.model.<module>.lora_A.weight`` etc. and an ``adapter_config.json`` with
``peft_type: "LORA"`` and ``lora_nums``.

That is exactly HydraLoRA with ``router_input="x"``, dense softmax gates, ``scaling = lora_alpha / r`` and
``dropout_per_head=True``; the tensors map one to one: ``hydra_A.weight = [lora_A; lora_route]`` (A's r rows, then
the router's N rows: this package's layout) and ``hydra_B.weight = [lora_B0 | ... | lora_B{N-1}]`` (the heads side
by side, (out, N*r)). :func:`convert_official_checkpoint` writes the result as a
normal adapter directory that ``peft.PeftModel.from_pretrained`` loads (after ``import peft_hydra``).

Their second code base, ``MLLM-HydraLoRA`` (LLaVA; ``moe.py``), is a different model (one router with a bias per MLP
block, shared by its three projections, top-1 routing by default) that per-layer HydraLoRA cannot represent: its
tensors are refused with an error that says so.

Command line: ``peft-hydra convert SRC DST [--base-model NAME] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from typing import Optional, Sequence

import torch

from .config import PREFIX, HydraLoraConfig

__all__ = ["convert_official_checkpoint", "main"]

#: Fields of the authors' ``adapter_config.json`` (their ``LoraConfig`` + ``PeftConfig``) and what becomes of them.
_CARRIED = {"r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "base_model_name_or_path",
            "task_type", "inference_mode", "revision"}  # fmt: skip
_CHECKED = {"peft_type", "lora_nums", "bias", "enable_lora", "modules_to_save", "blc_alpha", "blc_weight"}
_IGNORED = {"merge_weights", "auto_mapping"}  # merge-at-eval flag of their fork; PEFT bookkeeping
_KNOWN_FIELDS = _CARRIED | _CHECKED | _IGNORED

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B(?P<head>\d+)|lora_route)\.weight$")
_PEFT_PREFIX = "base_model.model."


def _error(src: str, message: str) -> ValueError:
    return ValueError(f"Cannot convert '{src}': {message}")


def _read_config(src: str) -> dict:
    path = os.path.join(src, "adapter_config.json")
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(src, "sft_lora_model", "adapter_config.json")):
            nested = os.path.join(src, "sft_lora_model")
            hint = f" The authors' training script saves the adapter in a sub-folder: pass '{nested}'."
        raise _error(src, f"no adapter_config.json in this folder.{hint}")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or "lora_nums" not in config:
        raise _error(
            src,
            f"adapter_config.json has peft_type={config.get('peft_type')!r} and "
            f"{'a' if 'lora_nums' in config else 'no'} 'lora_nums': a checkpoint of the HydraLoRA authors' code has "
            "peft_type 'LORA' and 'lora_nums' (the number of B heads). A plain PEFT LoRA adapter needs no "
            "conversion (load it with peft); a HydraLoRA adapter of this package (peft_type 'HYDRALORA') neither.",
        )
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise _error(
            src,
            f"adapter_config.json has field(s) {unknown} that the authors' LoraConfig does not have, so it was not "
            "written by their code (or was edited); known fields: " + ", ".join(sorted(_KNOWN_FIELDS)) + ".",
        )
    return config


def _read_tensors(src: str, adapter_file: Optional[str]) -> tuple[str, dict[str, torch.Tensor]]:
    if adapter_file is None:
        found = [name for name in _ADAPTER_FILES if os.path.isfile(os.path.join(src, name))]
        if not found:
            expected = list(_ADAPTER_FILES)
            raise _error(src, f"no adapter weights: expected one of {expected} next to adapter_config.json.")
        adapter_file = os.path.join(src, found[0])
    elif not os.path.isabs(adapter_file) and not os.path.isfile(adapter_file):
        adapter_file = os.path.join(src, adapter_file)
    if adapter_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(adapter_file, device="cpu")
    else:
        try:
            state = torch.load(adapter_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled non-tensor objects, corrupt file, ...
            reason = f"{type(exc).__name__}: {exc}"
            raise _error(src, f"{adapter_file} is not a plain tensor state dict ({reason}).") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _error(src, f"{adapter_file} does not hold a {{name: tensor}} state dict.")
    return adapter_file, state


def _group_modules(src: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        match = _KEY.match(key)
        if match is None or ".base_layer" in key or ".lora_B." in key:
            unknown.append(key)
            continue
        module = match["module"]
        if not module.startswith(_PEFT_PREFIX):
            module = _PEFT_PREFIX + module
        modules.setdefault(module, {})[match["kind"]] = value
    if unknown:
        modern = any(".lora_A." in k and not k.endswith(".lora_A.weight") for k in unknown) or any(
            ".lora_B.weight" in k or ".base_layer" in k for k in unknown
        )
        mllm = any("shared_lora_A" in k or ".moe_" in k for k in unknown)
        if mllm:
            hint = (
                " These are tensors of the authors' MLLM-HydraLoRA (LLaVA, moe.py): one router with a bias per MLP "
                "block, shared by gate/up/down_proj, and top-1 routing by default; HydraLoRA's per-layer routers "
                "cannot represent it, so it is not supported."
            )
        elif modern:
            hint = " These look like a current PEFT LoRA checkpoint (lora_A/lora_B, base_layer), not theirs."
        else:
            hint = (
                " The authors' format has per module only lora_A.weight, lora_B<i>.weight and lora_route.weight"
                " (trained modules_to_save or biases are not supported)."
            )
        raise _error(src, f"{len(unknown)} unknown tensor(s), e.g. {sorted(unknown)[:5]}.{hint}")
    if not modules:
        raise _error(src, "the adapter file holds no lora_A / lora_B<i> / lora_route tensors.")
    return modules


def _stack_module(src: str, module: str, tensors: dict[str, torch.Tensor], r: int, n: int):
    """(A with the router's rows below it (r + N, in), B side by side (out, N*r)) of one module, after checking names
    and shapes."""
    expected = {"lora_A", "lora_route"} | {f"lora_B{i}" for i in range(n)}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {[f'{module}.{k}.weight' for k in missing]}")
        if extra:
            parts.append(f"unexpected {[f'{module}.{k}.weight' for k in extra]}")
        raise _error(src, f"module '{module}' does not have the lora_nums={n} heads of its config: " + "; ".join(parts))
    A, route = tensors["lora_A"], tensors["lora_route"]
    heads = [tensors[f"lora_B{i}"] for i in range(n)]
    shapes = {f"lora_B{i}": tuple(b.shape) for i, b in enumerate(heads)}
    problems = []
    if A.dim() != 2 or A.shape[0] != r:
        problems.append(f"lora_A has shape {tuple(A.shape)}, expected (r={r}, in)")
    in_features = A.shape[-1]
    out_features = heads[0].shape[0] if heads[0].dim() == 2 else None
    if any(s != (out_features, r) for s in shapes.values()):
        problems.append(f"the B heads have shapes {shapes}, expected (out, r={r}) each")
    if tuple(route.shape) != (n, in_features):
        problems.append(f"lora_route has shape {tuple(route.shape)}, expected (lora_nums={n}, in={in_features})")
    if problems:
        raise _error(src, f"module '{module}': " + "; ".join(problems) + ".")
    B = torch.cat(heads, dim=1).contiguous()  # (out, N*r): head i in columns i*r .. (i+1)*r - 1
    return (torch.cat([A, route]) if n > 1 else A).contiguous(), B


def convert_official_checkpoint(
    src: str,
    dst: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    adapter_file: Optional[str] = None,
    overwrite: bool = False,
) -> HydraLoraConfig:
    """Convert a checkpoint of the HydraLoRA authors' code into a HydraLoRA adapter directory.

    Args:
        src: the folder their training script saved (``adapter_config.json`` with ``peft_type: "LORA"`` and
            ``lora_nums``, and ``adapter_model.bin`` or ``adapter_model.safetensors``). ``.bin`` files are read with
            ``torch.load(weights_only=True)``: no pickled code runs.
        dst: the output folder: ``adapter_config.json`` (a :class:`HydraLoraConfig`) and
            ``adapter_model.safetensors``, for ``PeftModel.from_pretrained(base, dst)`` after ``import peft_hydra``.
        base_model_name_or_path: overrides the base model recorded in their config (often a local path).
        adapter_file: the weights file, when it is not ``adapter_model.{safetensors,bin}`` in ``src``.
        overwrite: replace adapter files already in ``dst``.

    The config maps ``r``, ``lora_alpha`` (scaling ``lora_alpha / r``, as theirs), ``lora_dropout``,
    ``lora_nums -> num_experts``, ``fan_in_fan_out``, ``task_type`` and ``base_model_name_or_path``; their layer
    fixes ``router_input="x"`` (router on the layer input, no bias, softmax over the heads) and
    ``dropout_per_head=True`` (one dropout mask per head, as their loop). ``target_modules`` are the module names
    found in the checkpoint (their config's suffixes matched any module whose name merely ended with them). Missing,
    unknown or wrongly shaped tensors and unknown config fields raise a ``ValueError`` naming them. Returns the
    written config.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    config = _read_config(src)
    adapter_file, state = _read_tensors(src, adapter_file)

    n, r = config["lora_nums"], config.get("r")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _error(src, f"lora_nums must be an integer >= 1, got {n!r}.")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _error(src, f"r must be an integer >= 1, got {r!r}.")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _error(src, f"lora_alpha must be a number (their scaling is lora_alpha / r), got {alpha!r}.")
    if config.get("bias", "none") != "none":
        raise _error(src, f"bias={config['bias']!r}: trained biases are not part of HydraLoRA; only 'none' converts.")
    if config.get("enable_lora") is not None:
        raise _error(src, f"enable_lora={config['enable_lora']!r} (their MergedLinear) is not supported.")
    if config.get("modules_to_save"):
        raise _error(src, f"modules_to_save={config['modules_to_save']!r}: their fork saved no such tensors.")
    if config.get("blc_weight"):
        warnings.warn(
            f"'{src}' was trained with the authors' task-type balance loss (blc_weight={config['blc_weight']}); it "
            "is a training loss only and does not change the weights, so it is not carried over "
            "(peft_hydra's own balance loss is router_aux_loss_coef, 0 here)."
        )

    modules = _group_modules(src, state)
    out: dict[str, torch.Tensor] = {}
    for module in sorted(modules):
        A, B = _stack_module(src, module, modules[module], r, n)
        out[f"{module}.{PREFIX}A.weight"] = A
        out[f"{module}.{PREFIX}B.weight"] = B

    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    hydra_config = HydraLoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        num_experts=n,
        target_modules=targets,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        router_input="x",
        dropout_per_head=True,
        task_type=config.get("task_type"),
        base_model_name_or_path=base_model_name_or_path or config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        inference_mode=bool(config.get("inference_mode", True)),
    )

    written = [os.path.join(dst, name) for name in ("adapter_config.json", *_ADAPTER_FILES)]
    if not overwrite and any(os.path.exists(p) for p in written):
        raise ValueError(f"'{dst}' already holds an adapter: pass overwrite=True (--overwrite) to replace it.")
    os.makedirs(dst, exist_ok=True)
    hydra_config.save_pretrained(dst)
    from safetensors.torch import save_file

    save_file(out, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    stale = os.path.join(dst, "adapter_model.bin")
    if os.path.exists(stale):
        os.remove(stale)  # PeftModel.from_pretrained would prefer safetensors anyway; do not leave an old file
    return hydra_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-hydra convert SRC DST``: convert a checkpoint of the HydraLoRA authors' code (see module doc)."""
    parser = argparse.ArgumentParser(
        prog="peft-hydra convert",
        description="Convert a checkpoint of the HydraLoRA authors' code (Clin0212/HydraLoRA: lora_A, lora_B0..N-1, "
        "lora_route; peft_type LORA with lora_nums) into a HydraLoRA adapter for PeftModel.from_pretrained.",
    )
    parser.add_argument("src", help="folder with their adapter_config.json and adapter_model.bin / .safetensors")
    parser.add_argument("dst", help="output folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base-model", default=None, help="base model id or path to record (default: theirs)")
    parser.add_argument("--adapter-file", default=None, help="weights file if not adapter_model.{safetensors,bin}")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in DST")
    args = parser.parse_args(argv)
    try:
        config = convert_official_checkpoint(
            args.src, args.dst, base_model_name_or_path=args.base_model, adapter_file=args.adapter_file,
            overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"peft-hydra convert: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"Converted '{args.src}' -> '{args.dst}': HydraLoRA r={config.r}, lora_alpha={config.lora_alpha}, "
        f"num_experts={config.num_experts}, target_modules={sorted(config.target_modules)}, "
        f"base model {config.base_model_name_or_path!r}. Load it with "
        "`import peft_hydra; PeftModel.from_pretrained(base_model, DST)`."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
