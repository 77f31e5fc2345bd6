"""A seeded synthetic recommender data set with MovieLens' canonical schema, and data corruptors.

The process is built so that each model family has something real to find:

* **Genres.** Every item has one or two real MovieLens genre names, and the title spells
  them out ("Item 17 (Horror / Sci-Fi)"), so a text encoder can see them.
* **Taste.** Each user has a latent preference over genres, drawn around a population
  profile where some genres are much more popular than others (as in MovieLens).
* **Sequence.** The items of a genre form a chain (ordered by release year, like a series
  of sequels); a user walks along a chain one to three steps at a time, now and then
  switches to another genre they like, and rarely explores a popular item at random. The
  next item is therefore mostly predictable from the previous one, which a sequential
  model can learn and popularity cannot.
* **Drift.** With ``drift > 0``, that share of users, from 70% of the timeline on, move
  their taste to genres they did not like before; those late events are also rated a
  little lower. Because disliked genres are mostly the globally unpopular ones, the late
  genre mix and rating distribution shift visibly in aggregate, which is what a drift
  detector looks at. ``drift = 0`` is a stationary process.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from stratarec import schema
from stratarec.config import SyntheticConfig
from stratarec.data.ingest import canonicalize

__all__ = ["CORRUPTIONS", "DRIFT_START", "GENRE_NAMES", "CorruptionKind", "generate_synthetic", "inject_corruption"]

# Real MovieLens genre names, most common first (counts in ML-100K), so the first n_genres
# of them are the familiar ones and their popularity profile is plausible.
GENRE_NAMES: tuple[str, ...] = (
    "Drama", "Comedy", "Action", "Thriller", "Romance", "Adventure", "Children's", "Crime", "Sci-Fi",
    "Horror", "War", "Mystery", "Musical", "Documentary", "Animation", "Western", "Film-Noir", "Fantasy",
)  # fmt: skip
DRIFT_START = 0.7  # share of the timeline after which drifting users change taste

_SECOND_GENRE_P = 0.35  # share of items with a second genre
_SWITCH_P = 0.15  # per event: leave the current chain for another liked genre
_EXPLORE_P = 0.05  # per event: a popularity-weighted random item
_STEP_P = np.array([0.6, 0.3, 0.1])  # walk 1, 2 or 3 items along the chain
_TASTE_CONCENTRATION = 4.0  # Dirichlet concentration of a user's taste around the profile
_DRIFT_RATING_SHIFT = -0.4  # late events of drifting users are rated a little lower

CorruptionKind = Literal["nulls", "rating_out_of_range", "unknown_item", "duplicates", "future_timestamp"]
CORRUPTIONS: tuple[str, ...] = ("nulls", "rating_out_of_range", "unknown_item", "duplicates", "future_timestamp")


def generate_synthetic(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate canonical ``(events, items)`` from a seeded process (see the module docstring).

    Args:
        cfg: Sizes, seed, timeline (``start``, ``days``) and ``drift`` (share of users whose
            taste moves to previously disliked genres in the last 30% of the timeline).

    Returns:
        Events sorted by time (each user's timestamps strictly increasing, spread over
        ``cfg.days`` from ``cfg.start``) and items, with the canonical columns and dtypes.
        The same config always gives the same tables.
    """
    rng = np.random.default_rng(cfg.seed)
    n_genres = cfg.n_genres
    genre_names = GENRE_NAMES[:n_genres]

    # Population genre profile: earlier genres are more popular, as in MovieLens.
    profile = 1.0 / np.arange(1, n_genres + 1) ** 0.8
    profile /= profile.sum()

    # ---- items: a primary genre (catalog share follows the profile, as popular genres have
    # more titles), sometimes a second one, and a chain order per genre.
    primary = rng.permutation(_allocate(profile, cfg.n_items))  # (n_items,)
    has_second = rng.random(cfg.n_items) < _SECOND_GENRE_P
    second = (primary + rng.integers(1, n_genres, cfg.n_items)) % n_genres  # never equals primary
    chains = [np.flatnonzero(primary == g) for g in range(n_genres)]  # item rows in walk order
    position = np.empty(cfg.n_items)  # 0..1 along the item's chain
    for chain in chains:
        position[chain] = np.arange(len(chain)) / max(len(chain) - 1, 1)
    release_year = 1950 + np.round(65 * position).astype(int) + rng.integers(0, 5, cfg.n_items)
    quality = rng.normal(0.0, 0.4, cfg.n_items)  # per-item rating offset
    popularity = rng.pareto(1.2, cfg.n_items) + 1e-3  # heavy-tailed appeal for exploration
    popularity /= popularity.sum()
    item_genres = [[genre_names[primary[i]]] + ([genre_names[second[i]]] if has_second[i] else []) for i in range(cfg.n_items)]
    items = pd.DataFrame(
        {
            schema.ITEM_ID: np.arange(1, cfg.n_items + 1),
            schema.TITLE: [f"Item {i + 1} ({' / '.join(g)})" for i, g in enumerate(item_genres)],
            schema.GENRES: [schema.GENRE_SEPARATOR.join(g) for g in item_genres],
            schema.RELEASE_YEAR: release_year,
        }
    )

    # ---- users: taste scattered around the profile. Tastes far more concentrated than the
    # catalog would make users use up their favourite genres late in their history, which
    # would drift the genre mix even with drift=0.
    prefs = rng.dirichlet(profile * _TASTE_CONCENTRATION, cfg.n_users)  # (n_users, n_genres)
    n_drift = int(round(cfg.drift * cfg.n_users))
    drifting = np.zeros(cfg.n_users, dtype=bool)
    drifting[rng.permutation(cfg.n_users)[:n_drift]] = True
    late_prefs = prefs.copy()
    n_new = max(1, n_genres // 3)
    for u in np.flatnonzero(drifting):
        disliked = np.argsort(prefs[u], kind="stable")[:n_new]  # the genres this user liked least
        late_prefs[u] = 0.0
        late_prefs[u, disliked] = rng.dirichlet(np.ones(n_new))

    horizon = cfg.days * 86_400  # the timeline in seconds
    late_cut = DRIFT_START * horizon

    user_col, item_col, rating_col, second_col = [], [], [], []
    for u in range(cfg.n_users):
        t = _lifetime(rng, cfg.events_per_user, horizon)  # (n,) seconds, some before the timeline
        late = drifting[u] & (t >= late_cut)
        walk = _walk(rng, late, prefs[u], late_prefs[u], chains, popularity)
        pref_at = np.where(late[:, None], late_prefs[u], prefs[u])  # (n, n_genres)
        affinity = pref_at[np.arange(len(t)), primary[walk]] / pref_at.max(axis=1)
        shift = np.where(late, _DRIFT_RATING_SHIFT, 0.0)
        rating = np.clip(np.round(2.4 + 2.2 * affinity + quality[walk] + shift + rng.normal(0.0, 0.7, len(t))), 1, 5)
        observed = t >= 0  # history before the timeline shaped the walk but is not in the data
        user_col.append(np.full(int(observed.sum()), u + 1))
        item_col.append(walk[observed] + 1)
        rating_col.append(rating[observed])
        second_col.append(t[observed])

    seconds = np.concatenate(second_col)
    events = pd.DataFrame(
        {
            schema.USER_ID: np.concatenate(user_col),
            schema.ITEM_ID: np.concatenate(item_col),
            schema.RATING: np.concatenate(rating_col).astype(float),
            schema.EVENT_TIMESTAMP: pd.Timestamp(cfg.start, tz="UTC") + pd.to_timedelta(seconds, unit="s"),
        }
    )
    events = events.sort_values([schema.EVENT_TIMESTAMP, schema.USER_ID], kind="stable").reset_index(drop=True)
    return canonicalize(events, items)


def _allocate(shares: np.ndarray, n: int, minimum: int = 3) -> np.ndarray:
    """Labels 0..len(shares)-1, each repeated about ``shares * n`` times and at least ``minimum``."""
    counts = np.maximum(minimum, np.floor(shares * n).astype(int))
    while counts.sum() > n:  # the minimum overshot: take back from the largest
        counts[np.argmax(counts)] -= 1
    order = np.argsort(-(shares * n - np.floor(shares * n)), kind="stable")
    for k in range(n - counts.sum()):  # largest remainders first
        counts[order[k % len(order)]] += 1
    return np.repeat(np.arange(len(shares)), counts)


def _lifetime(rng: np.random.Generator, events_per_user: int, horizon: int) -> np.ndarray:
    """Event times (integer seconds, strictly increasing) of one user, cut at the timeline's end.

    Each user is active over a lifetime of 30-100% of the timeline that starts anywhere from
    one lifetime before the timeline to its end, and only the part inside the timeline is
    observed. A user's late events differ from their early ones (favourite chains get used
    up); placing lifetimes like this makes every point of the timeline see all life stages
    equally often, so with drift=0 the event mix does not change over time. The number of
    events is scaled so that on average ``events_per_user`` are observed, and a start is
    redrawn until at least three are.

    Returns:
        Times relative to the timeline start; negative ones precede it and are not observed.
    """
    span = rng.uniform(0.3, 1.0) * horizon
    n = max(3, int(rng.poisson(events_per_user * (span + horizon) / horizon)))
    offsets = np.sort(rng.uniform(0.0, span, n))
    for _ in range(1000):
        t = np.floor(rng.uniform(-span, horizon) + offsets).astype(np.int64)
        if ((t >= 0) & (t < horizon)).sum() >= 3:
            break
    else:  # practically unreachable: fall back to a lifetime that starts with the timeline
        t = np.floor(offsets).astype(np.int64)
    t = t[t < horizon]  # events after the timeline are never simulated
    # Ties at one-second resolution would break "increasing per user": t - k is made
    # non-decreasing by a running max, so t + k afterwards rises by at least a second.
    k = np.arange(len(t))
    return np.maximum.accumulate(t - k) + k


def _walk(
    rng: np.random.Generator,
    late: np.ndarray,
    pref: np.ndarray,
    late_pref: np.ndarray,
    chains: list[np.ndarray],
    popularity: np.ndarray,
) -> np.ndarray:
    """One user's item rows: walks along genre chains, never repeating an item.

    ``late`` marks the events after this user's taste changed (all False without drift).
    """
    n_items = len(popularity)
    seen = np.zeros(n_items, dtype=bool)
    out = np.empty(len(late), dtype=np.int64)
    genre, pos = -1, 0
    for k in range(len(late)):
        p = late_pref if late[k] else pref
        if late[k] and (k == 0 or not late[k - 1]):
            genre = -1  # the taste change starts a new chain right away
        r = rng.random()
        if genre >= 0 and r < _EXPLORE_P:
            out[k] = _popular_unseen(rng, seen, popularity)
            seen[out[k]] = True
            continue
        if genre < 0 or r < _EXPLORE_P + _SWITCH_P:
            genre, pos = _start_chain(rng, p, chains, seen)
        else:
            pos += 1 + int(rng.choice(3, p=_STEP_P))
        chain = chains[genre] if genre >= 0 else np.empty(0, dtype=np.int64)
        ahead = np.flatnonzero(~seen[chain[pos:]]) if pos < len(chain) else np.empty(0, dtype=np.int64)
        if len(ahead) == 0:  # end of this chain: carry on in another liked genre
            genre, pos = _start_chain(rng, p, chains, seen)
            chain = chains[genre] if genre >= 0 else np.empty(0, dtype=np.int64)
            ahead = np.flatnonzero(~seen[chain[pos:]]) if genre >= 0 else ahead
        if len(ahead) == 0:  # every liked chain is used up
            out[k] = _popular_unseen(rng, seen, popularity)
        else:
            pos += int(ahead[0])
            out[k] = chain[pos]
        seen[out[k]] = True
    return out


def _start_chain(rng: np.random.Generator, pref: np.ndarray, chains: list[np.ndarray], seen: np.ndarray) -> tuple[int, int]:
    """Pick a liked genre with unseen items left and a start in the first half of its unseen part."""
    open_genres = np.array([not seen[c].all() for c in chains])
    weights = pref * open_genres
    if weights.sum() <= 0:
        return -1, 0
    genre = int(rng.choice(len(chains), p=weights / weights.sum()))
    unseen = np.flatnonzero(~seen[chains[genre]])
    return genre, int(unseen[rng.integers(0, (len(unseen) + 1) // 2)])


def _popular_unseen(rng: np.random.Generator, seen: np.ndarray, popularity: np.ndarray) -> int:
    weights = np.where(seen, 0.0, popularity)
    if weights.sum() <= 0:  # the user has seen everything: allow a repeat rather than fail
        weights = popularity
    return int(rng.choice(len(popularity), p=weights / weights.sum()))


def inject_corruption(
    events: pd.DataFrame, items: pd.DataFrame, kind: CorruptionKind, n_rows: int = 3
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return copies of the tables with one kind of defect, for tests that validation stops a run.

    Args:
        events: Canonical events.
        items: Canonical items.
        kind: ``"nulls"`` (null ``user_id``), ``"rating_out_of_range"`` (a rating of 7),
            ``"unknown_item"`` (an ``item_id`` not in ``items``), ``"duplicates"`` (repeated
            ``(user_id, item_id, event_timestamp)`` rows) or ``"future_timestamp"`` (year 2100).
        n_rows: How many rows to corrupt, spread over the table.

    Returns:
        ``(events, items)``; the inputs are not modified.

    Raises:
        ValueError: Unknown ``kind``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    ev, it = events.copy(), items.copy()
    rows = np.unique(np.linspace(0, len(ev) - 1, n_rows).round().astype(int))
    idx = ev.index[rows]
    if kind == "nulls":
        ev[schema.USER_ID] = ev[schema.USER_ID].astype("Int64")
        ev.loc[idx, schema.USER_ID] = pd.NA
    elif kind == "rating_out_of_range":
        ev.loc[idx, schema.RATING] = 7.0
    elif kind == "unknown_item":
        ev.loc[idx, schema.ITEM_ID] = int(it[schema.ITEM_ID].max()) + 1000
    elif kind == "duplicates":
        ev = pd.concat([ev, ev.loc[idx]], ignore_index=True)
    else:  # future_timestamp
        ev.loc[idx, schema.EVENT_TIMESTAMP] = pd.Timestamp("2100-01-01", tz="UTC")
    return ev, it
