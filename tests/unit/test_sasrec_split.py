"""The gSASRec ML-1M split loader: files in the published layout, written here from a tiny made-up catalogue."""

import numpy as np
import pandas as pd
import pytest

from stratarec.data.sasrec import load_sasrec_split, read_ml1m_ratings, restore_published_test

pytestmark = pytest.mark.unit


def _write(root, lines_by_file: dict[str, list[list[int]]]) -> None:
    for name, lines in lines_by_file.items():
        path = root / "ml-1m-sasrec" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(" ".join(map(str, line)) + "\n" for line in lines))


def _layout(tmp_path, val_inputs):
    # Full sequences, as gSASRec's preprocess_ml1m.py sees them (user 1 is a validation user):
    # train = all but the last two items (three for validation users), test = the last item.
    full = [[1, 2, 3, 4, 5], [2, 3, 6, 7, 8, 9], [5, 4, 3, 1, 2]]
    train = [full[0][:-2], full[1][:-3], full[2][:-2]]
    _write(
        tmp_path,
        {
            "train/input.txt": train,
            "test/output.txt": [[s[-1]] for s in full],
            "val/input.txt": val_inputs(full),
            "val/output.txt": [[full[1][-2]]],
        },
    )
    return full


def test_published_protocol_input_is_everything_before_the_test_item(tmp_path):
    full = _layout(tmp_path, lambda full: [full[1][:-2]])
    split = load_sasrec_split(tmp_path)
    assert split.n_items == 9 and split.val_users.tolist() == [1]
    inputs, targets = split.published_test()
    assert [x.tolist() for x in inputs] == [full[1][:-1]]  # train + validation item + second-to-last
    assert targets.tolist() == [full[1][-1]]
    # The train/input.txt protocol ranks the same test items from a shorter history.
    assert split.train[1].tolist() == full[1][:-3] and split.test_targets.tolist() == [s[-1] for s in full]
    assert np.array_equal(split.val_targets, [full[1][-2]])


def test_aligned_training_ends_every_user_two_items_before_the_test_item(tmp_path):
    full = _layout(tmp_path, lambda full: [full[1][:-2]])
    split = load_sasrec_split(tmp_path)
    aligned = split.aligned_train()
    assert [a.tolist() for a in aligned] == [s[:-2] for s in full]
    assert split.train[1].tolist() == full[1][:-3]  # the loaded split itself is untouched
    # No validation or test item enters training.
    assert full[1][-2] not in aligned[1].tolist()
    assert all(s[-1] not in a.tolist() for s, a in zip(full, aligned, strict=True))


def test_a_validation_sequence_that_is_no_train_line_plus_one_item_is_refused(tmp_path):
    _layout(tmp_path, lambda full: [[9, 9, 9, 9]])
    with pytest.raises(ValueError, match="val/input.txt line 1 is not a train/input.txt line plus one item"):
        load_sasrec_split(tmp_path)


def test_missing_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ml-1m-sasrec"):
        load_sasrec_split(tmp_path)


# Raw-ratings restoration: four users with SASRec numbering (user 1 is the validation user);
# the raw file numbers users and items differently and lists rows out of time order.
_FULL = [[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8], [1, 7, 6, 5, 4, 3, 2], [1, 3, 5, 7, 2, 4, 6, 8]]
_RAW_USER = [40, 10, 30, 20]


def _raw_ratings(full, rare_row: bool = True) -> pd.DataFrame:
    rows = []
    for u, seq in enumerate(full):
        for t, item in enumerate(seq):
            rows.append((_RAW_USER[u], f"movie {9 - item}", 1000 * u + 10 * t))
    if rare_row:
        rows.append((40, "rated once", 15))  # below the item filter, so not in the split
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).sample(frac=1.0, random_state=0)
    return frame.sort_values("user", kind="stable").reset_index(drop=True)  # grouped by user, like ratings.dat


def _restoration_split(tmp_path):
    full = _FULL
    _write(
        tmp_path,
        {
            "train/input.txt": [s[:-3] if u == 1 else s[:-2] for u, s in enumerate(full)],
            "test/output.txt": [[s[-1]] for s in full],
            "val/input.txt": [full[1][:-2]],
            "val/output.txt": [[full[1][-2]]],
        },
    )
    return load_sasrec_split(tmp_path)


def test_the_missing_second_to_last_items_are_restored_from_raw_ratings(tmp_path):
    split = _restoration_split(tmp_path)
    restored = restore_published_test(split, _raw_ratings(_FULL), min_item_events=2, min_known=2)
    # Every user's input is now the sequence without only its last item, as gSASRec scored it.
    assert [x.tolist() for x in restored.inputs] == [s[:-1] for s in _FULL]
    assert restored.restored_items.tolist() == [5, 0, 3, 6]  # 0: the validation user's item was already known
    assert restored.raw_users.tolist() == _RAW_USER
    assert restored.mapping_agreement == 1.0


def test_ratings_that_are_not_the_splits_source_are_refused(tmp_path):
    split = _restoration_split(tmp_path)
    other = _raw_ratings(_FULL)
    other = other.drop(index=other.index[other["user"] == 20][:1])  # one rating fewer for one user
    with pytest.raises(ValueError, match="sequence lengths differ"):
        restore_published_test(split, other, min_item_events=2, min_known=2)


def test_both_raw_ratings_formats_are_read(tmp_path):
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    inter = tmp_path / "ml-1m.inter"
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        '1m_1\tOne Flew Over the Cuckoo\'s Nest (1975)\t5\t978300760\n1m_2\t"Great Escape, The (1963)"\t4\t978298413\n'
    )
    a = read_ml1m_ratings(dat)
    assert a["user"].tolist() == [1, 1, 2] and a["item"].tolist() == ["1193", "661", "1193"] and a["timestamp"].tolist()[0] == 978300760
    b = read_ml1m_ratings(inter)
    assert b["user"].tolist() == [1, 2] and b["item"].tolist()[1] == '"Great Escape, The (1963)"'
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(ValueError, match="neither ratings.dat"):
        read_ml1m_ratings(bad)
