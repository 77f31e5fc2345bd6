"""The BentoML service: next-item recommendations from the production bundle and Feast user features.

One typed service class. Everything it needs is resolved when BentoML instantiates it, not
at import:

* the model: ``$STRATAREC_MODEL_TAG``, else the model packed in the Bento being served, else
  ``<ServingConfig.model_name>:latest``; its model-store folder is a bundle directory. A
  model that cannot be loaded does not stop the worker: it stays alive (``/healthz`` 200),
  reports not ready (``/readyz`` 503, ``POST /status`` says why), answers API calls with 503
  and retries the load every :data:`REOPEN_SECONDS`;
* the Feast repository: ``$STRATAREC_FEATURE_REPO``, else ``<workspace>/feature_repo`` of
  the ``config.json`` saved in the bundle;
* the served-request log that monitoring reads: ``$STRATAREC_REQUEST_LOG`` (empty string
  disables it), else ``<workspace>/<ServingConfig.request_log>``;
* torch intra-op threads: ``$STRATAREC_TORCH_THREADS``, default 1.

Readiness (``GET /readyz`` 200/503, plain text, BentoML's own probe route calling
``__is_ready__``) needs three things, which ``POST /status`` reports as typed JSON with one
line per failed cause: the model is loaded; the feature store answers a real online read;
the features are fresh, i.e. the newest materialization of the user activity view recorded in
the Feast registry (``materialization_intervals``) is at most ``FeatureConfig.freshness_hours``
old by the wall clock.

Faults never fail a request. A feature read that errors or misses its deadline
(``ServingConfig.feature_timeout_ms``) is answered from the user's interest layer and global
popularity with ``degraded=true`` and a ``degraded_reason``; after
``ServingConfig.feature_failures_to_open`` failures in a row the store is left alone for
``ServingConfig.feature_retry_seconds``, then one read tries again, so the service returns to
normal by itself. Answers built from stale features carry ``stale_features=true``.

``POST /recommend`` and ``POST /recommend/batch`` send a ``Server-Timing`` header
(``feast;dur=<ms>, score;dur=<ms>``: the feature read and the scoring). ``POST
/recommend/adaptive`` is the same answer with BentoML's adaptive batching: it takes a JSON list
of requests, and BentoML answers concurrent callers together, as ``/recommend/batch`` does.

Every answer is logged for monitoring (features used, items, latency, flags) as JSON lines by
a background writer (:class:`RequestLog`) that drops rows rather than delay a response.
A request guard in front of the APIs (:class:`RequestGuard`) accepts only JSON bodies of
bounded size and depth, so nothing a client sends reaches BentoML's multipart, URL-download
or pickle decoders.

Test in-process with ``TestClient(RecommenderService.to_asgi())``; serve a built Bento with
``bentoml serve <bento tag>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import bentoml
import numpy as np
import pydantic_core
import torch
from bentoml.exceptions import ServiceUnavailable
from pydantic import ValidationError
from starlette.datastructures import Headers
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
    USER_ACTIVITY_VIEW,
    USER_ID,
    USER_RECENT_ITEMS,
)
from stratarec.serving.models import (
    ADAPTIVE_MAX_BATCH,
    MAX_BODY_BYTES,
    AdaptiveRequests,
    BatchRequest,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    FeatureStoreStatus,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    RequestLogStatus,
    ServerArguments,
    ServiceStatus,
    SimilarItemsRequest,
    SimilarItemsResponse,
    StateCacheStatus,
)

log = logging.getLogger(__name__)

MODEL_TAG_ENV = "STRATAREC_MODEL_TAG"
FEATURE_REPO_ENV = "STRATAREC_FEATURE_REPO"
REQUEST_LOG_ENV = "STRATAREC_REQUEST_LOG"
TORCH_THREADS_ENV = "STRATAREC_TORCH_THREADS"
COLD_LAYER = -1  # served_layer of a user without a layer, as monitoring expects
REOPEN_SECONDS = 5.0  # a feature store or model that failed to open is retried at most this often
PROBE_USER_ID = 0  # readiness reads this user's features; whether it exists does not matter
WARMUP_TIMEOUT_S = 10.0  # the first read opens the store: registry load and connections
# A readiness read's deadline (or the feature deadline, if longer): Kubernetes fails a probe
# that takes over 1 s by default, so waiting longer would only hide the answer.
PROBE_TIMEOUT_S = 1.0
API_THREADS = 4  # BentoML runs sync APIs in this many threads
# Reads abandoned at their deadline keep their thread until the backend answers or the client
# library gives up (redis-py retries a dead server with backoff for up to ~14 s), so the pool
# is larger than API_THREADS; when every thread is taken, reads are refused at once.
FEATURE_READ_THREADS = 16
# A feature read's deadline counts from when it starts; one still queued for a thread after this
# many deadlines is a timeout anyway.
READ_START_GRACE = 4
# The Feast registry is re-read in the background this often, so the registry cache (60 s TTL,
# feature_repo.store.REGISTRY_CACHE_SECONDS) never expires inside a request's deadline, and the
# freshness watermark follows new materializations.
REGISTRY_REFRESH_SECONDS = 30.0
# Adaptive batching (POST /recommend/adaptive): BentoML queues concurrent calls and answers up to
# ADAPTIVE_MAX_BATCH requests together; a call it expects to wait longer than this bound is
# refused with 503 ("process is overloaded"): BentoML's load shedding, not a failure of ours.
ADAPTIVE_ROUTE = "/recommend/adaptive"
# 300 ms, not tens: a full batch of 32 costs ~33 ms on 2 cores, and BentoML sheds any call it
# expects to wait past the bound; at 20 ms it refused 96% of requests at concurrency 32
# in-process, at 300 ms none (165 req/s). The bound is a shedding limit, not a target latency.
ADAPTIVE_MAX_LATENCY_MS = 300
SERVER_TIMING = "Server-Timing"
DEGRADED_LOG_EVERY_S = 10.0  # while degraded, one warning per this many seconds, not one per request
_MAX_REASON = 300  # characters of a backend error message carried into a response


class UserFeatureSource(Protocol):
    """Where the service reads users' online features."""

    @property
    def name(self) -> str:
        """Human-readable description, e.g. ``feast:/path/to/repo``."""
        ...

    @property
    def watermark(self) -> Watermark:
        """Newest materialization end of the user activity features, as last read."""
        ...

    def get_many(self, user_ids: Sequence[int]) -> dict[int, dict | None]:
        """Features of several users in one read; unknown users map to None."""
        ...

    def ping(self, timeout_s: float | None = None) -> None:
        """Raise if the source cannot answer a read within ``timeout_s`` right now."""
        ...


