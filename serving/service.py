"""The BentoML service: next-item recommendations from the production bundle and Feast user features.

One typed service class. Everything it needs is resolved when BentoML instantiates it, not
at import:

* the model: ``$STRATAREC_MODEL_TAG``, else the model packed in the Bento being served, else
  ``<ServingConfig.model_name>:latest``; its model-store folder is a bundle directory;
* the Feast repository: ``$STRATAREC_FEATURE_REPO``, else ``<workspace>/feature_repo`` of
  the ``config.json`` saved in the bundle;
* the served-request log that monitoring reads: ``$STRATAREC_REQUEST_LOG`` (empty string
  disables it), else ``<workspace>/<ServingConfig.request_log>``;
* torch intra-op threads: ``$STRATAREC_TORCH_THREADS``, default 1.

A failing or slow feature read never fails a request: it is answered by a cold start with
``degraded=true``. ``GET /healthz`` (liveness) and ``GET /readyz`` are BentoML's own probe
routes, plain text 200/503; ``/readyz`` calls ``__is_ready__`` (model loaded, one real
feature read). ``POST /status`` returns the same checks as typed JSON (BentoML APIs are POST).

Test in-process with ``TestClient(RecommenderService.to_asgi())``; serve a built Bento with
``bentoml serve <bento tag>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol

import bentoml
import numpy as np
import torch
from pydantic import ValidationError
from starlette.responses import JSONResponse

from stratarec.bundle import CONFIG_FILE, Recommendation, RecommenderBundle
from stratarec.config import FeatureConfig, ServingConfig, StrataConfig
from stratarec.feature_repo.pipeline_io import feature_repo_dir
from stratarec.schema import (
    DEGRADED,
    LATENCY_MS,
    LAYER_COARSE,
    RECOMMENDED_ITEMS,
    SERVED_AT,
    SERVED_LAYER,
    USER_ID,
    USER_RECENT_ITEMS,
)
from stratarec.serving.models import (
    BatchRequest,
    BatchResponse,
    FeatureStoreStatus,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    ServiceStatus,
    SimilarItemsRequest,
    SimilarItemsResponse,
)

log = logging.getLogger(__name__)

MODEL_TAG_ENV = "STRATAREC_MODEL_TAG"
FEATURE_REPO_ENV = "STRATAREC_FEATURE_REPO"
REQUEST_LOG_ENV = "STRATAREC_REQUEST_LOG"
TORCH_THREADS_ENV = "STRATAREC_TORCH_THREADS"
COLD_LAYER = -1  # served_layer of a user without a layer, as monitoring expects
REOPEN_SECONDS = 5.0  # a feature store that failed to open is retried at most this often
PROBE_USER_ID = 0  # readiness reads this user's features; whether it exists does not matter
PROBE_TIMEOUT_S = 5.0
API_THREADS = 4  # BentoML runs sync APIs in this many threads; feature reads get as many


class UserFeatureSource(Protocol):
    """Where the service reads users' online features."""

    @property
    def name(self) -> str:
        """Human-readable description, e.g. ``feast:/path/to/repo``."""
        ...

    def get(self, user_id: int) -> dict | None:
        """Features of one user, or None when the source does not know the user."""
        ...

    def get_many(self, user_ids: Sequence[int]) -> dict[int, dict | None]:
        """Features of several users in one read; unknown users map to None."""
        ...

    def ping(self, timeout_s: float | None = None) -> None:
        """Raise if the source cannot answer a read within ``timeout_s`` right now."""
        ...


def _known(features: Mapping[str, Any] | None) -> dict | None:
    """Feast returns all-None features for an entity it has never seen: that is an unknown user.

    A user with a layer row but no activity row is known (and has no history).
    """
    if not features or all(v is None for v in features.values()):
        return None
    return dict(features)


