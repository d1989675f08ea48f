"""Hub sharing: the model card of a HydraLoRA adapter, and a ``push_to_hub`` that keeps it.

``import peft_hydra`` changes no class of PEFT or transformers. What a HydraLoRA adapter's card needs comes from:

- Tags ``hydralora`` and ``peft-hydra``: ``PreTrainedModel.add_model_tags`` on the base model when the HydraLoRA tuner
  is created (:func:`tag_model`). PEFT's card writer (``PeftModel.create_or_update_model_card``) reads these tags.
- The "How to Get Started" snippet (``import peft_hydra`` first, then the class the adapter was trained on) and a
  ``push_to_hub`` that keeps PEFT's card: PEFT offers no hook for card text, and transformers' ``push_to_hub``
  (which ``PeftModel`` inherits) replaces the card written by ``save_pretrained`` with a ``library_name:
  transformers`` one. So these two methods are overridden on the INSTANCE, only for a ``PeftModel`` whose tuner is
  HydraLoRA (:func:`attach_to_peft_model`, called by ``HydraLoraModel.__init__``). Every other PEFT model, and the
  ``PeftModel`` class itself, are untouched. The override calls PEFT's own card writer first and then adds the tags a
  previous card had (PEFT drops them) and the snippet; ``push_to_hub`` starts from the remote card when there is one
  (so hand edits survive), saves with ``save_pretrained`` and uploads the folder with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import os
import re
import tempfile
import types
from typing import Optional

from .config import PEFT_TYPE_NAME

__all__ = ["HUB_TAGS", "attach_to_peft_model", "is_hydra_peft_model", "tag_model", "update_model_card", "usage_snippet"]

HUB_TAGS = ("hydralora", "peft-hydra")
_BEGIN = "<!-- peft-hydra usage: begin -->"
_END = "<!-- peft-hydra usage: end -->"
ADAPTER_PLACEHOLDER = "path/to/this-adapter-or-repo-id"


def tag_model(model) -> None:
    """Add :data:`HUB_TAGS` to ``model.model_tags`` (transformers' mechanism, read by PEFT's card writer)."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(list(HUB_TAGS))


def attach_to_peft_model(tuner) -> None:
    """Give the ``PeftModel`` that is about to hold ``tuner`` (a ``HydraLoraModel``) the HydraLoRA card methods.

    ``PeftModel.__init__`` creates the tuner and assigns it to ``self.base_model`` right after; the tuner never sees
    the ``PeftModel``. A one-shot module-registration hook catches that assignment and then removes itself (it is
    also removed by the first other registration, e.g. when the tuner is used without a ``PeftModel``).
    """
    from torch.nn.modules.module import register_module_module_registration_hook

    def hook(module, name, submodule):
        handle.remove()
        if submodule is tuner and name == "base_model":
            _override_card_methods(module)

    handle = register_module_module_registration_hook(hook)


def _override_card_methods(peft_model) -> None:
    for name, method in (("create_or_update_model_card", _create_or_update_model_card), ("push_to_hub", _push_to_hub)):
        object.__setattr__(peft_model, name, types.MethodType(method, peft_model))


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


def _create_or_update_model_card(self, output_dir: str):
    """PEFT's card, then the tags an existing card had (PEFT replaces them) and the HydraLoRA usage snippet."""
    path = os.path.join(output_dir, "README.md")
    kept_tags = ()
    if os.path.exists(path):
        from huggingface_hub import ModelCard

        kept_tags = tuple(ModelCard.load(path).data.tags or ())
    type(self).create_or_update_model_card(self, output_dir)
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
    tags: Optional[list[str]] = None,
    **save_kwargs,
):
    """Upload the adapter with its HydraLoRA card to ``repo_id``; other keyword arguments go to ``save_pretrained``
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