@dataclass(frozen=True)
class Watermark:
    """The materialization watermark of the user activity view.

    Attributes:
        time: End of the newest materialization interval (UTC), or None when none is known.
        error: Why the registry could not be read on the last attempt ("" when it could);
            ``time`` then keeps the last value read.
    """

    time: dt.datetime | None
    error: str = ""


@dataclass(frozen=True)
class Freshness:
    """Staleness verdict of a watermark against the configured bound."""

    watermark: str | None
    age_hours: float | None
    bound_hours: float
    stale: bool
    message: str
    error: str


@dataclass(frozen=True)
class Timing:
    """Where one answer's time went, sent as ``Server-Timing: feast;dur=<ms>, score;dur=<ms>``.

    Attributes:
        feast_ms: The online feature read (its deadline included, when it times out).
        score_ms: Turning features into ranked items: the forward pass, top-k, cold starts.
    """

    feast_ms: float
    score_ms: float

    def header(self) -> str:
        """The ``Server-Timing`` header value."""
        return f"feast;dur={self.feast_ms:.3f}, score;dur={self.score_ms:.3f}"

    def send(self, ctx: Any) -> None:
        """Put the header on the response of the request ``ctx`` belongs to (nothing when called in-process without one)."""
        if ctx is not None:
            ctx.response.headers[SERVER_TIMING] = self.header()


class FeatureStoreUnavailable(ConnectionError):
    """A feature read refused without touching the store: a recent failure, or every reader busy."""


def _known(features: Mapping[str, Any] | None) -> dict | None:
    """Feast returns all-None features for an entity it has never seen: that is an unknown user.

    A user with a layer row but no activity row is known (and has no history).
    """
    if not features or all(v is None for v in features.values()):
        return None
    return dict(features)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _hours(h: float) -> str:
    return f"{h:.0f}" if abs(h) >= 10 else f"{h:.2g}"


class _ReadStart:
    """When a feature read was submitted and when a thread began it."""

    __slots__ = ("at", "started", "submitted")

    def __init__(self) -> None:
        self.submitted = time.monotonic()
        self.at = self.submitted
        self.started = threading.Event()

    def mark(self) -> None:
        self.at = time.monotonic()
        self.started.set()


