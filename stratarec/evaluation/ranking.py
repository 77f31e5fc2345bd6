"""Full-ranking evaluation shared by the benchmark, the pipeline and the gate.

Every catalogue item is scored for every user, the user's seen items are excluded, and
the held-out item is looked up in the top K. Slices (per layer, cold users, cold items)
reuse the per-user values, so every number in a report comes from one ranking pass.
"""

from __future__ import annotations

import numpy as np

from stratarec.baselines import Scorer
from stratarec.evaluation.metrics import (
    catalogue_coverage,
    intra_list_diversity,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    recall_at_k,
)


def rank_top_k(scorer: Scorer, histories: list[np.ndarray], seen: list[np.ndarray], k: int, batch_size: int = 256) -> np.ndarray:
    """Top-K item rows (1-based) per user, with seen items excluded.

    Args:
        scorer: Produces (B, n_items) scores for a batch of histories.
        histories: Model inputs, one array of item rows per user.
        seen: Items each user must not be recommended (item rows).
        k: List length.
        batch_size: Users scored at once.

    Returns:
        (U, k) item rows, best first.
    """
    out = []
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        scores = np.array(scorer.score(batch), dtype=np.float32, copy=True)  # (B, n_items)
        for i, s in enumerate(seen[start : start + batch_size]):
            s = s[s > 0]
            scores[i, s - 1] = -np.inf
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, axis=1) + 1)
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def summarise(
    ranked: np.ndarray,
    targets: np.ndarray,
    k: int,
    n_items: int,
    item_vectors: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    n_train_users: int | None = None,
) -> dict[str, float]:
    """Mean metrics for one group of users.

    Args:
        ranked: (U, K) item rows (1-based).
        targets: (U,) target item rows.
        k: Cut-off.
        n_items: Catalogue size, for coverage.
        item_vectors: (n_items + 1, d) row-indexed item descriptions for diversity.
        item_popularity: (n_items + 1,) training counts per row, for novelty.
        n_train_users: Number of training users, for novelty.

    Returns:
        Metric name -> value, e.g. ``{"ndcg@10": 0.07, ...}``.
    """
    n = len(targets)
    metrics: dict[str, float] = {"users": float(n)}
    if n == 0:
        return metrics
    metrics[f"ndcg@{k}"] = float(ndcg_at_k(ranked, targets, k).mean())
    metrics[f"recall@{k}"] = float(recall_at_k(ranked, targets, k).mean())
    metrics[f"mrr@{k}"] = float(mrr_at_k(ranked, targets, k).mean())
    metrics[f"coverage@{k}"] = catalogue_coverage(ranked - 1, n_items, k)
    if item_vectors is not None:
        metrics[f"diversity@{k}"] = float(intra_list_diversity(ranked, item_vectors, k).mean())
    if item_popularity is not None and n_train_users:
        metrics[f"novelty@{k}"] = float(novelty(ranked, item_popularity, n_train_users, k).mean())
    return metrics


def evaluate_scorer(
    scorer: Scorer,
    histories: list[np.ndarray],
    seen: list[np.ndarray],
    targets: np.ndarray,
    k: int,
    n_items: int,
    *,
    item_vectors: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    slices: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Rank, then report metrics overall and for each boolean user slice.

    Users whose target is 0 (no held-out item) are ignored.

    Returns:
        ``{"overall": {...}, "<slice name>": {...}}``.
    """
    targets = np.asarray(targets)
    keep = np.flatnonzero(targets > 0)
    ranked = rank_top_k(scorer, [histories[i] for i in keep], [seen[i] for i in keep], k)
    t = targets[keep]
    n_train_users = len(histories)
    report = {"overall": summarise(ranked, t, k, n_items, item_vectors, item_popularity, n_train_users)}
    for name, mask in (slices or {}).items():
        m = np.asarray(mask, dtype=bool)[keep]
        report[name] = summarise(ranked[m], t[m], k, n_items, item_vectors, item_popularity, n_train_users)
    return report


def target_ranks(scores: np.ndarray, seen: list[np.ndarray], targets: np.ndarray, pool: np.ndarray | None = None) -> np.ndarray:
    """1-based full-ranking rank of each row's target, seen items excluded and ties counted against it.

    Recall@K of a small slice is mostly zeros; the rank shows whether a model moves the
    slice's items up even when not into the top K. With ``pool`` the target competes only
    with the pool's items: how well a model tells rare items apart from each other,
    whatever it thinks of rare items as a whole.

    Args:
        scores: (B, n_items) scores; column j is item row j + 1.
        seen: Per row, items to exclude (the target itself never is).
        targets: (B,) target item rows (1-based).
        pool: Optional (n_items,) booleans: other items outside it are excluded.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(scores) != len(targets) or len(seen) != len(targets):
        raise ValueError(f"scores ({len(scores)} rows), seen ({len(seen)}) and targets ({len(targets)}) must align")
    if len(targets) and (targets.min() < 1 or targets.max() > scores.shape[1]):
        raise ValueError(f"targets must be item rows 1..{scores.shape[1]}")
    ranks = np.zeros(len(targets), np.int64)
    for i, (row, drop, t) in enumerate(zip(scores, seen, targets, strict=True)):
        row = np.asarray(row, dtype=np.float64).copy()
        own = row[t - 1]
        drop = np.asarray(drop, dtype=np.int64)
        row[drop[(drop > 0) & (drop != t)] - 1] = -np.inf
        if pool is not None:
            row[~np.asarray(pool, dtype=bool)] = -np.inf
            row[t - 1] = own
        ranks[i] = int((row >= own).sum())
    return ranks


def scorer_target_ranks(
    scorer: Scorer,
    histories: list[np.ndarray],
    seen: list[np.ndarray],
    targets: np.ndarray,
    pool: np.ndarray | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`target_ranks` of a scorer over many histories, scored in batches.

    Returns:
        The full-ranking ranks, and the ranks among ``pool`` (None without a pool).
    """
    targets = np.asarray(targets, dtype=np.int64)
    full, in_pool = [], []
    for start in range(0, len(histories), batch_size):
        stop = start + batch_size
        scores = np.asarray(scorer.score(histories[start:stop]))
        full.append(target_ranks(scores, seen[start:stop], targets[start:stop]))
        if pool is not None:
            in_pool.append(target_ranks(scores, seen[start:stop], targets[start:stop], pool))
    empty = np.zeros(0, np.int64)
    ranks = np.concatenate(full) if full else empty
    return ranks, (np.concatenate(in_pool) if in_pool else empty) if pool is not None else None
