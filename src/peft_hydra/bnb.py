"""HydraLoRA on quantized base layers: bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (QLoRA), and a clear refusal of
every other quantized layer type.

The adapter (``hydra_A``, ``hydra_B``, router) stays in floating point (fp32 / bf16); the forward is the one of
:class:`~peft_hydra.layer.HydraLoraLayer` (quantized base output + adapter delta cast to the base output's dtype).
What quantization changes is the merge: the packed weight cannot be added to, so ``merge`` / ``unmerge`` dequantize
the base weight, add (subtract) ``scaling * sum_i g_i B_i A`` in fp32 and re-quantize, as PEFT's LoRA does in
``peft/tuners/lora/bnb.py``. The merged model therefore equals the fixed-gate forward up to the re-quantization error.

Importing this module does not import ``bitsandbytes``: a base layer can only be a bitsandbytes layer when
``bitsandbytes`` was already imported (by transformers' quantizer or by the user), so dispatch looks it up in
``sys.modules``.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from .standalone.compat import BaseTunerLayer, dequantize_bnb_weight
from .config import HydraLoraConfig
from .layer import Linear

__all__ = [
    "Linear4bit", "Linear8bitLt", "dispatch_bnb_4bit", "dispatch_bnb_8bit", "refuse_unsupported_quantized",
    "standard_4bit_layout",
]  # fmt: skip

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Module prefixes of the quantized / special linear layers that PEFT's LoRA handles with dedicated classes (or that
#: replace the matmul) and HydraLoRA does not: wrapping them as a plain ``Linear`` would be wrong.
_UNSUPPORTED_MODULES = {
    "hqq": "HQQ",
    "gptqmodel": "GPTQ/AWQ (gptqmodel)",
    "auto_gptq": "GPTQ (auto-gptq)",
    "awq": "AWQ (autoawq)",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "optimum.quanto": "optimum-quanto",
    "torchao": "torchao",
    "neural_compressor": "Intel Neural Compressor",
    "transformer_engine": "Transformer Engine",
    "megatron": "Megatron tensor parallel",
    "compressed_tensors": "compressed-tensors",
    "fp_quant": "FP-Quant",
    "vptq": "VPTQ",
    "spqr_quant": "SpQR",
    "bitsandbytes": "bitsandbytes, not Linear8bitLt / Linear4bit",
    "transformers.integrations": "a transformers quantization integration",
}

_QUANTIZED_ATTRS = ("qweight", "W_q", "qzeros", "weight_packed", "codes")


def _quantization_kind(module: nn.Module) -> Optional[str]:
    """A short name of the quantization scheme of ``module`` when it is a quantized (or otherwise special) layer
    HydraLoRA cannot wrap as a plain ``Linear``; None for an ordinary floating-point layer."""
    module_name = type(module).__module__
    for prefix, kind in _UNSUPPORTED_MODULES.items():
        if module_name == prefix or module_name.startswith(prefix + "."):
            return kind
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if type(weight) not in (torch.Tensor, nn.Parameter) and not _is_dtensor(weight):
            return f"tensor subclass {type(weight).__name__}"
        if weight.dtype not in _FLOAT_DTYPES:
            return f"{weight.dtype} weight"
    if any(isinstance(getattr(module, a, None), torch.Tensor) for a in _QUANTIZED_ATTRS):
        return "packed weights"
    return None


def _is_dtensor(weight: torch.Tensor) -> bool:
    """A distributed (sharded / tensor-parallel) float weight is not a quantized one."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(weight, DTensor)


def refuse_unsupported_quantized(module: nn.Module) -> None:
    """Raise a TypeError naming the layer type and the fix when ``module`` is a quantized layer HydraLoRA does not
    support (anything but bitsandbytes ``Linear8bitLt`` / ``Linear4bit``); return silently otherwise."""
    kind = _quantization_kind(module)
    if kind is None:
        return
    raise TypeError(
        f"HydraLoRA cannot adapt {type(module).__module__}.{type(module).__qualname__} ({kind}): such a layer "
        "needs its own adapter class (wrapped as a plain Linear its merge and export would be wrong), and HydraLoRA "
        "has one only for bitsandbytes Linear8bitLt and Linear4bit (transformers.BitsAndBytesConfig("
        "load_in_8bit=True) or (load_in_4bit=True)). Load the base model with bitsandbytes or unquantized, or leave "
        "this module out of target_modules (exclude_modules)."
    )


def _dispatch_bnb(kind: str, target: nn.Module, adapter_name: str, config: HydraLoraConfig, **kwargs):
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, getattr(bnb.nn, kind)):
        return None
    cls = Linear8bitLt if kind == "Linear8bitLt" else Linear4bit
    if config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out=True but the target is bitsandbytes {cls.__name__}: setting it to False.")
        config.fan_in_fan_out = False
    return cls(target, adapter_name, config, **kwargs)


def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, config: HydraLoraConfig, **kwargs) -> Optional[nn.Module]:
    """The HydraLoRA layer for a bitsandbytes ``Linear8bitLt`` base layer; None for anything else."""
    return _dispatch_bnb("Linear8bitLt", target, adapter_name, config, **kwargs)


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, config: HydraLoraConfig, **kwargs) -> Optional[nn.Module]:
    """The HydraLoRA layer for a bitsandbytes ``Linear4bit`` (QLoRA) base layer; None for anything else (other
    bitsandbytes modules are then refused by :func:`refuse_unsupported_quantized`)."""
    return _dispatch_bnb("Linear4bit", target, adapter_name, config, **kwargs)


