"""Ranking metrics with one signature: ``metric(ranked, targets, k)``.

``ranked`` is a (U, >=K) integer array of item indices, best first, for U users; ``targets``
is a (U,) array holding each user's single held-out item. With one relevant item per user:

* NDCG@K = 1 / log2(rank + 1) if the target is in the top K (rank is 1-based), else 0;
* Recall@K = HR@K = 1 if the target is in the top K, else 0;
* MRR@K = 1 / rank if the target is in the top K, else 0.

Every function returns the per-user values so callers can slice (per layer, cold users)
before averaging.
"""

from __future__ import annotations

import math

import numpy as np


def _hit_rank(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """1-based rank of each target inside the top K, 0 when absent. Shape (U,)."""
    top = np.asarray(ranked)[:, :k]
    hits = top == np.asarray(targets)[:, None]  # (U, K)
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1) + 1, 0)


def ndcg_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@K for one relevant item (ideal DCG is 1)."""
    rank = _hit_rank(ranked, targets, k).astype(np.float64)
    return np.divide(1.0, np.log2(rank + 1.0), out=np.zeros_like(rank), where=rank > 0)


def recall_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@K (equal to HR@K with one relevant item)."""
    return (_hit_rank(ranked, targets, k) > 0).astype(float)


def mrr_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per-user reciprocal rank, cut at K."""
    rank = _hit_rank(ranked, targets, k).astype(np.float64)
    return np.divide(1.0, rank, out=np.zeros_like(rank), where=rank > 0)


def catalogue_coverage(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one top-K list."""
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    return float(np.unique(np.asarray(ranked)[:, :k]).size / n_items)


def intra_list_diversity(ranked: np.ndarray, item_vectors: np.ndarray, k: int) -> np.ndarray:
    """Per-user mean pairwise cosine *distance* between the top-K items.

    Args:
        ranked: (U, >=K) item indices into ``item_vectors``.
        item_vectors: (n, d) item descriptions (genre one-hots or text embeddings).
        k: List length.

    Returns:
        (U,) values in [0, 2]; 0 means all K items are identical in ``item_vectors``.
    """
    if k < 2:
        return np.zeros(len(ranked))
    v = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    lists = v[np.asarray(ranked)[:, :k]]  # (U, K, d)
    sims = np.einsum("ukd,ujd->ukj", lists, lists)  # (U, K, K)
    off_diag = sims.sum(axis=(1, 2)) - np.trace(sims, axis1=1, axis2=2)
    return 1.0 - off_diag / (k * (k - 1))


def novelty(ranked: np.ndarray, item_popularity: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """Per-user mean self-information ``-log2(p(i))`` of the top-K items.

    ``p(i)`` is the share of training users who interacted with item *i*; items nobody
    interacted with get ``p = 1 / (n_users + 1)`` so the value stays finite.
    """
    pop = np.asarray(item_popularity, dtype=np.float64)
    p = np.where(pop > 0, pop / max(n_users, 1), 1.0 / (n_users + 1))
    info = -np.log2(np.clip(p, 1e-12, 1.0))
    return info[np.asarray(ranked)[:, :k]].mean(axis=1)


def ratio_estimate(
    y_sample: np.ndarray,
    x_sample: np.ndarray,
    x_population: np.ndarray,
    rounds: int = 2000,
    seed: int = 0,
) -> dict[str, float | tuple[float, float]]:
    """Ratio estimate of mean(y) over a population where y is known only on a sample.

    For a metric ``y`` measurable on a sample alone and a related metric ``x`` measurable
    on the sample and the whole population, ``mean(y_sample) / mean(x_sample) * mean(x_population)``
    corrects for a sample that is easier or harder than the population (the classic survey
    ratio estimator). The 95% interval bootstraps the sample (y and x paired per unit) and
    the population independently.

    Args:
        y_sample: (n,) per-unit values of the metric wanted, on the sample.
        x_sample: (n,) the auxiliary metric on the same units.
        x_population: (N,) the auxiliary metric on every unit of the population.
        rounds: Bootstrap rounds.
        seed: Seed of the bootstrap.

    Returns:
        ``ratio`` (mean y / mean x on the sample), ``estimate`` and ``ci95`` (low, high).

    Raises:
        ValueError: If the sample arrays differ in length, an array is empty, or mean(x_sample) is 0.
    """
    y, x, pop = (np.asarray(a, dtype=np.float64) for a in (y_sample, x_sample, x_population))
    if y.shape != x.shape or not len(y) or not len(pop):
        raise ValueError(f"y_sample and x_sample must be non-empty and equally long, got {y.shape} and {x.shape}; population {pop.shape}")
    if x.mean() == 0:
        raise ValueError("x_sample has mean 0: the ratio is undefined")
    ratio = y.mean() / x.mean()
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(y), size=(rounds, len(y)))
    j = rng.integers(0, len(pop), size=(rounds, len(pop)))
    x_boot = x[i].mean(axis=1)
    boot = np.divide(y[i].mean(axis=1), x_boot, out=np.full(rounds, np.nan), where=x_boot > 0) * pop[j].mean(axis=1)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return {"ratio": float(ratio), "estimate": float(ratio * pop.mean()), "ci95": (float(low), float(high))}


