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
