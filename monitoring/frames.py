"""Monitoring frames: the columns drift detection looks at, declared once, and the builders that fill them.

Two frames are monitored:

* the **event frame**, one row per interaction, built from the canonical events and items
  tables (plus the user layers when known);
* the **prediction frame**, one row per served request, built from the service's JSONL
  request log.

Every derived column is defined so that its distribution does *not* depend on how long the
window is. Otherwise the reference window (the longer, older part of the timeline) and the
current window would always look different, and drift would be reported on every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stratarec.schema import (
    DEGRADED,
    EVENT_TIMESTAMP,
    GENRE_SEPARATOR,
    GENRES,
    ITEM_ID,
    LATENCY_MS,
    LAYER_COARSE,
    RATING,
    RECOMMENDED_ITEMS,
    SERVED_AT,
    SERVED_LAYER,
    USER_ID,
)

# Derived event columns (names live here, not in schema.py, because only monitoring uses them).
ITEM_POPULARITY_PCT = "item_popularity_pct"  # item's popularity percentile in the *reference* window
PRIMARY_GENRE = "primary_genre"  # first genre of the item's pipe-separated list
HOUR_OF_DAY = "hour_of_day"  # UTC hour of the event
USER_RECENT_EVENTS = "user_events_7d"  # the user's events in the 7 days up to this one: user activity
ACTIVITY_LOOKBACK = pd.Timedelta(days=7)

# Derived prediction columns.
N_RECOMMENDED = "n_recommended"
MEAN_POPULARITY_RANK = "mean_popularity_rank"  # 1 = most popular item of the popularity source

UNKNOWN = "unknown"  # categorical value for a missing layer or genre
COLD_LAYER = -1  # served_layer of a cold user, as written by the service


@dataclass(frozen=True)
class ColumnSet:
    """Columns of one monitored frame, split by the type Evidently should treat them as.

    Attributes:
        numerical: Columns compared with a distance between numeric distributions.
        categorical: Columns compared as category shares (values are strings).

    """

    numerical: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        """Numerical then categorical column names."""
        return self.numerical + self.categorical

    def present_in(self, frame: pd.DataFrame) -> ColumnSet:
        """Keep only the columns ``frame`` actually has (e.g. no layer column before layering)."""
        return ColumnSet(
            numerical=tuple(c for c in self.numerical if c in frame.columns),
            categorical=tuple(c for c in self.categorical if c in frame.columns),
        )


MONITORED_COLUMNS = ColumnSet(
    numerical=(RATING, ITEM_POPULARITY_PCT, HOUR_OF_DAY, USER_RECENT_EVENTS),
    categorical=(PRIMARY_GENRE, LAYER_COARSE),
)
PREDICTION_COLUMNS = ColumnSet(
    numerical=(N_RECOMMENDED, MEAN_POPULARITY_RANK),
    categorical=(SERVED_LAYER,),
)


def item_popularity(events: pd.DataFrame) -> pd.Series:
    """Event count per item.

    Args:
        events: Canonical events.

    Returns:
        Counts indexed by item id, most popular first.

    """
    return events[ITEM_ID].value_counts().astype("int64")


def split_windows(events: pd.DataFrame, current_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split events by time into a reference window and the latest ``current_fraction`` of the timeline.

    The cut is on the time axis, not on row counts, so the current window is "the last N days"
    even when traffic is uneven.

    Args:
        events: Canonical events.
        current_fraction: Share of the time span (first to last event) that forms the current window.

    Returns:
        ``(reference, current)``: events before the cut, and events at or after it.

    Raises:
        ValueError: If the fraction is outside (0, 1) or either window would be empty.

    """
    if not 0.0 < current_fraction < 1.0:
        raise ValueError(f"current_fraction must be in (0, 1), got {current_fraction}")
    if events.empty:
        raise ValueError("cannot split an empty events frame")
    ts = events[EVENT_TIMESTAMP]
    start, end = ts.min(), ts.max()
    cut = start + (end - start) * (1.0 - current_fraction)
    is_current = ts >= cut
    reference, current = events.loc[~is_current], events.loc[is_current]
    if reference.empty or current.empty:
        raise ValueError(
            f"split at {cut} leaves an empty window (reference={len(reference)}, current={len(current)}); the events span too little time"
        )
    return reference.copy(), current.copy()


