"""Real Feast, local profile (SQLite online store, file registry, Parquet offline store) in a tmp repo."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast.repo_config import load_repo_config

from stratarec.config import FeatureConfig
from stratarec.feature_repo.store import (
    item_frame,
    online_item_features,
    online_user_features,
    open_store,
    publish_features,
    publish_user_layers,
    training_frame,
)
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.text_encoder import embed_texts, item_text

pytestmark = pytest.mark.integration

T0 = pd.Timestamp("2024-03-01 12:00:00", tz="UTC")
US = pd.Timedelta(microseconds=1)
FEATURE_REPO_SRC = Path(__file__).resolve().parents[2] / "feature_repo"


def _tables():
    items = pd.DataFrame(
        {
            "item_id": pd.array([1, 2, 3, 4, 5], dtype="Int64"),
            "title": pd.array(["One (1990)", "Two (1991)", "Three (1992)", "Four", "Five (1994)"], dtype="string"),
            "genres": pd.array(["Action", "Comedy", "Action|Drama", "Drama", "Comedy"], dtype="string"),
            "release_year": pd.array([1990, 1991, 1992, None, 1994], dtype="Int64"),
        }
    )
    # User 1: item 1, then 2 and 3 in the same second, then 4 an hour later. User 2: item 5.
    rows = [(1, 1, 0), (1, 3, 60), (1, 2, 60), (1, 4, 3660), (2, 5, 30)]
    events = pd.DataFrame(
        {
            "user_id": pd.array([r[0] for r in rows], dtype="Int64"),
            "item_id": pd.array([r[1] for r in rows], dtype="Int64"),
            "rating": 4.0,
            "event_timestamp": [T0 + pd.Timedelta(seconds=r[2]) for r in rows],
        }
    )
    return events, items


def _publish(repo: Path, cfg: FeatureConfig):
    events, items = _tables()
    ordered = order_events(events)
    activity = compute_user_activity(ordered, items, genre_vocabulary(items), cfg.recent_items_len)
    catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered.event_timestamp.min())
    return ordered, catalog, publish_features(repo, cfg, activity, catalog)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    repo = tmp_path_factory.mktemp("feature_repo")
    cfg = FeatureConfig(profile="local", project="stratarec_test", recent_items_len=3, text_encoder="hashing")
    ordered, catalog, summary = _publish(repo, cfg)
    return repo, cfg, ordered, catalog, summary, open_store(repo, cfg)


def test_publish_summary_and_repo_files(published):
    repo, cfg, ordered, _, summary, _ = published
    assert summary["watermark"] == ordered.event_timestamp.max().isoformat()
    assert (summary["activity_rows"], summary["catalog_rows"], summary["layer_rows"]) == (5, 5, 0)
    for name in ("user_activity.parquet", "item_catalog.parquet", "user_interest_layer.parquet"):
        assert (repo / "data" / name).is_file()
    assert not list((repo / "data").glob("*.tmp"))
    # The yaml written beside the store is what the feast CLI reads: same project and stores.
    loaded = load_repo_config(repo, repo / "feature_store.yaml")
    assert loaded.project == cfg.project and loaded.online_store.type == "sqlite"
    assert Path(loaded.online_store.path) == repo / "online.db" and (repo / "repo.py").is_file()


def test_online_read_returns_the_latest_snapshot(published):
    *_, store = published
    got = online_user_features(store, [1, 2, 99])
    assert got[1]["recent_items"] == [3, 2, 4]  # last 3 of 1, 3, 2, 4 (3 before 2: the hashed tie order)
    assert got[1]["event_count"] == 4
    assert got[2]["recent_items"] == [5] and got[2]["event_count"] == 1
    assert got[99]["recent_items"] is None
    assert set(got[1]) >= {"event_count", "last_event_ts", "mean_gap_days", "genre_mix", "recent_items", "layer_name"}


def test_historical_features_are_point_in_time(published):
    *_, ordered, _, _, store = published
    # Items 2 and 3 share a second; tie_order_key puts 3 first for user 1.
    assert ordered[ordered.user_id == 1].item_id.tolist() == [1, 3, 2, 4]
    u1 = ordered[ordered.user_id == 1].event_timestamp.tolist()
    cutoffs = [
        (1, u1[0] - US),  # before anything: no snapshot
        (1, u1[2] - US),  # between the tied events 3 and 2: the snapshot after item 3
        (1, u1[2]),  # exactly at event 2 (the third): its own snapshot
        (1, u1[3] - pd.Timedelta(minutes=1)),  # inside the hour gap
        (2, T0 + pd.Timedelta(days=9)),
        (1, u1[2]),  # a repeated (user, cut-off) pair gets its own row too
    ]
    entity = pd.DataFrame({"user_id": [u for u, _ in cutoffs], "event_timestamp": [t for _, t in cutoffs], "tag": list("abcdef")})
    frame = training_frame(store, entity)
    assert frame.tag.tolist() == list("abcdef")  # caller's rows and order are kept
    assert frame.event_count.isna().tolist() == [True, False, False, False, False, False]
    assert frame.event_count.tolist()[1:] == [2, 3, 3, 1, 3]
    assert [list(s) for s in frame.recent_items.tolist()[1:]] == [[1, 3], [1, 3, 2], [1, 3, 2], [5], [1, 3, 2]]


def test_item_features_offline_and_online(published):
    *_, catalog, _, store = published
    frame = item_frame(store, [3, 1], T0 + pd.Timedelta(days=1))
    assert frame.item_id.tolist() == [3, 1]
    assert frame.title.tolist() == ["Three (1992)", "One (1990)"]
    assert frame.popularity.tolist() == [1, 1]
    online = online_item_features(store, [4, 42])
    assert online[4]["release_year"] == -1 and online[4]["genres"] == "Drama"
    np.testing.assert_allclose(online[4]["text_embedding"], catalog.text_embedding[3], rtol=1e-6)
    assert online[42]["title"] is None


def test_user_layers_are_appended_and_served(tmp_path):
    cfg = FeatureConfig(profile="local", project="stratarec_layers", recent_items_len=3)
    _publish(tmp_path, cfg)
    release_1 = T0 + pd.Timedelta(days=1)
    release_2 = T0 + pd.Timedelta(days=2)

    def rows(when, coarse, name):
        return pd.DataFrame(
            {
                "user_id": pd.array([1, 2], dtype="Int64"),
                "layer_coarse": [coarse, 0],
                "layer_fine": [coarse * 3, 1],
                "layer_name": [name, "comedy"],
                "event_timestamp": when,
                "created_timestamp": when,
            }
        )

    first = publish_user_layers(tmp_path, cfg, rows(release_1, 1, "action"))
    store = open_store(tmp_path, cfg)
    assert online_user_features(store, [1])[1]["layer_name"] == "action"
    second = publish_user_layers(tmp_path, cfg, rows(release_2, 2, "drama"))
    assert (first["total_rows"], second["total_rows"], second["rows"]) == (2, 4, 2)
    online = online_user_features(store, [1, 2])
    assert (online[1]["layer_coarse"], online[1]["layer_fine"], online[1]["layer_name"]) == (2, 6, "drama")
    assert online[1]["recent_items"] == [3, 2, 4]  # publishing layers leaves activity alone
    # History is kept: a cut-off between the releases sees the first layering.
    between = pd.DataFrame({"user_id": [1, 1], "event_timestamp": [release_1 + pd.Timedelta(hours=1), release_2]})
    assert training_frame(store, between).layer_name.tolist() == ["action", "drama"]
    # Cut-offs before any layering (the next run's training set): activity features are
    # still there and the layer is missing, rather than Feast dropping the rows.
    before = pd.DataFrame({"user_id": [1, 2], "event_timestamp": [T0 + pd.Timedelta(hours=2), T0 + pd.Timedelta(hours=2)]})
    frame = training_frame(store, before)
    assert frame.event_count.tolist() == [4, 1] and [list(s) for s in frame.recent_items] == [[3, 2, 4], [5]]
    assert frame.layer_name.isna().all()


@pytest.mark.parametrize("name", ["feature_store.yaml", "feature_store.production.yaml"])
def test_checked_in_profiles_parse(name):
    loaded = load_repo_config(FEATURE_REPO_SRC, FEATURE_REPO_SRC / name)
    assert loaded.project == "stratarec" and loaded.offline_store.type == "file"
    assert loaded.entity_key_serialization_version == 3
    assert loaded.materialization_config.pull_latest_features
