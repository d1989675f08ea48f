"""`peft_hydra.suggest_num_experts`: TF-IDF + k-means + elbow on synthetic corpora with a known cluster count."""

import random

import pytest

import peft_hydra
from peft_hydra.heads import _elbow


def clustered_texts(n_clusters: int, per_cluster: int = 30, seed: int = 0) -> list[str]:
    """Texts drawn from ``n_clusters`` disjoint vocabularies: k-means should find exactly that many groups."""
    rng = random.Random(seed)
    vocabs = [[f"topic{c}word{i}" for i in range(25)] for c in range(n_clusters)]
    texts = [" ".join(rng.choices(vocabs[c], k=12)) for c in range(n_clusters) for _ in range(per_cluster)]
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("k", [3, 5])
def test_recovers_known_cluster_count(k):
    n, curve = peft_hydra.suggest_num_experts(clustered_texts(k), k_max=9, return_curve=True)
    assert n == k
    assert curve["k"] == list(range(1, 10))
    assert len(curve["sse"]) == 9 and curve["num_experts"] == k
    assert all(a >= b for a, b in zip(curve["sse"], curve["sse"][1:]))  # SSE does not increase with k


def test_is_deterministic_and_returns_int():
    texts = clustered_texts(4, seed=1)
    a = peft_hydra.suggest_num_experts(texts, k_max=8)
    b = peft_hydra.suggest_num_experts(texts, k_max=8)
    assert isinstance(a, int) and a == b == 4


def test_elbow_rule():
    # a sharp knee at k=3
    assert _elbow([1, 2, 3, 4, 5, 6], [100, 60, 20, 18, 16, 14]) == 3
    # a straight line has no elbow: the first k is returned
    assert _elbow([1, 2, 3, 4], [4, 3, 2, 1]) == 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 non-empty texts"):
        peft_hydra.suggest_num_experts(["only one"])
    with pytest.raises(ValueError, match="k_min < k_max"):
        peft_hydra.suggest_num_experts(clustered_texts(2), k_min=5, k_max=3)
