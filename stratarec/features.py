"""Feature computation for the Feast views, in plain pandas/numpy (no Feast import).

``user_activity`` has one row per event: the user's state right *after* that event. Feast's
point-in-time join then returns, for any cut-off time, the latest snapshot at or before it,
which is exactly the history a model may see at that time. ``item_catalog`` has one row per
item, and ``user_interest_layer`` rows are written when a model is released.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from stratarec.schema import (
    CREATED_TIMESTAMP,
    EVENT_TIMESTAMP,
    GENRE_SEPARATOR,
    GENRES,
    ITEM_ID,
    ITEM_POPULARITY,
    ITEM_TEXT_EMBEDDING,
    LAYER_COARSE,
    LAYER_FINE,
    LAYER_NAME,
    RELEASE_YEAR,
    TITLE,
    USER_EVENT_COUNT,
    USER_GENRE_MIX,
    USER_ID,
    USER_LAST_EVENT_TS,
    USER_MEAN_GAP_DAYS,
    USER_RECENT_ITEMS,
)

log = logging.getLogger(__name__)

TIE_OFFSET = pd.Timedelta(microseconds=1)
UNKNOWN_RELEASE_YEAR = -1
_NS_PER_SECOND = 1_000_000_000
_NS_PER_DAY = 86_400 * _NS_PER_SECOND

USER_ACTIVITY_COLUMNS: tuple[str, ...] = (
    USER_ID,
    EVENT_TIMESTAMP,
    CREATED_TIMESTAMP,
    USER_EVENT_COUNT,
    USER_LAST_EVENT_TS,
    USER_MEAN_GAP_DAYS,
    USER_GENRE_MIX,
    USER_RECENT_ITEMS,
)
ITEM_CATALOG_COLUMNS: tuple[str, ...] = (
    ITEM_ID,
    EVENT_TIMESTAMP,
    CREATED_TIMESTAMP,
    TITLE,
    GENRES,
    RELEASE_YEAR,
    ITEM_POPULARITY,
    ITEM_TEXT_EMBEDDING,
)
USER_LAYER_COLUMNS: tuple[str, ...] = (USER_ID, EVENT_TIMESTAMP, CREATED_TIMESTAMP, LAYER_COARSE, LAYER_FINE, LAYER_NAME)


def tie_order_key(user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random rank of each (user, item) pair: the order of a user's simultaneous events.

    splitmix64's finaliser over both ids (uint64 arithmetic wraps by design): the same pair
    always gets the same key, on every machine and run, and the keys of one user's items
    carry nothing of the items' catalogue ids.

    Args:
        user_ids: (n,) integer user ids.
        item_ids: (n,) integer item ids.

    Returns:
        (n,) uint64 keys.
    """
    x = np.asarray(user_ids, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = x ^ np.asarray(item_ids, dtype=np.int64).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def order_events(events: pd.DataFrame) -> pd.DataFrame:
    """Put events in a total order and make each user's timestamps strictly increasing.

    Rows are sorted by user, then time; a user's events at the same instant follow
    :func:`tie_order_key`, a fixed pseudo-random order. Each later event of a tie is moved
    forward by 1 microsecond per tie: in general ``t'[i] = max(t[i], t'[i-1] + 1µs)``.

    Why the ties matter: in ML-100K, 50,561 of the 100,000 events share their second with
    an earlier event of the same user (users rated pages of films at once), and 44% of the
    users' last events, the test targets, do. The true order inside a second is unknown.
    Breaking ties by item id, as this function once did, leaked the catalogue's numbering
    into the sequences: inside a tie the next item always had a larger id than the one
    before, and ids grow with the date an item entered the catalogue. ID embeddings learn
    that numbering; text cannot know it. It also made the held-out last event the newest
    catalogue item of the user's last page, so rare items were over-represented among test
    targets (32 test targets with at most 5 training events, against 19 with this order).
    A hashed order keeps the tie-break reproducible without saying anything about the items.

    Why strictly increasing: Feast's point-in-time join picks, for a cut-off time, the latest
    feature row at or before it. With ties, a cut-off placed "just before" a held-out event
    could equal the timestamp of that event's snapshot, or pick between two snapshots
    arbitrarily, and the training history would then include the event it should predict.
    A strict per-user order makes "the snapshot before event i" unique, and ``t[i] - 1µs`` a
    safe cut-off. Offsets are microseconds, so second-resolution timestamps keep their second.

    Args:
        events: Canonical events (user_id, item_id, rating, event_timestamp); other columns are kept.

    Returns:
        A new frame in that order with a fresh RangeIndex and adjusted ``event_timestamp``.
    """
    key = tie_order_key(events[USER_ID].to_numpy(dtype=np.int64), events[ITEM_ID].to_numpy(dtype=np.int64))
    order = np.lexsort((key, events[EVENT_TIMESTAMP].to_numpy(dtype="datetime64[ns]"), events[USER_ID].to_numpy(dtype=np.int64)))
    out = events.iloc[order].reset_index(drop=True)
    if out.empty:
        return out
    ts = out[EVENT_TIMESTAMP].dt.tz_convert("UTC")
    ticks = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)  # (n,) ns since the epoch
    step = TIE_OFFSET.value  # 1,000 ns
    # Closed form of t'[i] = max(t[i], t'[i-1] + step): with i the position inside the user,
    # t'[i] = i*step + max_{j<=i}(t[j] - j*step), a grouped cumulative max (no Python loop).
    pos = out.groupby(USER_ID, sort=False).cumcount().to_numpy(dtype=np.int64)
    fixed = pd.Series(ticks - pos * step).groupby(out[USER_ID].to_numpy(), sort=False).cummax().to_numpy() + pos * step
    moved = int((fixed != ticks).sum())
    if moved:
        log.info("order_events: moved %d tied events forward by multiples of 1 µs", moved)
        # A second- or millisecond-resolution column could not hold the offsets: widen it to ns.
        unit = ts.dt.unit if ts.dt.unit in ("us", "ns") else "ns"
        out[EVENT_TIMESTAMP] = pd.Series(pd.to_datetime(fixed, unit="ns", utc=True)).astype(f"datetime64[{unit}, UTC]")
    return out