def paired_exact_test(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test: do two models' hits on the same test events differ?

    Two models scored on the same events agree on most of them; only the discordant events
    (one hits, the other misses) carry evidence. Under "no difference" each discordant event
    is a fair coin, so the two-sided p-value is the binomial tail of the smaller count,
    doubled (capped at 1). With a few dozen cold-item events this is the honest way to read
    "3 hits versus 1".

    Args:
        hits_a: (n,) booleans, model A hit event i (e.g. the target in its top K).
        hits_b: (n,) booleans for model B on the same events, in the same order.

    Returns:
        ``a_only`` and ``b_only`` (discordant counts), ``hits_a``, ``hits_b``, ``n`` and ``p_value``.

    Raises:
        ValueError: If the arrays differ in shape.
    """
    a = np.asarray(hits_a, dtype=bool)
    b = np.asarray(hits_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"hits_a and hits_b must be 1-d and equally long, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = a_only + b_only
    smaller = min(a_only, b_only)
    tail = sum(math.comb(discordant, i) for i in range(smaller + 1)) / 2**discordant if discordant else 1.0
    return {
        "n": int(len(a)),
        "hits_a": int(a.sum()),
        "hits_b": int(b.sum()),
        "a_only": a_only,
        "b_only": b_only,
        "p_value": min(1.0, 2.0 * tail),
    }


def paired_relative_gap(reference: np.ndarray, candidate: np.ndarray, rounds: int = 2000, seed: int = 0) -> dict[str, object]:
    """How far ``candidate`` falls short of ``reference`` on the same users, with a bootstrap interval.

    The gap is ``1 - sum(candidate) / sum(reference)`` (e.g. per-user NDCG@10, so 0.02 means
    2% short). Users are resampled with replacement; with several runs (rows, e.g. seeds) a
    user's rows move together, so the interval reflects the users sampled, not just the runs.

    Args:
        reference: (n_users,) or (n_runs, n_users) per-user scores of the reference model.
        candidate: The same shape, same users in the same order.
        rounds: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        ``gap``, ``ci95`` (2.5th and 97.5th percentiles) and ``n_users``.

    Raises:
        ValueError: If the shapes differ or the reference sums to zero.
    """
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    cand = np.atleast_2d(np.asarray(candidate, dtype=np.float64))
    if ref.shape != cand.shape:
        raise ValueError(f"reference and candidate must have the same shape, got {ref.shape} and {cand.shape}")
    if ref.sum() <= 0:
        raise ValueError("reference scores sum to zero: the relative gap is undefined")
    per_user_ref, per_user_cand = ref.sum(axis=0), cand.sum(axis=0)
    idx = np.random.default_rng(seed).integers(0, ref.shape[1], size=(rounds, ref.shape[1]))
    boot_ref = per_user_ref[idx].sum(axis=1)
    boot = 1.0 - np.divide(per_user_cand[idx].sum(axis=1), boot_ref, out=np.full(rounds, np.nan), where=boot_ref > 0)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return {"gap": float(1.0 - per_user_cand.sum() / per_user_ref.sum()), "ci95": (float(low), float(high)), "n_users": int(ref.shape[1])}
