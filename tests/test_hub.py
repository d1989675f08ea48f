"""Hub sharing: PEFT's model card with HydraLoRA tags and snippet, offline loading by repo id, mocked push_to_hub."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig
from peft_hydra.standalone import card as hydra_hub


def _hydra(tiny_llama, name="acme/tiny-llama"):
    base = tiny_llama()
    base.name_or_path = name
    base.config._name_or_path = name
    return get_peft_model(
        base,
        HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_weights=False),
    )  # fmt: skip


def _snippet_code(card_text: str) -> str:
    block = card_text.split(hydra_hub._BEGIN, 1)[1].split(hydra_hub._END, 1)[0]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_save_pretrained_writes_peft_card_with_tags_and_write_model_card_adds_the_snippet(tiny_llama, tmp_path):
    model = _hydra(tiny_llama)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert {"hydralora", "peft-hydra", "transformers"} <= set(card.data.tags)  # add_model_tags: PEFT's own writer
    assert hydra_hub._BEGIN not in card.text  # PEFT has no hook for card text: the snippet needs one call
    peft_hydra.write_model_card(model, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "base_model:adapter:acme/tiny-llama" in card.data.tags  # PEFT's own tags are kept
    assert card.data.base_model == "acme/tiny-llama"
    code = _snippet_code(card.text)
    assert code.startswith("import peft_hydra")
    assert "AutoPeftModelForCausalLM.from_pretrained" in code
    assert "- PEFT " in card.text  # PEFT's framework-versions block is still there

    # Saving again (e.g. every checkpoint) and writing the card again: one snippet, no duplicated tags.
    model.save_pretrained(tmp_path)
    peft_hydra.write_model_card(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count(hydra_hub._BEGIN) == 1
    assert sorted(ModelCard.load(tmp_path / "README.md").data.tags) == sorted(card.data.tags)


def test_card_of_other_peft_methods_is_untouched(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert "hydralora" not in (card.data.tags or []) and "lora" in card.data.tags
    assert hydra_hub._BEGIN not in card.text


def test_nothing_of_peft_or_transformers_is_patched(tiny_llama):
    """`import peft_hydra` and a HydraLoRA model patch nothing: PeftModel keeps PEFT's / transformers' methods, the
    HydraLoRA PeftModel instance has none of its own, and no global module hook is installed."""
    from torch.nn.modules import module as torch_module
    from transformers.utils import PushToHubMixin

    assert PeftModel.create_or_update_model_card.__module__ == "peft.peft_model"
    assert PeftModel.push_to_hub is PushToHubMixin.push_to_hub
    hooks_before = len(torch_module._global_module_registration_hooks)
    hydra = _hydra(tiny_llama)
    assert "push_to_hub" not in vars(hydra) and "create_or_update_model_card" not in vars(hydra)
    assert type(hydra).push_to_hub is PushToHubMixin.push_to_hub
    assert len(torch_module._global_module_registration_hooks) == hooks_before
    assert "hydralora" in hydra.get_base_model().model_tags  # transformers' own tag mechanism


def test_card_snippet_without_task_type_names_the_trained_class_and_runs_as_written(tiny_llama, input_ids, tmp_path):
    """The README's quick start has no task_type: the card must name the class the adapter was trained on (a
    ``LlamaForCausalLM``; ``AutoModel`` would give a ``LlamaModel`` without the ``model.`` prefix, and the adapter
    would not load). The snippet runs as written, with only the adapter placeholder filled in."""
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    peft_hydra.write_model_card(model, tmp_path / "adapter")
    code = _snippet_code((tmp_path / "adapter" / "README.md").read_text())
    assert "from transformers import LlamaForCausalLM" in code and "AutoModel" not in code
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "expected": model.eval()(input_ids).logits}, tmp_path / "io.pt")
    script = code.replace(hydra_hub.ADAPTER_PLACEHOLDER, str(tmp_path / "adapter")) + textwrap.dedent(
        f"""
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(io["input_ids"]).logits, io["expected"])
        print("RAN")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0 and "RAN" in out.stdout, out.stderr[-3000:]


