"""Hierarchical interest layers, each named by what its members like.

Coarse clusters of users' interest vectors, and fine clusters inside each.

The interest vector is the trained model's user state, the same vector that scores the
next item, so layers group users who would get similar recommendations. Names weigh a
genre's share among members by its log-lift (share among members over share overall):
raw shares would name every layer after the most common genre (Drama, on MovieLens), and
lift alone after rare genres a few members touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from stratarec.config import LayerConfig
from stratarec.schema import GENRE_SEPARATOR, LAYER_COARSE, LAYER_FINE, LAYER_NAME, USER_ID


@dataclass
class InterestLayers:
    """The fitted layering.

    Attributes:
        assignments: One row per user: user_id, layer_coarse, layer_fine (global fine id), layer_name.
        layers: One row per layer (coarse and fine): level, layer, parent, name, size, top_genres,
            top_items (item ids), popular_items (item ids by member popularity, for cold start).
        coarse_centroids: (n_coarse, d) centroids of L2-normalised interest vectors.
        item_layer: (n_items + 1,) the coarse layer each item row serves best (-1 for padding).
    """

    assignments: pd.DataFrame
    layers: pd.DataFrame
    coarse_centroids: np.ndarray
    item_layer: np.ndarray

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """Coarse layer of new interest vectors (nearest centroid by cosine)."""
        v = _normalise(vectors)
        return (v @ self.coarse_centroids.T).argmax(axis=1)

    def layer_shares(self) -> dict[int, float]:
        """Share of users per coarse layer."""
        counts = self.assignments[LAYER_COARSE].value_counts(normalize=True)
        return {int(k): float(v) for k, v in counts.sort_index().items()}


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def genre_matrix(items_genres: list[str], genres: list[str]) -> np.ndarray:
    """(n_items, n_genres) one-hot genre matrix from pipe-separated genre strings."""
    col = {g: j for j, g in enumerate(genres)}
    m = np.zeros((len(items_genres), len(genres)), dtype=np.float32)
    for i, text in enumerate(items_genres):
        for g in str(text or "").split(GENRE_SEPARATOR):
            if g in col:
                m[i, col[g]] = 1.0
    return m


def _describe(
    member_rows: np.ndarray,
    histories: list[np.ndarray],
    item_genre: np.ndarray,
    genres: list[str],
    titles: np.ndarray,
    global_genre: np.ndarray,
    global_item: np.ndarray,
    cfg: LayerConfig,
) -> tuple[list[str], list[int], list[int], str]:
    """Top genres and representative items (by share times log-lift), popular items, and a name."""
    items = np.concatenate([histories[u] for u in member_rows]) if len(member_rows) else np.zeros(0, np.int64)
    counts = np.bincount(items, minlength=len(global_item)).astype(np.float64)
    counts[0] = 0
    share_g = counts @ item_genre
    share_g = share_g / max(share_g.sum(), 1e-9)
    # Score = share * log(lift): each genre's term of KL(layer || population). Plain lift
    # names layers after rare genres a handful of members touched (Film-Noir, Musical);
    # this favours what the layer watches a lot *and* more than everyone else does.
    lift_g = share_g / np.maximum(global_genre, 1e-9)
    score_g = np.where(lift_g > 1.0, share_g * np.log(np.maximum(lift_g, 1e-9)), 0.0)
    top_genres = [genres[j] for j in np.argsort(-score_g, kind="stable")[: cfg.name_top_genres] if score_g[j] > 0]
    # Representative items, scored the same way: watched by many members, and by more of them
    # than of the population; at least 10% of members must have seen one.
    member_share = counts / max(len(member_rows), 1)
    global_share = global_item / max(len(histories), 1)  # share of all users with the item
    lift_i = member_share / np.maximum(global_share, 1e-9)
    score_i = np.where((member_share >= 0.1) & (lift_i > 1.0), member_share * np.log(np.maximum(lift_i, 1e-9)), 0.0)
    score_i[0] = 0
    top_items = [int(i) for i in np.argsort(-score_i, kind="stable")[: cfg.name_top_items] if score_i[i] > 0]
    popular = [int(i) for i in np.argsort(-counts)[:50] if counts[i] > 0]
    genre_part = " & ".join(top_genres) if top_genres else "Mixed"
    sample = "; ".join(str(titles[i - 1]) for i in top_items[:2])
    name = f"{genre_part} — e.g. {sample}" if sample else genre_part
    return top_genres, top_items, popular, name


def build_interest_layers(
    users: np.ndarray,
    vectors: np.ndarray,
    histories: list[np.ndarray],
    item_genres: list[str],
    item_titles: list[str],
    genres: list[str],
    cfg: LayerConfig,
    seed: int = 0,
) -> InterestLayers:
    """Cluster users into coarse layers, then fine layers inside each, and name them.

    Args:
        users: (U,) external user ids.
        vectors: (U, d) interest vectors from the trained model.
        histories: Per-user item rows (1-based) used to describe the layers.
        item_genres: Pipe-separated genres per item row 1..n (list index = row - 1).
        item_titles: Titles per item row 1..n.
        genres: Genre vocabulary.
        cfg: Layer counts and naming sizes.
        seed: K-means seed.

    Returns:
        The layering, with item ids (rows) in ``layers.top_items`` / ``popular_items``.
    """
    n_users = len(users)
    if n_users < cfg.n_coarse:
        raise ValueError(f"layers.n_coarse={cfg.n_coarse} needs at least that many users, got {n_users}")
    v = _normalise(np.asarray(vectors, dtype=np.float64))
    coarse_km = KMeans(n_clusters=cfg.n_coarse, n_init=10, random_state=seed).fit(v)
    coarse = coarse_km.labels_
    fine = np.zeros(n_users, dtype=np.int64)
    n_items = len(item_genres)
    item_genre = genre_matrix(item_genres, genres)
    item_genre_rows = np.vstack([np.zeros((1, len(genres)), np.float32), item_genre])  # row-indexed
    all_items = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    global_item = np.bincount(all_items, minlength=n_items + 1).astype(np.float64)
    global_item[0] = 0
    global_genre = global_item @ item_genre_rows
    global_genre = global_genre / max(global_genre.sum(), 1e-9)
    titles = np.asarray(item_titles, dtype=object)

    rows = []
    fine_id = 0
    for c in range(cfg.n_coarse):
        members = np.flatnonzero(coarse == c)
        g, t, p, name = _describe(members, histories, item_genre_rows, genres, titles, global_genre, global_item, cfg)
        rows.append(
            {
                "level": "coarse",
                "layer": c,
                "parent": -1,
                "name": name,
                "size": len(members),
                "top_genres": g,
                "top_items": t,
                "popular_items": p,
            }
        )
        n_fine = min(cfg.n_fine, len(members))
        sub = (
            KMeans(n_clusters=n_fine, n_init=5, random_state=seed).fit(v[members]).labels_
            if n_fine > 1
            else np.zeros(len(members), np.int64)
        )
        for f in range(n_fine):
            fm = members[sub == f]
            fine[fm] = fine_id
            g2, t2, p2, name2 = _describe(fm, histories, item_genre_rows, genres, titles, global_genre, global_item, cfg)
            rows.append(
                {
                    "level": "fine",
                    "layer": fine_id,
                    "parent": c,
                    "name": name2,
                    "size": len(fm),
                    "top_genres": g2,
                    "top_items": t2,
                    "popular_items": p2,
                }
            )
            fine_id += 1
    layers = pd.DataFrame(rows)
    coarse_names = layers[layers.level == "coarse"].set_index("layer")["name"]
    assignments = pd.DataFrame({USER_ID: np.asarray(users, dtype=np.int64), LAYER_COARSE: coarse.astype(np.int64), LAYER_FINE: fine})
    assignments[LAYER_NAME] = assignments[LAYER_COARSE].map(coarse_names).astype("string")

    # Each item serves the layer whose members over-index on it most (counts normalised by layer size).
    per_layer = np.zeros((cfg.n_coarse, n_items + 1))
    for c in range(cfg.n_coarse):
        members = np.flatnonzero(coarse == c)
        if len(members):
            items = np.concatenate([histories[u] for u in members])
            per_layer[c] = np.bincount(items, minlength=n_items + 1) / len(members)
    item_layer = np.where(per_layer.sum(axis=0) > 0, per_layer.argmax(axis=0), -1)
    item_layer[0] = -1
    # Items nobody interacted with get the layer whose centroid genre mix is closest.
    unseen = np.flatnonzero(item_layer[1:] < 0) + 1
    if len(unseen):
        layer_genre = per_layer @ item_genre_rows  # (n_coarse, n_genres)
        item_layer[unseen] = (item_genre_rows[unseen] @ _normalise(layer_genre).T).argmax(axis=1)
    return InterestLayers(
        assignments=assignments,
        layers=layers,
        coarse_centroids=_normalise(coarse_km.cluster_centers_),
        item_layer=item_layer.astype(np.int64),
    )
