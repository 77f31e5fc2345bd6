"""Fixtures shared by the service tests: one workspace, one released bundle and one ASGI app per test run.

Why package scope: BentoML reads ``BENTOML_HOME`` once per process, and a second
``RecommenderService.to_asgi()`` app in one process fails its first request (BentoML
registers its Prometheus metrics globally). So every service test module uses the one app
built here and opens its own lifespan on it with :func:`serve`: each lifespan creates a new
service instance, which reads the environment (model tag, feature repository, request log)
set for it. Lifespans must not overlap: BentoML keeps one service instance per app.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import pytest
import torch

from stratarec.bundle import item_table, save_layers, write_json_atomic, write_parquet_atomic
from stratarec.config import FeatureConfig, LayerConfig, ModelConfig, ServingConfig, StrataConfig, SyntheticConfig, TrainConfig
from stratarec.data.synthetic import generate_synthetic
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.layering import build_interest_layers
from stratarec.schema import EVENT_TIMESTAMP, GENRES, ITEM_ID, TITLE, USER_ID, USER_RECENT_ITEMS
from stratarec.sequences import ItemIndex, split_from_events
from stratarec.text_encoder import embed_texts, item_text
from stratarec.training import ModelScorer, save_trained_model, train_sequential

SERVICE_ENV_VARS = ("STRATAREC_MODEL_TAG", "STRATAREC_FEATURE_REPO", "STRATAREC_REQUEST_LOG")


@pytest.fixture(scope="package")
def env(tmp_path_factory):
    """A workspace, with BentoML pointed at it before anything touches a BentoML store."""
    ws = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(ws / "bentoml"))
        mp.setenv("BENTOML_DO_NOT_TRACK", "true")  # no usage-stats POSTs from tests
        for var in SERVICE_ENV_VARS:
            mp.delenv(var, raising=False)
        yield {"workspace": ws, "monkeypatch": mp}


@pytest.fixture(scope="package")
def released(env):
    """Train, layer, publish features and layers to Feast (local profile), and save the bundle to the model store.

    Also returns the feature frames it published, so other tests can publish the same
    features elsewhere (e.g. to Redis + PostgreSQL).
    """
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
    published_activity = activity[activity[USER_ID] != held_out]
    publish_features(repo, cfg.features, published_activity, catalog)

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

    layer_rows = layer_feature_rows(bundle, pd.Timestamp.now(tz="UTC"))
    publish_user_layers(repo, cfg.features, layer_rows)
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
        "activity": published_activity,
        "catalog": catalog,
        "layer_rows": layer_rows,
        # What the registry must report as the activity view's watermark: publish_features
        # materializes up to the newest activity row.
        "watermark": pd.Timestamp(published_activity[EVENT_TIMESTAMP].max()),
    }


@pytest.fixture(scope="package")
def release_variant(released, tmp_path_factory) -> Callable[[StrataConfig], str]:
    """Save the released bundle again under a different ``config.json``; returns the new model tag.

    The service takes its feature store, deadlines and freshness bound from the bundle's
    config, so this is how a test serves the same model against another store or policy.
    """
    from stratarec.serving.package import save_to_model_store

    def _save(cfg: StrataConfig) -> str:
        bundle = tmp_path_factory.mktemp("variant") / "bundle"
        shutil.copytree(released["bundle"], bundle)
        (bundle / "config.json").write_text(cfg.to_json())
        return save_to_model_store(bundle, cfg, {"stage": "test"}, {"reason": "service test variant"})

    return _save


@pytest.fixture(scope="package")
def service_app(env):
    """The one ``RecommenderService.to_asgi()`` app of this test process (see the module docstring)."""
    from stratarec.serving.service import RecommenderService

    return RecommenderService.to_asgi()


@pytest.fixture(scope="package")
def serve(service_app) -> Callable[..., contextlib.AbstractContextManager]:
    """``with serve({"STRATAREC_MODEL_TAG": tag}) as client:`` runs one service lifespan with that environment.

    Variables mapped to None are unset. The service's ``__init__`` runs on entry and its
    shutdown hooks on exit; torch's process-wide thread count, which the service sets, is restored.
    """
    from starlette.testclient import TestClient

    @contextlib.contextmanager
    def _serve(environ: Mapping[str, str | None]) -> Iterator[TestClient]:
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as mp:
            for name in SERVICE_ENV_VARS:
                mp.delenv(name, raising=False)
            for name, value in environ.items():
                if value is None:
                    mp.delenv(name, raising=False)
                else:
                    mp.setenv(name, value)
            try:
                with TestClient(service_app) as client:
                    yield client
            finally:
                torch.set_num_threads(threads)

    return _serve