def _write_snapshot(cache, repo_id, folder, commit="a" * 40):
    """Lay out `folder`'s files as the Hugging Face cache would for `repo_id` at `main` (no symlinks needed)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        (snap / name).write_bytes((folder / name).read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_load_by_repo_id_from_offline_cache(tiny_llama, input_ids, tmp_path):
    model = _hydra(tiny_llama).eval()
    model.save_pretrained(tmp_path / "adapter")
    peft_hydra.write_model_card(model, tmp_path / "adapter")
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    cache = tmp_path / "hf" / "hub"
    _write_snapshot(cache, "acme/tiny-hydra", tmp_path / "adapter", commit="b" * 40)
    _write_snapshot(cache, "acme/tiny-llama", tmp_path / "base")
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "expected": model(input_ids).logits}, tmp_path / "io.pt")
    # The card's own snippet, with the repo id filled in, is the loading code (the base is resolved by repo id too).
    snippet = _snippet_code((tmp_path / "adapter" / "README.md").read_text())
    snippet = snippet.replace(hydra_hub.ADAPTER_PLACEHOLDER, "acme/tiny-hydra")
    script = snippet + textwrap.dedent(
        f"""
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        model.eval()
        assert model.peft_config["default"].base_model_name_or_path == "acme/tiny-llama"
        with torch.no_grad():
            torch.testing.assert_close(model(io["input_ids"]).logits, io["expected"])
        print("LOADED", type(model.base_model).__name__)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED StandaloneHydraLoraModel" in out.stdout


class FakeHub:
    """Stands in for the Hub API: records create_repo / upload_folder, serves a remote README or none."""

    def __init__(self, remote_card: str | None = None):
        self.remote_card = remote_card
        self.uploads: dict[str, bytes] = {}
        self.calls: list[str] = []

    def install(self, monkeypatch, tmp_path):
        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append("create_repo")
            from huggingface_hub import RepoUrl

            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def hf_hub_download(api, repo_id, filename, **kwargs):
            fake.calls.append(f"download:{filename}")
            if fake.remote_card is None:
                raise EntryNotFoundError(f"{filename} not found in {repo_id}")
            path = tmp_path / "remote_README.md"
            path.write_text(fake.remote_card)
            return str(path)

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            fake.calls.append("upload_folder")
            fake.upload_kwargs = kwargs
            for name in os.listdir(folder_path):
                fake.uploads[name] = open(os.path.join(folder_path, name), "rb").read()
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_new_repo_keeps_the_peft_card(tiny_llama, tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch, tmp_path)
    model = _hydra(tiny_llama)
    result = peft_hydra.push_to_hub(model, "acme/my-hydra", tags=["my-tag"], token="hf_fake")
    assert result == "commit-info"
    assert hub.calls[0] == "create_repo" and hub.calls[-1] == "upload_folder"
    assert hub.upload_kwargs["token"] == "hf_fake" and hub.upload_kwargs["create_pr"] is False
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.uploads)
    readme = tmp_path / "pushed.md"
    readme.write_bytes(hub.uploads["README.md"])
    card = ModelCard.load(readme)
    assert card.data.library_name == "peft"  # transformers' push_to_hub would write "transformers" here
    assert {"hydralora", "peft-hydra", "my-tag"} <= set(card.data.tags)
    code = _snippet_code(card.text)
    assert code.startswith("import peft_hydra") and '"acme/my-hydra"' in code


def test_push_to_hub_existing_repo_keeps_hand_written_text(tiny_llama, tmp_path, monkeypatch):
    remote = "---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n\nHand-written notes.\n"
    hub = FakeHub(remote_card=remote).install(monkeypatch, tmp_path)
    peft_hydra.push_to_hub(_hydra(tiny_llama), "acme/my-hydra")
    readme = tmp_path / "pushed.md"
    readme.write_bytes(hub.uploads["README.md"])
    card = ModelCard.load(readme)
    assert "Hand-written notes." in card.text and card.data.license == "mit"
    assert {"mine", "hydralora", "peft-hydra"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert _snippet_code(card.text).startswith("import peft_hydra")


def test_push_to_hub_of_other_peft_methods_is_transformers_own(tiny_llama, monkeypatch):
    """A LoRA model's push_to_hub is transformers' (PushToHubMixin), untouched by peft_hydra (a HydraLoRA model's too:
    peft_hydra.push_to_hub is a function of its own)."""
    from transformers.utils import PushToHubMixin

    seen = {}
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kw: seen.update(repo=repo_id, **kw) or "orig")
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert lora.push_to_hub("acme/lora", private=True) == "orig"
    assert seen["repo"] == "acme/lora" and seen["private"] is True