class FeastUserFeatures:
    """Online ``recommender_v1`` features from a Feast repository, with a deadline and a breaker.

    * The store is opened lazily and reopened (at most every :data:`REOPEN_SECONDS`) after a
      failure, so a service started while Redis or the registry was down recovers by itself.
    * Reads run on a thread pool so that a hung backend costs one deadline, not a stuck
      request; the abandoned read finishes (or fails) in the background.
    * After ``failures_to_open`` failed reads in a row, reads are refused at once for
      ``retry_s`` (no request pays a deadline against a store known to be down); then the
      next read is the trial. Readiness
      probes always try, so an idle service notices recovery too.
    * A background thread re-reads the registry every :data:`REGISTRY_REFRESH_SECONDS` and the
      materialization watermark with it.
    """

    def __init__(self, repo_dir: Path, cfg: FeatureConfig, timeout_s: float, retry_s: float = 1.0, failures_to_open: int = 3) -> None:
        self.repo_dir = Path(repo_dir)
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.failures_to_open = max(1, int(failures_to_open))
        self._consecutive_failures = 0
        self._store: Any = None
        self._opened_at = -float("inf")
        self._open_error = ""
        self._lock = threading.Lock()  # opening the store
        self._state = threading.Lock()  # breaker and in-flight count
        self._inflight = 0
        self._failing = False
        self._failed_at = -float("inf")
        self._last_error = ""
        self._watermark = Watermark(None, "the feature store has not been opened yet")
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=FEATURE_READ_THREADS, thread_name_prefix="feast-read")

    @property
    def name(self) -> str:  # noqa: D102
        return f"feast:{self.repo_dir}"

    @property
    def watermark(self) -> Watermark:  # noqa: D102
        return self._watermark

    def _open(self) -> Any:
        with self._lock:
            if self._store is not None:
                return self._store
            if time.monotonic() - self._opened_at < REOPEN_SECONDS:
                raise ConnectionError(f"feature store {self.repo_dir} is unavailable: {self._open_error}")
            self._opened_at = time.monotonic()
            try:
                from stratarec.feature_repo.store import open_store

                store = open_store(self.repo_dir, self.cfg)
            except Exception as exc:
                self._open_error = _short(exc)
                raise
            self._update_watermark(store)
            self._store = store
            if self._maintainer is None and not self._stop.is_set():
                self._maintainer = threading.Thread(target=self._maintain, name="feast-registry-refresh", daemon=True)
                self._maintainer.start()
            return store

    def _update_watermark(self, store: Any) -> None:
        try:
            view = store.get_feature_view(USER_ACTIVITY_VIEW, allow_registry_cache=True)
        except Exception as exc:
            # Keep the last time read: a registry outage is not evidence the features aged.
            self._watermark = Watermark(self._watermark.time, _short(exc))
            return
        end = view.most_recent_end_time
        if end is None:
            self._watermark = Watermark(None, f"the registry records no materialization of {USER_ACTIVITY_VIEW}")
        else:
            end = end.replace(tzinfo=dt.UTC) if end.tzinfo is None else end.astimezone(dt.UTC)
            self._watermark = Watermark(end)

    def _maintain(self) -> None:
        while not self._stop.wait(REGISTRY_REFRESH_SECONDS):
            store = self._store
            if store is None:
                continue
            with contextlib.suppress(Exception):  # the SQL registry logs its own refresh failures
                store.refresh_registry()
            self._update_watermark(store)

    def _admit(self, probe: bool) -> None:
        with self._state:
            if self._inflight >= FEATURE_READ_THREADS:
                raise FeatureStoreUnavailable(
                    f"all {FEATURE_READ_THREADS} feature-read threads still wait on earlier reads (hung store?); "
                    f"last error: {self._last_error}"
                )
            if self._failing and not probe:
                ago = time.monotonic() - self._failed_at
                if ago < self.retry_s:
                    raise FeatureStoreUnavailable(f"{self._last_error} ({ago:.1f} s ago; next read in {self.retry_s - ago:.1f} s)")
                # This read is the trial; concurrent requests keep skipping until it is decided.
                self._failed_at = time.monotonic()
            self._inflight += 1

    def _release(self) -> None:
        with self._state:
            self._inflight -= 1

    def _outcome(self, error: str | None) -> None:
        with self._state:
            if error is None:
                self._failing, self._consecutive_failures = False, 0
                return
            self._consecutive_failures += 1
            self._last_error = error
            # One slow read (a GC pause, the registry refresh holding the GIL) degrades only its
            # own answer; the breaker opens after several failures in a row, or again at once
            # when the trial read of an open breaker fails.
            if self._failing or self._consecutive_failures >= self.failures_to_open:
                self._failing, self._failed_at = True, time.monotonic()

    def _read(self, user_ids: list[int], start: _ReadStart) -> dict[int, dict | None]:
        start.mark()
        try:
            from stratarec.feature_repo.store import online_user_features

            rows = online_user_features(self._open(), user_ids)
            return {u: _known(rows.get(u)) for u in user_ids}
        finally:
            self._release()

    def get_many(self, user_ids: Sequence[int], timeout_s: float | None = None, *, probe: bool = False) -> dict[int, dict | None]:
        """Features of several users.

        Args:
            user_ids: Users to read.
            timeout_s: Deadline; default the configured one.
            probe: A readiness probe: tries the store even inside the retry window.

        Returns:
            ``{user_id: features or None}``.

        Raises:
            TimeoutError: The read missed its deadline (it goes on in the background).
            FeatureStoreUnavailable: Refused without a read (recent failure, readers busy).
            Exception: Whatever the store raised.
        """
        ids = [int(u) for u in user_ids]
        deadline = self.timeout_s if timeout_s is None else timeout_s
        self._admit(probe)
        start = _ReadStart()
        future = self._pool.submit(self._read, ids, start)
        try:
            rows = self._wait(future, start, deadline)
        except FutureTimeout as exc:
            if future.cancel():  # never started, so _read will not release its slot
                self._release()
            message = f"feature read for {len(ids)} users took longer than {deadline * 1000:.0f} ms"
            self._outcome(message)
            raise TimeoutError(message) from exc
        except Exception as exc:
            self._outcome(_short(exc))
            raise
        self._outcome(None)
        return rows

    @staticmethod
    def _wait(future: Any, start: _ReadStart, deadline: float) -> dict[int, dict | None]:
        """The read's result, with the deadline counted from when the read began.

        Under CPU saturation a read can wait for a thread (or the GIL) before it reaches the
        store; that wait says nothing about the store, and degrading then would turn an
        overloaded service into a wrong one (at concurrency 8 on 2 cores, a quarter of the
        answers were degraded while the deadline counted from submission). A read not even
        started after :data:`READ_START_GRACE` deadlines is a timeout all the same.
        """
        try:
            return future.result(timeout=deadline)
        except FutureTimeout:
            if not start.started.wait(timeout=max(0.0, start.submitted + READ_START_GRACE * deadline - time.monotonic())):
                raise
            return future.result(timeout=max(0.0, start.at + deadline - time.monotonic()))

    def get(self, user_id: int) -> dict | None:  # noqa: D102
        return self.get_many([user_id])[int(user_id)]

    def ping(self, timeout_s: float | None = None) -> None:
        """One real online read, even inside the retry window."""
        self.get_many([PROBE_USER_ID], timeout_s=timeout_s, probe=True)

    def close(self) -> None:
        """Stop the registry refresher and the read pool without waiting for an abandoned read.

        Also closes the SQL registry's connection pools, so a stopped service holds no
        PostgreSQL connections (Feast 0.67 has no synchronous close for a store).
        """
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        registry = getattr(self._store, "registry", None)
        for attr in ("write_engine", "read_engine"):
            engine = getattr(registry, attr, None)
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.dispose()


_STOP = object()


