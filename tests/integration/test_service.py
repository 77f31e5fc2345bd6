"""The BentoML service end to end, in-process: a real tiny bundle, real Feast (SQLite), a real model store.

The bundle is trained for a few epochs on synthetic sequences, its features are published
to a temporary Feast repository, and it is saved to a temporary BentoML model store. The
service then answers over HTTP through ``RecommenderService.to_asgi()`` and Starlette's
test client, exactly as ``bentoml serve`` would route requests, without opening a port.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stratarec.bundle import item_table, save_layers, write_json_atomic, write_parquet_atomic
from stratarec.config import FeatureConfig, LayerConfig, ModelConfig, ServingConfig, StrataConfig, SyntheticConfig, TrainConfig
from stratarec.data.synthetic import generate_synthetic
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.layering import build_interest_layers
from stratarec.schema import EVENT_TIMESTAMP, GENRES, ITEM_ID, LAYER_NAME, TITLE, USER_ID, USER_RECENT_ITEMS
from stratarec.sequences import ItemIndex, split_from_events
from stratarec.text_encoder import embed_texts, item_text
from stratarec.training import ModelScorer, save_trained_model, train_sequential

pytestmark = pytest.mark.integration

UNKNOWN_USER = 987_654_321
K = 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A workspace, with BentoML pointed at it before anything touches a BentoML store."""
    ws = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(ws / "bentoml"))
        mp.setenv("BENTOML_DO_NOT_TRACK", "true")  # no usage-stats POSTs from tests
        for var in ("STRATAREC_MODEL_TAG", "STRATAREC_FEATURE_REPO", "STRATAREC_REQUEST_LOG"):
            mp.delenv(var, raising=False)
        yield {"workspace": ws, "monkeypatch": mp}


@pytest.fixture(scope="module")
def released(env):
    """Train, layer, publish features and layers to Feast, and save the bundle to the model store."""
    from stratarec.feature_repo.pipeline_io import feature_repo_dir
    from stratarec.feature_repo.store import publish_features, publish_user_layers
    from stratarec.serving.package import save_to_model_store
    from stratarec.serving.release import layer_feature_rows

    ws = env["workspace"]
    cfg = StrataConfig(
        workspace=str(ws),
        data={"source": "synthetic", "synthetic": SyntheticConfig(n_users=60, n_items=80, n_genres=4, events_per_user=14, seed=5)},
        features=FeatureConfig(text_encoder="hashing", recent_items_len=30),
        model=ModelConfig(hidden_size=16, num_heads=1, num_layers=1, max_len=12, text_init=False, dropout=0.1),
        train=TrainConfig(epochs=3, batch_size=64, patience=5, seed=3, device="cpu"),
        layers=LayerConfig(n_coarse=3, n_fine=1),
        # The default 50 ms deadline is for production; two shared cores under a parallel
        # test run can take longer, and a timeout here would turn "known user" into "degraded".
        serving=ServingConfig(feature_timeout_ms=2000),
    )
    events, items = generate_synthetic(cfg.data.synthetic)
    ordered = order_events(events)

    # Features, as the features stage computes them; one user is held out of the activity view
    # (but keeps a layer): the service must cold-start them from their layer.
    genres = genre_vocabulary(items)
    activity = compute_user_activity(ordered, items, genres, cfg.features.recent_items_len)
    held_out = int(ordered[USER_ID].iloc[-1])
    catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered[EVENT_TIMESTAMP].min())
    repo = feature_repo_dir(cfg)
    publish_features(repo, cfg.features, activity[activity[USER_ID] != held_out], catalog)

    # Bundle: model, catalogue, layers, config.
    bundle = ws / "bundle"
    index = ItemIndex(np.sort(items[ITEM_ID].to_numpy()))
    split = split_from_events(ordered, index)
    result = train_sequential(split, index, None, cfg.model, cfg.train, ws / "checkpoints")
    save_trained_model(result.model, index, bundle)
    by_row = items.set_index(ITEM_ID).loc[index.item_ids]
    histories = split.test_inputs()
    layers = build_interest_layers(
        split.users,
        ModelScorer(result.model).user_vectors(histories),
        histories,
        by_row[GENRES].astype(str).tolist(),
        by_row[TITLE].astype(str).tolist(),
        genres,
        cfg.layers,
        seed=0,
    )
    save_layers(bundle, layers)
    write_parquet_atomic(item_table(items, index, split.train_item_counts(len(index)), layers.item_layer), bundle / "items.parquet")
    (bundle / "config.json").write_text(cfg.to_json())
    write_json_atomic(bundle / "lineage.json", {"seed": cfg.train.seed, "git_sha": "test", "data_window": {"start": "", "end": ""}})

    publish_user_layers(repo, cfg.features, layer_feature_rows(bundle, pd.Timestamp.now(tz="UTC")))
    tag = save_to_model_store(bundle, cfg, {"stage": "production", "run_id": "test"}, {"reason": "integration test"})
    last = activity.groupby(USER_ID).tail(1).set_index(USER_ID)
    known = int(last.index[0])
    return {
        "cfg": cfg,
        "tag": tag,
        "bundle": bundle,
        "known_user": known,
        "known_history": [int(i) for i in last.loc[known, USER_RECENT_ITEMS]],
        "held_out": held_out,
        "held_out_layer": int(layers.assignments.set_index(USER_ID).loc[held_out, "layer_coarse"]),
        "item_ids": index.item_ids.tolist(),
    }


