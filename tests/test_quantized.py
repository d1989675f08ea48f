"""HydraLoRA on quantized bases: bitsandbytes 8-bit (LLM.int8) and 4-bit (QLoRA) on the CPU backend, and a clear
refusal of every other quantized layer type.

Merging into a quantized base dequantizes, adds and re-quantizes, so the merged model differs from the unmerged one by
a re-quantization error that depends on the bit width and on the kernels bitsandbytes takes on this CPU: the merge
tests judge it against PEFT LoRA's own merge of the same update into the same base, measured in the same test. On CPUs
with AVX512-BF16 an eval forward repacks every 4-bit weight into a CPU-specific layout; ``pack_4bit_for_cpu``
(conftest) puts the weights in that layout on every machine, so the merge, unmerge and export tests cover it whatever
the CPU. The fixture model has hidden size 64: bitsandbytes' CPU kernels crash on a 4-bit model of hidden size 32.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peft_hydra  # noqa: E402
from peft_hydra import HydraLoraConfig, HydraLoraLayer  # noqa: E402
from peft_hydra.bnb import Linear4bit, Linear8bitLt, standard_4bit_layout  # noqa: E402

from conftest import VOCAB, make_tiny_llama, pack_4bit_for_cpu  # noqa: E402

MLP = ["gate_proj", "up_proj", "down_proj"]
GATES = [0.2, 0.3, 0.5]
BITS = {"8bit": (Linear8bitLt, torch.int8), "4bit": (Linear4bit, torch.uint8), "4bit-dq": (Linear4bit, torch.uint8)}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bnb's fp16 casts and our re-quantization notes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama (hidden 64: bitsandbytes' 4-bit CPU kernels need it) saved once for this module."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def quantized(base_dir, bits):
    if bits == "8bit":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:  # "4bit" (NF4) or "4bit-dq" (NF4 with double quantization of the block scales, as the authors' script)
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=bits == "4bit-dq",
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, device_map="cpu").eval()


def hydra(**kw):
    kw.setdefault("target_modules", MLP + ["q_proj"])
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("num_experts", 3)
    kw.setdefault("init_weights", False)  # random B: the adapter has a visible effect
    return HydraLoraConfig(**kw)


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def hydra_layers(model):
    return [m for m in model.modules() if isinstance(m, HydraLoraLayer)]


def copy_hydra_weights(src, dst):
    """Give ``dst`` the A and B tensors of ``src`` (same targets), leaving ``dst``'s router (the rows of hydra_A after
    A's r = 4 rows, when it has one) alone."""
    want = {n: p for n, p in src.named_parameters() if ".hydra_A." in n or ".hydra_B." in n}
    with torch.no_grad():
        for n, p in dst.named_parameters():
            if n in want:
                rows = 4 if ".hydra_A." in n else p.shape[0]
                p[:rows].copy_(want[n][:rows])


def unpack_4bit(model) -> None:
    """Undo ``pack_4bit_for_cpu`` (``standard_4bit_layout``: bitsandbytes' inverse, block scales in order). PEFT's
    LoRA merge reads a 4-bit weight with ``dequantize_4bit``, which does not know the CPU-packed layout."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = standard_4bit_layout(m.weight)


def peft_lora_reference(hydra_model, bits, base_dir, path, gates=None):
    """The same update as a plain PEFT LoRA on a fresh quantized base: ``hydra_model``'s adapter exported with
    ``gates`` (exactly its fixed-gate update)."""
    peft_hydra.export_lora(hydra_model, path, gates=gates)
    return PeftModel.from_pretrained(quantized(base_dir, bits), path).eval()


def through_cpu_layout(lora) -> None:
    """Give the LoRA model's 4-bit weights the history the HydraLoRA model's have in these tests (into the CPU-packed
    layout and back: its bfloat16 block scales), in the layout PEFT's merge reads."""
    pack_4bit_for_cpu(lora)
    unpack_4bit(lora)


def peft_lora_merge_error(hydra_model, bits, base_dir, ids, path, gates=None) -> torch.Tensor:
    """Max |logit change| that PEFT's own LoRA merge causes for the same update on the same base."""
    lora = peft_lora_reference(hydra_model, bits, base_dir, path, gates)
    want = logits(lora, ids)
    through_cpu_layout(lora)
    return (logits(lora.merge_and_unload(), ids) - want).abs().max()


