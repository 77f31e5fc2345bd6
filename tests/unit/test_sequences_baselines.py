"""Split, padding and the non-sequential baselines."""

import numpy as np
import pandas as pd
import pytest

from stratarec.baselines import EASE, ItemKNN, MostPopular, TextSimilarity, build_baselines, tune_ease
from stratarec.evaluation.ranking import evaluate_scorer
from stratarec.sequences import (
    ItemIndex,
    leave_last_out_cutoffs,
    length_grouped_batches,
    next_event_cases,
    pad_right,
    split_from_events,
    split_from_frame,
    split_to_frame,
)

pytestmark = pytest.mark.unit


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"]).assign(
        event_timestamp=lambda d: pd.to_datetime(d.event_timestamp, unit="s", utc=True)
    )


def test_leave_last_out_split_by_order():
    ev = _events([(1, 10, 1), (1, 20, 2), (1, 30, 3), (1, 40, 4), (2, 10, 1), (2, 20, 2)])
    idx = ItemIndex(np.array([10, 20, 30, 40]))
    split = split_from_events(ev, idx)
    assert split.users.tolist() == [1, 2]
    assert split.train[0].tolist() == [1, 2]  # items 10, 20
    assert split.val_targets.tolist() == [3, 0]
    assert split.test_targets.tolist() == [4, 0]
    assert split.train[1].tolist() == [1, 2]  # fewer than 3 events: all train
    assert split.test_inputs()[0].tolist() == [1, 2, 3]
    cut = leave_last_out_cutoffs(ev).set_index("user_id")
    assert cut.loc[1, "test_item"] == 40 and cut.loc[1, "val_item"] == 30 and cut.loc[2, "test_item"] == -1


def test_split_frame_round_trip():
    ev = _events([(1, 10, 1), (1, 20, 2), (1, 30, 3), (2, 30, 1), (2, 10, 2), (2, 20, 3)])
    idx = ItemIndex(np.array([10, 20, 30]))
    split = split_from_events(ev, idx)
    back = split_from_frame(split_to_frame(split, idx), idx)
    assert [t.tolist() for t in back.train] == [t.tolist() for t in split.train]
    assert back.test_targets.tolist() == split.test_targets.tolist()


def test_split_rejects_interleaved_users():
    ev = _events([(1, 10, 1), (2, 20, 2), (1, 30, 3)])
    with pytest.raises(ValueError, match="grouped by user"):
        split_from_events(ev, ItemIndex(np.array([10, 20, 30])))


def test_pad_right_keeps_most_recent():
    items, lengths = pad_right([np.array([1, 2, 3, 4]), np.array([5])], 3)
    assert items.tolist() == [[2, 3, 4], [5, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_item_index_unknown_ids_map_to_padding():
    idx = ItemIndex(np.array([7, 3]))
    assert idx.to_index([3, 99, 7]).tolist() == [2, 0, 1]
    assert idx.to_ids(np.array([1, 2])).tolist() == [7, 3]


def test_most_popular_counts_users():
    train = [np.array([1, 2]), np.array([2]), np.array([2, 3])]
    assert MostPopular(train, 3).score([np.array([1])])[0].tolist() == [1.0, 3.0, 1.0]


def test_item_knn_and_ease_recover_co_occurrence():
    # items 1 and 2 always co-occur; item 3 alone
    train = [np.array([1, 2]), np.array([1, 2]), np.array([3]), np.array([1, 2])]
    for model in (ItemKNN(train, 3, neighbours=2), EASE(train, 3, l2=1.0)):
        s = model.score([np.array([1])])[0]
        assert s[1] > s[2], model.name  # item 2 scores above item 3 for a user who saw item 1


def test_build_baselines_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baselines(["nope"], [np.array([1])], 1)


def test_tuned_ease_keeps_the_l2_with_the_best_validation_ndcg():
    rng = np.random.default_rng(0)
    # Two item groups (1-10, 11-20); users stay inside one group, so co-occurrence predicts.
    train = [rng.choice(np.arange(1, 11) + 10 * (u % 2), size=6, replace=False) for u in range(60)]
    val_targets = np.array([next(i for i in range(1, 11) if i + 10 * (u % 2) not in h) + 10 * (u % 2) for u, h in enumerate(train)])
    grid = (0.1, 10.0, 1e6)
    tuned = tune_ease(train, 21, (train, val_targets), grid=grid)
    scores = {l2: evaluate_scorer(EASE(train, 21, l2=l2), train, train, val_targets, 10, 21)["overall"]["ndcg@10"] for l2 in grid}
    assert tuned.l2 == max(grid, key=lambda l2: (scores[l2], -l2))
    np.testing.assert_array_equal(tuned.weights, EASE(train, 21, l2=tuned.l2).weights)
    built = build_baselines(["ease"], train, 21, validation=(train, val_targets))[0]
    assert built.l2 == tune_ease(train, 21, (train, val_targets)).l2  # the default grid
    assert build_baselines(["ease"], train, 21)[0].l2 == 250.0  # no validation: the fixed default


def test_item_index_lookup_is_safe_from_many_threads():
    from concurrent.futures import ThreadPoolExecutor

    ids = np.arange(10, 5000, 3)
    query = np.array([10, 11, 4999, 4996, 7, 13])
    expected = [1, 0, 1664, 1663, 0, 2]  # id 10 + 3 * (row - 1)
    for _ in range(20):  # a fresh index each time: the first concurrent uses are the risky ones
        index = ItemIndex(ids)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _, index=index: index.to_index(query).tolist(), range(32)))
        assert all(r == expected for r in results)


