"""`peft_hydra.suggest_num_experts`: TF-IDF + k-means restarts and folds + an elbow that must stand out, on synthetic
corpora with a known number of clusters (a clear elbow is found) and with none (the documented fallback is taken)."""

import random
import sys

import pytest

import peft_hydra
from peft_hydra.heads import DEFAULT_FALLBACK, PAPER_RANGE, _elbow_gap

FAST = {"n_init": 3, "folds": 3}


def clustered_texts(n_clusters: int, per_cluster: int = 20, seed: int = 0) -> list[str]:
    """Texts drawn from ``n_clusters`` disjoint vocabularies: k-means should find exactly that many groups."""
    rng = random.Random(seed)
    vocabs = [[f"topic{c}word{i}" for i in range(25)] for c in range(n_clusters)]
    texts = [" ".join(rng.choices(vocabs[c], k=12)) for c in range(n_clusters) for _ in range(per_cluster)]
    rng.shuffle(texts)
    return texts


def unclustered_texts(n: int = 90, seed: int = 0) -> list[str]:
    """Texts drawn from ONE shared vocabulary: no cluster structure at all."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(300)]
    return [" ".join(rng.choices(vocab, k=12)) for _ in range(n)]


@pytest.mark.parametrize("k", [3, 5])
def test_clear_elbow_recovers_known_cluster_count(k):
    n, curve = peft_hydra.suggest_num_experts(clustered_texts(k), k_max=8, return_curve=True, **FAST)
    assert n == k and curve["clear"] and not curve["fallback_used"]
    assert curve["k"] == list(range(1, 9)) and len(curve["sse"]) == 8 and curve["num_experts"] == k
    assert curve["gap"] >= curve["margin"] and curve["fold_elbows"] == [k] * 3 and curve["agreement"] == 1.0
    assert all(a >= b for a, b in zip(curve["sse"], curve["sse"][1:]))  # SSE does not increase with k
    assert "clear elbow" in curve["reason"]


def test_no_structure_takes_the_documented_fallback():
    n, curve = peft_hydra.suggest_num_experts(unclustered_texts(), k_max=8, return_curve=True, **FAST)
    assert not curve["clear"] and curve["fallback_used"] and curve["gap"] < curve["margin"]
    assert n == DEFAULT_FALLBACK and PAPER_RANGE[0] <= n <= PAPER_RANGE[1]
    assert "no clear elbow" in curve["reason"] and f"fallback N = {DEFAULT_FALLBACK}" in curve["reason"]
    # fallback=None returns the (unclear) elbow itself; a custom fallback is honoured
    assert peft_hydra.suggest_num_experts(unclustered_texts(), k_max=8, fallback=None, **FAST) == curve["elbow"]
    assert peft_hydra.suggest_num_experts(unclustered_texts(), k_max=8, fallback=2, **FAST) == 2


def test_unstable_choice_across_folds_is_not_clear():
    """A big gap is not enough: when the folds do not choose the whole-corpus elbow, the elbow is not clear."""
    texts = clustered_texts(5)
    # folds of 5% of 100 texts (5 texts, ~1 per cluster) cannot see the 5 clusters: their elbows scatter
    n, curve = peft_hydra.suggest_num_experts(texts, k_max=8, return_curve=True, n_init=3, folds=5, fold_fraction=0.05)
    assert curve["elbow"] == 5 and curve["gap"] >= curve["margin"]  # the whole corpus alone shows a clear knee
    assert len(curve["fold_elbows"]) == 5 and curve["agreement"] < curve["min_agreement"]
    assert not curve["clear"] and curve["fallback_used"] and n == DEFAULT_FALLBACK
    assert "of folds choose k=5" in curve["reason"] and "straight line" not in curve["reason"]
    # the same corpus with folds large enough to see every cluster: they agree and the elbow is clear
    n, curve = peft_hydra.suggest_num_experts(texts, k_max=8, return_curve=True, **FAST)
    assert curve["clear"] and n == 5 and curve["agreement"] == 1.0
    # no folds: stability is not measured (agreement 1); a margin no curve can meet: not clear
    n, curve = peft_hydra.suggest_num_experts(texts, k_max=8, return_curve=True, min_agreement=1.0, folds=0, n_init=3)
    assert curve["clear"] and curve["fold_elbows"] == []
    n, curve = peft_hydra.suggest_num_experts(texts, k_max=8, return_curve=True, margin=0.99, **FAST)
    assert not curve["clear"] and n == DEFAULT_FALLBACK and "straight line" in curve["reason"]


def test_is_deterministic_and_returns_int():
    texts = clustered_texts(4, seed=1)
    a = peft_hydra.suggest_num_experts(texts, k_max=7, **FAST)
    b = peft_hydra.suggest_num_experts(texts, k_max=7, **FAST)
    assert isinstance(a, int) and a == b == 4


def test_elbow_rule():
    assert _elbow_gap([1, 2, 3, 4, 5, 6], [100, 60, 20, 18, 16, 14])[0] == 3  # a sharp knee at k=3
    k, gap = _elbow_gap([1, 2, 3, 4], [4, 3, 2, 1])  # a straight line has no elbow: gap 0
    assert gap == 0.0 and k == 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 3 non-empty texts"):
        peft_hydra.suggest_num_experts(["only one", "two"])
    with pytest.raises(ValueError, match=r"k_min \+ 2 <= k_max"):
        peft_hydra.suggest_num_experts(clustered_texts(2), k_min=5, k_max=3)
    with pytest.raises(ValueError, match="at least 3 values"):  # two k values can never show an elbow
        peft_hydra.suggest_num_experts(clustered_texts(2), k_min=1, k_max=2)
    with pytest.raises(ValueError, match="fallback must be None or an integer"):
        peft_hydra.suggest_num_experts(clustered_texts(2), fallback=0)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.feature_extraction", None)
    monkeypatch.setitem(sys.modules, "sklearn.feature_extraction.text", None)
    with pytest.raises(ImportError, match=r"pip install 'peft-hydra\[compare\]'"):
        peft_hydra.suggest_num_experts(clustered_texts(2))


@pytest.mark.parametrize("kwargs", [{"folds": -1}, {"n_init": 0}, {"folds": True}])
def test_bad_folds_and_restarts_are_refused(kwargs):
    """folds=-1 used to mean no folds, so agreement defaulted to 1.0 and any elbow was called clear."""
    with pytest.raises(ValueError, match="must be an integer >="):
        peft_hydra.suggest_num_experts(["a b", "c d", "e f", "g h"], k_max=3, **kwargs)
