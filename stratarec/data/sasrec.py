"""The published MovieLens-1M split for sequential recommendation (SASRec preprocessing).

Files (see the data README): ``train/input.txt`` one line per user with the item ids in time
order minus the held-out item, ``test/output.txt`` the held-out item per user, and
``val/input.txt`` / ``val/output.txt`` 512 separate validation sequences with their next
item. Item ids are already 1..n_items, so they are used as model rows directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class SasrecSplit:
    """The split as arrays of item rows (ids are 1-based and dense).

    What the files hold (checked on them, and as gSASRec's ``preprocess_ml1m.py`` writes them):
    ``train/input.txt`` is each user's sequence without its last *two* items (three for the 512
    validation users), ``test/output.txt`` the last item, ``val/`` the 512 users' sequence
    without its last two items and their second-to-last item. The published numbers rank the
    test item given the sequence without only the last item (gSASRec's ``test/input.txt``),
    which these files do not carry: that item is known here only for the 512 validation users.

    Attributes:
        val_users: (512,) the user (row of ``train``) of each validation sequence.
    """

    train: list[np.ndarray]
    test_targets: np.ndarray
    val_inputs: list[np.ndarray]
    val_targets: np.ndarray
    n_items: int
    val_users: np.ndarray

    def published_test(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, targets) of the published protocol, for the users whose test input is known.

        Input = everything before the test item (validation input + validation item), target =
        the test item: exactly gSASRec's ``test/input.txt`` rows for these 512 users.
        """
        inputs = [np.append(v, t) for v, t in zip(self.val_inputs, self.val_targets, strict=True)]
        return inputs, self.test_targets[self.val_users]

    def aligned_train(self) -> list[np.ndarray]:
        """Training sequences with the validation users' lines one item longer (their validation input).

        gSASRec trained on ``train/input.txt``, where 5,528 of its 6,040 test users end two items
        before their test item and the 512 validation users three. The published protocol can be
        scored here only on those 512, so training on their validation input puts them where the
        other test users were: one unseen item between training and the test item. Neither the
        validation item nor the test item is in any training sequence.
        """
        train = list(self.train)
        for row, sequence in zip(self.val_users, self.val_inputs, strict=True):
            train[int(row)] = sequence
        return train


def _read_sequences(path: Path) -> list[np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: point --data-dir (or STRATAREC_DATA_DIR) at the folder holding ml-1m-sasrec/")
    return [np.array(line.split(), dtype=np.int64) for line in path.read_text().splitlines() if line.strip()]


def load_sasrec_split(data_dir: Path) -> SasrecSplit:
    """Load ``<data_dir>/ml-1m-sasrec`` (or ``data_dir`` itself when it is that folder)."""
    root = Path(data_dir)
    if not (root / "train").exists():
        root = root / "ml-1m-sasrec"
    train = _read_sequences(root / "train" / "input.txt")
    test = np.array([s[0] for s in _read_sequences(root / "test" / "output.txt")], dtype=np.int64)
    val_in = _read_sequences(root / "val" / "input.txt")
    val_out = np.array([s[0] for s in _read_sequences(root / "val" / "output.txt")], dtype=np.int64)
    if len(train) != len(test):
        raise ValueError(f"train/input.txt has {len(train)} users but test/output.txt has {len(test)}")
    n_items = int(max(max(s.max() for s in train), test.max(), max(s.max() for s in val_in), val_out.max()))
    return SasrecSplit(
        train=train, test_targets=test, val_inputs=val_in, val_targets=val_out, n_items=n_items, val_users=_val_users(train, val_in)
    )


def _val_users(train: list[np.ndarray], val_inputs: list[np.ndarray]) -> np.ndarray:
    """The train row of each validation sequence: the one user whose train line is the sequence minus its last item."""
    by_line = {seq.tobytes(): i for i, seq in enumerate(train)}
    users = []
    for j, seq in enumerate(val_inputs):
        user = by_line.get(seq[:-1].tobytes())
        if user is None:
            raise ValueError(f"val/input.txt line {j + 1} is not a train/input.txt line plus one item: not the gSASRec split")
        users.append(user)
    return np.asarray(users, dtype=np.int64)


@dataclass
class RestoredTest:
    """The published protocol's test inputs for every user, restored from the raw ratings.

    Attributes:
        inputs: One sequence per user: ``train/input.txt`` plus the second-to-last item
            (for the 512 validation users: their validation input plus validation item).
        restored_items: (n_users,) the restored second-to-last item per user, 0 for the
            validation users (whose item the files already carry).
        mapping_agreement: Share of (user, position) votes that agree with the item mapping
            chosen; below 1 only where equal timestamps let two items swap places.
        raw_users: (n_users,) the raw user id paired with each split user.
    """

    inputs: list[np.ndarray]
    restored_items: np.ndarray
    mapping_agreement: float
    raw_users: np.ndarray


def read_ml1m_ratings(path: Path) -> pd.DataFrame:
    """Read raw MovieLens-1M ratings as columns user (int), item (str token), timestamp (int), in file order.

    Accepts GroupLens' ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and the RecBole
    atomic file ``ml-1m.inter`` (tab-separated with a typed header; users ``1m_<id>``, movies
    named by title). The file stays wherever the user keeps it: MovieLens' licence forbids
    redistributing it, so nothing here copies it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: give the MovieLens-1M ratings.dat (GroupLens) or ml-1m.inter (RecBole)")
    with path.open(encoding="latin-1") as fh:
        first = fh.readline()
    if "::" in first:
        frame = pd.read_csv(path, sep="::", engine="python", header=None, names=["user", "item", "rating", "timestamp"], encoding="latin-1")
    elif first.startswith("user_id:token"):
        frame = pd.read_csv(path, sep="\t", quoting=3, dtype=str, encoding="latin-1")
        frame.columns = [c.split(":")[0] for c in frame.columns]
        frame = frame.rename(columns={"user_id": "user", "item_id": "item"})
        frame["user"] = frame["user"].str.removeprefix("1m_")
    else:
        raise ValueError(f"{path}: first line {first.strip()[:60]!r} is neither ratings.dat ('::'-separated) nor a RecBole .inter header")
    out = pd.DataFrame(
        {
            "user": pd.to_numeric(frame["user"], errors="raise").astype(np.int64),
            "item": frame["item"].astype(str),
            "timestamp": pd.to_numeric(frame["timestamp"], errors="raise").astype(np.int64),
        }
    )
    return out


def restore_published_test(
    split: SasrecSplit, ratings: pd.DataFrame, min_item_events: int = 5, min_known: int = 5, max_rounds: int = 20
) -> RestoredTest:
    """Restore every user's published test input (the sequence without only its last item) from raw ratings.

    The shared files drop each user's second-to-last item (see :class:`SasrecSplit`); the raw
    ratings still hold it. SASRec's preprocessing kept items with at least ``min_item_events``
    ratings and renumbered users and items in an order that is not recorded, so both
    numberings are recovered here:

    * users whose sequence length no other user shares are paired by length alone;
    * in a paired user's time-ordered raw sequence, position ``p`` of the training part is the
      item at position ``p`` of ``train/input.txt`` unless equal timestamps swapped them, and
      the last position is the test item (for validation users the two before it are the
      validation items), so the majority raw item per SASRec item is its identity;
    * every other user is paired with the one raw user of the same length whose items contain
      all of its mapped items, and pairing repeats until no user is left.

    Then a user's raw item set minus the mapped items of the split is exactly the missing
    item, whatever the order of ties.

    Args:
        split: The loaded split.
        ratings: Columns user, item, timestamp (:func:`read_ml1m_ratings`), in file order.
        min_item_events: SASRec's item filter.
        min_known: Mapped items a user's training part needs before it is paired by containment
            (fewer could fit the wrong raw user while the mapping is still young).
        max_rounds: Pairing rounds before giving up.

    Returns:
        The restored inputs, aligned with ``split.test_targets``.

    Raises:
        ValueError: The ratings are not the data behind this split (lengths, pairing, the
            mapping or a missing item do not check out); the message says which.
    """
    counts = ratings["item"].value_counts()
    kept = ratings[ratings["item"].map(counts) >= min_item_events]
    # A stable sort keeps file order among equal timestamps, as SASRec's per-user sort did.
    kept = kept.sort_values(["user", "timestamp"], kind="stable")
    grouped = kept.groupby("user", sort=True)["item"]
    raw_ids = np.array([u for u, _ in grouped], dtype=np.int64)
    raw = [g.to_numpy() for _, g in grouped]
    n_users = len(split.train)
    if len(raw) != n_users:
        raise ValueError(f"ratings: {len(raw)} users after the item filter, the split has {n_users}")
    is_val = np.zeros(n_users, dtype=bool)
    is_val[split.val_users] = True
    lengths = np.array([len(t) + (3 if v else 2) for t, v in zip(split.train, is_val, strict=True)])
    raw_by_length: dict[int, list[int]] = {}
    for r, seq in enumerate(raw):
        raw_by_length.setdefault(len(seq), []).append(r)
    sas_by_length: dict[int, list[int]] = {}
    for u, n in enumerate(lengths):
        sas_by_length.setdefault(int(n), []).append(u)
    if sorted(raw_by_length) != sorted(sas_by_length) or any(len(raw_by_length[n]) != len(v) for n, v in sas_by_length.items()):
        raise ValueError("ratings: the users' sequence lengths differ from the split's; these ratings are not its source")

    votes: dict[int, dict[str, int]] = {}
    pair = np.full(n_users, -1, dtype=np.int64)

    val_row = {int(u): j for j, u in enumerate(split.val_users)}

    def add_pair(u: int, r: int) -> None:
        pair[u] = r
        raw_sets[r] = None  # taken
        # Known positions: the training part, the test item (last) and, for validation users,
        # the validation input's last item and the validation item (third- and second-to-last).
        sas = list(split.train[u].tolist())
        at = list(range(len(sas)))
        if is_val[u]:
            j = val_row[u]
            sas += [int(split.val_inputs[j][-1]), int(split.val_targets[j])]
            at += [len(raw[r]) - 3, len(raw[r]) - 2]
        sas.append(int(split.test_targets[u]))
        at.append(len(raw[r]) - 1)
        for sas_item, p in zip(sas, at, strict=True):
            box = votes.setdefault(int(sas_item), {})
            box[raw[r][p]] = box.get(raw[r][p], 0) + 1

    raw_sets: list[set[str] | None] = [set(seq.tolist()) for seq in raw]
    for n, users in sas_by_length.items():
        if len(users) == 1:
            add_pair(users[0], raw_by_length[n][0])
    for _ in range(max_rounds):
        to_raw = {sas: max(box, key=box.__getitem__) for sas, box in votes.items()}
        progressed = False
        for u in np.flatnonzero(pair < 0):
            known = [to_raw[i] for i in split.train[u].tolist() if i in to_raw]
            if len(known) < min_known:
                continue
            fits = [r for r in raw_by_length[int(lengths[u])] if raw_sets[r] is not None and raw_sets[r].issuperset(known)]
            if len(fits) == 1:
                add_pair(int(u), fits[0])
                progressed = True
        if (pair >= 0).all() or not progressed:
            break
    if (pair < 0).any():
        raise ValueError(
            f"ratings: {(pair < 0).sum()} users could not be paired with a raw user, e.g. split user {np.flatnonzero(pair < 0)[0] + 1}"
        )
    to_raw = {sas: max(box, key=box.__getitem__) for sas, box in votes.items()}
    agree = sum(box[to_raw[sas]] for sas, box in votes.items()) / max(1, sum(sum(b.values()) for b in votes.values()))
    if len(set(to_raw.values())) != len(to_raw):
        raise ValueError("ratings: two SASRec items map to the same raw item; these ratings are not the split's source")
    # An item that is only ever someone's missing second-to-last item has no vote: with one such
    # item on each side the pairing is forced, with more it is not recoverable.
    unseen_sas = sorted(set(range(1, split.n_items + 1)) - set(to_raw))
    unmapped_raw = sorted(set(kept["item"].unique()) - set(to_raw.values()))
    if len(unseen_sas) == len(unmapped_raw) == 1:
        to_raw[unseen_sas[0]] = unmapped_raw[0]
    elif unmapped_raw:
        raise ValueError(f"ratings: {len(unmapped_raw)} raw items match no item of the split (e.g. {unmapped_raw[0]!r})")
    from_raw = {r: s for s, r in to_raw.items()}
    inputs: list[np.ndarray] = []
    restored = np.zeros(n_users, dtype=np.int64)
    for u in range(n_users):
        known = set(split.train[u].tolist()) | {int(split.test_targets[u])}
        if is_val[u]:
            j = val_row[u]
            known |= {int(split.val_inputs[j][-1]), int(split.val_targets[j])}
        missing = [r for r in raw[pair[u]] if from_raw.get(r) not in known]
        if is_val[u]:
            if missing:
                raise ValueError(f"ratings: validation user {u + 1} has raw items the split does not: {missing[:3]}")
            inputs.append(np.append(split.val_inputs[j], split.val_targets[j]))
            continue
        if len(missing) != 1 or missing[0] not in from_raw:
            raise ValueError(f"ratings: split user {u + 1} should lack exactly one mapped item, found {len(missing)}")
        restored[u] = from_raw[missing[0]]
        inputs.append(np.append(split.train[u], restored[u]))
    return RestoredTest(inputs=inputs, restored_items=restored, mapping_agreement=float(agree), raw_users=raw_ids[pair])