#: Our merge error may exceed PEFT LoRA's for the same update by this factor plus this fraction of the adapter's
#: effect (the two deltas are the same matrix up to float rounding, which can flip a few quantization levels).
MERGE_ERROR_FACTOR, MERGE_ERROR_SLACK = 1.25, 0.02


@pytest.mark.parametrize("bits", BITS)
def test_quantized_targets_get_bnb_layers_with_float_adapters(base_dir, bits):
    cls, packed = BITS[bits]
    model = get_peft_model(quantized(base_dir, bits), hydra())
    layers = hydra_layers(model)
    assert len(layers) == 4 * 2 and all(type(m) is cls for m in layers)
    for m in layers:
        assert m.get_base_layer().weight.dtype == packed  # still quantized
        assert m.hydra_A["default"].weight.dtype == torch.float32 and m.hydra_B["default"].weight.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hydra_" in n for n in trainable)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("how", ["fixed_gates_config", "gates_argument"])
def test_merge_and_unload_equals_fixed_gate_forward(base_dir, ids, tmp_path, bits, how):
    """The merged quantized model equals the fixed-gate forward up to re-quantization error, no worse than PEFT LoRA's
    merge of the same update into the same base. A merge that dropped the adapter (error = the whole effect) or
    misread a CPU-packed 4-bit weight fails this; the 4-bit weights are merged from the CPU-packed layout."""
    torch.manual_seed(0)
    fixed = get_peft_model(quantized(base_dir, bits), hydra(fixed_gates=GATES))
    want = logits(fixed, ids)
    with fixed.disable_adapter():
        effect = (want - logits(fixed, ids)).abs().max()
    assert effect > 0.1  # the adapter visibly changes the output
    lora_error = peft_lora_merge_error(fixed, bits, base_dir, ids, tmp_path / "lora")

    if how == "fixed_gates_config":
        model = fixed
    else:  # learned router, merged with the same fixed gates
        model = get_peft_model(quantized(base_dir, bits), hydra())
        copy_hydra_weights(fixed, model)
        logits(model, ids)  # evaluated before merging, as a user would
    cls, packed = BITS[bits]
    pack_4bit_for_cpu(model)
    merged = model.merge_and_unload() if how == "fixed_gates_config" else model.merge_and_unload(gates=GATES)
    assert not hydra_layers(merged)
    layer = merged.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit)
    assert layer.weight.dtype == packed  # re-quantized, not left in float
    err = (logits(merged, ids) - want).abs().max()
    print(f"{bits} {how}: merged vs fixed-gate forward {float(err):.3f}, PEFT LoRA {float(lora_error):.3f}, "
          f"adapter effect {float(effect):.3f}")  # fmt: skip
    assert err <= MERGE_ERROR_FACTOR * lora_error + MERGE_ERROR_SLACK * effect, (float(err), float(lora_error))


LAYOUTS = [("8bit", "standard")] + [(b, h) for b in ("4bit", "4bit-dq") for h in ("standard", "cpu-packed", "saved")]


@pytest.mark.parametrize("bits,history", LAYOUTS)
def test_merge_weight_is_dequantized_base_plus_delta(base_dir, bits, history):
    """Layer level: merged W = quantize(dequantize(W0) + scaling * sum_i g_i B_i A); unmerge subtracts it again.
    ``cpu-packed``: W0 is in bitsandbytes' CPU-packed layout before the merge and again before the unmerge;
    ``saved``: then unpacked in place by bitsandbytes' own state_dict(), as a save after an evaluation does. The layer
    (in 128) holds two 4-bit blocks per row, so block scales read in the wrong order would show."""
    model = get_peft_model(quantized(base_dir, bits), hydra(fixed_gates=GATES))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    cpu_packed = history != "standard"

    def repack():
        assert pack_4bit_for_cpu(layer) == 1
        if history == "saved":
            layer.get_base_layer().state_dict()

    w0 = layer._dequantize().float().clone()
    if cpu_packed:
        repack()
        w0_packed = layer._dequantize().float()
        # the same weights read from the other layout: only the bfloat16 rounding of the block scales differs
        assert (w0_packed - w0).abs().max() <= 2**-7 * w0.abs().max()
        w0 = w0_packed.clone()
    delta = layer.get_delta_weight("default").float()
    weight = layer.get_base_layer().weight
    if bits != "8bit":  # the reference: bitsandbytes' own quantization of the float sum, same block size and type
        q, state = bnb.functional.quantize_4bit(
            w0 + delta, blocksize=weight.blocksize, quant_type=weight.quant_type,
            compress_statistics=weight.compress_statistics,
        )  # fmt: skip
        want = bnb.functional.dequantize_4bit(q, state)
    layer.merge(safe_merge=True)
    assert layer.merged
    merged = layer._dequantize().float()
    if bits == "8bit":  # int8 row-wise absmax: at most one step (row absmax / 127) from the float sum
        step = (w0 + delta).abs().amax(dim=1, keepdim=True) / 127
        assert ((merged - (w0 + delta)).abs() <= step).all()
    else:
        torch.testing.assert_close(merged, want, rtol=0, atol=0)
    assert (merged - w0 - delta).norm() < 0.2 * delta.norm()  # the delta is there, not dropped
    if cpu_packed:
        repack()
    layer.unmerge()
    assert not layer.merged
    assert (layer._dequantize().float() - w0).norm() < 0.2 * delta.norm()


