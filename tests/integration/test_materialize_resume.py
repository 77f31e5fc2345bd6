"""Materialization killed halfway resumes from its watermark: production profile, real ML-100K.

A subprocess publishes ML-100K's features (99,693 activity rows, 943 users, 1,664 items)
into Redis + a PostgreSQL registry in 8 chunks. Once the watermark shows 3 chunks
committed and the 4th chunk has written half its rows to Redis, the test SIGKILLs it. The
rerun, in this process with features recomputed from the raw data (as a KFP retry would),
must skip the 3 committed chunks, redo the half-written one, and end with exactly the online
values of an uninterrupted single-window run into a second project (done while the child
starts up). A second test covers what must *not* resume: changed source, resume disabled,
a wiped online store, and that a finished run has nothing left to do.

Each run uses its own Feast project (the suffix of every Redis key it writes) and its own
PostgreSQL schema (where the registry tables live), named with a fresh uuid, and removes
both afterwards, as in test_feast_production.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stratarec.config import FeatureConfig
from stratarec.data.movielens import load_movielens_100k
from stratarec.feature_repo.store import ChunkEvent, open_store, plan_chunks, publish_features, read_watermark
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.schema import FEATURE_SERVICE, ITEM_ID, USER_ACTIVITY_VIEW, USER_ID
from stratarec.text_encoder import embed_texts, item_text
from tests.integration.production_stores import isolated_production, redis_client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHUNKS = 8
KILL_IN_CHUNK = 3  # chunks 0..2 commit; chunk 3 is half written to Redis when the kill lands
RECENT_ITEMS = 20  # shorter than production's 200: the same rows, a quarter of the bytes to hash and write
CHILD_TIMEOUT_S = 120

# The crashed run. It is a real publish_features; the only test hook pauses the Redis writes
# of chunk KILL_IN_CHUNK after half its rows, so the SIGKILL is certain to land mid-chunk
# with uncommitted rows already in Redis (the worst case for a resume).
CHILD = r"""
import json, sys, time
from pathlib import Path

from feast.infra.online_stores.redis import RedisOnlineStore

from stratarec.config import FeatureConfig
from stratarec.feature_repo.store import publish_features
from tests.integration.test_materialize_resume import KILL_IN_CHUNK, ml100k_features

repo, cfg_json, data_dir, marker = sys.argv[1:5]
cfg = FeatureConfig.model_validate_json(cfg_json)
activity, catalog = ml100k_features(Path(data_dir), cfg.recent_items_len)
armed = {"on": False}
original = RedisOnlineStore.online_write_batch

