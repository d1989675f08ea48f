"""Multi-task data for the comparison: the shipped benchmark files or a user's JSONL / `datasets` dataset.

Every example becomes ``{"id", "source", "category", "split", "prompt", "answer", "short_answer"}``; categories are
the intrinsic components the report is broken down by. Tokenised examples add ``input_ids`` and ``n_prompt`` (the
loss is computed on the answer tokens ``input_ids[n_prompt:]`` only).
"""

from __future__ import annotations

import os
import random
import re
from collections import OrderedDict, defaultdict
from typing import Any, Optional

from .errors import ConfigError
from .synthetic import SYNTHETIC_SOURCES

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _bbh(rec):
    return f"Q: {rec['input']}\nA:", " " + str(rec["target"]).strip()


def _dolly(rec):
    ctx = (rec.get("context") or "").strip()
    prompt = (f"Context: {ctx}\n" if ctx else "") + f"Instruction: {rec['instruction'].strip()}\nResponse:"
    return prompt, " " + rec["response"].strip()


def _gsm8k(rec):
    return f"Question: {rec['question'].strip()}\nAnswer:", " " + rec["answer"].strip()


#: Built-in sources: file in peft_hydra/data, formatter, whether answers are short (exact-match accuracy reported).
BUILTIN_SOURCES = {
    "bbh27": ("bbh27.jsonl", _bbh, True),
    "dolly8": ("dolly8.jsonl", _dolly, False),
    "gsm8k": ("gsm8k.jsonl", _gsm8k, False),
}

SOURCE_KEYS = {
    "name", "path", "dataset", "dataset_config", "train_split", "eval_split", "eval_fraction", "prompt_field",
    "answer_field", "category_field", "prompt_template", "short_answer", "categories", "train_per_category",
    "eval_per_category", "val_per_category",
}  # fmt: skip


def read_json(path: str) -> list[dict]:
    """The records of a JSON Lines (or JSON) file, read by ``datasets.load_dataset("json", ...)``."""
    import datasets

    if not os.path.exists(path):
        raise ConfigError(
            f"Data file {path!r} does not exist: fix `data.sources[].path` in the config (a relative path is read "
            "from the config file's folder)."
        )
    try:
        return datasets.load_dataset("json", data_files=path, split="train").to_list()
    except Exception as e:  # datasets / pyarrow report a malformed file with their own error types
        raise ConfigError(f"{path} cannot be read as JSON Lines (one JSON object per line, the same fields with the "
                          f"same types in every line): {type(e).__name__}: {e}") from e  # fmt: skip


def _user_records(src: dict, label: str) -> list[dict]:
    cat_field = src.get("category_field", "category")
    p_field, a_field = src.get("prompt_field"), src.get("answer_field")
    if not p_field or not a_field:
        raise ConfigError(
            f"Data source {label} needs `prompt_field` and `answer_field` (the names of the prompt and answer fields)."
        )
    if "path" in src:
        rows = read_json(src["path"])
        has_split = all(r.get("split") is not None for r in rows)  # datasets gives a field missing in a row as None
    else:
        import datasets

        name = src["dataset"]
        loader = datasets.load_from_disk if os.path.isdir(name) else datasets.load_dataset
        args = [name] + ([src["dataset_config"]] if src.get("dataset_config") else [])
        ds = loader(*args)
        rows = []
        for split_key, split_name in (("train_split", "train"), ("eval_split", "eval")):
            if src.get(split_key, split_name if split_name == "train" else None):
                part = ds[src.get(split_key, "train")]
                rows += [dict(r, split=split_name) for r in part]
        has_split = bool(src.get("eval_split"))
    if not rows:
        raise ConfigError(f"Data source {label} is empty.")
    for i, r in enumerate(rows):
        for field, what in ((cat_field, "category"), (p_field, "prompt"), (a_field, "answer")):
            if r.get(field) is None:
                raise ConfigError(
                    f"Data source {label}: record {i} has no {what} field {field!r} (fields: {sorted(r)}). Every "
                    f"record needs a `{cat_field}` (its category / intrinsic component), a prompt and an answer; set "
                    "`category_field`, `prompt_field`, `answer_field` in the config to the names your data uses."
                )
    if not has_split:  # deterministic split by hash-free shuffling per category
        frac = float(src.get("eval_fraction", 0.2))
        by_cat = defaultdict(list)
        for r in rows:
            by_cat[str(r[cat_field])].append(r)
        rows = []
        for cat, rs in by_cat.items():
            idx = list(range(len(rs)))
            random.Random(f"split-{cat}").shuffle(idx)
            n_eval = max(1, int(round(frac * len(rs)))) if len(rs) > 1 else 0
            for j, k in enumerate(idx):
                rows.append(dict(rs[k], split="eval" if j < n_eval else "train"))
    template = src.get("prompt_template", "{prompt}")
    out = []
    for r in rows:
        out.append(
            {
                "category": str(r[cat_field]),
                "split": r["split"],
                "prompt": template.format(prompt=str(r[p_field])),
                "answer": " " + str(r[a_field]).strip(),
            }
        )
    return out


