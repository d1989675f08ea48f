"""The synthetic conflicting-task source `conflict4` (peft_hydra/compare/synthetic.py): deterministic from its seed,
every input shared by all tasks with a different answer per task, train/eval inputs disjoint, usable by name in
`data.sources`."""

from collections import defaultdict

from peft_hydra.compare import data as D
from peft_hydra.compare.synthetic import TASKS, conflict_inputs, conflict_records


def test_same_seed_same_records_other_seed_other_records():
    assert conflict_records(seed=0) == conflict_records(seed=0)
    assert conflict_inputs(50, seed=0) != conflict_inputs(50, seed=1)


def test_tasks_conflict_on_the_same_input():
    recs = conflict_records(n_inputs=120)
    by_input = defaultdict(dict)
    for r in recs:
        assert r["prompt"] == f"Task: {r['category']}\nInput: {r['input']}\nOutput:"  # the task is in the prompt
        by_input[r["input"]][r["category"]] = r["answer"]
    assert len(by_input) == 120
    for inp, answers in by_input.items():
        assert set(answers) == set(TASKS)  # every input in every task
        assert len(set(answers.values())) == len(TASKS), (inp, answers)  # ... with a different answer per task
    words = "lamp river coat".split()
    assert {t: f(words) for t, f in TASKS.items()} == {
        "reverse": "coat river lamp", "uppercase": "LAMP RIVER COAT", "sort": "coat lamp river", "initials": "l r c"}


def test_train_and_eval_inputs_are_disjoint_for_every_task():
    recs = conflict_records(n_inputs=80, eval_fraction=0.25)
    split_of = defaultdict(set)
    for r in recs:
        split_of[r["input"]].add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())  # an input is eval for every task or train for every task
    assert sum(s == {"eval"} for s in split_of.values()) == 20


def test_conflict4_is_a_data_source_name():
    splits = D.build_splits({"sources": ["conflict4"], "train_per_category": 5, "val_per_category": 1,
                             "eval_per_category": 3})  # fmt: skip
    assert {ex["category"] for ex in splits["train"]} == set(TASKS)
    assert len(splits["eval"]) == 3 * len(TASKS) and all(ex["short_answer"] for ex in splits["eval"])
    assert splits == D.build_splits({"sources": ["conflict4"], "train_per_category": 5, "val_per_category": 1,
                                     "eval_per_category": 3})  # fmt: skip


# ------------------------------------------------------------------------------------------- cipher family
from peft_hydra.compare.synthetic import CIPHER_WORDS, cipher_maps, cipher_records  # noqa: E402


def test_cipher_maps_are_derangements_that_disagree_on_every_word():
    maps = cipher_maps(n_tasks=4, vocab=12, seed=0)
    words = CIPHER_WORDS[:12]
    assert len(maps) == 4 and maps == cipher_maps(4, 12, 0) and maps != cipher_maps(4, 12, 1)
    for m in maps.values():
        assert sorted(m) == sorted(words) and sorted(m.values()) == sorted(words)  # a permutation of the vocabulary
        assert all(m[w] != w for w in words)  # no word maps to itself
    for w in words:
        assert len({m[w] for m in maps.values()}) == 4  # every pair of tasks disagrees on every word


def test_cipher_records_conflict_word_by_word_and_keep_splits_disjoint():
    recs = cipher_records(n_inputs=100, eval_fraction=0.2, seed=3)
    maps = cipher_maps(4, 12, 3)
    by_input, split_of = defaultdict(dict), defaultdict(set)
    for r in recs:
        assert r["prompt"] == f"Task: {r['category']}\nInput: {r['input']}\nOutput:"  # the task comes first
        assert r["answer"] == " " + " ".join(maps[r["category"]][w] for w in r["input"].split())
        assert 3 <= len(r["input"].split()) <= 5
        by_input[r["input"]][r["category"]] = r["answer"]
        split_of[r["input"]].add(r["split"])
    assert len(by_input) == 100 and all(len(set(a.values())) == 4 for a in by_input.values())
    assert all(len(s) == 1 for s in split_of.values()) and sum(s == {"eval"} for s in split_of.values()) == 20
    assert recs == cipher_records(n_inputs=100, eval_fraction=0.2, seed=3)


def test_cipher_sources_by_name():
    for name, tasks in (("cipher4", 4), ("cipher8", 8)):
        splits = D.build_splits({"sources": [name], "train_per_category": 5, "val_per_category": 1,
                                 "eval_per_category": 3})  # fmt: skip
        assert len({ex["category"] for ex in splits["train"]}) == tasks
        assert len(splits["eval"]) == 3 * tasks and all(ex["short_answer"] for ex in splits["eval"])