def paused_write(self, config, table, data, progress):
    if not (armed["on"] and table.name == "user_activity"):
        return original(self, config, table, data, progress)
    half = data[: len(data) // 2]
    original(self, config, table, half, progress)
    written = {str(key.entity_values[0].int64_val): int(ts.timestamp()) for key, _, ts, _ in half}
    Path(marker).write_text(json.dumps(written))
    time.sleep(600)  # the test kills us here

RedisOnlineStore.online_write_batch = paused_write

def on_chunk(event):
    if event.view == "user_activity" and event.phase == "start" and event.index == KILL_IN_CHUNK:
        armed["on"] = True

publish_features(Path(repo), cfg, activity, catalog, on_chunk=on_chunk)
print("CHILD FINISHED WITHOUT BEING KILLED")
"""


def ml100k_features(data_dir: Path, recent_len: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """User activity and item catalogue of ML-100K, as the features stage computes them (hashing text encoder)."""
    events, items = load_movielens_100k(data_dir)
    ordered = order_events(events)
    activity = compute_user_activity(ordered, items, genre_vocabulary(items), recent_len)
    catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered.event_timestamp.min())
    return activity, catalog


@pytest.fixture()
def isolated():
    """Makes production configs, each with its own project and schema; removes their keys and schemas afterwards."""
    with isolated_production("stratarec_mr") as (make, client, _):
        yield (lambda **overrides: make(recent_items_len=RECENT_ITEMS, **overrides)), client


def _online(store, service_name: str, key: str, ids: list[int]) -> dict:
    """Every feature of the service for ``ids``, with each view's event timestamp."""
    service = store.get_feature_service(service_name)
    return store.get_online_features(features=service, entity_rows=[{key: i} for i in ids]).to_dict(include_event_timestamps=True)


def _start_child(repo: Path, cfg: FeatureConfig, data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start the run that will be killed; returns (process, half-written marker, log)."""
    marker, log_path = tmp_path / "half_written.json", tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(repo), cfg.model_dump_json(), str(data_dir), str(marker)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return child, marker, log_path


def _kill_mid_chunk(child: subprocess.Popen, repo: Path, marker: Path, log_path: Path) -> tuple[int, dict[int, int]]:
    """Poll the watermark, SIGKILL the child mid-chunk; returns (chunks committed, rows it half-wrote)."""
    try:
        committed = 0
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        # Poll the watermark as an operator would; kill once the first chunks are committed
        # and the next one is half written.
        while not (committed >= KILL_IN_CHUNK and marker.exists()):
            if child.poll() is not None:
                pytest.fail(f"the child exited ({child.returncode}) before it could be killed:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no kill point within {CHILD_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            entry = read_watermark(repo)["views"].get(USER_ACTIVITY_VIEW) or {}
            committed = int(entry.get("committed", 0))
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert "CHILD FINISHED" not in log_path.read_text()
    half_written = {int(k): v for k, v in json.loads(marker.read_text()).items()}
    return int(read_watermark(repo)["views"][USER_ACTIVITY_VIEW]["committed"]), half_written


def test_killed_materialization_resumes_from_watermark(isolated, shared_data_dir, tmp_path):
    make, client = isolated
    started = time.monotonic()
    crashed_cfg = make(materialize_chunks=CHUNKS)
    straight_cfg = make(materialize_chunks=1)
    crashed_repo, straight_repo = tmp_path / "crashed", tmp_path / "straight"
    child, marker, log_path = _start_child(crashed_repo, crashed_cfg, shared_data_dir, tmp_path)
    try:
        # While the child starts up: the features, recomputed from the raw data here (as a KFP
        # retry would), and the reference, one uninterrupted single-window run into another project.
        activity, catalog = ml100k_features(shared_data_dir, RECENT_ITEMS)
        straight = publish_features(straight_repo, straight_cfg, activity, catalog)
        assert straight["materialization"][USER_ACTIVITY_VIEW]["chunks"] == 1 and not straight["resumed"]
    finally:
        # 1. Crash: SIGKILL with chunks 0..2 committed and chunk 3 half in Redis.
        committed_at_kill, half_written = _kill_mid_chunk(child, crashed_repo, marker, log_path)
    assert committed_at_kill == KILL_IN_CHUNK
    store = open_store(crashed_repo, crashed_cfg)
    got = store.get_online_features(
        features=[f"{USER_ACTIVITY_VIEW}:event_count"], entity_rows=[{USER_ID: u} for u in half_written]
    ).to_dict(include_event_timestamps=True)
    # The uncommitted chunk really reached Redis before the kill: the resume must cope with it.
    assert got["event_count__ts"] == list(half_written.values()) and None not in got["event_count"]
    registry_view = store.registry.get_feature_view(USER_ACTIVITY_VIEW, crashed_cfg.project)
    assert len(registry_view.materialization_intervals) == KILL_IN_CHUNK  # Feast saw the same 3 commits

    # 2. Rerun with the same inputs: same source bytes, so the watermark holds.
    plan = plan_chunks(activity.event_timestamp, CHUNKS)
    events: list[ChunkEvent] = []
    resumed = publish_features(crashed_repo, crashed_cfg, activity, catalog, on_chunk=events.append)
    report = resumed["materialization"][USER_ACTIVITY_VIEW]
    assert (report["chunks"], report["skipped"], report["materialized"]) == (CHUNKS, KILL_IN_CHUNK, CHUNKS - KILL_IN_CHUNK)
    assert report["resumed_from"] == plan[KILL_IN_CHUNK].start.isoformat()
    assert [e.index for e in events if e.view == USER_ACTIVITY_VIEW and e.phase == "start"] == list(range(KILL_IN_CHUNK, CHUNKS))
    assert resumed["resumed"] and resumed["chunks_skipped"] == KILL_IN_CHUNK
    assert resumed["watermark"] == activity.event_timestamp.max().isoformat()
    # Feast's registry holds each chunk's interval exactly once: nothing committed was redone.
    intervals = store.registry.get_feature_view(USER_ACTIVITY_VIEW, crashed_cfg.project).materialization_intervals
    assert [(s, e) for s, e in intervals] == [(c.start.to_pydatetime(), c.end.to_pydatetime()) for c in plan]
    entry = read_watermark(crashed_repo)["views"][USER_ACTIVITY_VIEW]
    assert entry["committed"] == CHUNKS and entry["watermark"] == plan[-1].end.isoformat()

    # 3. Same online values as the uninterrupted run, for every user and item, timestamps included.
    users = sorted(int(u) for u in activity[USER_ID].unique())
    items = sorted(int(i) for i in catalog[ITEM_ID].unique())
    straight_store = open_store(straight_repo, straight_cfg)
    crashed_users = _online(store, FEATURE_SERVICE, USER_ID, users)
    assert crashed_users == _online(straight_store, FEATURE_SERVICE, USER_ID, users)
    assert _online(store, "item_catalog_v1", ITEM_ID, items) == _online(straight_store, "item_catalog_v1", ITEM_ID, items)
    # ...and both are the truth: every user's latest snapshot (event count = all their events).
    assert crashed_users["event_count"] == activity.groupby(USER_ID).size().reindex(users).tolist()
    latest = activity.groupby(USER_ID).event_timestamp.max().reindex(users)
    assert crashed_users["event_count__ts"] == [int(t.timestamp()) for t in latest]
    assert len(list(client.scan_iter(match=b"*" + crashed_cfg.project.encode(), count=1000))) == len(users) + len(items)
    assert time.monotonic() - started < 90


def test_changed_source_or_disabled_resume_start_over(isolated, tmp_path):
    make, _ = isolated
    cfg = make(materialize_chunks=3)
    t0 = pd.Timestamp("2024-03-01", tz="UTC")
    items = pd.DataFrame(
        {
            "item_id": pd.array([1, 2, 3], dtype="Int64"),
            "title": pd.array(["One", "Two", "Three"], dtype="string"),
            "genres": pd.array(["Action", "Comedy", "Drama"], dtype="string"),
            "release_year": pd.array([1990, 1991, 1992], dtype="Int64"),
        }
    )

    def publish(n_events: int, config: FeatureConfig) -> dict:
        rows = [(u, 1 + i % 3, u * 1000 + i * 60) for u in (10, 20, 30) for i in range(n_events)]
        events = pd.DataFrame(
            {
                "user_id": pd.array([r[0] for r in rows], dtype="Int64"),
                "item_id": pd.array([r[1] for r in rows], dtype="Int64"),
                "rating": 4.0,
                "event_timestamp": [t0 + pd.Timedelta(seconds=r[2]) for r in rows],
            }
        )
        ordered = order_events(events)
        activity = compute_user_activity(ordered, items, genre_vocabulary(items), config.recent_items_len)
        catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered.event_timestamp.min())
        return publish_features(tmp_path, config, activity, catalog)

    first = publish(4, cfg)
    assert (first["chunks_skipped"], first["materialization"][USER_ACTIVITY_VIEW]["chunks"]) == (0, 3)
    assert publish(4, cfg)["chunks_materialized"] == 0  # same bytes: nothing to redo
    changed = publish(5, cfg)  # new rows: the old watermark describes other data
    assert changed["chunks_skipped"] == 0 and changed["watermark"] > first["watermark"]
    assert publish(5, cfg.model_copy(update={"materialize_resume": False}))["chunks_skipped"] == 0
    # A wiped online store is noticed: the watermark is not trusted, everything is redone.
    client = redis_client(cfg)
    client.delete(*client.scan_iter(match=b"*" + cfg.project.encode(), count=1000))
    wiped = publish(5, cfg)
    assert wiped["chunks_skipped"] == 0 and wiped["chunks_materialized"] == wiped["chunks_total"]
    store = open_store(tmp_path, cfg)
    got = store.get_online_features(features=[f"{USER_ACTIVITY_VIEW}:event_count"], entity_rows=[{USER_ID: 30}]).to_dict()
    assert got["event_count"] == [5]


def test_plan_chunks_covers_every_row_once_and_keeps_ties_together():
    stamps = pd.to_datetime(
        ["2024-01-01", "2024-01-01", "2024-01-01", "2024-01-02", "2024-01-05", "2024-01-05T00:00:00.000000001", "2024-01-09"],
        utc=True,
        format="ISO8601",
    )
    values = pd.Series(stamps)
    for n in (1, 2, 3, 4, 7, 50):
        plan = plan_chunks(values, n)
        assert 1 <= len(plan) <= n and sum(c.rows for c in plan) == len(values)
        for a, b in zip(plan, plan[1:], strict=False):
            assert a.end < b.start  # disjoint, ordered
        for c in plan:  # each row in exactly one chunk, counted right (nanoseconds included)
            assert c.rows == int(((values >= c.start) & (values <= c.end)).sum())
    # Seven chunks of one row were asked for; the three rows tied at 2024-01-01 cannot be split.
    assert [c.rows for c in plan_chunks(values, 7)] == [3, 1, 1, 1, 1]
    assert [c.rows for c in plan_chunks(values, 2)] == [4, 3]  # the first chunk ends where half the rows are reached
    by_day = plan_chunks(values, chunk_hours=24)
    assert [(c.start.day, c.end.day, c.rows) for c in by_day] == [(1, 1, 3), (2, 2, 1), (5, 5, 2), (9, 9, 1)]
    assert plan_chunks(pd.Series([], dtype="datetime64[ns, UTC]"), 4) == []
    assert np.all(np.diff([c.start.value for c in plan_chunks(values, 7)]) > 0)
