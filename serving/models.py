"""Request and response models of the recommender service.

Wire names of shared columns come from :mod:`stratarec.schema` (as field aliases), so the
HTTP contract, Feast and monitoring can never disagree about ``user_id`` or ``item_id``.

Inputs are strict: ``"1"``, ``1.5`` and ``true`` are not ids, unknown keys are rejected,
and every error BentoML returns names the offending field in ``detail[].loc``.
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


class BatchRequest(_Request):
    """Several recommendation requests answered with one feature read and one forward pass."""

    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH)


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
    """Reachability of the online feature store."""

    reachable: bool
    source: str = Field(description="Which feature source the service reads, e.g. 'feast:/path/to/feature_repo'.")
    feature_service: str = FEATURE_SERVICE
    error: str = ""
    latency_ms: float | None = None


class ServiceStatus(_Response):
    """What ``/readyz`` decides from, in detail."""

    ready: bool
    model_loaded: bool
    model_tag: str
    n_items: int
    n_layers: int
    feature_store: FeatureStoreStatus
    requests_served: int
    requests_degraded: int
