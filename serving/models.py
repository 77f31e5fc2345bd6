"""Request and response models of the recommender service.

Wire names of shared columns come from :mod:`stratarec.schema` (as field aliases), so the
HTTP contract, Feast and monitoring can never disagree about ``user_id`` or ``item_id``.

Inputs are strict: ``"1"``, ``1.5`` and ``true`` are not ids, unknown keys are rejected,
and every error BentoML returns names the offending field in ``detail[].loc``. Errors about
the body as a whole (size, media type, malformed JSON) come from the service's request
guard in the same shape, with ``loc`` ``["body"]``, ``["headers", "content-type"]`` or the
field the parser stopped in.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from stratarec.config import ServingConfig
from stratarec.schema import FEATURE_SERVICE, ITEM_ID, LAYER_NAME, TITLE, USER_ID

_SERVING = ServingConfig()
DEFAULT_K = _SERVING.default_k
MAX_K = _SERVING.max_k
MAX_EXCLUDE = 1000
MAX_BATCH = 256
# The largest valid body is a full batch with full exclude lists: 256 x 1000 ids of up to 19
# digits, about 5 MB. Anything larger is refused before it is read (413).
MAX_BODY_BYTES = 8 * 1024 * 1024
# Ids travel to Feast and NumPy as int64: a larger JSON integer must be a 400, not an overflow.
INT64_MAX = 2**63 - 1

Id = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K, description=f"Number of items to return, 1..{MAX_K}.")]


class _Request(BaseModel):
    # validate_by_name lets Python callers use attribute names; on the wire they are the same
    # strings today, and the alias keeps them tied to stratarec.schema if that ever changes.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


class _Response(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)


class RecommendRequest(_Request):
    """Next-item recommendations for one user."""

    user_id: Id = Field(alias=USER_ID, description="The user; unknown users get cold-start recommendations.")
    k: K = DEFAULT_K
    exclude: list[Id] = Field(
        default_factory=list, max_length=MAX_EXCLUDE, description="Item ids never to return (besides the user's own history)."
    )
    diversify: StrictBool = Field(False, description="Take items round-robin across interest layers.")
    discovery: StrictInt = Field(
        0,
        ge=0,
        le=MAX_K,
        description="How many of the k places, at the end, go to the best-scored new or rarely rated items "
        "(at most ServingConfig.discovery_max_events training events); a value above k gives all k places to them. "
        "Cold-start answers have none.",
    )


class BatchRequest(_Request):
    """Several recommendation requests answered with one feature read and one forward pass."""

    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH)


# POST /recommend/adaptive (adaptive batching): BentoML answers up to ADAPTIVE_MAX_BATCH queued
# requests together. Its body is a JSON list of requests (a batchable API takes one list argument,
# which BentoML concatenates across concurrent callers and splits back), at most one batch long:
# BentoML would split a longer list and may refuse (503) the part that waits past the latency
# bound. Larger lists belong to POST /recommend/batch.
ADAPTIVE_MAX_BATCH = 32
AdaptiveRequests = Annotated[list[RecommendRequest], Field(min_length=1, max_length=ADAPTIVE_MAX_BATCH)]


class SimilarItemsRequest(_Request):
    """Items closest to one item in the model's learned embedding space."""

    item_id: Id = Field(alias=ITEM_ID)
    k: K = DEFAULT_K


class RecommendedItem(_Response):
    """One recommended item and why it was chosen."""

    item_id: int = Field(alias=ITEM_ID)
    title: str = Field(alias=TITLE)
    score: float = Field(description="Model score (popularity-based for cold start); comparable within one response only.")
    layer: int = Field(description="Coarse interest layer the item serves best (-1 when the model has no layers).")
    layer_name: str = Field(alias=LAYER_NAME)
    reason: str