class RequestLog:
    """JSON lines of served requests, written by a background thread, rotated by size.

    ``write`` only puts rows on a bounded queue and never waits: when the queue is full
    (the disk is slow, full or hung) rows are dropped and counted, because losing a
    monitoring row must not delay or lose the user's answer. The writer thread serialises
    rows and appends them to ``requests-<UTC time>-<pid>-<seq>.jsonl`` in ``directory``
    (what ``stratarec.monitoring.pipeline_io.read_request_log`` globs; names sort in time
    order). A file is closed and the next one started before it would exceed ``max_bytes``
    (a single larger row gets a file of its own); this process keeps its newest ``max_files``
    files (0 keeps all). One file per process, so workers never interleave partial lines.
    Write errors are counted and logged, never raised.
    """

    def __init__(self, directory: Path, max_bytes: int = 16 * 1024 * 1024, max_files: int = 64, queue_size: int = 10_000) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.max_files = int(max_files)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pid = os.getpid()
        self._seq = 0
        self._file: Any = None
        self._size = 0
        self._counts = {"written": 0, "dropped": 0, "failed": 0, "files_rotated": 0}
        self._lock = threading.Lock()
        self._warned = False
        self._closed = False
        # Named now, opened by the writer: the name is known (and stable) before the first row.
        self.path = self._segment_path()
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    def _segment_path(self) -> Path:
        now = dt.datetime.now(dt.UTC)
        return self.directory / f"requests-{now:%Y%m%dT%H%M%S}-{self._pid}-{self._seq:06d}.jsonl"

    def write(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Queue rows for writing; never blocks.

        Args:
            rows: JSON-serialisable mappings, one per served request; not modified later.

        Returns:
            How many rows were queued (the rest were dropped and counted).
        """
        accepted = 0
        for row in rows:
            if self._closed:
                break
            try:
                self._queue.put_nowait(row)
                accepted += 1
            except queue.Full:
                break
        if accepted < len(rows):
            with self._lock:
                self._counts["dropped"] += len(rows) - accepted
        return accepted

    def stats(self) -> RequestLogStatus:
        """Counters of the writer."""
        with self._lock:
            counts = dict(self._counts)
        return RequestLogStatus(enabled=True, directory=str(self.directory), queued=self._queue.qsize(), **counts)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued and stop the writer; gives up after ``timeout_s`` if the disk hangs."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Drain a burst so it costs one flush, not one per row.
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1000:
                    batch.append(self._queue.get_nowait())
            rows = [r for r in batch if r is not _STOP]
            if rows:
                self._write(rows)
            if len(rows) < len(batch):
                break
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _write(self, rows: list[Mapping[str, Any]]) -> None:
        lines, unserialisable = [], 0
        for row in rows:
            try:
                lines.append((json.dumps(row, separators=(",", ":"), default=_json_default) + "\n").encode("utf-8"))
            except (TypeError, ValueError):
                unserialisable += 1
        done = 0
        try:
            for line in lines:
                if self._file is not None and self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                if self._file is None:
                    self._open()
                self._file.write(line)
                self._size += len(line)
                done += 1
            if self._file is not None:
                self._file.flush()
        except OSError as exc:
            with self._lock:
                self._counts["failed"] += len(lines) - done + unserialisable
                self._counts["written"] += done
            if not self._warned:
                log.warning("cannot write the request log %s (monitoring will miss requests): %s", self.path, exc)
                self._warned = True
            if self._file is not None:  # reopen on the next batch: the disk may have recovered
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
            return
        with self._lock:
            self._counts["written"] += done
            self._counts["failed"] += unserialisable
        self._warned = False

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._size = os.fstat(self._file.fileno()).st_size

    def _rotate(self) -> None:
        self._file.close()
        self._file = None
        self._seq += 1
        self.path = self._segment_path()
        with self._lock:
            self._counts["files_rotated"] += 1
        if self.max_files:
            own = sorted(self.directory.glob(f"requests-*-{self._pid}-*.jsonl"))
            for old in own[: max(0, len(own) - (self.max_files - 1))]:
                with contextlib.suppress(OSError):
                    old.unlink()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _features_used(features: Mapping[str, Any] | None) -> dict | None:
    """What the request-log row keeps of a user's features: scalars as read, sequences by length.

    The item sequence and genre mix can be hundreds of values per row; their lengths say
    whether a user was warm, and the values are in the offline store at ``served_at``.
    """
    if not features:
        return None
    out: dict[str, Any] = {}
    for name, value in features.items():
        if isinstance(value, list | tuple | np.ndarray):
            out[f"{name}_len"] = len(value)
        else:
            out[name] = value.item() if isinstance(value, np.generic) else value
    return out


# -- request guard ------------------------------------------------------------------------

_POSITION = re.compile(r"line (\d+) column (\d+)")
_KEY = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:')
_COLON = re.compile(rb"\s*:")
_JSON_MEDIA_TYPES = ("application/json",)
_KEY_WINDOW = 4096  # bytes searched backwards from a JSON error for an unknown key
# Where the parser gives up at the body's edge, no field is to blame.
_BODY_LEVEL = ("trailing characters", "EOF while parsing")
_REQUEST_FIELDS = tuple(
    sorted(
        {
            field.alias or name
            for model in (RecommendRequest, BatchRequest, SimilarItemsRequest)
            for name, field in model.model_fields.items()
        }
    )
)


def _field_at(body: bytes, message: str) -> str | None:
    """The request field a JSON syntax error sits in, from the parser's position, or None.

    The nearest preceding key that is a field of the request models wins (so deep nesting
    inside ``user_id`` names ``user_id``, not a key nested in it); failing that, the nearest
    plain identifier key. Only identifiers are returned, so the error never echoes arbitrary text.
    """
    found = _POSITION.search(message)
    if not found or message.startswith(_BODY_LEVEL):
        return None
    line, column = int(found.group(1)), int(found.group(2))
    offset = 0
    for _ in range(line - 1):
        offset = body.find(b"\n", offset) + 1
        if offset == 0:
            return None
    end = offset + column - 1  # jiter's columns count bytes
    best, best_at = None, -1
    for name in _REQUEST_FIELDS:
        needle, at = f'"{name}"'.encode(), end
        for _ in range(64):  # the same text may also occur as a value; a few looks suffice
            at = body.rfind(needle, 0, at)
            if at < 0:
                break
            if _COLON.match(body, at + len(needle)):
                if at > best_at:
                    best, best_at = name, at
                break
    if best is not None:
        return best
    keys = list(_KEY.finditer(body, max(0, end - _KEY_WINDOW), end))
    return keys[-1].group(1).decode() if keys else None


def _guard_error(status: int, kind: str, loc: list[str | int], msg: str) -> JSONResponse:
    body = ErrorResponse(error=msg, detail=[ErrorDetail(type=kind, loc=loc, msg=msg)])
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _json_problem(body: bytes, want_list: bool = False) -> JSONResponse | None:
    """A 400 for a body that is not one well-formed JSON object (a JSON list if ``want_list``), else None."""
    if not body:
        return None  # BentoML reads an empty body as {}: the missing required field is then named
    try:
        value = pydantic_core.from_json(body)  # the parser pydantic validates with: same limits, same verdicts
    except ValueError as exc:
        field = _field_at(body, str(exc))
        where = f" in field {field!r}" if field else ""
        return _guard_error(400, "json_invalid", [field] if field else ["body"], f"Invalid JSON{where}: {exc}")
    kind = type(value).__name__
    if want_list:
        if not isinstance(value, list):
            return _guard_error(
                400, "list_type", ["body"], f'the body must be a JSON list of requests such as [{{"user_id": 1}}], not {kind}'
            )
    elif not isinstance(value, dict):
        return _guard_error(400, "model_type", ["body"], f'the body must be a JSON object such as {{"user_id": 1}}, not {kind}')
    return None


class RequestGuard:
    """ASGI middleware in front of the POST APIs: JSON only, bounded size, well-formed.

    * ``Content-Type`` must be ``application/json`` (or absent): BentoML would otherwise pick
      its multipart decoder (which spools uploads to disk and downloads URLs given for file
      fields) or pickle for other media types. 415 otherwise.
    * Bodies over ``max_body_bytes`` are refused with 413, from ``Content-Length`` before
      reading, or as soon as a chunked body grows past it.
    * The body must parse as one JSON object (a JSON list on the routes in ``list_routes``,
      the batchable APIs); deep nesting, bad escapes and invalid UTF-8 get a 400 naming the
      field the parser stopped in (``loc``), or ``body``.
    * ``GET /docs.json`` is corrected: request bodies with required fields are marked required.

    Errors have BentoML's validation shape: ``{"error": ..., "detail": [{"type", "loc", "msg"}]}``.
    """

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES, list_routes: Sequence[str] = (ADAPTIVE_ROUTE,)) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.list_routes = frozenset(list_routes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # noqa: D102
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/docs.json":
            await self._openapi(scope, receive, send)
            return
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type")
        if media_type is not None and media_type.split(";")[0].strip().lower() not in _JSON_MEDIA_TYPES:
            msg = f"send the body as application/json, not {media_type[:80]!r}"
            await _guard_error(415, "unsupported_media_type", ["headers", "content-type"], msg)(scope, receive, send)
            return
        too_large = f"the body is larger than {self.max_body_bytes} bytes"
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await _guard_error(400, "content_length", ["headers", "content-length"], "Content-Length is not a number")(scope, receive, send)
            return
        if length is not None and int(length) > self.max_body_bytes:
            await _guard_error(413, "body_too_large", ["body"], too_large)(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _guard_error(413, "body_too_large", ["body"], too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = _json_problem(body, want_list=scope["path"] in self.list_routes)
        if problem is not None:
            await problem(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _openapi(self, scope: dict, receive: Any, send: Any) -> None:
        """BentoML's OpenAPI document, with ``requestBody.required`` set where the body has required fields.

        BentoML 1.4 never sets it, so the document says every body may be omitted, while an
        omitted body is read as ``{}`` and then lacks e.g. ``user_id``: clients (and
        schemathesis) following the schema would be refused.
        """
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                spec = json.loads(body)
                for item in spec.get("paths", {}).values():
                    request = (item.get("post") or {}).get("requestBody")
                    if request and any(media.get("schema", {}).get("required") for media in request.get("content", {}).values()):
                        request["required"] = True
                body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


# -- service ------------------------------------------------------------------------------


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


def _freeze_heap() -> None:
    """Move everything allocated so far (modules, model, Feast objects) out of the garbage collector's view.

    A worker holds ~560k long-lived objects after start-up. A full (generation 2) collection
    walks all of them: ~330 ms here, with the GIL held, so every in-flight request stalls;
    under load that happened every few seconds and was the whole p99 (one Feast read "took"
    560 ms). Frozen objects are never collected, which is right for what lives as long as the
    process; what requests allocate later is collected as usual.
    """
    gc.collect()
    gc.freeze()


def _items(recs: Sequence[Recommendation]) -> list[RecommendedItem]:
    return [RecommendedItem.model_validate(r.__dict__) for r in recs]


def _degraded_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return str(exc)
    if isinstance(exc, FeatureStoreUnavailable):
        return f"feature store unavailable: {exc}"[:_MAX_REASON]
    return f"feature store unreachable: {_short(exc)}"


# Read once when BentoML imports the service: `bentoml serve <bento> --arg workers=2` (defaults otherwise).
SERVER_ARGS = bentoml.use_arguments(ServerArguments)


@bentoml.service(
    traffic={"timeout": 30, "max_concurrency": 64},
    workers=SERVER_ARGS.workers,
    logging={"access": {"enabled": SERVER_ARGS.access_log}},
    metrics={"enabled": SERVER_ARGS.metrics},
    # Sync APIs run in this many threads. They share one process (and its GIL): more threads
    # let feature reads overlap with scoring, not scoring with scoring.
    threads=API_THREADS,
    labels={"project": "stratarec", "component": "serving"},
)
class RecommenderService:
    """Interest-layered sequential recommendations."""

    def __init__(self) -> None:
        # One intra-op thread: one request's forward pass is a few small matrix products, so
        # extra torch threads only add synchronisation. Measured here (2 shared cores, before the
        # serving fast path): p50 /recommend 8 ms with 1 thread, 109 ms with 2. Scale out with
        # BentoML workers instead.
        torch.set_num_threads(int(os.environ.get(TORCH_THREADS_ENV, "1")))
        self.model_tag = resolve_model_tag(getattr(RecommenderService, "bento", None))
        self.model_error = "not loaded yet"
        self.bundle: RecommenderBundle | None = None
        self.cfg: StrataConfig | None = None
        self.features: UserFeatureSource | None = None
        self.request_log: RequestLog | None = None
        self._model_lock = threading.Lock()
        self._model_tried_at = -float("inf")
        self._counts = {"served": 0, "degraded": 0, "stale": 0}
        self._counts_lock = threading.Lock()
        self._outage = {"requests": 0, "since": 0.0, "logged_at": -float("inf")}
        self._last_not_ready: list[str] = []
        self._started = False
        if not self._load_model():
            log.error("model %s is not loaded (%s): not ready; retrying every %.0f s", self.model_tag, self.model_error, REOPEN_SECONDS)
            self._started = True
            return
        # Warm-up: the first Feast read loads the registry and opens connections, which would
        # blow the first request's deadline. A failure here only means "not ready yet".
        status = self._feature_status(WARMUP_TIMEOUT_S)
        log.info(
            "serving %s (%d items, %d layers) with features from %s: %s; watermark %s (%s)",
            self.model_tag,
            self.bundle.n_items,
            len(self.bundle.layer_names),
            status.source,
            "reachable" if status.reachable else f"UNREACHABLE ({status.error})",
            status.watermark,
            "STALE" if status.stale else "fresh",
        )
        _freeze_heap()
        self._started = True

    def _load_model(self) -> bool:
        """Load the model once; after a failure, retry at most every :data:`REOPEN_SECONDS`."""
        if self.bundle is not None:
            return True
        # Never wait for another thread's attempt: a request or probe meanwhile answers "not loaded".
        if not self._model_lock.acquire(blocking=False):
            return False
        try:
            return self._load_model_locked()
        finally:
            self._model_lock.release()

    def _load_model_locked(self) -> bool:
        if self.bundle is not None:
            return True
        if time.monotonic() - self._model_tried_at < REOPEN_SECONDS:
            return False
        self._model_tried_at = time.monotonic()
        try:
            model = bentoml.models.get(self.model_tag)
            model_dir = Path(model.path)
            cfg = StrataConfig.from_json((model_dir / CONFIG_FILE).read_text())
            bundle = RecommenderBundle(
                model_dir, state_cache_size=cfg.serving.state_cache_size, discovery_max_events=cfg.serving.discovery_max_events
            )
        except Exception as exc:
            self.model_error = _short(exc)
            return False
        self.model_tag = str(model.tag)
        self.cfg = cfg
        repo = Path(os.environ.get(FEATURE_REPO_ENV) or feature_repo_dir(cfg))
        serving = cfg.serving
        self.features = FeastUserFeatures(
            repo, cfg.features, serving.feature_timeout_ms / 1000.0, serving.feature_retry_seconds, serving.feature_failures_to_open
        )
        log_dir = os.environ.get(REQUEST_LOG_ENV, str(cfg.workspace_path / serving.request_log))
        if log_dir:
            self.request_log = RequestLog(
                Path(log_dir), serving.request_log_max_bytes, serving.request_log_max_files, serving.request_log_queue
            )
        self.model_error = ""
        self.bundle = bundle  # last: request threads take "bundle set" to mean "all set"
        if self._started:
            _freeze_heap()  # a model loaded after start-up (retry path) is long-lived too
        return True

    def _model_unavailable(self) -> JSONResponse:
        body = ErrorResponse(error=f"model {self.model_tag} is not loaded: {self.model_error}", detail="model")
        return JSONResponse(body.model_dump(mode="json"), status_code=503, headers={"Retry-After": f"{REOPEN_SECONDS:.0f}"})

    # -- probes -------------------------------------------------------------------------

    def _freshness(self) -> Freshness:
        bound = self.cfg.features.freshness_hours
        mark = getattr(self.features, "watermark", None)
        if mark is None or mark.time is None:
            # Unknown freshness counts as stale: features must not be served as fresh unchecked.
            why = mark.error if mark is not None else "the feature source reports no watermark"
            return Freshness(None, None, bound, True, f"features stale: watermark unknown ({why}), bound {bound:g} h", why)
        age = (dt.datetime.now(dt.UTC) - mark.time).total_seconds() / 3600.0
        stamp = _iso(mark.time)
        message = f"features stale: watermark {stamp} is {_hours(age)} h old, bound {bound:g} h"
        return Freshness(stamp, age, bound, age > bound, message, mark.error)

    def _feature_status(self, timeout_s: float | None = None) -> FeatureStoreStatus:
        t0 = time.perf_counter()
        error, latency = "", None
        try:
            # A probe may take longer than a request's deadline, but not forever.
            self.features.ping(timeout_s=timeout_s or max(PROBE_TIMEOUT_S, self.cfg.serving.feature_timeout_ms / 1000.0))
            latency = (time.perf_counter() - t0) * 1000
        except Exception as exc:
            error = _short(exc)
        fresh = self._freshness()
        return FeatureStoreStatus(
            reachable=not error,
            source=self.features.name,
            error=error,
            latency_ms=latency,
            watermark=fresh.watermark,
            age_hours=fresh.age_hours,
            freshness_bound_hours=fresh.bound_hours,
            stale=fresh.stale,
            freshness_error=fresh.error,
        )

    def _status(self) -> ServiceStatus:
        with self._counts_lock:
            served, degraded, stale = self._counts["served"], self._counts["degraded"], self._counts["stale"]
        counters = {"requests_served": served, "requests_degraded": degraded, "requests_stale": stale}
        if not self._load_model():
            return ServiceStatus(
                ready=False,
                not_ready_reasons=[f"model not loaded: {self.model_tag}: {self.model_error}"],
                model_loaded=False,
                model_error=self.model_error,
                model_tag=self.model_tag,
                n_items=0,
                n_layers=0,
                feature_store=None,
                request_log=RequestLogStatus(enabled=False),
                **counters,
            )
        features = self._feature_status()
        reasons = []
        if not features.reachable:
            reasons.append(f"feature store unreachable: {features.error}")
        if features.stale:
            reasons.append(self._freshness().message)
        return ServiceStatus(
            ready=not reasons,
            not_ready_reasons=reasons,
            model_loaded=True,
            model_tag=self.model_tag,
            n_items=self.bundle.n_items,
            n_layers=len(self.bundle.layer_names),
            feature_store=features,
            request_log=self.request_log.stats() if self.request_log else RequestLogStatus(enabled=False),
            state_cache=StateCacheStatus(**self.bundle.state_cache.stats()) if self.bundle.state_cache else None,
            **counters,
        )

    def __is_ready__(self) -> bool:
        """``GET /readyz``: model loaded, feature store answering a real read, features fresh."""
        status = self._status()
        if status.not_ready_reasons != self._last_not_ready:  # log changes, not every probe
            if status.ready:
                log.info("ready")
            else:
                log.warning("not ready: %s", "; ".join(status.not_ready_reasons))
            self._last_not_ready = status.not_ready_reasons
        return status.ready

    @bentoml.api(route="/status")
    def status(self) -> ServiceStatus:
        """Readiness in detail: model, feature store reachability and freshness, counters, request log."""
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

    def _cold_start(self, k: int, layer: int | None, exclude: Sequence[int]) -> list[Recommendation]:
        """Popular items of the layer, topped up with globally popular ones.

        A layer only knows the items its members interacted with, which can be fewer than k.
        """
        recs = self.bundle.cold_start(k, layer=layer, exclude=list(exclude))
        if len(recs) < k and layer is not None:
            taken = set(exclude) | {r.item_id for r in recs}
            recs += self.bundle.cold_start(k - len(recs), exclude=sorted(taken))
        return recs

    def _note_features(self, degraded_reason: str | None) -> None:
        """Log an outage once when it starts, every :data:`DEGRADED_LOG_EVERY_S` while it lasts, and its end."""
        now = time.monotonic()
        with self._counts_lock:
            outage = self._outage
            if degraded_reason is None:
                if outage["requests"]:
                    log.info(
                        "feature store is back: serving from features again after %d degraded answers over %.1f s",
                        outage["requests"],
                        now - outage["since"],
                    )
                    outage.update(requests=0, logged_at=-float("inf"))
                return
            if not outage["requests"]:
                outage["since"] = now
            outage["requests"] += 1
            if now - outage["logged_at"] < DEGRADED_LOG_EVERY_S:
                return
            outage["logged_at"] = now
            count = outage["requests"]
        log.warning("serving degraded (interest-layer and popularity recommendations, %d answers so far): %s", count, degraded_reason)

    def _answer(self, requests: Sequence[RecommendRequest], endpoint: str) -> tuple[list[RecommendResponse], Timing]:
        """Answer requests with one feature read and one forward pass for the plain warm ones.

        Returns the responses in request order and where the time went (:class:`Timing`).
        """
        started = time.perf_counter()
        bundle = self.bundle
        user_ids = list(dict.fromkeys(r.user_id for r in requests))
        degraded_reason: str | None = None
        try:
            features = self.features.get_many(user_ids)
        except Exception as exc:  # any feature-store failure degrades to layer/popularity, never a 5xx
            degraded_reason = _degraded_reason(exc)
            features = {}
        read = time.perf_counter()
        self._note_features(degraded_reason)
        fresh = self._freshness() if degraded_reason is None else None
        stale = bool(fresh and fresh.stale)

        results: list[list[Recommendation] | None] = [None] * len(requests)
        cold = [True] * len(requests)
        layers: list[int | None] = []
        batched: list[int] = []  # requests scored together in one forward pass
        histories: list[np.ndarray] = []  # their known history items, as model rows
        for i, req in enumerate(requests):
            feats = features.get(req.user_id)
            layers.append(self._layer(req.user_id, feats))
            recent = feats.get(USER_RECENT_ITEMS) if feats else None
            rows = bundle.history_rows(recent)  # unknown items dropped: none left is no history
            if not len(rows):
                results[i] = self._cold_start(req.k, layers[i], req.exclude)
            elif req.diversify or req.discovery:
                results[i] = bundle.recommend_rows(rows, req.k, exclude=req.exclude, diversify=req.diversify, discovery=req.discovery)
                cold[i] = False
            else:
                batched.append(i)
                histories.append(rows)
                cold[i] = False
        if batched:
            # One forward pass; ask for enough items that dropping the excluded ones leaves k.
            k_max = max(requests[i].k + len(set(requests[i].exclude)) for i in batched)
            for i, recs in zip(batched, bundle.recommend_batch_rows(histories, k_max), strict=True):
                req = requests[i]
                if req.exclude:
                    drop = set(req.exclude)
                    recs = [r for r in recs if r.item_id not in drop]
                results[i] = recs[: req.k]
        scored = time.perf_counter()

        degraded = degraded_reason is not None
        watermark = fresh.watermark if fresh else None
        responses = []
        for i, req in enumerate(requests):
            layer = layers[i]
            responses.append(
                RecommendResponse(
                    user_id=req.user_id,
                    items=_items(results[i] or []),
                    degraded=degraded,
                    degraded_reason=degraded_reason,
                    stale_features=stale,
                    feature_watermark=watermark,
                    cold_start=cold[i],
                    layer=layer,
                    layer_name=bundle.layer_names.get(layer) if layer is not None else None,
                    model_tag=self.model_tag,
                )
            )
        latency_ms = (time.perf_counter() - started) * 1000
        self._record(requests, responses, features, latency_ms, endpoint)
        return responses, Timing(feast_ms=(read - started) * 1000, score_ms=(scored - read) * 1000)

    def _record(
        self,
        requests: Sequence[RecommendRequest],
        responses: Sequence[RecommendResponse],
        features: Mapping[int, dict | None],
        latency_ms: float,
        endpoint: str,
    ) -> None:
        with self._counts_lock:
            self._counts["served"] += len(responses)
            self._counts["degraded"] += sum(r.degraded for r in responses)
            self._counts["stale"] += sum(r.stale_features for r in responses)
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
                    "degraded_reason": r.degraded_reason,
                    "stale_features": r.stale_features,
                    "feature_watermark": r.feature_watermark,
                    "cold_start": r.cold_start,
                    "features": _features_used(features.get(r.user_id)),
                    "k": q.k,
                    "n_exclude": len(q.exclude),
                    "diversify": q.diversify,
                    "discovery": q.discovery,
                    "endpoint": endpoint,
                    "model_tag": r.model_tag,
                }
                for q, r in zip(requests, responses, strict=True)
            ]
        )

    def _unavailable(self, ctx: bentoml.Context | None) -> JSONResponse:
        if ctx is not None:  # BentoML sets the response's status from the context when an API takes one
            ctx.response.status_code = 503
        return self._model_unavailable()

    @bentoml.api(route="/recommend", output_spec=RecommendResponse)
    def recommend(self, request: RecommendRequest, /, ctx: bentoml.Context = None) -> RecommendResponse | JSONResponse:  # type: ignore[assignment]
        """Top-k next items for a user, never items from their history or ``exclude``.

        Users unknown to the feature store get popular items of their interest layer (or of
        everyone): ``cold_start=true``. If the feature store fails, the answer is a cold
        start with ``degraded=true`` and a ``degraded_reason``; answers from features older
        than the freshness bound carry ``stale_features=true``. The ``Server-Timing`` response
        header says how long the feature read (``feast``) and the scoring (``score``) took.
        """
        if not self._load_model():
            return self._unavailable(ctx)
        with _server_side():
            responses, timing = self._answer([request], "/recommend")
        timing.send(ctx)
        return responses[0]

    @bentoml.api(route="/recommend/batch", output_spec=BatchResponse)
    def recommend_batch(self, batch: BatchRequest, /, ctx: bentoml.Context = None) -> BatchResponse | JSONResponse:  # type: ignore[assignment]
        """Several users at once: one feature read, one forward pass; responses in request order.

        The ``Server-Timing`` header (``feast``, ``score``) covers the whole batch.
        """
        if not self._load_model():
            return self._unavailable(ctx)
        with _server_side():
            responses, timing = self._answer(batch.requests, "/recommend/batch")
            answer = BatchResponse(responses=responses)
        timing.send(ctx)
        return answer

    @bentoml.api(
        route=ADAPTIVE_ROUTE,
        batchable=True,
        max_batch_size=ADAPTIVE_MAX_BATCH,
        max_latency_ms=ADAPTIVE_MAX_LATENCY_MS,
    )
    def recommend_adaptive(self, requests: AdaptiveRequests, /) -> list[RecommendResponse]:
        """``/recommend`` with adaptive batching: the body is a JSON list of requests, the answer a list of responses.

        BentoML queues concurrent calls and answers them together (up to
        :data:`ADAPTIVE_MAX_BATCH` requests, waiting at most :data:`ADAPTIVE_MAX_LATENCY_MS` ms),
        as ``/recommend/batch`` would: one feature read, one forward pass. Each caller gets
        the answers to its own list (at most :data:`ADAPTIVE_MAX_BATCH` requests), in its order.
        Without a loaded model, or when BentoML sheds load past the latency bound, the answer is 503.
        No ``Server-Timing`` header: one batch serves several callers.
        """
        if not self._load_model():
            # A batched call cannot return a per-caller response: every caller gets BentoML's 503.
            raise ServiceUnavailable(f"model {self.model_tag} is not loaded: {self.model_error}")
        with _server_side():
            responses, _ = self._answer(requests, ADAPTIVE_ROUTE)
        return responses

    @bentoml.api(route="/similar-items", output_spec=SimilarItemsResponse)
    def similar_items(self, request: SimilarItemsRequest, /) -> SimilarItemsResponse | JSONResponse:
        """Items nearest to ``item_id`` in the learned item embedding space; 404 for an unknown item."""
        if not self._load_model():
            return self._model_unavailable()
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
        if self.request_log is not None:
            self.request_log.close()


RecommenderService.add_asgi_middleware(RequestGuard, max_body_bytes=MAX_BODY_BYTES)