@pytest.fixture(scope="module")
def client(env, released):
    from starlette.testclient import TestClient

    from stratarec.serving.service import RecommenderService

    env["monkeypatch"].setenv("STRATAREC_MODEL_TAG", released["tag"])
    threads = torch.get_num_threads()  # the service sets torch's process-wide thread count
    with TestClient(RecommenderService.to_asgi()) as c:
        yield c
    torch.set_num_threads(threads)


def post(client, route, body):
    return client.post(route, content=body if isinstance(body, str) else json.dumps(body), headers={"content-type": "application/json"})


def test_known_user_gets_k_unseen_items_with_titles_and_layers(client, released):
    user, history = released["known_user"], released["known_history"]
    exclude = [i for i in released["item_ids"] if i not in history][:3]
    r = post(client, "/recommend", {"user_id": user, "k": K, "exclude": exclude})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == user and body["model_tag"] == released["tag"]
    assert body["cold_start"] is False and body["degraded"] is False
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
    assert status["ready"] and status["model_loaded"] and status["model_tag"] == released["tag"]
    assert status["feature_store"]["reachable"] and status["feature_store"]["source"].startswith("feast:")
    assert status["n_items"] == len(released["item_ids"]) and status["n_layers"] == 3


def test_openapi_is_typed(client):
    spec = client.get("/docs.json").json()
    for route in ("/recommend", "/recommend/batch", "/similar-items", "/status"):
        ok = spec["paths"][route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok.get("properties"), route
    req = spec["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert req["required"] == [USER_ID] and req["additionalProperties"] is False
    assert req["properties"]["k"]["maximum"] == 1000


def test_request_log_feeds_monitoring(client, released):
    from stratarec.monitoring.frames import build_prediction_frame

    post(client, "/recommend", {"user_id": released["known_user"], "k": 2})
    files = sorted((Path(released["cfg"].workspace) / "request_log").glob("*.jsonl"))
    assert files
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    frame = build_prediction_frame(rows)
    assert len(frame) == len(rows) and {"-1"} <= set(frame["served_layer"])  # cold users are layer -1
    assert frame["n_recommended"].min() >= 1


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


@pytest.mark.parametrize("failure", ["unpublished repository", "deadline exceeded"])
def test_feature_store_failure_degrades_to_cold_start(client, released, tmp_path, failure):
    """Real Feast failures, swapped in through the service's feature-source seam: requests still succeed, marked degraded.

    (A second ``to_asgi()`` app in one process is not an option: BentoML registers its
    Prometheus metrics globally and the second app's first request fails on duplicates.)
    """
    import bentoml

    from stratarec.feature_repo.pipeline_io import feature_repo_dir
    from stratarec.serving.service import FeastUserFeatures

    cfg = released["cfg"]
    svc = bentoml.get_current_service()
    if failure == "unpublished repository":  # no registry, no tables: every read raises
        broken = FeastUserFeatures(tmp_path / "never_published", cfg.features, timeout_s=2.0)
    else:  # the real repository, but a deadline no read can meet
        broken = FeastUserFeatures(feature_repo_dir(cfg), cfg.features, timeout_s=1e-6)
    healthy, svc.features = svc.features, broken
    try:
        before = post(client, "/status", {}).json()["requests_degraded"]
        r = post(client, "/recommend", {"user_id": released["known_user"], "k": K})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["degraded"] is True and body["cold_start"] is True and len(body["items"]) == K
        assert body["layer"] is not None  # the bundle still knows the user's layer
        status = post(client, "/status", {}).json()
        assert status["requests_degraded"] == before + 1
        if failure == "unpublished repository":
            assert client.get("/readyz").status_code == 503
            assert not status["ready"] and status["feature_store"]["error"]
    finally:
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
