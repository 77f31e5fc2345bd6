"""Real Feast, production profile: Redis 127.0.0.1:6379 online store, SQL registry on PostgreSQL 127.0.0.1:5432.

Each run uses its own Feast project (the suffix of every Redis key it writes) and its own
PostgreSQL schema (where the registry tables live), both named with a fresh uuid, and
removes both afterwards. An unreachable Redis or PostgreSQL fails the test: a skip would
let CI pass without ever checking the production profile.
"""

import json

import pandas as pd
import pytest
from sqlalchemy import text

from stratarec.feature_repo.store import (
    online_item_features,
    online_user_features,
    open_store,
    publish_features,
    publish_user_layers,
    read_watermark,
    training_frame,
)
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.text_encoder import embed_texts, item_text
from tests.integration.production_stores import isolated_production

pytestmark = pytest.mark.integration

T0 = pd.Timestamp("2024-03-01 12:00:00", tz="UTC")


@pytest.fixture()
def production(tmp_path):
    with isolated_production("stratarec_it") as (make, client, engine):
        yield tmp_path, make(recent_items_len=2, materialize_chunks=2), client, engine
    engine.dispose()
    client.close()


def _tables():
    items = pd.DataFrame(
        {
            "item_id": pd.array([1, 2, 3], dtype="Int64"),
            "title": pd.array(["One (1990)", "Two (1991)", "Three"], dtype="string"),
            "genres": pd.array(["Action", "Comedy|Drama", "Drama"], dtype="string"),
            "release_year": pd.array([1990, 1991, None], dtype="Int64"),
        }
    )
    rows = [(10, 1, 0), (10, 2, 60), (10, 3, 120), (20, 3, 30)]
    events = pd.DataFrame(
        {
            "user_id": pd.array([r[0] for r in rows], dtype="Int64"),
            "item_id": pd.array([r[1] for r in rows], dtype="Int64"),
            "rating": 3.0,
            "event_timestamp": [T0 + pd.Timedelta(seconds=r[2]) for r in rows],
        }
    )
    return events, items


def test_production_profile_apply_materialize_and_read(production):
    repo, cfg, client, engine = production
    events, items = _tables()
    ordered = order_events(events)
    activity = compute_user_activity(ordered, items, genre_vocabulary(items), cfg.recent_items_len)
    catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered.event_timestamp.min())

    summary = publish_features(repo, cfg, activity, catalog)
    assert summary["profile"] == "production" and summary["online_users"] == 2
    # Chunked materialization: 4 activity rows at 4 instants in 2 chunks, the catalogue (one instant) in 1.
    assert summary["watermark"] == ordered.event_timestamp.max().isoformat()
    assert (summary["chunks_total"], summary["chunks_skipped"], summary["resumed"]) == (3, 0, False)
    watermark = read_watermark(repo)["views"]["user_activity"]
    assert (watermark["committed"], len(watermark["chunks"]), watermark["watermark"]) == (2, 2, summary["watermark"])
    assert cfg.redis_connection not in json.dumps(read_watermark(repo))  # the store is named by a digest only

    store = open_store(repo, cfg)
    # Feast's registry (in the run's schema) recorded one interval per chunk, as the watermark did.
    intervals = store.registry.get_feature_view("user_activity", cfg.project).materialization_intervals
    assert [(s.isoformat(), e.isoformat()) for s, e in intervals] == [(c["start"], c["end"]) for c in watermark["chunks"]]
    users = online_user_features(store, [10, 20])
    assert users[10]["recent_items"] == [2, 3] and users[10]["event_count"] == 3
    assert users[20]["recent_items"] == [3]
    assert online_item_features(store, [3])[3]["release_year"] == -1

    # Point in time over the same store: a cut-off between events 2 and 3 sees the snapshot after 2.
    cut = pd.DataFrame({"user_id": [10], "event_timestamp": [T0 + pd.Timedelta(seconds=90)]})
    assert training_frame(store, cut).event_count.tolist() == [2]

    layered = publish_user_layers(
        repo,
        cfg,
        pd.DataFrame(
            {
                "user_id": [10],
                "event_timestamp": T0 + pd.Timedelta(days=1),
                "created_timestamp": T0 + pd.Timedelta(days=1),
                "layer_coarse": [1],
                "layer_fine": [4],
                "layer_name": ["drama"],
            }
        ),
    )
    assert online_user_features(store, [10])[10]["layer_name"] == "drama"
    assert layered["watermark"] == (T0 + pd.Timedelta(days=1)).isoformat() and layered["materialization"]["chunks"] == 1

    # Isolation: every key this run wrote ends with its project name (2 users + 3 items)...
    assert len(list(client.scan_iter(match=b"*" + cfg.project.encode(), count=1000))) == 5
    # ...and the registry rows live in the run's schema and nowhere else (other runs may share the server).
    with engine.connect() as conn:
        schemas = conn.execute(text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'projects'")).scalars().all()
        holding = [
            schema
            for schema in schemas
            if conn.execute(text(f'SELECT 1 FROM "{schema}".projects WHERE project_id = :p'), {"p": cfg.project}).first()
        ]
    assert holding == [cfg.registry_schema]
