"""Synthetic conflicting tasks: a controlled benchmark where routing should matter.

``conflict4`` (a built-in data source name, usable in ``data.sources``): one shared pool of inputs (a few lowercase
words) and four tasks that map the SAME input to DIFFERENT answers, the task named in the prompt::

    Task: reverse          Input: lamp river coat     Output: coat river lamp
    Task: uppercase        Input: lamp river coat     Output: LAMP RIVER COAT
    Task: sort             Input: lamp river coat     Output: coat lamp river
    Task: initials         Input: lamp river coat     Output: l r c

One LoRA has to serve four conflicting input -> output maps from one set of weights; a router that reads the task
from the prompt could send each task to its own head. Everything is generated from a seed (no download): the same
seed gives the same records, byte for byte. Train and eval inputs are disjoint (an input is in one split for every
task), so the eval measures the tasks, not memorised inputs.
"""

from __future__ import annotations

import random

#: A fixed vocabulary of short, common, lowercase English words (distinct first letters are not required).
WORDS = (
    "apple bird boat bread brick cake camp card cat chair chalk cloud coat coin corn cup desk dog door dream drum "
    "duck dust egg farm fire fish flag foot fork frog game gate gift girl glass glove goat gold grass hand hat hill "
    "horn horse house ink iron jam jar key king kite lake lamp leaf lion lock map milk moon mouse nail nest net "
    "nose note oak ocean owl paint park pear pen pig pipe plane plate pond queen rain ring river road rock roof "
    "rope rose salt sand seed sheep ship shoe silk sky snow sock song spoon star stone sun table tent tiger tooth "
    "town toy train tree truck van vase wall water whale wheel wind wing wolf wood yard zoo"
).split()

#: task name -> answer of a list of words
TASKS = {
    "reverse": lambda ws: " ".join(reversed(ws)),
    "uppercase": lambda ws: " ".join(w.upper() for w in ws),
    "sort": lambda ws: " ".join(sorted(ws)),
    "initials": lambda ws: " ".join(w[0] for w in ws),
}


def conflict_inputs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 4) -> list[list[str]]:
    """``n`` distinct inputs (lists of distinct words), deterministic from ``seed``. An input whose words are
    already sorted, reversed-sorted, or otherwise makes two tasks agree is skipped, so every input's answers differ
    across all tasks."""
    rng = random.Random(f"conflict-{seed}")
    seen, out = set(), []
    while len(out) < n:
        ws = rng.sample(WORDS, rng.randint(min_words, max_words))
        key = tuple(ws)
        if key in seen:
            continue
        answers = [f(ws) for f in TASKS.values()]
        if len(set(answers)) < len(answers):  # e.g. an already sorted input: reverse or sort would not conflict
            continue
        seen.add(key)
        out.append(ws)
    return out


def conflict_records(n_inputs: int = 400, eval_fraction: float = 0.25, seed: int = 0) -> list[dict]:
    """Records ``{"category": task, "split", "prompt", "answer", "input"}`` of every task on every input. The first
    ``eval_fraction`` of the (shuffled) inputs are eval inputs for every task, the rest train inputs."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    inputs = conflict_inputs(n_inputs, seed)
    n_eval = max(1, int(round(eval_fraction * n_inputs)))
    recs = []
    for task, fn in TASKS.items():
        for i, ws in enumerate(inputs):
            text = " ".join(ws)
            recs.append({
                "category": task,
                "split": "eval" if i < n_eval else "train",
                "prompt": f"Task: {task}\nInput: {text}\nOutput:",
                "answer": " " + fn(ws),
                "input": text,
            })  # fmt: skip
    return recs


#: Synthetic built-in sources: name -> (records, short_answer). Short answers: exact-match accuracy is reported.
SYNTHETIC_SOURCES = {"conflict4": (conflict_records, True)}
