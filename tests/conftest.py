"""Shared tiny-model fixtures (CPU, random weights, no Hub access).

Keep this module small and generic: other test modules (tuner, comparison harness, integrations) use it.

- ``tiny_llama`` / ``tiny_gpt2``: factories returning a fresh, seeded, eval-mode model each call
  (``tiny_llama(seed=0, **config_overrides)``), so that two calls give two identical base models.
- ``input_ids``: a small (2, 6) batch of token ids for those models.
- ``hydra(**kw)``: a ``HydraLoraConfig`` on every Llama linear with random heads (non-identity), ``logits(model, ids)``,
  and ``IdsDataset``: token-id sequences as a causal-LM dataset for ``transformers.Trainer``.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import peft_hydra  # noqa: F401  (registers the HYDRALORA PEFT type for every test)

VOCAB = 96
REPO = Path(__file__).resolve().parents[1]


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def make_tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kwargs)).eval()


def hydra(**kw):
    """A HydraLoraConfig on every Llama linear with random B heads (so the adapter is not the identity)."""
    kw.setdefault("target_modules", peft_hydra.LLAMA_LIKE_TARGET_MODULES)
    kw.setdefault("init_weights", False)
    return peft_hydra.HydraLoraConfig(**kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class IdsDataset(torch.utils.data.Dataset):
    """Token-id sequences (n, length) as a causal-LM dataset: input_ids, attention_mask, labels."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (2, 6), generator=g)


def pack_4bit_for_cpu(model) -> int:
    """Put the bitsandbytes 4-bit base weights of the adapted layers of ``model`` (the ``base_layer`` of each PEFT
    tuner layer) into the layout that bitsandbytes' CPU kernel repacks them to in place during an eval forward without
    grad on CPUs with AVX512-BF16 (``quant_state.packing_format_for_cpu``), whatever this machine's CPU, so that tests
    cover code that meets weights in that layout on every machine. Returns how many such weights are in that layout
    afterwards (an eval forward on such a CPU may have packed them already). On a CPU without AVX512-BF16 no forward
    may run on a packed weight (bitsandbytes registers its packed kernel only where the CPU has it): pack, then merge,
    unmerge or read, then forward (a merge replaces the weight; other layers are left unpacked)."""
    import bitsandbytes as bnb

    packed = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and name.rsplit(".", 1)[-1] == "base_layer":
            weight = module.weight
            if not getattr(weight.quant_state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
                    weight.data, weight.quant_state
                )
            packed += 1
    return packed


#: A chat template without generation markers, enough for TRL's and the frameworks' conversational formats.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(chat_template=None):
    """A byte-level tokenizer built offline (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then one id per byte), for commands
    that tokenize real text; ``chat_template``: e.g. :data:`CHAT_TEMPLATE`."""
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


def word_tokenizer():
    """A word-level tokenizer for the tiny models, built offline: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3 and
    the words ``w4`` ... ``w95`` (token id = the number), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------- fresh installs
# `pip install peft-hydra` (regular and editable) into a new virtual environment, built once per test session and
# shared by tests/test_package.py and tests/test_lm_eval.py. The new environment sees this environment's packages
# (torch, peft, transformers, lm-eval, setuptools) through a .pth line, so only peft-hydra itself is installed (no
# download). Every check runs in a fresh interpreter of that environment that never imports peft_hydra: the start-up
# hook installed with the package (src/_peft_hydra_autoload.py) must register HydraLoRA whichever way peft gets
# imported.
def fresh_install(kind: str, tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a new virtual environment with this repository installed (``kind``: "regular" or
    "editable"); created on first use in the session's temporary folder and reused after that."""
    venv = tmp_path_factory.getbasetemp() / f"fresh-install-{kind}"
    python = venv / "bin" / "python"
    ready = venv / "ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True, timeout=300)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        # this environment's site-packages (pip and setuptools too) as a plain path entry: its .pth files (our hook
        # among them) do not run there
        Path(site, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        proc = subprocess.run([*install, *(["-e"] if kind == "editable" else []), str(REPO)], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert Path(site, "peft_hydra-autoload.pth").read_text().strip() == "import _peft_hydra_autoload"
        ready.write_text(site)
    return python, Path(ready.read_text())


def tiny_base_and_adapter(tmp_path_factory) -> Path:
    """A folder with ``base/`` (a tiny Llama with a word-level tokenizer, as a local model folder), ``adapter/`` (a
    HydraLoRA adapter whose adapter_config.json names that folder as its base model; random B, so it changes the
    outputs) and ``probe.pt`` (input ids and the adapted model's logits). Made once per session."""
    folder = tmp_path_factory.getbasetemp() / "tiny-base-and-adapter"
    if (folder / "probe.pt").exists():
        return folder
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    make_tiny_llama().save_pretrained(folder / "base")
    word_tokenizer().save_pretrained(folder / "base")
    config = peft_hydra.HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"), config).eval()
    model.save_pretrained(folder / "adapter")
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, folder / "probe.pt")
    return folder