def genre_vocabulary(items: pd.DataFrame) -> list[str]:
    """Sorted unique genre names of the item table (the order of ``genre_mix``).

    Args:
        items: Canonical items with pipe-separated ``genres``.

    Returns:
        Genre names, sorted; empty names are dropped.
    """
    names: set[str] = set()
    for joined in items[GENRES].astype("string").dropna():
        names.update(g.strip() for g in joined.split(GENRE_SEPARATOR) if g.strip())
    return sorted(names)


def _genre_flags(items: pd.DataFrame, genres: list[str]) -> pd.DataFrame:
    """(n_items, n_genres) 0/1 float32 flags indexed by item_id; unknown genre names are ignored."""
    col = {g: j for j, g in enumerate(genres)}
    flags = np.zeros((len(items), len(genres)), dtype=np.float32)
    for row, joined in enumerate(items[GENRES].astype("string").fillna("")):
        for name in joined.split(GENRE_SEPARATOR):
            j = col.get(name.strip())
            if j is not None:
                flags[row, j] = 1.0
    ids = items[ITEM_ID].to_numpy(dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("items has repeated item_id values")
    return pd.DataFrame(flags, index=pd.Index(ids, name=ITEM_ID), columns=genres)


def compute_user_activity(ordered_events: pd.DataFrame, items: pd.DataFrame, genres: list[str], recent_len: int) -> pd.DataFrame:
    """One snapshot of the user's state right after each event (the ``user_activity`` view).

    Args:
        ordered_events: Events from :func:`order_events` (sorted, strictly increasing per user).
        items: Canonical items, for each event's genres.
        genres: Genre order of ``genre_mix`` (from :func:`genre_vocabulary`).
        recent_len: Length of ``recent_items``.

    Returns:
        One row per event, in input order: user_id, event_timestamp, created_timestamp
        (= event_timestamp, so recomputing features from the same events gives identical rows),
        event_count (int64, events so far including this one), last_event_ts (int64 epoch
        seconds of this event), mean_gap_days (float64 mean time between consecutive events
        so far; 0.0 after the first event), genre_mix (float32 arrays of len(genres): share
        of the user's events so far whose item carries each genre, so multi-genre items
        count towards each of their genres and the shares need not sum to 1), recent_items
        (int64 arrays: the last ``recent_len`` item ids, oldest first). Events of items
        missing from ``items`` count towards no genre.

    Raises:
        ValueError: The events are not in :func:`order_events` order, ``recent_len`` < 1, or
            item ids repeat in ``items``.
    """
    if recent_len < 1:
        raise ValueError(f"recent_len must be at least 1, got {recent_len}")
    n = len(ordered_events)
    users = ordered_events[USER_ID].to_numpy(dtype=np.int64)
    item_ids = ordered_events[ITEM_ID].to_numpy(dtype=np.int64)
    ts_ns = ordered_events[EVENT_TIMESTAMP].dt.tz_convert("UTC").to_numpy(dtype="datetime64[ns]").astype(np.int64)
    if n and (np.any(np.diff(users) < 0) or np.any((np.diff(users) == 0) & (np.diff(ts_ns) <= 0))):
        raise ValueError("events must be sorted by user with strictly increasing timestamps: pass them through order_events first")

    # Users occupy contiguous runs: starts[k]..starts[k+1] is the k-th user's slice.
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.r_[starts, n])
    first_row = np.repeat(starts, lengths)  # (n,) row of the user's first event
    count = np.arange(n, dtype=np.int64) - first_row + 1  # (n,) 1-based position inside the user

    span_days = (ts_ns - ts_ns[first_row]) / _NS_PER_DAY
    mean_gap = np.divide(span_days, count - 1, out=np.zeros(n, dtype=np.float64), where=count > 1)

    flags = _genre_flags(items, genres).reindex(item_ids, fill_value=0.0).to_numpy(dtype=np.float64)  # (n, G)
    cum = np.cumsum(flags, axis=0)
    # Grouped cumsum: subtract the running total just before each user's first row.
    before = np.vstack([np.zeros((1, len(genres))), cum[:-1]]) if n else cum
    mix = ((cum - before[first_row]) / count[:, None]).astype(np.float32)  # (n, G)

    # Slices are views of one array, so 100k windows cost pointers, not copies, until Parquet.
    window_start = np.maximum(first_row, np.arange(n) - recent_len + 1)
    recent = [item_ids[a : b + 1] for a, b in zip(window_start.tolist(), range(n), strict=True)]

    timestamps = ordered_events[EVENT_TIMESTAMP].reset_index(drop=True)
    return pd.DataFrame(
        {
            USER_ID: users,
            EVENT_TIMESTAMP: timestamps,
            CREATED_TIMESTAMP: timestamps,
            USER_EVENT_COUNT: count,
            USER_LAST_EVENT_TS: ts_ns // _NS_PER_SECOND,
            USER_MEAN_GAP_DAYS: mean_gap,
            USER_GENRE_MIX: list(mix),
            USER_RECENT_ITEMS: recent,
        },
        columns=list(USER_ACTIVITY_COLUMNS),
    )