class FeastUserFeatures:
    """Online ``recommender_v1`` features from a Feast repository, with a per-read deadline.

    The store is opened lazily and reopened (at most every :data:`REOPEN_SECONDS`) after a
    failure, so a service started while Redis or the registry was down recovers by itself.
    Reads run on a small thread pool so that a hung backend costs one deadline, not a stuck
    request; the abandoned read finishes (or fails) in the background.
    """

    def __init__(self, repo_dir: Path, cfg: FeatureConfig, timeout_s: float) -> None:
        self.repo_dir = Path(repo_dir)
        self.cfg = cfg
        self.timeout_s = timeout_s
        self._store: Any = None
        self._opened_at = -float("inf")
        self._open_error = ""
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="feast-read")

    @property
    def name(self) -> str:  # noqa: D102
        return f"feast:{self.repo_dir}"

    def _open(self) -> Any:
        with self._lock:
            if self._store is not None:
                return self._store
            if time.monotonic() - self._opened_at < REOPEN_SECONDS:
                raise ConnectionError(f"feature store {self.repo_dir} is unavailable: {self._open_error}")
            self._opened_at = time.monotonic()
            try:
                from stratarec.feature_repo.store import open_store

                self._store = open_store(self.repo_dir, self.cfg)
            except Exception as exc:
                self._open_error = f"{type(exc).__name__}: {exc}"
                raise
            return self._store

    def _read(self, user_ids: list[int]) -> dict[int, dict | None]:
        from stratarec.feature_repo.store import online_user_features

        rows = online_user_features(self._open(), user_ids)
        return {u: _known(rows.get(u)) for u in user_ids}

    def get(self, user_id: int) -> dict | None:  # noqa: D102
        return self.get_many([user_id])[int(user_id)]

    def get_many(self, user_ids: Sequence[int], timeout_s: float | None = None) -> dict[int, dict | None]:
        """Features of several users; raises TimeoutError past the deadline."""
        ids = [int(u) for u in user_ids]
        deadline = self.timeout_s if timeout_s is None else timeout_s
        future = self._pool.submit(self._read, ids)
        try:
            return future.result(timeout=deadline)
        except FutureTimeout as exc:
            future.cancel()
            raise TimeoutError(f"feature read for {len(ids)} users took longer than {deadline * 1000:.0f} ms") from exc

    def ping(self, timeout_s: float | None = None) -> None:
        """One real online read; the readiness probe allows more than a request's deadline."""
        self.get_many([PROBE_USER_ID], timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the read pool without waiting for an abandoned read."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestLog:
    """Appends one JSON line per served request, read back by ``stratarec.monitoring``.

    One file per day and process (``requests-<YYYYMMDD>-<pid>.jsonl``), so concurrent workers
    never interleave partial lines. A failed write is logged, never raised: losing a
    monitoring row must not lose the user's answer.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._warned = False

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:  # noqa: D102
        now = dt.datetime.now(dt.UTC)
        path = self.directory / f"requests-{now:%Y%m%d}-{os.getpid()}.jsonl"
        text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(text)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the request log %s (monitoring will miss requests): %s", path, exc)
                self._warned = True


def resolve_model_tag(bento: Any = None, env: Mapping[str, str] = os.environ) -> str:
    """The model to serve: ``$STRATAREC_MODEL_TAG``, else the one packed in the Bento, else the latest.

    Args:
        bento: The Bento this service was loaded from (``None`` when served from source).
        env: Environment to read.

    Returns:
        A BentoML model tag string.
    """
    if env.get(MODEL_TAG_ENV):
        return env[MODEL_TAG_ENV]
    model_name = ServingConfig().model_name
    if bento is not None:
        packed = [str(m.tag) for m in bento.info.all_models if m.tag.name == model_name]
        if packed:
            return packed[0]
    return f"{model_name}:latest"


@contextlib.contextmanager
def _server_side() -> Iterator[None]:
    """Turn a pydantic error raised while *building* a response into a 500.

    BentoML maps every ``ValidationError`` to 400, which would blame the client for our bug.
    """
    try:
        yield
    except ValidationError as exc:
        raise RuntimeError(f"response failed validation: {exc}") from exc


def _items(recs: Sequence[Recommendation]) -> list[RecommendedItem]:
    return [RecommendedItem.model_validate(r.__dict__) for r in recs]


@bentoml.service(
    traffic={"timeout": 30, "max_concurrency": 64},
    # Sync APIs run in this many threads; torch inference is serialised by the bundle's lock,
    # so more threads only help feature reads overlap.
    threads=API_THREADS,
    labels={"project": "stratarec", "component": "serving"},
)
class RecommenderService:
    """Interest-layered sequential recommendations."""

    def __init__(self) -> None:
        # One intra-op thread: the model is small and inference is serialised by the bundle's
        # lock, so extra torch threads only add synchronisation. Measured here (2 shared cores):
        # p50 /recommend 8 ms with 1 thread, 109 ms with 2. Scale out with BentoML workers instead.
        torch.set_num_threads(int(os.environ.get(TORCH_THREADS_ENV, "1")))
        tag = resolve_model_tag(getattr(RecommenderService, "bento", None))
        model = bentoml.models.get(tag)
        self.model_tag = str(model.tag)
        model_dir = Path(model.path)
        self.bundle = RecommenderBundle(model_dir)
        self.cfg = StrataConfig.from_json((model_dir / CONFIG_FILE).read_text())
        repo = Path(os.environ.get(FEATURE_REPO_ENV) or feature_repo_dir(self.cfg))
        self.features: UserFeatureSource = FeastUserFeatures(repo, self.cfg.features, self.cfg.serving.feature_timeout_ms / 1000.0)
        log_dir = os.environ.get(REQUEST_LOG_ENV, str(self.cfg.workspace_path / self.cfg.serving.request_log))
        self.request_log = RequestLog(Path(log_dir)) if log_dir else None
        self._counts = {"served": 0, "degraded": 0}
        self._counts_lock = threading.Lock()
        # Warm-up: the first Feast read loads the registry and opens connections, which would
        # blow the first request's deadline. A failure here only means "not ready yet".
        status = self._feature_status()
        log.info(
            "serving %s (%d items, %d layers) with features from %s: %s",
            self.model_tag,
            self.bundle.n_items,
            len(self.bundle.layer_names),
            self.features.name,
            "reachable" if status.reachable else f"UNREACHABLE ({status.error})",
        )

    # -- probes -------------------------------------------------------------------------

    def _feature_status(self) -> FeatureStoreStatus:
        t0 = time.perf_counter()
        try:
            # A probe may take longer than a request's deadline (registry refresh), but not forever.
            self.features.ping(timeout_s=max(PROBE_TIMEOUT_S, self.cfg.serving.feature_timeout_ms / 1000.0))
        except Exception as exc:
            return FeatureStoreStatus(reachable=False, source=self.features.name, error=f"{type(exc).__name__}: {exc}")
        return FeatureStoreStatus(reachable=True, source=self.features.name, latency_ms=(time.perf_counter() - t0) * 1000)

    def _status(self) -> ServiceStatus:
        features = self._feature_status()
        with self._counts_lock:
            served, degraded = self._counts["served"], self._counts["degraded"]
        return ServiceStatus(
            ready=features.reachable,
            model_loaded=True,  # __init__ raises otherwise, and BentoML never starts the worker
            model_tag=self.model_tag,
            n_items=self.bundle.n_items,
            n_layers=len(self.bundle.layer_names),
            feature_store=features,
            requests_served=served,
            requests_degraded=degraded,
        )

    def __is_ready__(self) -> bool:
        """``GET /readyz``: the model is loaded and the feature store answers a real read."""
        status = self._status()
        if not status.ready:
            log.warning("not ready: feature store %s: %s", status.feature_store.source, status.feature_store.error)
        return status.ready

    @bentoml.api(route="/status")
    def status(self) -> ServiceStatus:
        """Readiness in detail: model, catalogue size, feature store reachability and counters."""
        with _server_side():
            return self._status()

    # -- recommendations ----------------------------------------------------------------

    def _layer(self, user_id: int, features: Mapping[str, Any] | None) -> int | None:
        """The user's coarse layer *in this model*.

        The bundle's own assignment comes first: layer ids are k-means labels of one model,
        and Feast may hold another release's layers (e.g. while an older model is rolled
        back). Feast's value is used only for users the bundle has not seen, and only when
        this model has such a layer.
        """
        layer = self.bundle.layer_of_user(user_id)
        if layer is None and features and features.get(LAYER_COARSE) is not None:
            candidate = int(features[LAYER_COARSE])
            layer = candidate if candidate in self.bundle.layer_names else None
        return layer

    def _has_history(self, history: Sequence[int]) -> bool:
        return bool(len(history)) and bool((self.bundle.index.to_index(np.asarray(history, dtype=np.int64)) > 0).any())

    def _cold_start(self, k: int, layer: int | None, exclude: Sequence[int]) -> list[Recommendation]:
        """Popular items of the layer, topped up with globally popular ones.

        A layer only knows the items its members interacted with, which can be fewer than k.
        """
        recs = self.bundle.cold_start(k, layer=layer, exclude=list(exclude))
        if len(recs) < k and layer is not None:
            taken = set(exclude) | {r.item_id for r in recs}
            recs += self.bundle.cold_start(k - len(recs), exclude=sorted(taken))
        return recs

    def _answer(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        """Answer requests with one feature read and one forward pass for the plain warm ones."""
        started = time.perf_counter()
        user_ids = list(dict.fromkeys(r.user_id for r in requests))
        degraded = False
        try:
            features = self.features.get_many(user_ids)
        except Exception as exc:  # any feature-store failure degrades to cold start, never a 5xx
            log.warning("feature read for %d users failed, answering with cold start: %s: %s", len(user_ids), type(exc).__name__, exc)
            features, degraded = {}, True

        results: list[list[Recommendation] | None] = [None] * len(requests)
        cold = [True] * len(requests)
        layers: list[int | None] = []
        batched: list[int] = []  # requests scored together by recommend_batch
        for i, req in enumerate(requests):
            feats = features.get(req.user_id)
            layers.append(self._layer(req.user_id, feats))
            history = [int(x) for x in (feats or {}).get(USER_RECENT_ITEMS) or []]
            if not self._has_history(history):
                results[i] = self._cold_start(req.k, layers[i], req.exclude)
            elif req.diversify:
                results[i] = self.bundle.recommend(history, req.k, exclude=req.exclude, diversify=True)
                cold[i] = False
            else:
                batched.append(i)
                cold[i] = False
        if batched:
            # One forward pass; ask for enough items that dropping the excluded ones leaves k.
            histories = [[int(x) for x in features[requests[i].user_id][USER_RECENT_ITEMS]] for i in batched]
            k_max = max(requests[i].k + len(set(requests[i].exclude)) for i in batched)
            for i, recs in zip(batched, self.bundle.recommend_batch(histories, k_max), strict=True):
                drop = set(requests[i].exclude)
                results[i] = [r for r in recs if r.item_id not in drop][: requests[i].k]

        responses = []
        for i, req in enumerate(requests):
            layer = layers[i]
            responses.append(
                RecommendResponse(
                    user_id=req.user_id,
                    items=_items(results[i] or []),
                    degraded=degraded,
                    cold_start=cold[i],
                    layer=layer,
                    layer_name=self.bundle.layer_names.get(layer) if layer is not None else None,
                    model_tag=self.model_tag,
                )
            )
        latency_ms = (time.perf_counter() - started) * 1000
        self._record(responses, latency_ms)
        return responses

    def _record(self, responses: Sequence[RecommendResponse], latency_ms: float) -> None:
        with self._counts_lock:
            self._counts["served"] += len(responses)
            self._counts["degraded"] += sum(r.degraded for r in responses)
        if self.request_log is None:
            return
        served_at = dt.datetime.now(dt.UTC).isoformat()
        self.request_log.write(
            [
                {
                    SERVED_AT: served_at,
                    USER_ID: r.user_id,
                    RECOMMENDED_ITEMS: [it.item_id for it in r.items],
                    SERVED_LAYER: COLD_LAYER if r.layer is None else r.layer,
                    LATENCY_MS: round(latency_ms, 3),
                    DEGRADED: r.degraded,
                    "cold_start": r.cold_start,
                    "model_tag": r.model_tag,
                }
                for r in responses
            ]
        )

    @bentoml.api(route="/recommend")
    def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        """Top-k next items for a user, never items from their history or ``exclude``.

        Users unknown to the feature store get popular items of their interest layer (or of
        everyone): ``cold_start=true``. If the feature store fails, the answer is a cold
        start with ``degraded=true``.
        """
        with _server_side():
            return self._answer([request])[0]

    @bentoml.api(route="/recommend/batch")
    def recommend_batch(self, batch: BatchRequest, /) -> BatchResponse:
        """Several users at once: one feature read, one forward pass; responses in request order."""
        with _server_side():
            return BatchResponse(responses=self._answer(batch.requests))

    @bentoml.api(route="/similar-items", output_spec=SimilarItemsResponse)
    def similar_items(self, request: SimilarItemsRequest, /) -> SimilarItemsResponse | JSONResponse:
        """Items nearest to ``item_id`` in the learned item embedding space; 404 for an unknown item."""
        with _server_side():
            try:
                recs = self.bundle.similar_items(request.item_id, request.k)
            except KeyError:
                # Returned rather than raised: BentoML 1.4.40 wraps a raised NotFound's body in a
                # list (app.py: ``detail = ({"error": str(exc)},)``), contradicting its own
                # OpenAPI schema for 404, which this object matches.
                return JSONResponse(
                    {"error": f"item_id {request.item_id} is not in the catalogue of model {self.model_tag}", "detail": "item_id"},
                    status_code=404,
                )
            return SimilarItemsResponse(item_id=request.item_id, items=_items(recs), model_tag=self.model_tag)

    @bentoml.on_shutdown
    def _close(self) -> None:
        close = getattr(self.features, "close", None)
        if close is not None:
            close()
