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
    """The split as arrays of item rows (ids are 1-based and dense)."""

    train: list[np.ndarray]
    test_targets: np.ndarray
    val_inputs: list[np.ndarray]
    val_targets: np.ndarray
    n_items: int


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
    return SasrecSplit(train=train, test_targets=test, val_inputs=val_in, val_targets=val_out, n_items=n_items)