def load_source(src: dict, index: int) -> tuple[str, list[dict], bool]:
    """Return ``(source_name, records, short_answer)`` for one entry of ``data.sources``."""
    if not isinstance(src, dict):
        src = {"name": src}
    unknown = sorted(set(src) - SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"data.sources[{index}] has unknown key(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}.")
    if "name" in src and "path" not in src and "dataset" not in src:
        name = src["name"]
        if name in SYNTHETIC_SOURCES:
            make, short = SYNTHETIC_SOURCES[name]
            recs = [{k: r[k] for k in ("category", "split", "prompt", "answer")} for r in make()]
            return name, recs, bool(src.get("short_answer", short))
        if name not in BUILTIN_SOURCES:
            raise ConfigError(
                f"data.sources[{index}]: unknown built-in source {name!r}; built-in: "
                f"{sorted(BUILTIN_SOURCES) + sorted(SYNTHETIC_SOURCES)}, or "
                "give `path:` (a JSONL) or `dataset:` (a Hugging Face dataset) with prompt_field/answer_field."
            )
        fname, fmt, short = BUILTIN_SOURCES[name]
        recs = []
        for r in read_json(os.path.join(DATA_DIR, fname)):
            prompt, answer = fmt(r)
            recs.append({"category": r["category"], "split": r["split"], "prompt": prompt, "answer": answer})
        return name, recs, bool(src.get("short_answer", short))
    if "path" not in src and "dataset" not in src:
        raise ConfigError(f"data.sources[{index}] needs `name` (built-in), `path` (JSONL) or `dataset`.")
    label = src.get("name") or os.path.splitext(os.path.basename(str(src.get("path") or src.get("dataset"))))[0]
    return label, _user_records(src, f"data.sources[{index}] ({label})"), bool(src.get("short_answer", False))


