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

``cipher4`` / ``cipher8`` (:func:`cipher_records`): per-task substitution ciphers over a small word vocabulary, the
family where routing by task should pay: the tasks conflict on every input, each alone is a small lookup, and they
share no skill beyond reading the words.
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
    check_eval_fraction(eval_fraction)
    return task_records(TASKS, conflict_inputs(n_inputs, seed), eval_fraction)


def check_eval_fraction(eval_fraction: float) -> None:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")


def task_records(tasks: dict, inputs: list[list[str]], eval_fraction: float) -> list[dict]:
    """Every task (name -> answer of a word list) on every input, the task named first in the prompt; the first
    ``eval_fraction`` of the inputs are eval inputs for every task, the rest train inputs."""
    n_eval = max(1, int(round(eval_fraction * len(inputs))))
    recs = []
    for task, fn in tasks.items():
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


# ------------------------------------------------------------------------------------------------ ciphers
#: The cipher family's vocabulary: short common words, each one token (with its leading space) for SmolLM2's tokenizer.
CIPHER_WORDS = "cat dog sun tree book fish car hat cup bird milk door ring lamp rock star".split()
#: Neutral task names (no hint of the map): the task is named first in the prompt.
CIPHER_TASKS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")


def cipher_maps(n_tasks: int = 4, vocab: int = 12, seed: int = 0) -> dict[str, dict[str, str]]:
    """``n_tasks`` substitution ciphers over the first ``vocab`` words of :data:`CIPHER_WORDS`, deterministic from
    ``seed``: task -> {word: word}. Each map is a random permutation without fixed points (no word maps to itself:
    copying the input never helps), and any two tasks map EVERY word differently (they conflict on every input)."""
    if not 2 <= n_tasks <= len(CIPHER_TASKS) or not n_tasks < vocab <= len(CIPHER_WORDS):
        raise ValueError(f"cipher_maps needs 2 <= n_tasks <= {len(CIPHER_TASKS)} and n_tasks < vocab <= "
                         f"{len(CIPHER_WORDS)}; got n_tasks={n_tasks}, vocab={vocab}.")  # fmt: skip
    words = CIPHER_WORDS[:vocab]
    rng = random.Random(f"cipher-{seed}")
    perms: list[list[int]] = []
    while len(perms) < n_tasks:
        p = list(range(vocab))
        rng.shuffle(p)
        if all(p[i] != i for i in range(vocab)) and all(p[i] != q[i] for q in perms for i in range(vocab)):
            perms.append(p)
    return {CIPHER_TASKS[k]: {words[i]: words[p[i]] for i in range(vocab)} for k, p in enumerate(perms)}


def cipher_records(n_inputs: int = 400, eval_fraction: float = 0.25, seed: int = 0, n_tasks: int = 4,
                   vocab: int = 12, min_words: int = 3, max_words: int = 5) -> list[dict]:  # fmt: skip
    """Records of the cipher family: task k maps each input word w to ``perm_k(w)`` (:func:`cipher_maps`), word by
    word, the task named at the start of the prompt::

        Task: alpha     Input: cat sun lamp     Output: ring tree hat
        Task: beta      Input: cat sun lamp     Output: door cup fish

    Every task sees the same inputs (distinct words of the vocabulary, ``min_words``-``max_words`` long) and answers
    each differently: the tasks conflict, while each alone is a small lookup (a permutation of ``vocab`` words) that
    a low rank can hold. Unlike ``conflict4`` (four word-order skills that share reading the words), the tasks share
    nothing but the input words, so one set of weights must hold ``n_tasks x vocab`` (task, word) -> word entries and
    an oracle router can give each task its own head. Train and eval inputs are disjoint (the first
    ``eval_fraction`` of the shuffled inputs are eval inputs for every task); eval inputs are new word combinations,
    every word of which is in training."""
    check_eval_fraction(eval_fraction)
    maps = cipher_maps(n_tasks, vocab, seed)
    words = CIPHER_WORDS[:vocab]
    rng = random.Random(f"cipher-inputs-{seed}")
    seen, inputs = set(), []
    while len(inputs) < n_inputs:
        ws = tuple(rng.sample(words, rng.randint(min_words, max_words)))
        if ws not in seen:
            seen.add(ws)
            inputs.append(list(ws))
    tasks = {task: (lambda ws, m=m: " ".join(m[w] for w in ws)) for task, m in maps.items()}
    return task_records(tasks, inputs, eval_fraction)


#: Synthetic built-in sources: name -> (records, short_answer). Short answers: exact-match accuracy is reported.
#: ``cipher4``: 4 ciphers over 12 words; ``cipher8``: 8 ciphers over 16 words (more conflicting tasks than heads).
SYNTHETIC_SOURCES = {
    "conflict4": (conflict_records, True),
    "cipher4": (cipher_records, True),
    "cipher8": (lambda: cipher_records(n_tasks=8, vocab=16), True),
}