def compute_item_catalog(events: pd.DataFrame, items: pd.DataFrame, embeddings: np.ndarray, as_of: pd.Timestamp) -> pd.DataFrame:
    """One row per item (the ``item_catalog`` view).

    Args:
        events: Events whose counts become ``popularity``.
        items: Canonical items; row i is described by ``embeddings[i]``.
        embeddings: (n_items, d) text embeddings aligned with ``items`` rows.
        as_of: Event and created timestamp of every row: the time from which a
            point-in-time join can see the catalogue.

    Returns:
        item_id, event_timestamp, created_timestamp, title, genres, release_year (int64, -1
        when unknown), popularity (int64 event count), text_embedding (float32 arrays).

    Raises:
        ValueError: ``embeddings`` does not have one row per item, or item ids repeat.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
        raise ValueError(f"embeddings must have shape ({len(items)}, d), got {embeddings.shape}")
    item_ids = items[ITEM_ID].to_numpy(dtype=np.int64)
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("items has repeated item_id values")
    counts = events[ITEM_ID].value_counts()
    popularity = counts.reindex(item_ids, fill_value=0).to_numpy(dtype=np.int64)
    stamp = pd.Timestamp(as_of)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    when = pd.Series([stamp] * len(items), dtype="datetime64[ns, UTC]")
    year = pd.to_numeric(items[RELEASE_YEAR], errors="coerce").astype("Int64").fillna(UNKNOWN_RELEASE_YEAR)
    return pd.DataFrame(
        {
            ITEM_ID: item_ids,
            EVENT_TIMESTAMP: when,
            CREATED_TIMESTAMP: when,
            TITLE: items[TITLE].astype("string").fillna("").to_numpy(),
            GENRES: items[GENRES].astype("string").fillna("").to_numpy(),
            RELEASE_YEAR: year.to_numpy(dtype=np.int64),
            ITEM_POPULARITY: popularity,
            ITEM_TEXT_EMBEDDING: list(embeddings),
        },
        columns=list(ITEM_CATALOG_COLUMNS),
    )


def empty_user_layers() -> pd.DataFrame:
    """An empty ``user_interest_layer`` frame with the view's column types.

    Feast needs the source file to exist (with the right schema) before any model has been
    released, so the features stage writes this placeholder.
    """
    return pd.DataFrame(
        {
            USER_ID: pd.Series(dtype=np.int64),
            EVENT_TIMESTAMP: pd.Series(dtype="datetime64[ns, UTC]"),
            CREATED_TIMESTAMP: pd.Series(dtype="datetime64[ns, UTC]"),
            LAYER_COARSE: pd.Series(dtype=np.int64),
            LAYER_FINE: pd.Series(dtype=np.int64),
            LAYER_NAME: pd.Series(dtype="string"),
        },
        columns=list(USER_LAYER_COLUMNS),
    )