def test_length_grouped_batches_by_hand():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9]), np.array([10, 11])]
    batches = list(length_grouped_batches(seqs, max_len=4, batch_rows=2))
    # Cut lengths 3, 1, 4, 2 -> order 1, 3, 0, 2; each batch is only as wide as its longest row.
    assert [b[0].tolist() for b in batches] == [[1, 3], [0, 2]]
    np.testing.assert_array_equal(batches[0][1], [[4, 0], [10, 11]])
    np.testing.assert_array_equal(batches[0][2], [1, 2])
    np.testing.assert_array_equal(batches[1][1], [[1, 2, 3, 0], [6, 7, 8, 9]])  # 5 items cut to the last 4
    np.testing.assert_array_equal(batches[1][2], [3, 4])
    assert list(length_grouped_batches([], max_len=4, batch_rows=2)) == []


def test_next_event_cases_by_hand():
    ev = _events([(1, 10, 1), (1, 20, 5), (1, 99, 6), (1, 30, 7), (2, 40, 8), (3, 10, 2), (3, 20, 3)])
    idx = ItemIndex(np.array([10, 20, 30, 40]))  # rows 1..4; item 99 is unknown and dropped
    cases = next_event_cases(ev, idx, after=pd.Timestamp(4, unit="s", tz="UTC"), max_history=1)
    # user 1: events at 5 and 7 are late; user 2's only event has no history; user 3 is all early.
    assert cases.users.tolist() == [1, 1]
    assert cases.targets.tolist() == [2, 3]
    assert [h.tolist() for h in cases.histories] == [[1], [2]]  # max_history=1 keeps the newest item
    full = next_event_cases(ev, idx, after=pd.Timestamp(4, unit="s", tz="UTC"), max_history=10)
    assert [h.tolist() for h in full.histories] == [[1], [1, 2]]


def test_next_event_cases_rejects_interleaved_users():
    ev = _events([(1, 10, 1), (2, 20, 2), (1, 30, 3)])
    with pytest.raises(ValueError, match="grouped by user"):
        next_event_cases(ev, ItemIndex(np.array([10, 20, 30])), after=pd.Timestamp(0, unit="s", tz="UTC"), max_history=5)


def test_text_similarity_scores_cosine_to_recent_items():
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # rows 1, 2, 3
    scorer = TextSimilarity(vectors, window=1)
    # Only the newest item (row 2, direction (0, 1)) makes the profile.
    s = scorer.score([np.array([1, 2]), np.array([], np.int64)])
    np.testing.assert_allclose(s[0], [0.0, 1.0, np.sqrt(0.5)], atol=1e-6)
    assert not s[1].any()  # no history, no signal
    both = TextSimilarity(vectors, window=2).score([np.array([1, 2])])[0]
    # Profile = mean of (1, 0) and (0, 1) = (0.5, 0.5): dot products 0.5, 0.5, 2 * 0.5 / sqrt(2).
    np.testing.assert_allclose(both, [0.5, 0.5, np.sqrt(0.5)], atol=1e-6)