class RecommendResponse(_Response):
    """Recommendations for one user."""

    user_id: int = Field(alias=USER_ID)
    items: list[RecommendedItem]
    degraded: bool = Field(description="The feature store could not be read; the answer is a cold start.")
    degraded_reason: str | None = Field(None, description="Why the answer is degraded, e.g. 'feature read timed out after 50 ms'.")
    stale_features: bool = Field(
        False,
        description=(
            "The answer used online features whose materialization watermark is older than the service's freshness bound "
            "(or unknown); see POST /status."
        ),
    )
    feature_watermark: str | None = Field(
        None, description="End of the newest materialization of the user activity features (ISO 8601, UTC), when known."
    )
    cold_start: bool = Field(description="No usable history: popular items of the user's layer, else of all users.")
    layer: int | None = Field(description="The user's coarse interest layer, when known.")
    layer_name: str | None = Field(alias=LAYER_NAME)
    model_tag: str


class BatchResponse(_Response):
    """One response per request, in request order."""

    responses: list[RecommendResponse]


class SimilarItemsResponse(_Response):
    """Items similar to the one asked about."""

    item_id: int = Field(alias=ITEM_ID)
    items: list[RecommendedItem]
    model_tag: str


class FeatureStoreStatus(_Response):
    """Reachability and freshness of the online feature store."""

    reachable: bool
    source: str = Field(description="Which feature source the service reads, e.g. 'feast:/path/to/feature_repo'.")
    feature_service: str = FEATURE_SERVICE
    error: str = ""
    latency_ms: float | None = None
    watermark: str | None = Field(
        None,
        description="Newest materialization end time of the user activity view in the Feast registry (ISO 8601, UTC); null if never.",
    )
    age_hours: float | None = Field(None, description="Wall-clock now minus the watermark, in hours.")
    freshness_bound_hours: float = Field(description="Features older than this are stale (FeatureConfig.freshness_hours).")
    stale: bool = Field(description="The watermark is older than the bound, or unknown.")
    freshness_error: str = Field("", description="Why the watermark could not be read, if it could not.")


class RequestLogStatus(_Response):
    """The served-request log's writer: what it wrote and what it had to drop."""

    enabled: bool
    directory: str | None = None
    written: int = 0
    dropped: int = Field(0, description="Rows dropped because the writer's queue was full (the response was never delayed).")
    failed: int = Field(0, description="Rows lost to write errors (e.g. a full disk).")
    queued: int = 0
    files_rotated: int = 0


class StateCacheStatus(_Response):
    """The user-state cache: transformer passes saved by answering a repeated history from memory."""

    entries: int
    capacity: int
    hits: int
    misses: int


class ServiceStatus(_Response):
    """What ``/readyz`` decides from, in detail."""

    ready: bool
    not_ready_reasons: list[str] = Field(
        default_factory=list,
        description=(
            "Why the service is not ready, one line per cause, e.g. "
            "'features stale: watermark 1998-04-22T23:10:38Z is 250000 h old, bound 24 h'."
        ),
    )
    model_loaded: bool
    model_error: str = Field("", description="Why the model could not be loaded (the service retries by itself).")
    model_tag: str
    n_items: int
    n_layers: int
    feature_store: FeatureStoreStatus | None = Field(description="Null while no model is loaded: the model's config names the store.")
    requests_served: int
    requests_degraded: int
    requests_stale: int = Field(0, description="Requests answered from stale features.")
    request_log: RequestLogStatus
    state_cache: StateCacheStatus | None = Field(None, description="Null when ServingConfig.state_cache_size is 0.")


class ErrorDetail(_Response):
    """One problem with a request, in the shape of pydantic's (and BentoML's) validation errors."""

    type: str
    loc: list[str | int] = Field(description="Where the problem is: a field path, or 'body' / 'headers' for the request as a whole.")
    msg: str


class ErrorResponse(_Response):
    """A 4xx/503 answer: a one-line summary and the problems it is made of."""

    error: str
    detail: list[ErrorDetail] | str = Field(description="The problems, or the name of the field that is wrong.")


class ServerArguments(BaseModel):
    """Options of one server process, given as ``bentoml serve <bento> --arg key=value``.

    They size and instrument the process; what the model answers is the model's own config.
    """

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes. One per CPU the pod may use; a sync API shares one GIL per process, "
        "so one process cannot use a second core for scoring.",
    )
    access_log: bool = Field(
        False,
        description="BentoML's per-request access log line. Off by default: the service's own request log "
        "already records every answer (with features and latency) without blocking the response.",
    )
    metrics: bool = Field(True, description="Prometheus metrics at /metrics.")