def test_merge_4bit_with_per_layer_mean_gates(base_dir, ids, tmp_path):
    """merge_and_unload(gates=measure_mean_gates(...)) on a 4-bit base equals the model with those per-layer gates
    fixed, within PEFT LoRA's re-quantization error for the same update."""
    model = get_peft_model(quantized(base_dir, "4bit"), hydra()).eval()
    gates = peft_hydra.measure_mean_gates(model, [ids])
    assert len(gates) == 8 and len({tuple(g) for g in gates.values()}) > 1  # really per layer
    fixed = get_peft_model(quantized(base_dir, "4bit"), hydra(fixed_gates=gates))
    copy_hydra_weights(model, fixed)
    want = logits(fixed, ids)
    with fixed.disable_adapter():
        effect = (want - logits(fixed, ids)).abs().max()
    lora_error = peft_lora_merge_error(fixed, "4bit", base_dir, ids, tmp_path / "lora")
    pack_4bit_for_cpu(model)
    err = (logits(model.merge_and_unload(gates=gates), ids) - want).abs().max()
    assert err <= MERGE_ERROR_FACTOR * lora_error + MERGE_ERROR_SLACK * effect, (float(err), float(lora_error))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_merge_learned_router_without_gates_is_refused(base_dir, bits):
    model = get_peft_model(quantized(base_dir, bits), hydra())
    from peft_hydra.config import no_exact_merge_message

    message = re.escape(no_exact_merge_message("default", 3))  # the same error as on an unquantized base
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=message):
        model.merge_adapter()
    assert not any(m.merged for m in hydra_layers(model))


def test_merge_n1_4bit_and_unmerge_adapter(base_dir, ids, tmp_path):
    """N = 1 (a LoRA) merged into and unmerged from a 4-bit base, each step from the CPU-packed layout: the errors
    are those of PEFT LoRA's own merge_adapter / unmerge_adapter of the same update."""
    model = get_peft_model(quantized(base_dir, "4bit"), hydra(num_experts=1))
    want = logits(model, ids)
    with model.disable_adapter():
        effect = (want - logits(model, ids)).abs().max()
    lora = peft_lora_reference(model, "4bit", base_dir, tmp_path / "lora")
    lora_want = logits(lora, ids)
    torch.testing.assert_close(lora_want, want, rtol=1e-4, atol=1e-4)  # the same update
    errors = {}
    for name, peft_model, reference, prepare in (
        ("lora", lora, lora_want, through_cpu_layout), ("hydra", model, want, pack_4bit_for_cpu)
    ):  # fmt: skip
        prepare(peft_model)
        peft_model.merge_adapter()
        merged = (logits(peft_model, ids) - reference).abs().max()
        prepare(peft_model)
        peft_model.unmerge_adapter()
        errors[name] = (merged, (logits(peft_model, ids) - reference).abs().max())
    for step, (ours, theirs) in zip(("merge", "unmerge"), zip(errors["hydra"], errors["lora"])):
        assert ours <= MERGE_ERROR_FACTOR * theirs + MERGE_ERROR_SLACK * effect, (step, float(ours), float(theirs))


