"""Item indexing and the temporal leave-last-out split.

Events must already be in a total order per user (see ``stratarec.features.order_events``).
Each user's last event is the test target and the one before it the validation target;
everything earlier is training history. Users with fewer than three events only train.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stratarec.schema import EVENT_TIMESTAMP, ITEM_ID, USER_ID


@dataclass(frozen=True)
class ItemIndex:
    """Maps external item ids to model rows. Row 0 is padding; item ``item_ids[j]`` is row ``j + 1``."""

    item_ids: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.item_ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("item_ids must be unique")
        object.__setattr__(self, "item_ids", ids)
        # A sorted-array lookup, not a pandas index: pandas builds an index's hash table
        # lazily on first use, and concurrent first uses from the service's threads race
        # ("cannot reindex on an axis with duplicate labels"). numpy arrays are read-only here.
        order = np.argsort(ids, kind="stable")
        object.__setattr__(self, "_sorted_ids", ids[order])
        object.__setattr__(self, "_sorted_rows", order.astype(np.int64) + 1)

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_index(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """External ids to rows; unknown ids map to 0 (padding) so callers can drop them."""
        sorted_ids: np.ndarray = self._sorted_ids  # type: ignore[attr-defined]
        query = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(sorted_ids) == 0:
            return np.zeros(len(query), dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == query, self._sorted_rows[pos], 0)  # type: ignore[attr-defined]

    def to_ids(self, rows: np.ndarray) -> np.ndarray:
        """Rows (1-based) back to external ids."""
        return self.item_ids[np.asarray(rows, dtype=np.int64) - 1]


@dataclass
class SequenceSplit:
    """Per-user histories (as item rows) and held-out targets, aligned on ``users``.

    Attributes:
        users: (U,) external user ids.
        train: each user's training history, oldest first.
        val_targets: (U,) validation item row, 0 when the user has none.
        test_targets: (U,) test item row, 0 when the user has none.
        window: (start, end) timestamps of the events the split was built from.
    """

    users: np.ndarray
    train: list[np.ndarray]
    val_targets: np.ndarray
    test_targets: np.ndarray
    window: tuple[str, str] = ("", "")
    meta: dict = field(default_factory=dict)

    def val_inputs(self) -> list[np.ndarray]:
        """Histories that predict the validation item: the training history."""
        return self.train

    def test_inputs(self) -> list[np.ndarray]:
        """Histories that predict the test item: training history plus the validation item."""
        return [np.append(h, v) if v > 0 else h for h, v in zip(self.train, self.val_targets, strict=True)]

    def full_histories(self) -> list[np.ndarray]:
        """Everything known about each user: train, validation and test items."""
        out = []
        for h, v, t in zip(self.train, self.val_targets, self.test_targets, strict=True):
            extra = [x for x in (v, t) if x > 0]
            out.append(np.append(h, extra).astype(np.int64))
        return out

    def train_item_counts(self, n_items: int) -> np.ndarray:
        """(n_items + 1,) number of training events per item row."""
        counts = np.zeros(n_items + 1, dtype=np.int64)
        for h in self.train:
            np.add.at(counts, h, 1)
        counts[0] = 0
        return counts


def leave_last_out_cutoffs(ordered_events: pd.DataFrame) -> pd.DataFrame:
    """Per user, the timestamps and items of the validation and test events.

    Returns:
        One row per user with columns user_id, val_ts, val_item, test_ts, test_item;
        val/test are NaT/-1 for users with fewer than three events.
    """
    ev = ordered_events[[USER_ID, ITEM_ID, EVENT_TIMESTAMP]]
    pos_from_end = ev.groupby(USER_ID, sort=False).cumcount(ascending=False)
    size = ev.groupby(USER_ID, sort=False)[ITEM_ID].transform("size")
    eligible = size >= 3
    test = ev[(pos_from_end == 0) & eligible].set_index(USER_ID)
    val = ev[(pos_from_end == 1) & eligible].set_index(USER_ID)
    users = pd.Index(ev[USER_ID].unique(), name=USER_ID)
    out = pd.DataFrame(index=users)
    out["val_ts"] = val[EVENT_TIMESTAMP].reindex(users)
    out["val_item"] = val[ITEM_ID].reindex(users).fillna(-1).astype(np.int64)
    out["test_ts"] = test[EVENT_TIMESTAMP].reindex(users)
    out["test_item"] = test[ITEM_ID].reindex(users).fillna(-1).astype(np.int64)
    return out.reset_index()


def split_from_events(ordered_events: pd.DataFrame, index: ItemIndex) -> SequenceSplit:
    """Temporal leave-last-out split built straight from an ordered event table."""
    ev = ordered_events[[USER_ID, ITEM_ID, EVENT_TIMESTAMP]]
    rows = index.to_index(ev[ITEM_ID].to_numpy())
    users, starts = np.unique(ev[USER_ID].to_numpy(), return_index=True)
    # np.unique sorts users; slice each user's contiguous block in original order.
    order = np.argsort(starts)
    users, starts = users[order], starts[order]
    ends = np.append(starts[1:], len(ev))
    if int((np.diff(ev[USER_ID].to_numpy()) != 0).sum()) != len(users) - 1:
        raise ValueError("events must be grouped by user and time-ordered (call order_events first)")
    train, val, test = [], np.zeros(len(users), np.int64), np.zeros(len(users), np.int64)
    for u, (s, e) in enumerate(zip(starts, ends, strict=True)):
        seq = rows[s:e]
        seq = seq[seq > 0]
        if len(seq) >= 3:
            train.append(seq[:-2])
            val[u], test[u] = seq[-2], seq[-1]
        else:
            train.append(seq)
    ts = ev[EVENT_TIMESTAMP]
    window = (str(ts.min()), str(ts.max())) if len(ts) else ("", "")
    return SequenceSplit(users=users, train=train, val_targets=val, test_targets=test, window=window)


@dataclass
class NextEventCases:
    """Every event after a cut-off, each with the history that preceded it.

    The rolling counterpart of the leave-last-out split: a model trained on the events up
    to the cut-off predicts each later event from everything the user did before it
    (including earlier events after the cut-off, which the model has not trained on). It
    gives hundreds of test events for slices that leave-last-out leaves with a handful.
    """

    users: np.ndarray  # (N,) user id of each case
    histories: list[np.ndarray]  # item rows before the event, oldest first
    targets: np.ndarray  # (N,) item row of the event

    def __len__(self) -> int:
        return len(self.targets)


def next_event_cases(ordered_events: pd.DataFrame, index: ItemIndex, after: pd.Timestamp, max_history: int) -> NextEventCases:
    """One case per known-item event later than ``after`` whose user has an earlier known item.

    Args:
        ordered_events: Events grouped by user in time order (``order_events``).
        index: The model's item rows; events of unknown items are dropped.
        after: Events with a timestamp strictly later than this are targets.
        max_history: Histories keep their last ``max_history`` items, as the feature store does.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    ev = ordered_events[[USER_ID, ITEM_ID, EVENT_TIMESTAMP]]
    user_col = ev[USER_ID].to_numpy()
    if len(user_col) and int((np.diff(user_col) != 0).sum()) != len(np.unique(user_col)) - 1:
        raise ValueError("events must be grouped by user and time-ordered (call order_events first)")
    rows = index.to_index(ev[ITEM_ID].to_numpy())
    late = (ev[EVENT_TIMESTAMP] > after).to_numpy()
    known = rows > 0
    rows, late, user_col = rows[known], late[known], user_col[known]
    bounds = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1], True]) if len(rows) else np.zeros(1, np.int64)
    users, histories, targets = [], [], []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        seq = rows[s:e]
        for j in np.flatnonzero(late[s:e]):
            if j == 0:
                continue  # nothing to predict it from
            users.append(user_col[s])
            histories.append(seq[max(0, j - max_history) : j])
            targets.append(seq[j])
    return NextEventCases(users=np.asarray(users, np.int64), histories=histories, targets=np.asarray(targets, np.int64))


