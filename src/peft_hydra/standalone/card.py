"""The model card of a HydraLoRA adapter, and a ``push_to_hub`` that keeps it. Patches nothing.

- Tags ``hydralora`` and ``peft-hydra``: ``PreTrainedModel.add_model_tags`` on the base model when the tuner is created
  (:func:`tag_model`); PEFT's own card writer (``save_pretrained``) puts them into the card.
- The usage snippet (``import peft_hydra`` first, then the class the adapter was trained on): PEFT offers no hook for
  card text, so :func:`write_model_card` adds it to a saved adapter's card (call it after ``save_pretrained``), and
  :func:`push_to_hub` uploads an adapter with it. transformers' ``push_to_hub``, which
  ``PeftModel`` inherits, replaces the card of a new repository with a ``library_name: transformers`` one; ours
  starts from the remote card when there is one (so hand edits survive), saves with ``save_pretrained`` and uploads
  the folder with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Optional

from ..config import PEFT_TYPE_NAME

__all__ = ["HUB_TAGS", "is_hydra_peft_model", "push_to_hub", "tag_model", "update_model_card", "usage_snippet", "write_model_card"]

HUB_TAGS = ("hydralora", "peft-hydra")
_BEGIN = "<!-- peft-hydra usage: begin -->"
_END = "<!-- peft-hydra usage: end -->"
ADAPTER_PLACEHOLDER = "path/to/this-adapter-or-repo-id"


def tag_model(model) -> None:
    """Add :data:`HUB_TAGS` to ``model.model_tags`` (transformers' mechanism, read by PEFT's card writer)."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(list(HUB_TAGS))


def is_hydra_peft_model(model) -> bool:
    """True when any adapter of the PeftModel ``model`` is a HydraLoRA adapter."""
    configs = getattr(model, "peft_config", None) or {}
    return any(str(getattr(c.peft_type, "value", c.peft_type)) == PEFT_TYPE_NAME for c in configs.values())


def usage_snippet(
    adapter: str = ADAPTER_PLACEHOLDER, base_model: Optional[str] = None, task_type=None, base_class: Optional[type] = None
) -> str:
    """The Python snippet of the card: ``import peft_hydra`` first, then PEFT's loading code for the class the adapter
    was trained on (``base_class``; ``AutoPeftModelForCausalLM`` for ``task_type="CAUSAL_LM"``)."""
    task = str(getattr(task_type, "value", task_type) or "")
    base = base_model or "BASE_MODEL_ID"
    first = "import peft_hydra  # registers the HydraLoRA PEFT type (pip install peft-hydra)\n"
    if task == "CAUSAL_LM":
        return (
            f"{first}from peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")  # loads {base} + the adapter\n'
        )
    name, module = (base_class.__name__, base_class.__module__) if base_class is not None else ("AutoModel", "transformers")
    if module.split(".")[0] == "transformers":
        module = "transformers"  # e.g. transformers.models.llama.modeling_llama -> the public name
    return (
        f"{first}from peft import PeftModel\nfrom {module} import {name}\n\n"
        f'base = {name}.from_pretrained("{base}")\n'
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
    base_class = type(peft_model.get_base_model()) if hasattr(peft_model, "get_base_model") else None
    block = f"{_BEGIN}\n```python\n{usage_snippet(adapter_ref, base, config.task_type, base_class)}```\n{_END}"
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


def write_model_card(model, save_directory: str, adapter_ref: str = ADAPTER_PLACEHOLDER) -> None:
    """The card of the adapter saved in ``save_directory``: PEFT's card (``model.create_or_update_model_card``), the
    tags it had kept, the HydraLoRA tags and the usage snippet (``adapter_ref``: the repo id or path to load from)."""
    path = os.path.join(save_directory, "README.md")
    kept_tags = ()
    if os.path.exists(path):
        from huggingface_hub import ModelCard

        kept_tags = tuple(ModelCard.load(path).data.tags or ())
    model.create_or_update_model_card(save_directory)
    update_model_card(path, model, adapter_ref=adapter_ref, tags=kept_tags)


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token=None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs,
):
    """Upload the adapter of ``model`` (a PeftModel) with its HydraLoRA card to ``repo_id``; other keyword arguments go
    to ``save_pretrained``
    (e.g. ``max_shard_size``, ``safe_serialization``, ``selected_adapters``)."""
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
        kept_tags: tuple = ()
        if remote is not None:
            with open(remote, encoding="utf-8") as src, open(readme, "w", encoding="utf-8") as dst:
                dst.write(src.read())
            from huggingface_hub import ModelCard

            kept_tags = tuple(ModelCard.load(readme).data.tags or ())  # PEFT's card writer replaces them
        model.save_pretrained(tmp, **save_kwargs)
        update_model_card(readme, model, adapter_ref=repo_id, tags=(*kept_tags, *(tags or ())))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload HydraLoRA adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