@pytest.mark.parametrize("bits", ["8bit", "4bit-dq"])
def test_kbit_training_with_gradient_checkpointing(base_dir, ids, bits):
    model = prepare_model_for_kbit_training(quantized(base_dir, bits), use_gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    # 4-bit with the authors' per-head dropout masks (paper_preset), 8-bit with one shared mask
    model = get_peft_model(model, hydra(init_weights=True, lora_dropout=0.1, dropout_per_head=bits != "8bit"))
    packed_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype in (torch.int8, torch.uint8)}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
    assert any(g[4:].abs().sum() > 0 for n, g in grads.items() if ".hydra_A." in n)  # the router's rows, once B != 0
    for n, p in model.named_parameters():
        if n in packed_before:
            assert torch.equal(p, packed_before[n])  # the quantized base stays frozen


def test_bf16_adapter_on_4bit_base(base_dir, ids):
    model = get_peft_model(quantized(base_dir, "4bit"), hydra())
    for n, p in model.named_parameters():
        if ".hydra_" in n:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32  # the adapter delta is cast to the base output's dtype
    out.loss.backward()
    a = model.base_model.model.model.layers[0].mlp.up_proj.hydra_A["default"].weight
    assert a.grad is not None and a.grad.dtype == torch.bfloat16 and a.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", ["8bit", "4bit-dq"])
def test_save_load_on_quantized_base(base_dir, ids, tmp_path, bits):
    model = get_peft_model(quantized(base_dir, bits), hydra(top_k=2))
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantized(base_dir, bits), tmp_path / "adapter")
    assert all(type(m) is BITS[bits][0] for m in hydra_layers(loaded))
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=0)


