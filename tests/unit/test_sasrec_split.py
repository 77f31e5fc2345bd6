"""The gSASRec ML-1M split loader: files in the published layout, written here from a tiny made-up catalogue."""

import numpy as np
import pytest

from stratarec.data.sasrec import load_sasrec_split

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
