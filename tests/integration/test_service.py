"""The BentoML service end to end, in-process: a real tiny bundle, real Feast (SQLite), a real model store.

The bundle is trained for a few epochs on synthetic sequences, its features are published
to a temporary Feast repository, and it is saved to a temporary BentoML model store
(fixtures in ``conftest.py``, shared with the fault and fuzz tests). The service then answers
over HTTP through ``RecommenderService.to_asgi()`` and Starlette's test client, exactly as
``bentoml serve`` would route requests, without opening a port.

The request log's writer (:class:`RequestLog`) is also tested on its own here: rotation, and
that a stalled disk (a FIFO nobody reads) never blocks a response.

The serving fast path (precomputed item tables, a lean forward pass) is checked against a plain
reference computation over the same bundle (``Reference`` from
``tests/unit/test_bundle_speed_equivalence.py``), through HTTP, for all three recommend routes:
``/recommend``, ``/recommend/batch`` and the adaptive-batching ``/recommend/adaptive``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from stratarec.schema import ITEM_ID, LAYER_COARSE, LAYER_NAME, TITLE, USER_ID, USER_RECENT_ITEMS

pytestmark = pytest.mark.integration

UNKNOWN_USER = 987_654_321
K = 5


@pytest.fixture(scope="module")
def client(serve, released):
    """The released model served in-process, through the one ASGI app of this test run (conftest.py)."""
    with serve({"STRATAREC_MODEL_TAG": released["tag"]}) as c:
        yield c


def post(client, route, body):
    return client.post(route, content=body if isinstance(body, str) else json.dumps(body), headers={"content-type": "application/json"})


def test_known_user_gets_k_unseen_items_with_titles_and_layers(client, released):
    user, history = released["known_user"], released["known_history"]
    exclude = [i for i in released["item_ids"] if i not in history][:3]
    r = post(client, "/recommend", {"user_id": user, "k": K, "exclude": exclude})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == user and body["model_tag"] == released["tag"]
    assert body["cold_start"] is False and body["degraded"] is False and body["degraded_reason"] is None
    assert body["stale_features"] is False  # the default bound (100 years) keeps 2024 demo data fresh
    assert abs(pd.Timestamp(body["feature_watermark"]) - released["watermark"]) < pd.Timedelta(seconds=1)
    assert isinstance(body["layer"], int) and body[LAYER_NAME]
    ids = [it[ITEM_ID] for it in body["items"]]
    assert len(ids) == K == len(set(ids))
    assert not set(ids) & set(history) and not set(ids) & set(exclude)
    assert all(it[TITLE] and isinstance(it["layer"], int) and it["reason"] for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_diversify_spreads_over_layers(client, released):
    r = post(client, "/recommend", {"user_id": released["known_user"], "k": 6, "diversify": True})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 6 and len({it["layer"] for it in items}) >= 2


def test_discovery_places_end_the_list_with_rare_items(client, released, reference):
    ref = reference[0]
    user, history = released["known_user"], released["known_history"]
    head = post(client, "/recommend", {"user_id": user, "k": 3}).json()["items"]
    request = {"user_id": user, "k": 5, "discovery": 2}
    r = post(client, "/recommend", request)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [it[ITEM_ID] for it in items[:3]] == [it[ITEM_ID] for it in head]
    events = dict(zip(ref.item_ids.tolist(), ref.popularity.tolist(), strict=True))
    tail = items[3:]
    assert len(tail) == 2 and all(it["reason"].startswith("discovery: ") and events[it[ITEM_ID]] <= 5 for it in tail)
    assert len({it[ITEM_ID] for it in items}) == 5 and not {it[ITEM_ID] for it in items} & set(history)
    batch = post(client, "/recommend/batch", {"requests": [request, {"user_id": user, "k": 3}]}).json()["responses"]
    assert [[it[ITEM_ID] for it in b["items"]] for b in batch] == [[it[ITEM_ID] for it in items], [it[ITEM_ID] for it in head]]


def test_unknown_user_gets_cold_start_not_an_error(client):
    r = post(client, "/recommend", {"user_id": UNKNOWN_USER, "k": K})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and body["degraded"] is False and body["layer"] is None
    assert len(body["items"]) == K and all("cold start" in it["reason"] for it in body["items"])


def test_user_without_activity_is_cold_started_from_their_layer(client, released):
    r = post(client, "/recommend", {"user_id": released["held_out"], "k": K})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and body["layer"] == released["held_out_layer"]
    assert all("interest layer" in it["reason"] for it in body["items"])
    # A layer lists at most 50 popular items (< 78 asked): the rest is topped up from global popularity.
    many = len(released["item_ids"]) - 2
    items = post(client, "/recommend", {"user_id": released["held_out"], "k": many, "exclude": released["item_ids"][:2]}).json()["items"]
    ids = [it[ITEM_ID] for it in items]
    assert len(ids) == many == len(set(ids)) and not set(ids) & set(released["item_ids"][:2])


def test_batch_answers_in_request_order_and_matches_single_requests(client, released):
    reqs = [
        {"user_id": released["known_user"], "k": 3, "exclude": released["item_ids"][:2]},
        {"user_id": UNKNOWN_USER, "k": 2},
        {"user_id": released["known_user"], "k": 4, "diversify": True},
    ]
    r = post(client, "/recommend/batch", {"requests": reqs})
    assert r.status_code == 200, r.text
    out = r.json()["responses"]
    assert [o["user_id"] for o in out] == [q["user_id"] for q in reqs]
    assert [len(o["items"]) for o in out] == [3, 2, 4]
    assert [o["cold_start"] for o in out] == [False, True, False]
    single = post(client, "/recommend", reqs[0]).json()
    assert [it[ITEM_ID] for it in out[0]["items"]] == [it[ITEM_ID] for it in single["items"]]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/recommend", {"user_id": 1, "k": 0}, "k"),
        ("/recommend", {"user_id": 1, "k": 1001}, "k"),
        ("/recommend", {"user_id": "abc"}, "user_id"),
        ("/recommend", {"user_id": "1"}, "user_id"),  # strict: a numeric string is not an id
        ("/recommend", {"user_id": 1.5}, "user_id"),
        ("/recommend", {"user_id": -1}, "user_id"),
        ("/recommend", {"k": 3}, "user_id"),
        ("/recommend", {"user_id": 1, "colour": "red"}, "colour"),
        ("/recommend", {"user_id": 1, "exclude": list(range(1001))}, "exclude"),
        ("/recommend", {"user_id": 2**63}, "user_id"),
        ("/recommend/batch", {"requests": [{"user_id": 1}, {"user_id": 2, "k": 0}]}, "k"),
        ("/recommend/batch", {"requests": []}, "requests"),
        ("/similar-items", {"item_id": 1, "k": 0}, "k"),
    ],
)
def test_malformed_requests_are_4xx_naming_the_field(client, route, body, field):
    r = post(client, route, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    locs = [err["loc"] for err in r.json()["detail"]]
    assert any(field in loc for loc in locs), r.text


def test_invalid_json_is_400(client):
    r = post(client, "/recommend", "{not json")
    assert r.status_code == 400 and "Invalid JSON" in r.text


def test_similar_items(client, released):
    item = released["item_ids"][0]
    r = post(client, "/similar-items", {"item_id": item, "k": K})
    assert r.status_code == 200, r.text
    ids = [it[ITEM_ID] for it in r.json()["items"]]
    assert len(ids) == K and item not in ids


def test_similar_items_for_an_unknown_item_is_404_naming_it(client):
    r = post(client, "/similar-items", {"item_id": 10**9, "k": 3})
    assert r.status_code == 404, r.text
    assert "item_id" in r.json()["error"] and str(10**9) in r.json()["error"]


def test_probes_and_status(client, released):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = post(client, "/status", {})
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["ready"] and status["not_ready_reasons"] == [] and status["model_loaded"] and status["model_error"] == ""
    assert status["model_tag"] == released["tag"]
    store = status["feature_store"]
    assert store["reachable"] and store["source"].startswith("feast:") and store["latency_ms"] > 0
    assert status["n_items"] == len(released["item_ids"]) and status["n_layers"] == 3
    # Freshness comes from the Feast registry's materialization intervals (the file registry here).
    assert abs(pd.Timestamp(store["watermark"]) - released["watermark"]) < pd.Timedelta(seconds=1)
    assert store["watermark"].endswith("Z") and store["stale"] is False and store["freshness_error"] == ""
    assert store["freshness_bound_hours"] == released["cfg"].features.freshness_hours == 876_000
    assert store["age_hours"] > 24 * 365  # synthetic 2024 data: old, yet within the demo bound
    assert status["request_log"]["enabled"] and status["request_log"]["dropped"] == 0
    cache = status["state_cache"]  # the user-state cache counts what the earlier tests asked
    assert cache["capacity"] == released["cfg"].serving.state_cache_size and cache["hits"] + cache["misses"] > 0
    assert 0 < cache["entries"] <= cache["capacity"]
    # Start-up froze the long-lived heap, so a full collection no longer stalls every request.
    assert gc.get_freeze_count() > 100_000


def test_openapi_is_typed(client):
    spec = client.get("/docs.json").json()
    for route in ("/recommend", "/recommend/batch", "/similar-items", "/status"):
        ok = spec["paths"][route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok.get("properties"), route
    assert {"healthz", "readyz"} <= {path.strip("/") for path in spec["paths"]}
    response = spec["components"]["schemas"]["RecommendResponse"]["properties"]
    assert {"degraded", "degraded_reason", "stale_features", "feature_watermark"} <= set(response)
    item = spec["components"]["schemas"]["RecommendedItem"]["properties"]
    assert {ITEM_ID, TITLE, "score", "layer", "reason"} <= set(item)
    # The service marks bodies with required fields as required (BentoML leaves them optional).
    assert spec["paths"]["/recommend"]["post"]["requestBody"]["required"] is True
    assert "required" not in spec["paths"]["/status"]["post"]["requestBody"]
    req = spec["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert req["required"] == [USER_ID] and req["additionalProperties"] is False
    assert req["properties"]["k"]["maximum"] == 1000


def test_request_log_feeds_monitoring(client, released):
    """Each answer becomes one row (features used, items, latency, flags) that monitoring's own reader reads back.

    (Most of this test's time is importing ``stratarec.monitoring.pipeline_io``, which imports Evidently.)
    """
    from stratarec.monitoring.frames import build_prediction_frame
    from stratarec.monitoring.pipeline_io import read_request_log

    user = released["known_user"]
    post(client, "/recommend", {"user_id": UNKNOWN_USER, "k": 2})
    body = post(client, "/recommend", {"user_id": user, "k": 2, "exclude": released["item_ids"][:3]}).json()
    directory = Path(released["cfg"].workspace) / "request_log"
    status = _wait_for_log(client, lambda s: s["queued"] == 0)
    assert status["written"] >= 1 and status["dropped"] == status["failed"] == 0
    assert all(f.name.startswith("requests-") for f in directory.iterdir())
    frame = read_request_log(directory)
    row = frame[frame["user_id"] == user].iloc[-1]
    assert list(row["recommended_items"]) == [it[ITEM_ID] for it in body["items"]]
    assert not row["degraded"] and not row["stale_features"] and row["degraded_reason"] is None and row["latency_ms"] > 0
    assert row["k"] == 2 and row["n_exclude"] == 3 and row["endpoint"] == "/recommend" and row["model_tag"] == released["tag"]
    features = row["features"]  # the features the answer used: scalars as read, sequences by length
    assert features["recent_items_len"] == len(released["known_history"]) and features["event_count"] >= 1
    assert "layer_coarse" in features and "genre_mix_len" in features
    predictions = build_prediction_frame(frame)
    assert len(predictions) == len(frame) and {"-1"} <= set(predictions["served_layer"])  # cold users are layer -1
    assert predictions["n_recommended"].min() >= 1


def _wait_for_log(client, done, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = post(client, "/status", {}).json()["request_log"]
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_request_log_rotates_by_size_and_keeps_the_newest_files(tmp_path):
    from stratarec.monitoring.pipeline_io import read_request_log
    from stratarec.serving.service import RequestLog

    users = list(range(100, 130))  # three digits each: every row has the same size
    row = {"served_at": "2026-01-01T00:00:00+00:00", "recommended_items": list(range(40)), "served_layer": 0}
    line_bytes = len(json.dumps({**row, "user_id": users[0]}, separators=(",", ":"))) + 1
    log = RequestLog(tmp_path, max_bytes=4 * line_bytes, max_files=0)
    for user in users:
        assert log.write([{**row, "user_id": user}]) == 1
    log.close()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 8 and all(f.stat().st_size <= 4 * line_bytes for f in files)  # 30 rows, 4 per file
    assert log.stats().files_rotated == 7 and log.stats().written == 30
    # Monitoring's reader sees every row, in order, across the rotated files.
    assert read_request_log(tmp_path)["user_id"].tolist() == users

    kept = tmp_path / "kept"
    log = RequestLog(kept, max_bytes=4 * line_bytes, max_files=3)
    for user in users:
        log.write([{**row, "user_id": user}])
    log.close()
    assert len(list(kept.glob("*.jsonl"))) == 3
    assert read_request_log(kept)["user_id"].tolist() == users[-10:]  # the newest 3 files: 4 + 4 + 2 rows


def test_request_log_full_queue_drops_and_counts_but_never_blocks(tmp_path):
    """A stalled disk: the log's file is a FIFO nobody reads, so the writer blocks opening it.

    ``write`` must still return at once: rows beyond the queue are dropped and counted.
    """
    from stratarec.serving.service import RequestLog

    log = RequestLog(tmp_path, queue_size=50)
    os.mkfifo(log.path)  # the writer opens the file it named at construction
    row = {"served_at": "2026-01-01T00:00:00+00:00", "user_id": 1, "recommended_items": [1, 2], "served_layer": 0}
    t0 = time.perf_counter()
    accepted = sum(log.write([{**row, "user_id": i}]) for i in range(5000))
    elapsed = time.perf_counter() - t0
    stats = log.stats()
    assert elapsed < 2.0, f"5000 writes took {elapsed:.2f} s: the response path waited on the disk"
    assert 50 <= accepted <= 50 + 1000  # the queue, plus at most one batch the writer took before it stalled
    assert stats.dropped == 5000 - accepted and stats.written == 0

    # Unstall the disk: a reader drains the FIFO, and every accepted row (none dropped) arrives.
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(Path(log.path).read_bytes()))
    reader.start()
    log.close(timeout_s=10)
    reader.join(10)
    lines = received[0].decode().splitlines()
    assert len(lines) == accepted and log.stats().written == accepted
    ids = [json.loads(line)["user_id"] for line in lines]
    assert ids[:50] == list(range(50)) and ids == sorted(set(ids))  # accepted rows keep their order, none twice


def test_in_process_latency(client, released):
    """Not a benchmark: a guard that one request stays far below a second, and the number for the record."""
    body = {"user_id": released["known_user"], "k": 10}
    post(client, "/recommend", body)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        assert post(client, "/recommend", body).status_code == 200
        times.append((time.perf_counter() - t0) * 1000)
    p50 = statistics.median(times)
    print(f"\nin-process /recommend latency over 30 requests: p50 {p50:.1f} ms, max {max(times):.1f} ms")
    assert p50 < 500


def server_timing(response) -> dict[str, float]:
    """``Server-Timing: feast;dur=1.2, score;dur=3.4`` -> ``{"feast": 1.2, "score": 3.4}``."""
    out = {}
    for part in response.headers["server-timing"].split(","):
        name, _, duration = part.strip().partition(";dur=")
        out[name] = float(duration)
    return out


def test_server_timing_header_splits_feast_and_scoring(client, released):
    user = released["known_user"]
    for route, body in (
        ("/recommend", {"user_id": user, "k": K}),
        ("/recommend", {"user_id": UNKNOWN_USER, "k": K}),
        ("/recommend/batch", {"requests": [{"user_id": user, "k": K}, {"user_id": UNKNOWN_USER}]}),
    ):
        t0 = time.perf_counter()
        r = post(client, route, body)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        assert r.status_code == 200, r.text
        assert re.fullmatch(r"feast;dur=\d+\.\d{3}, score;dur=\d+\.\d{3}", r.headers["server-timing"]), r.headers["server-timing"]
        timing = server_timing(r)
        assert set(timing) == {"feast", "score"} and timing["feast"] > 0 and timing["score"] >= 0
        assert timing["feast"] + timing["score"] < elapsed_ms
    # Errors carry no timing: nothing was read or scored.
    assert "server-timing" not in post(client, "/recommend", {"user_id": 1, "k": 0}).headers


@pytest.fixture(scope="module")
def reference(released):
    """The plain computation over the released bundle, and what the service reads per user."""
    from stratarec.bundle import RecommenderBundle
    from tests.unit.test_bundle_speed_equivalence import Reference

    bundle = RecommenderBundle(released["bundle"])
    latest = released["activity"].groupby(USER_ID).tail(1).set_index(USER_ID)
    histories = {int(u): [int(i) for i in items] for u, items in latest[USER_RECENT_ITEMS].items()}
    feast_layers = {int(row[USER_ID]): row[LAYER_COARSE] for _, row in released["layer_rows"].iterrows()}
    return Reference(released["bundle"], bundle.model), histories, feast_layers


def expected_answer(reference, request: dict) -> list[tuple]:
    """The service's answer to one request, computed the plain way (the service's rules, the reference's numbers)."""
    ref, histories, feast_layers = reference
    user, k, exclude = request["user_id"], request.get("k", 10), request.get("exclude", [])
    layer = ref.user_layer.get(user)
    if layer is None and feast_layers.get(user) is not None and int(feast_layers[user]) in ref.names:
        layer = int(feast_layers[user])
    history = histories.get(user, [])
    if not len(ref.rows(history)):  # cold: the layer's popular items, topped up from everyone's
        recs = ref.cold_start(k, layer, exclude)
        if len(recs) < k and layer is not None:
            recs += ref.cold_start(k - len(recs), None, sorted(set(exclude) | {r[0] for r in recs}))
        return recs
    if request.get("diversify"):
        return ref.recommend(history, k, exclude, diversify=True)
    drop = set(exclude)
    return [r for r in ref.recommend(history, k + len(drop)) if r[0] not in drop][:k]


def assert_same_items(items: list[dict], want: list[tuple]) -> None:
    assert [it[ITEM_ID] for it in items] == [w[0] for w in want]  # ids and order
    assert [(it[TITLE], it["layer"], it[LAYER_NAME], it["reason"]) for it in items] == [(w[1], w[3], w[4], w[5]) for w in want]
    assert [it["score"] for it in items] == pytest.approx([w[2] for w in want], abs=1e-5)


def equivalence_requests(released, reference) -> list[dict]:
    _, histories, _ = reference
    users = sorted(histories)[:6]
    ids = released["item_ids"]
    history = released["known_history"]
    unseen = [i for i in ids if i not in history]
    return [
        {"user_id": users[0], "k": 10},
        {"user_id": users[1], "k": 3, "exclude": unseen[:4]},
        {"user_id": users[2], "k": 7, "diversify": True},
        {"user_id": users[3], "k": 5, "exclude": [unseen[5], 10**12, unseen[5]], "diversify": True},
        {"user_id": released["known_user"], "k": 10, "exclude": history[-2:] + unseen[:2]},
        {"user_id": users[4], "k": len(ids)},  # every unseen item
        {"user_id": UNKNOWN_USER, "k": 6},  # cold start from global popularity
        {"user_id": UNKNOWN_USER, "k": 4, "exclude": ids[:3]},
        {"user_id": released["held_out"], "k": 5},  # cold start from the user's layer
        {"user_id": released["held_out"], "k": len(ids) - 2, "exclude": ids[:2]},  # layer topped up from everyone's
        {"user_id": users[5], "k": 1},
    ]


def test_answers_equal_a_plain_reference_computation(client, released, reference):
    """Ids, order, titles, layers and reasons identical; scores to 1e-5; on every recommend route."""
    requests = equivalence_requests(released, reference)
    wants = [expected_answer(reference, q) for q in requests]
    cold = [not reference[0].rows(reference[1].get(q["user_id"], [])).size for q in requests]
    assert any(cold) and not all(cold)
    for request, want in zip(requests, wants, strict=True):
        r = post(client, "/recommend", request)
        assert r.status_code == 200, r.text
        assert_same_items(r.json()["items"], want)
    batch = post(client, "/recommend/batch", {"requests": requests})
    adaptive = post(client, "/recommend/adaptive", requests)
    assert batch.status_code == 200 and adaptive.status_code == 200, (batch.text, adaptive.text)
    for answers in (batch.json()["responses"], adaptive.json()):
        assert [a["user_id"] for a in answers] == [q["user_id"] for q in requests]
        assert [a["cold_start"] for a in answers] == cold
        for answer, want in zip(answers, wants, strict=True):
            assert_same_items(answer["items"], want)


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    """Equal answers, scores to 1e-5 (a batched forward pass may round differently from a single one)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {**g, "items": None} == {**w, "items": None}
        assert [{**it, "score": None} for it in g["items"]] == [{**it, "score": None} for it in w["items"]]
        assert [it["score"] for it in g["items"]] == pytest.approx([it["score"] for it in w["items"]], abs=1e-5)


def test_adaptive_route_answers_lists_like_recommend(client, released):
    """Batchable ``/recommend/adaptive``: a list in, a list out, each answer what ``/recommend`` gives."""
    user, ids = released["known_user"], released["item_ids"]
    requests = [
        {"user_id": user, "k": 4, "exclude": ids[:3]},
        {"user_id": UNKNOWN_USER, "k": 2},
        {"user_id": released["held_out"], "k": 3},
        {"user_id": user, "k": 5, "diversify": True},
    ]
    singles = [post(client, "/recommend", q).json() for q in requests]
    one = post(client, "/recommend/adaptive", [requests[0]])
    assert one.status_code == 200, one.text
    assert_same_answers(one.json(), singles[:1])
    many = post(client, "/recommend/adaptive", requests)
    assert many.status_code == 200, many.text
    assert_same_answers(many.json(), singles)
    # A full batch in one call.
    full = [{"user_id": user, "k": 1 + i % 5} if i % 3 else {"user_id": UNKNOWN_USER, "k": 2} for i in range(32)]
    r = post(client, "/recommend/adaptive", full)
    assert r.status_code == 200, r.text
    assert [len(a["items"]) for a in r.json()] == [q["k"] for q in full]
    assert_same_answers(r.json()[:4], [post(client, "/recommend", q).json() for q in full[:4]])
    # Concurrent callers are batched together, yet each gets its own answers.
    from concurrent.futures import ThreadPoolExecutor

    bodies = [[{"user_id": user, "k": 1 + i}] for i in range(6)] + [[{"user_id": UNKNOWN_USER, "k": 3}, {"user_id": user, "k": 2}]]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post_shed(client, "/recommend/adaptive", b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for body, answer in zip(bodies, answers, strict=True):
        assert [(a["user_id"], len(a["items"])) for a in answer.json()] == [(q["user_id"], q["k"]) for q in body]


def post_shed(client, route, body, attempts: int = 20):
    """POST, trying again while BentoML's adaptive batching sheds load (503 when a call would wait past its latency bound)."""
    for _ in range(attempts):
        r = post(client, route, body)
        if r.status_code != 503:
            return r
        time.sleep(0.05)
    return r


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"user_id": 1}, "body"),  # an object, not a list
        ([], None),
        ([{"user_id": 1}] * 33, None),  # longer than one adaptive batch: /recommend/batch takes those
        ([{"user_id": 1, "k": 0}], "k"),
        ([{"user_id": "1"}], "user_id"),
        ("[{not json", "body"),
    ],
)
def test_adaptive_route_refuses_malformed_lists(client, body, loc):
    r = post(client, "/recommend/adaptive", body)
    assert r.status_code == 400, r.text
    if loc is not None:
        assert any(loc in err["loc"] for err in r.json()["detail"]), r.text


