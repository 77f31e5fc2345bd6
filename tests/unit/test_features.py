"""Feature computation and text embeddings, checked against answers worked out by hand."""

import time

import numpy as np
import pandas as pd
import pytest

from stratarec.features import (
    USER_ACTIVITY_COLUMNS,
    compute_item_catalog,
    compute_user_activity,
    empty_user_layers,
    genre_vocabulary,
    order_events,
    tie_order_key,
)
from stratarec.text_encoder import EMBEDDING_DIM, embed_texts, item_text

pytestmark = pytest.mark.unit

T0 = pd.Timestamp("2024-01-01", tz="UTC")
US = pd.Timedelta(microseconds=1)
DAY = pd.Timedelta(days=1)


def _events(rows):
    """rows: (user_id, item_id, seconds after T0)."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "seconds"])
    return pd.DataFrame(
        {
            "user_id": df.user_id.astype("Int64"),
            "item_id": df.item_id.astype("Int64"),
            "rating": 4.0,
            "event_timestamp": (T0 + pd.to_timedelta(df.seconds, unit="s")).astype("datetime64[ns, UTC]"),
        }
    )


def _items():
    return pd.DataFrame(
        {
            "item_id": pd.array([1, 2, 3], dtype="Int64"),
            "title": pd.array(["Alpha (1990)", "Beta (1991)", "Gamma"], dtype="string"),
            "genres": pd.array(["Action|Comedy", "Drama", "Action"], dtype="string"),
            "release_year": pd.array([1990, 1991, None], dtype="Int64"),
        }
    )


# ---- order_events ---------------------------------------------------------------------


def _splitmix_reference(user: int, item: int) -> int:
    """tie_order_key in plain Python integers, written independently of numpy."""
    mask = (1 << 64) - 1
    x = ((user * 0x9E3779B97F4A7C15) & mask) ^ item
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_tie_order_key_matches_a_plain_python_splitmix64():
    users = np.array([0, 0, 1, 7, 943, 2**40])
    items = np.array([0, 1, 10, 20, 1682, 5])
    got = tie_order_key(users, items)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == [_splitmix_reference(int(u), int(i)) for u, i in zip(users, items, strict=True)]
    assert int(got[0]) == 0  # the finaliser maps 0 to 0


def test_tie_order_key_says_nothing_of_item_ids():
    # One user's 1,000 simultaneous items: ordered by the key, consecutive items are as
    # often a larger id as a smaller one (item-id order would make it always larger).
    items = np.arange(1, 1001)
    ordered = items[np.argsort(tie_order_key(np.full(1000, 5), items))]
    share_up = float((np.diff(ordered) > 0).mean())
    assert 0.45 < share_up < 0.55
    # Another user gets another order of the same items.
    other = items[np.argsort(tie_order_key(np.full(1000, 6), items))]
    assert not np.array_equal(ordered, other)


def test_order_events_breaks_ties_by_the_hashed_order_and_one_microsecond_per_tie():
    ev = _events([(1, 30, 100), (2, 5, 100), (1, 10, 100), (1, 20, 100), (1, 5, 101), (2, 6, 100)])
    out = order_events(ev)
    assert out.user_id.tolist() == [1, 1, 1, 1, 2, 2]
    # Inside each (user, second) tie, the order is the one tie_order_key gives, worked out here
    # with the plain-Python reference.
    tie_1 = sorted([10, 20, 30], key=lambda i: _splitmix_reference(1, i))
    tie_2 = sorted([5, 6], key=lambda i: _splitmix_reference(2, i))
    assert out.item_id.tolist() == [*tie_1, 5, *tie_2]
    t100 = T0 + pd.Timedelta(seconds=100)
    expected = [t100, t100 + US, t100 + 2 * US, T0 + pd.Timedelta(seconds=101), t100, t100 + US]
    assert out.event_timestamp.tolist() == expected
    assert out.event_timestamp.dtype == ev.event_timestamp.dtype
    assert out.index.tolist() == list(range(6))
    # The input's row order does not matter.
    again = order_events(ev.iloc[::-1].reset_index(drop=True))
    pd.testing.assert_frame_equal(again, out)


def test_order_events_cascades_when_a_tie_runs_into_the_next_timestamp():
    # t' = max(t, previous + 1 µs): the third event (already 1 µs later) must move to 2 µs.
    ev = _events([(1, 1, 0), (1, 2, 0), (1, 3, 0)])
    ev.loc[2, "event_timestamp"] = T0 + US
    out = order_events(ev)
    assert out.event_timestamp.tolist() == [T0, T0 + US, T0 + 2 * US]


def test_order_events_leaves_input_untouched_and_keeps_other_columns():
    ev = _events([(1, 2, 0), (1, 1, 0)])
    before = ev.copy()
    out = order_events(ev)
    pd.testing.assert_frame_equal(ev, before)
    assert out.rating.tolist() == [4.0, 4.0]


# ---- user activity ----------------------------------------------------------------------


def test_genre_vocabulary_is_sorted_unique_and_skips_empty_names():
    items = pd.DataFrame({"item_id": [1, 2, 3], "genres": pd.array(["Drama|Action", "", None], dtype="string")})
    assert genre_vocabulary(items) == ["Action", "Drama"]
    assert genre_vocabulary(_items()) == ["Action", "Comedy", "Drama"]


def test_user_activity_snapshots_by_hand():
    # User 7: item 1 (Action|Comedy) at day 0, item 2 (Drama) at day 1, item 3 (Action) at day 3.
    ev = _events([(7, 1, 0), (7, 2, 86_400), (7, 3, 3 * 86_400), (8, 2, 0)])
    out = compute_user_activity(order_events(ev), _items(), ["Action", "Comedy", "Drama"], recent_len=2)
    assert list(out.columns) == list(USER_ACTIVITY_COLUMNS)
    u7 = out[out.user_id == 7]
    assert u7.event_count.tolist() == [1, 2, 3]
    assert u7.mean_gap_days.tolist() == [0.0, 1.0, 1.5]
    np.testing.assert_allclose(np.stack(u7.genre_mix), [[1, 1, 0], [0.5, 0.5, 0.5], [2 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    assert [r.tolist() for r in u7.recent_items] == [[1], [1, 2], [2, 3]]  # truncated to 2, oldest first
    epoch = int(T0.timestamp())
    assert u7.last_event_ts.tolist() == [epoch, epoch + 86_400, epoch + 3 * 86_400]
    assert (out.created_timestamp == out.event_timestamp).all()
    u8 = out[out.user_id == 8].iloc[0]
    assert u8.event_count == 1 and u8.recent_items.tolist() == [2]
    np.testing.assert_allclose(u8.genre_mix, [0, 0, 1])
    assert out.event_count.dtype == np.int64 and out.last_event_ts.dtype == np.int64
    assert out.mean_gap_days.dtype == np.float64 and out.user_id.dtype == np.int64
    assert all(v.dtype == np.float32 and len(v) == 3 for v in out.genre_mix)
    assert all(v.dtype == np.int64 for v in out.recent_items)


def test_user_activity_rejects_events_not_in_total_order():
    ev = _events([(1, 1, 0), (1, 2, 0)])  # a tie: order_events was not applied
    with pytest.raises(ValueError, match="order_events"):
        compute_user_activity(ev, _items(), ["Action"], recent_len=3)


def test_each_snapshot_sees_exactly_the_events_up_to_its_own():
    """Point in time: row i must equal a brute-force recomputation from events[:i+1] of its user."""
    rng = np.random.default_rng(0)
    n = 300
    ev = _events(list(zip(rng.integers(1, 6, n), rng.integers(1, 5, n), rng.integers(0, 40, n) * 3600, strict=True)))
    ordered = order_events(ev)  # many ties: 300 events over 40 distinct hours
    genres = ["Action", "Comedy", "Drama"]
    flags = {1: [1, 1, 0], 2: [0, 0, 1], 3: [1, 0, 0], 4: [0, 0, 0]}  # item 4 is not in the table
    out = compute_user_activity(ordered, _items(), genres, recent_len=4)
    for i, row in out.iterrows():
        seen = ordered[(ordered.user_id == row.user_id) & (ordered.event_timestamp <= row.event_timestamp)]
        assert row.event_count == len(seen)
        assert row.recent_items.tolist() == seen.item_id.tolist()[-4:]
        np.testing.assert_allclose(row.genre_mix, np.mean([flags[int(x)] for x in seen.item_id], axis=0), rtol=1e-6)
        span = (seen.event_timestamp.iloc[-1] - seen.event_timestamp.iloc[0]) / DAY
        assert row.mean_gap_days == pytest.approx(span / (len(seen) - 1) if len(seen) > 1 else 0.0)
        assert row.event_timestamp == ordered.event_timestamp.iloc[i]


def test_user_activity_is_vectorised_enough_for_movielens_100k():
    rng = np.random.default_rng(1)
    n = 100_000
    ev = pd.DataFrame(
        {
            "user_id": pd.array(rng.integers(1, 944, n), dtype="Int64"),
            "item_id": pd.array(rng.integers(1, 4, n), dtype="Int64"),
            "rating": 3.0,
            "event_timestamp": T0 + pd.to_timedelta(rng.integers(0, 10**7, n), unit="s"),
        }
    )
    start = time.perf_counter()
    out = compute_user_activity(order_events(ev), _items(), ["Action", "Comedy", "Drama"], recent_len=200)
    assert time.perf_counter() - start < 10
    assert len(out) == n


# ---- item catalogue and layers ------------------------------------------------------------


def test_item_catalog_rows():
    ev = _events([(1, 1, 0), (2, 1, 5), (2, 3, 9)])
    emb = np.eye(3, 4, dtype=np.float64)
    as_of = T0 + DAY
    cat = compute_item_catalog(ev, _items(), emb, as_of)
    assert cat.item_id.tolist() == [1, 2, 3]
    assert cat.popularity.tolist() == [2, 0, 1] and cat.popularity.dtype == np.int64
    assert cat.release_year.tolist() == [1990, 1991, -1] and cat.release_year.dtype == np.int64
    assert (cat.event_timestamp == as_of).all() and (cat.created_timestamp == as_of).all()
    assert str(cat.event_timestamp.dtype) == "datetime64[ns, UTC]"
    assert cat.title.tolist() == ["Alpha (1990)", "Beta (1991)", "Gamma"]
    assert cat.genres.tolist() == ["Action|Comedy", "Drama", "Action"]
    assert all(v.dtype == np.float32 for v in cat.text_embedding)
    assert cat.text_embedding[2].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="shape"):
        compute_item_catalog(ev, _items(), emb[:2], as_of)


def test_empty_user_layers_has_the_view_columns_and_types():
    df = empty_user_layers()
    assert len(df) == 0
    assert df.dtypes.astype(str).to_dict() == {
        "user_id": "int64",
        "event_timestamp": "datetime64[ns, UTC]",
        "created_timestamp": "datetime64[ns, UTC]",
        "layer_coarse": "int64",
        "layer_fine": "int64",
        "layer_name": "string",
    }


# ---- text ---------------------------------------------------------------------------------


def test_item_text_format():
    assert item_text(_items()) == ["Alpha (1990) | Action, Comedy", "Beta (1991) | Drama", "Gamma | Action"]
    bare = pd.DataFrame({"title": pd.array(["Solo", None], dtype="string"), "genres": pd.array(["", None], dtype="string")})
    assert item_text(bare) == ["Solo", ""]


def test_hashing_embedding_is_deterministic_and_unit_norm():
    texts = ["Toy Story (1995) | Animation, Comedy", "GoldenEye (1995) | Action", "", "a"]
    a = embed_texts(texts, encoder="hashing")
    b = embed_texts(list(texts), encoder="hashing")
    assert a.dtype == np.float32 and a.shape == (4, EMBEDDING_DIM)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    # Pinned values: blake2b buckets do not depend on the process (unlike hash()) or the machine.
    v = embed_texts(["Toy Story"], encoder="hashing")[0]
    assert np.flatnonzero(v).tolist() == [13, 141, 286]  # "toy", "story", "toy story"
    np.testing.assert_allclose(v[[13, 141, 286]], np.array([1, -1, 1]) / np.sqrt(3), rtol=1e-6)
    assert embed_texts([], encoder="hashing").shape == (0, EMBEDDING_DIM)


def test_unknown_encoder_is_rejected():
    with pytest.raises(ValueError, match="unknown text encoder"):
        embed_texts(["x"], encoder="word2vec")


def test_minilm_puts_similar_titles_closer_than_unrelated_ones():
    from stratarec.text_encoder import _load_minilm

    calls = []
    texts = [
        "Star Wars (1977) | Action, Adventure, Sci-Fi",
        "Return of the Jedi (1983) | Action, Adventure, Sci-Fi",
        "Sense and Sensibility (1995) | Drama, Romance",
    ]
    v = embed_texts(texts, encoder="minilm", batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert v.shape == (3, EMBEDDING_DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
    assert calls == [(2, 3), (3, 3)]
    # The loader is cached: a second call reuses the model instead of reading it again.
    misses = _load_minilm.cache_info().misses
    embed_texts(texts[:1], encoder="minilm")
    assert _load_minilm.cache_info().misses == misses