class _BnbLinear(Linear):
    """Shared part of the bitsandbytes layers: :class:`~peft_hydra.layer.Linear` whose merge / unmerge step
    dequantizes, adds and re-quantizes. Subclasses define :meth:`_dequantize` (the base weight as a float tensor) and
    :meth:`_requantize`."""

    bits: int = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HydraLoraConfig, r: int, lora_alpha: float,
                 layer_name: Optional[str] = None, **kwargs) -> None:  # fmt: skip
        kwargs.pop("fan_in_fan_out", None)  # a bitsandbytes weight is (out, in)
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, fan_in_fan_out=False, layer_name=layer_name,
                         **kwargs)  # fmt: skip

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _add_delta_to_base(self, adapter: str, gates: torch.Tensor, sign: float, safe_merge: bool = False) -> None:
        """Dequantize W0, add ``sign * delta`` in fp32, re-quantize (the merge / unmerge step of a quantized base)."""
        warnings.warn(
            f"Merging into a {self.bits}-bit base re-quantizes the weight: outputs can differ slightly from the "
            "unmerged (fixed-gate) model because of rounding."
        )
        dequantized = self._dequantize()
        delta = self._delta_weight(adapter, gates).float().to(dequantized.device)
        new_weight = dequantized.float() + sign * delta
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self._requantize(new_weight.to(dequantized.dtype))


class Linear8bitLt(_BnbLinear):
    """HydraLoRA on a bitsandbytes ``Linear8bitLt`` (LLM.int8()) base layer."""

    bits = 8

    def _dequantize(self) -> torch.Tensor:
        base = self.get_base_layer()
        if base.weight.dtype != torch.int8:  # has_fp16_weights=True: the weight is kept in float
            return base.weight.data
        if base.state.SCB is None:
            base.state.SCB = base.weight.SCB
        return dequantize_bnb_weight(base.weight, state=base.state)

    def _requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        if old.dtype != torch.int8:  # has_fp16_weights=True: a float weight, updated in place
            old.data = weight.to(old.dtype)
            base.state.reset_grads()
            return
        # Int8Params quantizes (row-wise absmax) when moved from the CPU to a device, the CPU included.
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()  # the next forward takes CB / SCB from the new weight


class Linear4bit(_BnbLinear):
    """HydraLoRA on a bitsandbytes ``Linear4bit`` (QLoRA: NF4 / FP4, optional double quantization) base layer."""

    bits = 4

    def _dequantize(self) -> torch.Tensor:
        import bitsandbytes as bnb

        data, state = standard_4bit_layout(self.get_base_layer().weight)
        return bnb.functional.dequantize_4bit(data, state)

    def _requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        # Same blocksize, quant_type, double quantization and storage as before; a fresh quant_state.
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)


def standard_4bit_layout(weight) -> tuple[torch.Tensor, object]:
    """``(data, quant_state)`` of the bitsandbytes 4-bit weight ``weight`` in the standard layout that
    ``bitsandbytes.functional.dequantize_4bit`` reads, without changing ``weight``.

    On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` repacks its weight IN PLACE for its CPU kernel the first
    time it runs in eval mode without grad (``quant_state.packing_format_for_cpu``: the nibbles re-ordered into an
    (out, in/2) tile layout, the block scales transposed to bfloat16, double quantization undone).
    ``dequantize_4bit`` does not read that layout, so a merge after any evaluation or ``generate()`` would otherwise
    add the delta to misread weights. bitsandbytes' own ``_save_to_state_dict`` and ``.cuda()`` undo it with
    ``_convert_weight_packed_for_cpu_inverse``; this does the same on copies, and puts single-quantized block scales
    back in order, which that inverse misses (also where bitsandbytes already ran it in place). Only the bfloat16
    rounding of the block scales remains. A layout this code does not know is refused with an error that names it.
    """
    import bitsandbytes as bnb

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise _unknown_4bit_layout(data, state, "its CPU-packed layout, but this bitsandbytes has no inverse")
        data, state = inverse(data.clone(), copy.deepcopy(state))
    if state.absmax.dim() == 2 and not state.nested:
        # That inverse (here, and in place by bitsandbytes' own _save_to_state_dict: any state_dict() or
        # save_pretrained after an evaluation) restores the block scales of double quantization only (0.50):
        # single-quantized ones stay transposed, (in / blocksize, out) in bfloat16, read in the wrong order.
        state = copy.copy(state)
        state.absmax = state.absmax.T.reshape(-1).float()
    n_bytes = data.numel() * data.element_size()
    standard = data.dim() == 1 or (data.dim() == 2 and data.shape[1] == 1)
    if not standard or n_bytes != (math.prod(state.shape) + 1) // 2:
        raise _unknown_4bit_layout(data, state, "a layout that is neither the standard (n, 1) one nor the CPU-packed one")
    return data, state


def _unknown_4bit_layout(data: torch.Tensor, state, what: str) -> RuntimeError:
    import bitsandbytes as bnb

    return RuntimeError(
        f"Cannot merge into this bitsandbytes 4-bit weight: bitsandbytes {bnb.__version__} stores it in {what} "
        f"(data {tuple(data.shape)} {data.dtype}, quant_state.shape {tuple(state.shape)}). Merging would add the "
        "update to misread weights. Keep the adapter unmerged, or export it with peft_hydra.export_lora and merge on "
        "an unquantized base, or use a bitsandbytes version peft-hydra is tested with (docs/quantized.md)."
    )