def build_event_frame(
    events: pd.DataFrame,
    items: pd.DataFrame,
    user_layers: pd.DataFrame | None = None,
    *,
    reference_events: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per-event monitoring rows with the columns of :data:`MONITORED_COLUMNS`.

    Args:
        events: Canonical events of one window.
        items: Canonical items table.
        user_layers: ``user_id, layer_coarse[, layer_name]`` per user. Users missing from it get
            the layer ``"unknown"``. When ``None``, the layer column is left out altogether,
            because a constant column would only dilute the drifted share.
        reference_events: Window whose item counts define popularity. Pass the reference window
            when building the current frame, so both frames use the *same* popularity lookup:
            popularity counted inside the current window describes the current window's own
            taste, so a shift towards new or niche items would look normal. Its events before this window
            are also the history for the activity lookback. Defaults to ``events``.

    Returns:
        One row per event: ``user_id``, ``item_id``, ``event_timestamp`` (for tracing) and the
        monitored columns. Categorical columns hold strings.

    """
    if events.empty:
        raise ValueError("events frame is empty")
    ts = pd.to_datetime(events[EVENT_TIMESTAMP], utc=True)
    item_ids = events[ITEM_ID]

    # Percentile rank among the reference window's items; an item it never saw ranks 0,
    # so a move to new or niche items shows up as mass near 0.
    counts = item_popularity(events if reference_events is None else reference_events)
    pct = counts.rank(pct=True, method="average")
    popularity = item_ids.map(pct).astype("float64").fillna(0.0)

    first_genre = items[GENRES].fillna("").astype(str).str.split(GENRE_SEPARATOR, regex=False).str[0].str.strip()
    first_genre = first_genre.where(first_genre != "", UNKNOWN)
    genre = item_ids.map(pd.Series(first_genre.to_numpy(), index=items[ITEM_ID].to_numpy())).fillna(UNKNOWN)

    recent = _user_recent_events(events[USER_ID], ts, reference_events)

    frame = pd.DataFrame(
        {
            USER_ID: events[USER_ID].array,
            ITEM_ID: item_ids.array,
            EVENT_TIMESTAMP: ts.array,  # keeps the UTC dtype (to_numpy would box every Timestamp)
            RATING: events[RATING].astype("float64").to_numpy(),
            ITEM_POPULARITY_PCT: popularity.to_numpy(),
            HOUR_OF_DAY: ts.dt.hour.astype("int64").to_numpy(),
            USER_RECENT_EVENTS: recent,
            PRIMARY_GENRE: genre.astype(str).to_numpy(),
        }
    )
    if user_layers is not None:
        layer_of = pd.Series(_layer_labels(user_layers[LAYER_COARSE]).to_numpy(), index=user_layers[USER_ID].to_numpy())
        frame[LAYER_COARSE] = events[USER_ID].map(layer_of).fillna(UNKNOWN).astype(str).to_numpy()
    return frame


def build_prediction_frame(
    request_log: pd.DataFrame | Iterable[Mapping[str, Any]],
    *,
    item_popularity_counts: pd.Series | None = None,
) -> pd.DataFrame:
    """Per-request monitoring rows with the columns of :data:`PREDICTION_COLUMNS`.

    Args:
        request_log: Rows of the served-request log (``served_at``, ``user_id``,
            ``recommended_items``, ``served_layer``, ``latency_ms``, ``degraded``), as a frame
            (e.g. ``pd.read_json(path, lines=True)``) or as an iterable of dicts.
        item_popularity_counts: Event count per item (see :func:`item_popularity`). When given,
            adds ``mean_popularity_rank``: the mean popularity rank of the recommended items,
            1 being the most popular, items it lacks ranking just after the last one.

    Returns:
        One row per request: ``served_at`` (UTC), ``user_id``, ``latency_ms`` and ``degraded``
        passed through, plus ``served_layer`` as a string and the derived prediction columns.

    """
    log = request_log if isinstance(request_log, pd.DataFrame) else pd.DataFrame(list(request_log))
    if log.empty:
        raise ValueError("request log is empty")
    recs = log[RECOMMENDED_ITEMS].map(_as_item_list)

    frame = pd.DataFrame(
        {
            SERVED_AT: pd.to_datetime(log[SERVED_AT], utc=True, format="ISO8601").array,
            USER_ID: log[USER_ID].array,
            # Layer ids as strings: Evidently compares them as categories, and -1 (cold) is
            # a category, not a number below layer 0.
            SERVED_LAYER: _layer_labels(log[SERVED_LAYER]).to_numpy(),
            N_RECOMMENDED: recs.map(len).astype("int64").to_numpy(),
        }
    )
    for passthrough in (LATENCY_MS, DEGRADED):
        if passthrough in log.columns:
            frame[passthrough] = log[passthrough].to_numpy()
    if item_popularity_counts is not None:
        order = item_popularity_counts.sort_values(ascending=False, kind="stable")
        rank = pd.Series(np.arange(1, len(order) + 1, dtype=np.float64), index=order.index)
        unseen = float(len(order) + 1)
        # (n_requests * k,) one row per recommended item, keyed by its request's position.
        exploded = pd.Series(recs.to_numpy(), index=np.arange(len(recs))).explode()
        ranks = exploded.map(rank).astype("float64").fillna(unseen).where(exploded.notna())
        frame[MEAN_POPULARITY_RANK] = ranks.groupby(level=0).mean().reindex(np.arange(len(recs))).to_numpy()
    return frame


def _user_recent_events(users: pd.Series, ts: pd.Series, reference_events: pd.DataFrame | None) -> np.ndarray:
    """Each event's count of the same user's events in the trailing :data:`ACTIVITY_LOOKBACK`, itself included.

    This is the activity signal instead of "events per user in the window": a per-window count
    grows with the window, and even as a rate its spread shrinks as the window lengthens, so it
    drifts on stationary data. The gap to the user's previous event fails too: the gap that
    straddles the window start is size-biased (a fixed cut lands in long gaps more often).
    A fixed trailing lookback has the same distribution in any window. Reference events before
    the window serve as history; an event whose lookback reaches before all available history
    gets NaN (Evidently drops it) rather than an undercount.
    """
    t_s = _epoch_seconds(ts)
    u = users.to_numpy()
    rows = np.arange(len(users))
    if reference_events is not None:
        ref_ts = pd.to_datetime(reference_events[EVENT_TIMESTAMP], utc=True)
        # Only strictly earlier history: an overlapping reference would count events twice.
        before = (ref_ts < ts.min()).to_numpy()
        ref_t = _epoch_seconds(ref_ts)[before]
        t_s = np.concatenate([ref_t, t_s])
        u = np.concatenate([reference_events[USER_ID].to_numpy()[before], u])
        rows = np.concatenate([np.full(len(ref_t), -1), rows])
    lookback = int(ACTIVITY_LOOKBACK.total_seconds())
    history_start = t_s.min()
    codes = pd.factorize(u)[0].astype(np.int64)
    # One sorted int64 key per (user, time): a user's events are contiguous and time-ordered, so
    # two binary searches count the user's events in (t - lookback, t]. (B,) throughout.
    stride = int(t_s.max() - history_start) + lookback + 1
    key = codes * stride + (t_s - history_start)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    count = np.searchsorted(sorted_key, key, side="right") - np.searchsorted(sorted_key, key - lookback, side="right")
    mine = rows >= 0
    out = np.full(len(users), np.nan)
    out[rows[mine]] = np.where(t_s[mine] - lookback >= history_start, count[mine], np.nan)
    return out


def _epoch_seconds(ts: pd.Series) -> np.ndarray:
    """Whole seconds since the epoch, whatever the Series' datetime resolution."""
    return ((ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _layer_labels(values: pd.Series) -> pd.Series:
    """Layer ids as category strings ("0", "1", ..., "-1"); missing becomes ``"unknown"``."""
    numeric = pd.to_numeric(values, errors="coerce").astype("Int64")
    return numeric.astype("string").fillna(UNKNOWN).astype(str)


def _as_item_list(value: Any) -> list[int]:
    """Return one log row's recommended items as a list (a JSONL row may hold null)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [int(i) for i in value]