def pad_right(seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` items of each sequence and right-pad with 0.

    Returns:
        (B, T) item rows and (B,) lengths, T = min(max_len, longest sequence) (at least 1).
    """
    lengths = np.array([min(len(s), max_len) for s in seqs], dtype=np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if lengths[i]:
            out[i, : lengths[i]] = s[-lengths[i] :]
    return out, lengths


def length_grouped_batches(seqs: list[np.ndarray], max_len: int, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Right-padded batches of sequences of similar length, for scoring.

    Padding every row of a batch to its longest sequence wastes most of the work when lengths
    vary, so rows are sorted by (cut) length first; callers put results back by ``rows``.

    Yields:
        ``(rows, items, lengths)``: the batch's indices into ``seqs``, then :func:`pad_right` of them.
    """
    lengths = np.array([min(len(s), max_len) for s in seqs], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_rows):
        rows = order[start : start + batch_rows]
        items, lens = pad_right([seqs[i] for i in rows], max_len)
        yield rows, items, lens


TRAIN_ITEMS = "train_items"
VAL_ITEM = "val_item"
TEST_ITEM = "test_item"


def split_to_frame(split: SequenceSplit, index: ItemIndex) -> pd.DataFrame:
    """Serialise a split with external item ids (val/test -1 when absent)."""

    def ext(rows: np.ndarray) -> np.ndarray:
        return np.where(rows > 0, index.item_ids[np.maximum(rows, 1) - 1], -1)

    return pd.DataFrame(
        {
            USER_ID: np.asarray(split.users, dtype=np.int64),
            TRAIN_ITEMS: [index.to_ids(h).tolist() for h in split.train],
            VAL_ITEM: ext(split.val_targets),
            TEST_ITEM: ext(split.test_targets),
        }
    )


def split_from_frame(frame: pd.DataFrame, index: ItemIndex, window: tuple[str, str] = ("", "")) -> SequenceSplit:
    """Inverse of :func:`split_to_frame`; items missing from ``index`` are dropped."""
    train = []
    for items in frame[TRAIN_ITEMS]:
        rows = index.to_index(np.asarray(list(items), dtype=np.int64))
        train.append(rows[rows > 0])
    return SequenceSplit(
        users=frame[USER_ID].to_numpy(dtype=np.int64),
        train=train,
        val_targets=index.to_index(frame[VAL_ITEM].to_numpy(dtype=np.int64)),
        test_targets=index.to_index(frame[TEST_ITEM].to_numpy(dtype=np.int64)),
        window=window,
    )
