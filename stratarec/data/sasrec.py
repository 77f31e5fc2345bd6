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
