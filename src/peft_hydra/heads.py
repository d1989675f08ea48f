"""Choose the number of HydraLoRA heads N from a corpus, following the paper's appendix (arXiv 2404.19245).

The procedure (needs scikit-learn, part of the ``compare`` extra: ``pip install 'peft-hydra[compare]'``):

1. The texts are embedded with TF-IDF (sub-linear term frequency, L2-normalised rows).
2. For every k in ``k_min..k_max`` k-means is run with ``n_init`` restarts (the best of the restarts is kept) on the
   whole corpus and on ``folds`` random subsets of ``fold_fraction`` of the texts; each gives a within-cluster
   sum-of-squares (SSE) curve.
3. The elbow of a curve is the k whose point lies farthest below the straight line (the chord) joining the first and
   last points, with both axes scaled to [0, 1] (the "kneedle" rule). Its distance below the chord, ``gap``, is a
   fraction of the whole SSE drop: 0 for a straight line, up to 1 for a right angle.
4. The elbow is **clear** when the whole-corpus curve's gap is at least ``margin`` (default 0.1: the elbow sits at
   least 10% of the SSE drop below a straight line) AND at least ``min_agreement`` (default 60%) of the folds pick
   the same k (the choice is stable under resampling).
5. With a clear elbow, N is its k. Without one, N is ``fallback`` (default 3, inside the 2-4 heads the paper reports
   for its corpora), and the returned curve says so (``clear: False``, ``fallback_used: True``).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Optional, Sequence, Union

__all__ = ["suggest_num_experts"]

#: The documented defaults of the procedure (see the module docstring).
DEFAULT_MARGIN = 0.1
DEFAULT_MIN_AGREEMENT = 0.6
DEFAULT_FALLBACK = 3
PAPER_RANGE = (2, 4)


def _elbow_gap(ks: Sequence[int], sse: Sequence[float]) -> tuple[int, float]:
    """(k, gap) of the point farthest below the chord of the normalised, decreasing SSE curve (gap 0: no elbow)."""
    k0, k1 = ks[0], ks[-1]
    s0, s1 = sse[0], sse[-1]
    span = s0 - s1
    if span <= 0 or k1 == k0:
        return int(ks[0]), 0.0
    best_k, best_gap = ks[0], 0.0
    for k, s in zip(ks, sse):
        x = (k - k0) / (k1 - k0)
        y = (s - s1) / span  # 1 at the first point, 0 at the last
        gap = (1.0 - x) - y  # chord value minus curve value
        if gap > best_gap + 1e-12:
            best_k, best_gap = k, gap
    return int(best_k), float(best_gap)


def _sse_curve(X, ks, n_init: int, random_state: int) -> list[float]:
    from sklearn.cluster import KMeans

    return [float(KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(X).inertia_) for k in ks]


def suggest_num_experts(
    texts: Sequence[str],
    k_min: int = 1,
    k_max: int = 10,
    max_features: int = 5000,
    random_state: int = 0,
    return_curve: bool = False,
    *,
    n_init: int = 10,
    folds: int = 5,
    fold_fraction: float = 0.8,
    margin: float = DEFAULT_MARGIN,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    fallback: Optional[int] = DEFAULT_FALLBACK,
) -> Union[int, tuple[int, dict[str, Any]]]:
    """Suggest N (the number of B heads) for a training corpus: TF-IDF + k-means + a clear elbow, else ``fallback``.

    Needs scikit-learn (``pip install 'peft-hydra[compare]'``). The procedure and its thresholds are described in
    the module docstring of ``peft_hydra.heads``.

    Args:
        texts: The training texts (e.g. prompt + answer of every training example).
        k_min, k_max: The range of cluster counts tried (inclusive, at least 3 values); clipped to the number of
            distinct texts.
        max_features: TF-IDF vocabulary size.
        random_state: Seed of k-means and of the folds (results are deterministic for a given seed).
        return_curve: Also return the evidence: ``{"k", "sse", "num_experts", "elbow", "gap", "margin", "clear",
            "fold_elbows", "agreement", "fallback_used", "reason"}`` (e.g. to plot or report it).
        n_init: k-means restarts per k (the best is kept).
        folds: Random subsets of the corpus whose elbows measure the stability of the choice (0: no folds).
        fold_fraction: Size of each subset, as a fraction of the texts.
        margin: How far below the chord (as a fraction of the SSE drop) the elbow must be to count as clear.
        min_agreement: Fraction of folds that must choose the same k as the whole corpus.
        fallback: N returned when there is no clear elbow (default 3); ``None`` returns the (unclear) elbow anyway.

    Returns:
        N, or ``(N, curve)`` with ``return_curve=True``.
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as e:
        raise ImportError(
            "suggest_num_experts needs scikit-learn: pip install 'peft-hydra[compare]'"
        ) from e

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 3:
        raise ValueError(f"suggest_num_experts needs at least 3 non-empty texts, got {len(texts)}.")
    if not (isinstance(k_min, int) and isinstance(k_max, int) and 1 <= k_min and k_min + 2 <= k_max):
        raise ValueError(
            f"suggest_num_experts needs integers 1 <= k_min and k_min + 2 <= k_max (an elbow needs at least 3 values "
            f"of k), got k_min={k_min}, k_max={k_max}."
        )
    if not 0.0 <= margin < 1.0 or not 0.0 <= min_agreement <= 1.0 or not 0.0 < fold_fraction <= 1.0:
        raise ValueError(
            f"suggest_num_experts: margin must be in [0, 1), min_agreement in [0, 1] and fold_fraction in (0, 1]; got "
            f"margin={margin}, min_agreement={min_agreement}, fold_fraction={fold_fraction}."
        )
    for name, value, low in (("folds", folds, 0), ("n_init", n_init, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"suggest_num_experts: {name} must be an integer >= {low}, got {value!r}.")
    if fallback is not None and (not isinstance(fallback, int) or fallback < 1):
        raise ValueError(f"suggest_num_experts: fallback must be None or an integer >= 1, got {fallback!r}.")
    n_distinct = len(set(texts))
    ks = [k for k in range(k_min, k_max + 1) if k <= n_distinct]
    if len(ks) < 3:
        raise ValueError(
            f"suggest_num_experts: only {n_distinct} distinct texts, too few to try 3 values of k from k_min={k_min}."
        )
    X = TfidfVectorizer(max_features=max_features, sublinear_tf=True).fit_transform(texts)
    sse = _sse_curve(X, ks, n_init, random_state)
    elbow, gap = _elbow_gap(ks, sse)
    rng = random.Random(random_state)
    fold_elbows = []
    n_sub = max(3, int(round(fold_fraction * X.shape[0])))
    for f in range(folds):
        rows = sorted(rng.sample(range(X.shape[0]), n_sub))
        sub = X[rows]
        fks = [k for k in ks if k <= n_sub]
        if len(fks) < 3:
            continue
        fold_elbows.append(_elbow_gap(fks, _sse_curve(sub, fks, n_init, random_state + 1 + f))[0])
    agreement = (Counter(fold_elbows)[elbow] / len(fold_elbows)) if fold_elbows else 1.0
    clear = gap >= margin and agreement >= min_agreement
    if clear:
        n, reason = elbow, f"clear elbow at k={elbow} (gap {gap:.3f} >= {margin}, {agreement:.0%} of folds agree)"
    else:
        why = []
        if gap < margin:
            why.append(f"the SSE curve is within {margin} of a straight line (gap {gap:.3f})")
        if agreement < min_agreement:
            why.append(f"only {agreement:.0%} of folds choose k={elbow} (folds: {fold_elbows})")
        n = elbow if fallback is None else fallback
        reason = "no clear elbow: " + "; ".join(why) + (f"; fallback N = {fallback}" if fallback is not None else "")
    if return_curve:
        return n, {
            "k": ks, "sse": sse, "num_experts": n, "elbow": elbow, "gap": gap, "margin": margin, "clear": clear,
            "fold_elbows": fold_elbows, "agreement": agreement, "min_agreement": min_agreement,
            "fallback_used": (not clear) and fallback is not None, "fallback": fallback, "reason": reason,
        }  # fmt: skip
    return n
