"""Non-sequential baselines scored with the same interface and split as the transformer.

Every scorer maps a batch of histories (lists of item rows) to a (B, n_items) score matrix
whose column *j* is item row *j + 1*. Evaluation excludes seen items afterwards, so the
scorers don't have to.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import scipy.sparse as sp


class Scorer(Protocol):
    """Anything that scores all items for a batch of histories."""

    name: str

    def score(self, histories: list[np.ndarray]) -> np.ndarray:
        """Return (B, n_items) scores."""
        ...


def interaction_matrix(histories: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Binary (users, n_items) matrix from item-row histories (row 0, padding, is dropped)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    keep = cols > 0
    m = sp.csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], cols[keep] - 1)), shape=(len(histories), n_items))
    m.data[:] = 1.0  # duplicates collapse to 1
    return m


class MostPopular:
    """Rank by the number of training users who interacted with each item."""

    name = "most_popular"

    def __init__(self, train: list[np.ndarray], n_items: int) -> None:
        self.popularity = np.asarray(interaction_matrix(train, n_items).sum(axis=0)).ravel().astype(np.float32)

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        return np.broadcast_to(self.popularity, (len(histories), len(self.popularity))).copy()


class TextSimilarity:
    """Rank by text similarity to the user's recent items: a content-only reference, no training.

    Each item's score is the cosine between its text vector and the mean unit text vector
    of the user's last ``window`` items. It knows nothing of popularity, so it shows how far
    item text alone can find rare and new items, and what that costs overall.
    """

    name = "text_similarity"

    def __init__(self, text_vectors: np.ndarray, window: int = 10) -> None:
        """Keep unit text vectors.

        Args:
            text_vectors: (n_items, d) text vector per item row 1..n_items.
            window: Recent items that make the user's profile.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        v = np.asarray(text_vectors, dtype=np.float32)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        self.unit = v / np.where(norms > 0, norms, 1.0)
        self.window = window

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        out = np.zeros((len(histories), len(self.unit)), np.float32)
        for i, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)
            h = h[h > 0][-self.window :]
            if len(h):
                out[i] = self.unit @ self.unit[h - 1].mean(axis=0)
        return out


class ItemKNN:
    """Item-based collaborative filtering: cosine item-item similarity, top-``neighbours`` kept."""

    name = "item_knn"

    def __init__(self, train: list[np.ndarray], n_items: int, neighbours: int = 100, shrink: float = 10.0) -> None:
        x = interaction_matrix(train, n_items)
        co = (x.T @ x).toarray().astype(np.float32)  # (n, n) co-occurrence counts
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + shrink)
        np.fill_diagonal(sim, 0.0)
        if neighbours < n_items:
            # Keep each item's strongest neighbours: the classic item-kNN sparsification.
            cut = np.partition(sim, -neighbours, axis=1)[:, -neighbours][:, None]
            sim = np.where(sim >= cut, sim, 0.0)
        self.similarity = sim
        self.n_items = n_items

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        return np.asarray(interaction_matrix(histories, self.n_items) @ self.similarity)


EASE_L2_GRID = (50.0, 100.0, 250.0, 500.0, 1000.0)


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019): closed-form item-item weights."""

    name = "ease"

    def __init__(self, train: list[np.ndarray], n_items: int, l2: float = 250.0, gram: np.ndarray | None = None) -> None:
        if gram is None:
            x = interaction_matrix(train, n_items)
            gram = (x.T @ x).toarray().astype(np.float64)
        p = np.linalg.inv(gram + l2 * np.eye(n_items))  # (n_items, n_items)
        b = p / (-np.diag(p))
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        self.n_items = n_items
        self.l2 = l2

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        return np.asarray(interaction_matrix(histories, self.n_items) @ self.weights)


def tune_ease(
    train: list[np.ndarray],
    n_items: int,
    validation: tuple[list[np.ndarray], np.ndarray],
    grid: tuple[float, ...] = EASE_L2_GRID,
    k: int = 10,
) -> EASE:
    """EASE with the L2 strength that ranks the validation items best (NDCG@k).

    A baseline the gate must beat has to be a fair one: EASE's best L2 moves with the data
    set's density (about 50 on ML-100K's temporal split, a few hundred on ML-1M), so a fixed
    value would make the candidate's win look larger than it is.

    Args:
        train: Training histories (item rows).
        n_items: Catalogue size.
        validation: ``(histories, targets)``: each history's next item; target 0 is skipped.
        grid: L2 values tried.
        k: Cut-off of the validation NDCG.

    Returns:
        The EASE fitted with the best L2 (ties keep the first, smallest value).
    """
    from stratarec.evaluation.ranking import evaluate_scorer  # ranking imports this module

    x = interaction_matrix(train, n_items)
    gram = (x.T @ x).toarray().astype(np.float64)  # (n_items, n_items), shared by every fit
    histories, targets = validation
    best, best_ndcg = None, -1.0
    for l2 in grid:
        model = EASE(train, n_items, l2=l2, gram=gram)
        ndcg = evaluate_scorer(model, histories, histories, targets, k, n_items)["overall"][f"ndcg@{k}"]
        if ndcg > best_ndcg:
            best, best_ndcg = model, ndcg
    return best


def build_baselines(
    names: list[str], train: list[np.ndarray], n_items: int, validation: tuple[list[np.ndarray], np.ndarray] | None = None
) -> list[Scorer]:
    """Instantiate baselines by name, fitted on the training histories.

    Args:
        names: Baselines to build (``most_popular``, ``item_knn``, ``ease``).
        train: Training histories.
        n_items: Catalogue size.
        validation: ``(histories, next items)``; when given, EASE's L2 is tuned on it.
    """
    registry = {"most_popular": MostPopular, "item_knn": ItemKNN, "ease": EASE}
    unknown = set(names) - set(registry)
    if unknown:
        raise ValueError(f"gate.baselines: unknown baseline(s) {sorted(unknown)}; choose from {sorted(registry)}")
    return [tune_ease(train, n_items, validation) if n == "ease" and validation else registry[n](train, n_items) for n in names]
