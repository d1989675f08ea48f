"""Choose the number of HydraLoRA heads N from a corpus, as in the paper's appendix (arXiv 2404.19245).

The texts are embedded with TF-IDF, clustered with k-means for k = k_min..k_max, and N is the elbow of the
within-cluster sum-of-squares (SSE) curve: the k whose point lies farthest below the straight line joining the
first and last points of the curve (both axes scaled to [0, 1], the "kneedle" rule).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

__all__ = ["suggest_num_experts"]


def _elbow(ks: Sequence[int], sse: Sequence[float]) -> int:
    """The k of maximum distance below the chord of the (normalised, decreasing) SSE curve."""
    if len(ks) < 3:
        return int(ks[int(min(range(len(sse)), key=lambda i: sse[i]))]) if len(ks) == 2 else int(ks[0])
    k0, k1 = ks[0], ks[-1]
    s0, s1 = sse[0], sse[-1]
    span = (s0 - s1) or 1.0
    best_k, best_gap = ks[0], 0.0
    for k, s in zip(ks, sse):
        x = (k - k0) / (k1 - k0)
        y = (s - s1) / span  # 1 at the first point, 0 at the last
        gap = (1.0 - x) - y  # chord value minus curve value
        if gap > best_gap + 1e-12:
            best_k, best_gap = k, gap
    return int(best_k)


def suggest_num_experts(
    texts: Sequence[str],
    k_min: int = 1,
    k_max: int = 10,
    max_features: int = 5000,
    random_state: int = 0,
    return_curve: bool = False,
) -> Union[int, tuple[int, dict[str, Any]]]:
    """Suggest N (the number of B heads) for a training corpus: TF-IDF + k-means + elbow of the SSE curve.

    Args:
        texts: The training texts (e.g. prompt + answer of every training example).
        k_min, k_max: The range of cluster counts tried (inclusive); clipped to the number of distinct texts.
        max_features: TF-IDF vocabulary size.
        random_state: Seed of k-means (results are deterministic for a given seed).
        return_curve: Also return ``{"k": [...], "sse": [...], "num_experts": N}`` (e.g. to plot the curve).

    Returns:
        N, or ``(N, curve)`` with ``return_curve=True``. N = 1 means no cluster structure was found.
    """
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise ValueError(f"suggest_num_experts needs at least 2 non-empty texts, got {len(texts)}.")
    if not (isinstance(k_min, int) and isinstance(k_max, int) and 1 <= k_min < k_max):
        raise ValueError(f"suggest_num_experts needs integers 1 <= k_min < k_max, got k_min={k_min}, k_max={k_max}.")
    X = TfidfVectorizer(max_features=max_features, sublinear_tf=True).fit_transform(texts)
    n_distinct = len(set(texts))
    ks = [k for k in range(k_min, k_max + 1) if k <= n_distinct]
    sse = []
    for k in ks:
        km = KMeans(n_clusters=k, n_init=5, random_state=random_state).fit(X)
        sse.append(float(km.inertia_))
    n = _elbow(ks, sse)
    if return_curve:
        return n, {"k": ks, "sse": sse, "num_experts": n}
    return n