def build_splits(data_cfg: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Sample train / val / eval examples per category. ``val`` is carved from the train split (never from eval)."""
    sources = data_cfg.get("sources")
    if not sources:
        raise ConfigError("`data.sources` is missing or empty: list built-in names (bbh27, dolly8, gsm8k) or files.")
    splits = {"train": [], "val": [], "eval": []}
    for i, src in enumerate(sources):
        src_d = src if isinstance(src, dict) else {"name": src}
        name, recs, short = load_source(src_d, i)
        n_train = int(src_d.get("train_per_category", data_cfg.get("train_per_category", 100)))
        n_val = int(src_d.get("val_per_category", data_cfg.get("val_per_category", 10)))
        n_eval = int(src_d.get("eval_per_category", data_cfg.get("eval_per_category", 20)))
        wanted = src_d.get("categories")
        by_cat: dict[str, dict[str, list]] = OrderedDict()
        for r in recs:
            if wanted is None or r["category"] in wanted:
                by_cat.setdefault(r["category"], {"train": [], "eval": []})[r["split"]].append(r)
        if wanted is not None:
            missing = sorted(set(wanted) - set(by_cat))
            if missing:
                raise ConfigError(f"data source {name!r}: categories {missing} not found; it has {sorted(by_cat)}.")
        for cat, parts in by_cat.items():
            rng = random.Random(f"{seed}-{name}-{cat}")
            tr = list(parts["train"])
            rng.shuffle(tr)
            ev = list(parts["eval"])
            rng.shuffle(ev)
            picks = {"val": tr[:n_val], "train": tr[n_val : n_val + n_train], "eval": ev[:n_eval]}
            for split, rs in picks.items():
                for j, r in enumerate(rs):
                    splits[split].append(
                        {
                            "id": f"{name}/{cat}/{split}/{j}",
                            "source": name,
                            "category": cat,
                            "split": split,
                            "prompt": r["prompt"],
                            "answer": r["answer"],
                            "short_answer": short,
                        }
                    )
    for split in ("train", "eval"):
        if not splits[split]:
            raise ConfigError(f"The data config yields no {split} examples: check the per-category counts.")
    return splits


def general_texts(n: int, used_prompts: list[str], min_chars: int = 300, seed: int = 0) -> list[str]:
    """``n`` paragraphs of general text that no method trains on, for the forgetting measurement: the Wikipedia
    paragraphs in the ``context`` fields of the shipped Dolly file (dolly8.jsonl), without any paragraph that occurs
    in one of ``used_prompts`` (the train / val / eval prompts of the run), at least ``min_chars`` long, distinct,
    in a fixed order shuffled by ``seed``."""
    seen, texts = set(), []
    for r in read_json(os.path.join(DATA_DIR, "dolly8.jsonl")):
        ctx = (r.get("context") or "").strip()
        if len(ctx) >= min_chars and ctx not in seen:
            seen.add(ctx)
            texts.append(ctx)
    used = "\n\n".join(used_prompts)
    texts = [t for t in texts if t not in used]
    random.Random(f"general-{seed}").shuffle(texts)
    if len(texts) < n:
        raise ConfigError(
            f"forgetting: {n} general-text paragraphs were asked for, but only {len(texts)} Dolly contexts are not "
            "used by the run's examples: lower `forgetting`."
        )
    return texts[:n]


def tokenize_general(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """General-text examples for the forgetting measurement: the whole paragraph is scored (``n_prompt`` = 1: every
    token after the first is predicted), cut to ``max_length`` tokens."""
    out = []
    for j, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
        out.append({"id": f"general/{j}", "source": "general", "category": "general", "split": "general",
                    "prompt": "", "answer": t, "short_answer": False, "input_ids": ids, "n_prompt": 1})  # fmt: skip
    return out


def tokenize(examples: list[dict], tokenizer, max_length: int, max_answer_tokens: int) -> list[dict]:
    """Add ``input_ids`` (prompt + answer + EOS) and ``n_prompt``; the prompt is cut from the left, the answer from
    the right (then without EOS), so that every example has at least one answer token."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]
        a = a[:max_answer_tokens] if len(a) >= max_answer_tokens else a + ([eos] if eos is not None else [])
        keep_p = max(1, max_length - len(a))
        p = p[-keep_p:]
        ids = (p + a)[:max_length]
        out.append(dict(ex, input_ids=ids, n_prompt=len(p)))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def generation_rule(ex: dict) -> Optional[str]:
    """How a generated answer is scored: ``"final_number"`` (GSM8K: the number after ``####``, else the last number),
    ``"exact_line"`` (short answers: the first generated line, stripped, equals the answer), or None (not scored)."""
    if ex.get("source") == "gsm8k":
        return "final_number"
    return "exact_line" if ex.get("short_answer") else None


def final_number(text: str) -> Optional[str]:
    part = text.split("####", 1)[1] if "####" in text else text
    nums = _NUMBER.findall(part)
    if not nums:
        return None
    n = (nums[0] if "####" in text else nums[-1]).replace(",", "").rstrip(".")
    try:
        return f"{float(n):g}"
    except ValueError:
        return None


def generation_done(rule: str, text: str) -> bool:
    """Stop rule: a full first line (exact_line), or a number after ``####`` followed by a line end (final_number)."""
    if rule == "exact_line":
        return "\n" in text.lstrip("\n")
    return "####" in text and bool(re.search(r"####\s*-?[\d,.]+\s*\n", text))


def generated_correct(rule: str, generated: str, answer: str) -> bool:
    if rule == "exact_line":
        return generated.lstrip("\n").split("\n", 1)[0].strip() == answer.strip()
    return final_number(generated) is not None and final_number(generated) == final_number(answer)


def training_texts(examples: list[dict]) -> list[str]:
    return [ex["prompt"] + ex["answer"] for ex in examples]


class ByteTokenizer:
    """A dependency-free byte-level tokenizer (ids 3..258 = bytes; 0 pad, 1 bos, 2 eos) for tiny random models."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    eos_token = "</s>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def describe(splits: dict[str, list[dict]]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = OrderedDict()
    for split, exs in splits.items():
        for ex in exs:
            counts.setdefault(ex["category"], {"source": ex["source"], "train": 0, "val": 0, "eval": 0})[split] += 1
    return {"categories": counts, "n": {s: len(v) for s, v in splits.items()}}