def test_export_lora_from_4bit_loads_as_peft_lora(base_dir, ids, tmp_path):
    """export_lora reads only the float adapter tensors: the exported LoRA on the same 4-bit base (PEFT's own bnb
    LoRA layers) equals the HydraLoRA model with those fixed gates."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    fixed = get_peft_model(quantized(base_dir, "4bit"), hydra(fixed_gates=GATES))
    want = logits(fixed, ids)
    model = get_peft_model(quantized(base_dir, "4bit"), hydra())
    copy_hydra_weights(fixed, model)
    pack_4bit_for_cpu(model)  # the base as after an evaluation on an AVX512-BF16 CPU: the export reads none of it
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".hydra_" not in n}
    peft_hydra.export_lora(model, tmp_path / "lora", gates=GATES)
    # nor does it change it (bitsandbytes' own state_dict() would rewrite packed weights of every 4-bit layer)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if ".hydra_" not in n)
    lora = PeftModel.from_pretrained(quantized(base_dir, "4bit"), tmp_path / "lora")
    assert any(isinstance(m, LoraLayer) for m in lora.modules())
    torch.testing.assert_close(logits(lora, ids), want, rtol=1e-4, atol=1e-4)


def test_merge_into_an_unknown_4bit_layout_is_refused(base_dir, monkeypatch):
    """A 4-bit weight in a layout the code cannot read is refused with an error naming it, and nothing is merged."""
    model = get_peft_model(quantized(base_dir, "4bit"), hydra(fixed_gates=GATES))
    pack_4bit_for_cpu(model)
    weights = [m.get_base_layer().weight for m in hydra_layers(model)]
    before = [w.data.clone() for w in weights]
    monkeypatch.delattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse")
    with pytest.raises(RuntimeError, match=r"CPU-packed layout, but this bitsandbytes has no inverse.*export_lora"):
        model.merge_adapter()
    for w in weights:  # packed data without the flag: a layout bitsandbytes might add one day
        w.quant_state.packing_format_for_cpu = False
    with pytest.raises(RuntimeError, match=r"neither the standard \(n, 1\) one nor the CPU-packed one"):
        model.merge_adapter()
    assert not any(m.merged for m in hydra_layers(model))
    assert all(torch.equal(w.data, b) for w, b in zip(weights, before))


def test_mixed_adapter_batch_on_8bit(base_dir, ids):
    model = get_peft_model(quantized(base_dir, "8bit"), hydra()).eval()
    want = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["default", "__base__"]).logits.float()
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1], base[1], rtol=1e-3, atol=1e-3)


def test_merge_8bit_with_fp16_weights(ids):
    """Linear8bitLt(has_fp16_weights=True) keeps a float weight (quantized on the fly): merge adds to it in place."""
    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    for layer in model.model.layers:
        old = layer.mlp.up_proj
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=False, has_fp16_weights=True)
        new.load_state_dict(old.state_dict())
        layer.mlp.up_proj = new.to("cpu")
    model = get_peft_model(model, hydra(target_modules=["up_proj"], fixed_gates=GATES)).eval()
    assert all(type(m) is Linear8bitLt for m in hydra_layers(model))
    want = logits(model, ids)
    with model.disable_adapter():
        effect = (want - logits(model, ids)).abs().max()
    merged = model.merge_and_unload()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert (logits(merged, ids) - want).abs().max() < 0.05 * effect


# ------------------------------------------------------------------------------ other quantized layer types
class FakeHQQLinear(nn.Module):  # an HQQ-style layer: packed weights, not an nn.Linear
    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.register_buffer("W_q", torch.zeros(32, 1, dtype=torch.uint8))

    def forward(self, x):
        return x


FakeHQQLinear.__module__ = "hqq.core.quantize"


class FakeQuantLinear(nn.Module):  # a GPTQ/AWQ-style layer defined outside a known package: qweight / qzeros
    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.register_buffer("qweight", torch.zeros(1, 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(1, 1, dtype=torch.int32))

    def forward(self, x):
        return x


class SubclassTensor(torch.Tensor):  # stands for torchao's AffineQuantizedTensor & co. (weights as a subclass)
    pass


def linear_with(weight):
    layer = nn.Linear(8, 8, bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.mark.parametrize(
    "make,names",
    [
        (FakeHQQLinear, ["FakeHQQLinear", "HQQ"]),
        (FakeQuantLinear, ["FakeQuantLinear", "packed weights"]),
        (lambda: linear_with(torch.zeros(8, 8).to(torch.float8_e4m3fn)), ["Linear", "float8_e4m3fn"]),
        (lambda: linear_with(torch.zeros(8, 8).as_subclass(SubclassTensor)), ["Linear", "SubclassTensor"]),
        (lambda: linear_with(torch.zeros(8, 8, dtype=torch.int8)), ["Linear", "torch.int8"]),
    ],
    ids=["hqq", "gptq-like", "fp8", "tensor-subclass", "int8-weight"],
)
def test_unsupported_quantized_layers_are_refused(make, names):
    model = nn.Sequential()
    model.add_module("proj", make())
    with pytest.raises(TypeError) as err:
        get_peft_model(model, HydraLoraConfig(target_modules=["proj"], num_experts=2))
    message = str(err.value)
    for name in names + ["only for bitsandbytes Linear8bitLt and Linear4bit", "exclude_modules"]:
        assert name in message, message


def test_other_bitsandbytes_layer_is_refused():
    model = nn.Sequential()
    model.add_module("proj", bnb.nn.StableEmbedding(16, 8))
    with pytest.raises(TypeError, match="StableEmbedding.*bitsandbytes"):
        get_peft_model(model, HydraLoraConfig(target_modules=["proj"], num_experts=2))


# ------------------------------------------------------------------ README snippet ("Quantized models (QLoRA)")
def test_readme_qlora_snippet(base_dir, tmp_path, monkeypatch):
    """The "Quantized models (QLoRA)" snippet of /work/coord/readme-quant.md (README.md), run as written with
    the tiny model standing in for the 7B one. Keep the two identical."""
    monkeypatch.chdir(tmp_path)
    model_id = str(base_dir)
    # --- snippet start
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft_hydra

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=bnb_config)
    base = prepare_model_for_kbit_training(base)  # fp32 norms, gradient checkpointing
    model = get_peft_model(base, peft_hydra.HydraLoraConfig.paper_preset())
    # ... train (the adapter is fp32; the 4-bit base stays frozen) ...
    model.save_pretrained("hydra-qlora")

    # Serving with fixed gates ("uniform", N numbers, or per layer: peft_hydra.measure_mean_gates(model, batches)):
    peft_hydra.export_lora(model, "hydra-as-lora", gates="uniform")  # a plain LoRA for any LoRA server
    merged = model.merge_and_unload(gates="uniform")  # dequantize, add, re-quantize into the 4-bit weights
    # --- snippet end
    assert not hydra_layers(merged)
    assert isinstance(merged.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert (tmp_path / "hydra-qlora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "hydra-as-lora" / "adapter_model.safetensors").exists()
