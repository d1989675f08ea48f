"""Hub sharing: the model card of a HydraLoRA adapter, and a ``push_to_hub`` that keeps it.

PEFT writes the model card in ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``). Its only
extension point is the base model's ``model_tags``, which adds tags but no text, and changing the user's base model
to get a card is worse than the cure. So this module wraps two ``PeftModel`` methods, once, on ``import peft_hydra``
(:func:`install_hub_hooks`); both wrappers call PEFT's original unchanged for every non-HydraLoRA model:

- ``create_or_update_model_card``: after PEFT's card (``library_name: peft``, PEFT's tags, base model), add the tags
  ``hydralora`` and ``peft-hydra`` (and the tags an existing card had, which PEFT drops) and a "How to Get Started" snippet that starts with ``import peft_hydra``
  (without it, loading the adapter fails in PEFT with ``KeyError: 'HYDRALORA'``).
- ``push_to_hub``: transformers' version replaces the card written by ``save_pretrained`` with a
  ``library_name: transformers`` one (a new repo) or with the remote card (an existing repo). The HydraLoRA version
  starts from the remote card when there is one (so hand edits survive), lets ``save_pretrained`` update it as above,
  adds ``tags``, fills the repo id into the snippet and uploads the folder with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Optional

from ._registry import PEFT_TYPE_NAME

__all__ = ["HUB_TAGS", "install_hub_hooks", "is_hydra_peft_model", "update_model_card", "usage_snippet"]

HUB_TAGS = ("hydralora", "peft-hydra")
_BEGIN = "<!-- peft-hydra usage: begin -->"
_END = "<!-- peft-hydra usage: end -->"
ADAPTER_PLACEHOLDER = "path/to/this-adapter-or-repo-id"
_MARK = "_peft_hydra_original"


def is_hydra_peft_model(model) -> bool:
    """True when any adapter of the PeftModel ``model`` is a HydraLoRA adapter."""
    configs = getattr(model, "peft_config", None) or {}
    return any(str(getattr(c.peft_type, "value", c.peft_type)) == PEFT_TYPE_NAME for c in configs.values())


def usage_snippet(adapter: str = ADAPTER_PLACEHOLDER, base_model: Optional[str] = None, task_type=None) -> str:
    """The Python snippet of the card: ``import peft_hydra`` first, then PEFT's usual loading code."""
    task = str(getattr(task_type, "value", task_type) or "")
    base = base_model or "BASE_MODEL_ID"
    if task == "CAUSAL_LM":
        return (
            "import peft_hydra  # registers the HydraLoRA PEFT type (pip install peft-hydra)\n"
            "from peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")  # loads {base} + the adapter\n'
            "model.base_model.router_stats()  # per-layer mean gates and entropy, after a few forwards\n"
        )
    return (
        "import peft_hydra  # registers the HydraLoRA PEFT type (pip install peft-hydra)\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModel\n\n"
        f'base = AutoModel.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{adapter}")\n'
    )


def update_model_card(path: str, peft_model, adapter_ref: str = ADAPTER_PLACEHOLDER, tags=()) -> None:
    """Add the HydraLoRA tags (+ ``tags``) and the usage snippet to the card at ``path`` (idempotent)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    current = list(card.data.tags or [])
    for tag in (*HUB_TAGS, *tags):
        if tag not in current:
            current.append(tag)
    card.data.tags = sorted(current)
    card.data.library_name = "peft"
    config = next(iter(peft_model.peft_config.values()))
    if getattr(peft_model, "active_adapter", None) in peft_model.peft_config:
        config = peft_model.peft_config[peft_model.active_adapter]
    base = card.data.base_model or config.base_model_name_or_path
    block = (
        f"{_BEGIN}\n```python\n{usage_snippet(adapter_ref, base, config.task_type)}```\n{_END}"
    )
    text = card.text
    if _BEGIN in text and _END in text:
        text = re.sub(re.escape(_BEGIN) + r".*?" + re.escape(_END), lambda _: block, text, count=1, flags=re.S)
    else:
        anchor = "Use the code below to get started with the model."
        if anchor in text:
            head, tail = text.split(anchor, 1)
            tail = tail.replace("[More Information Needed]", "", 1) if tail.lstrip().startswith("[More") else tail
            text = f"{head}{anchor}\n\n{block}\n{tail}"
        else:
            text = f"{text.rstrip()}\n\n## How to Get Started with the Model\n\n{block}\n"
    card.text = text
    card.save(path)


def _create_or_update_model_card(self, output_dir: str):
    if not is_hydra_peft_model(self):
        return _create_or_update_model_card.__wrapped__(self, output_dir)
    path = os.path.join(output_dir, "README.md")
    kept_tags = ()
    if os.path.exists(path):  # PEFT replaces the tags of an existing card: keep the user's
        from huggingface_hub import ModelCard

        kept_tags = tuple(ModelCard.load(path).data.tags or ())
    _create_or_update_model_card.__wrapped__(self, output_dir)
    update_model_card(path, self, tags=kept_tags)


def _push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token=None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    max_shard_size="50GB",
    tags: Optional[list[str]] = None,
    **save_kwargs,
):
    if not is_hydra_peft_model(self):
        kwargs = dict(
            commit_message=commit_message, commit_description=commit_description, private=private, token=token,
            revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags, **save_kwargs,
        )  # fmt: skip
        return _push_to_hub.__wrapped__(self, repo_id, **kwargs)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        readme = os.path.join(tmp, "README.md")
        try:
            remote = api.hf_hub_download(repo_id, "README.md", revision=revision, token=token)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            remote = None
        if remote is not None:
            with open(remote, encoding="utf-8") as src, open(readme, "w", encoding="utf-8") as dst:
                dst.write(src.read())
        self.save_pretrained(tmp, **save_kwargs)
        update_model_card(readme, self, adapter_ref=repo_id, tags=tags or ())
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload HydraLoRA adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def install_hub_hooks() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` and ``PeftModel.push_to_hub`` (idempotent; the wrappers
    defer to PEFT / transformers for every model without a HydraLoRA adapter)."""
    from peft import PeftModel

    for name, wrapper in (("create_or_update_model_card", _create_or_update_model_card), ("push_to_hub", _push_to_hub)):
        current = PeftModel.__dict__.get(name) or getattr(PeftModel, name)
        if getattr(current, _MARK, False):
            continue
        wrapper.__wrapped__ = current
        wrapper.__doc__ = (current.__doc__ or "") + "\n\n(peft-hydra: HydraLoRA adapters get their tags and usage snippet.)"
        setattr(wrapper, _MARK, True)
        setattr(PeftModel, name, wrapper)