def test_adaptive_route_is_listed_as_batchable(client):
    from stratarec.serving.service import ADAPTIVE_MAX_BATCH, ADAPTIVE_MAX_LATENCY_MS, RecommenderService

    api = RecommenderService.apis["recommend_adaptive"]
    assert api.batchable and api.route == "/recommend/adaptive"
    assert (api.max_batch_size, api.max_latency_ms) == (ADAPTIVE_MAX_BATCH, ADAPTIVE_MAX_LATENCY_MS) == (32, 300)
    schema = api.schema()  # what bento.yaml records and bench/serve.py reads
    assert schema["batchable"] and schema["input"]["type"] == "array" and schema["output"]["type"] == "array"
    spec = client.get("/docs.json").json()["paths"]["/recommend/adaptive"]["post"]
    assert spec["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"


def test_unloaded_model_is_503_on_every_recommend_route(client, released):
    """Without a model: 503 on each route (``/recommend`` and ``/recommend/batch`` keep their reason and Retry-After)."""
    import bentoml

    svc = bentoml.get_current_service()
    bundle, tried = svc.bundle, svc._model_tried_at
    svc.bundle, svc._model_tried_at = None, time.monotonic() + 3600  # not loaded, and no reload attempt meanwhile
    try:
        for route, body in (
            ("/recommend", {"user_id": 1}),
            ("/recommend/batch", {"requests": [{"user_id": 1}]}),
            ("/recommend/adaptive", [{"user_id": 1}]),
        ):
            r = post(client, route, body)
            assert r.status_code == 503, (route, r.status_code, r.text)
            if route != "/recommend/adaptive":
                assert "is not loaded" in r.json()["error"] and r.headers["retry-after"]
    finally:
        svc.bundle, svc._model_tried_at = bundle, tried
    assert post(client, "/recommend/adaptive", [{"user_id": released["known_user"], "k": 2}]).status_code == 200


@pytest.mark.parametrize("failure", ["unpublished repository", "deadline exceeded"])
def test_feature_store_failure_degrades_to_cold_start(client, released, tmp_path, failure):
    """Real Feast failures, swapped in through the service's feature-source seam: requests still succeed, marked degraded.

    (One ``to_asgi()`` app per process, see conftest.py; the fault tests with a private Redis
    are in test_service_faults.py.)
    """
    import bentoml

    from stratarec.feature_repo.pipeline_io import feature_repo_dir
    from stratarec.serving.service import FeastUserFeatures

    cfg = released["cfg"]
    svc = bentoml.get_current_service()
    before = post(client, "/status", {}).json()["requests_degraded"]
    lock = None
    if failure == "unpublished repository":  # no registry, no tables: every read raises
        broken = FeastUserFeatures(tmp_path / "never_published", cfg.features, timeout_s=2.0)
    else:
        # The real repository, with its SQLite online store held under an exclusive lock by
        # another writer: reads wait (sqlite's 5 s busy timeout) far past a 300 ms deadline.
        broken = FeastUserFeatures(feature_repo_dir(cfg), cfg.features, timeout_s=0.3)
        lock = sqlite3.connect(feature_repo_dir(cfg) / "online.db", isolation_level=None)
        assert lock.execute("PRAGMA journal_mode").fetchone()[0] != "wal"  # WAL would let readers through
        lock.execute("BEGIN EXCLUSIVE")
    healthy, svc.features = svc.features, broken
    try:
        t0 = time.perf_counter()
        r = post(client, "/recommend", {"user_id": released["known_user"], "k": K})
        elapsed = time.perf_counter() - t0
        if lock is not None:
            lock.execute("ROLLBACK")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["degraded"] is True and body["cold_start"] is True and len(body["items"]) == K
        expected = "recommender_v1 does not exist" if failure == "unpublished repository" else "took longer than 300 ms"
        assert expected in body["degraded_reason"], body["degraded_reason"]
        assert body["stale_features"] is False and body["feature_watermark"] is None  # no features were used
        assert body["layer"] is not None  # the bundle still knows the user's layer
        assert elapsed < 2.0
        status = post(client, "/status", {}).json()
        assert status["requests_degraded"] == before + 1
        if failure == "unpublished repository":
            assert client.get("/readyz").status_code == 503
            assert not status["ready"] and status["feature_store"]["error"]
    finally:
        if lock is not None:
            lock.close()
        svc.features = healthy
        broken.close()
    assert post(client, "/recommend", {"user_id": released["known_user"], "k": K}).json()["degraded"] is False


def test_build_bento_packs_the_model(env, released):
    import bentoml

    from stratarec.serving.package import build_bento
    from stratarec.serving.service import resolve_model_tag

    t0 = time.perf_counter()
    tag = build_bento(released["cfg"], released["tag"])
    print(f"\nbuild_bento took {time.perf_counter() - t0:.1f} s")
    bento = bentoml.bentos.get(tag)
    assert Path(bento.path).is_relative_to(env["workspace"] / "bentoml")
    assert [str(m.tag) for m in bento.info.all_models] == [released["tag"]]
    assert bento.info.labels["model_tag"] == released["tag"]
    assert bento.info.service == "stratarec.serving.service:RecommenderService"
    assert (Path(bento.path) / "src" / "pyproject.toml").is_file()
    assert not (Path(bento.path) / "src" / "stratarec").exists()  # the code comes from the environment
    # Served without $STRATAREC_MODEL_TAG, the Bento serves the model it packs.
    assert resolve_model_tag(bento, env={}) == released["tag"]
    assert os.environ["BENTOML_HOME"] == str(env["workspace"] / "bentoml")
