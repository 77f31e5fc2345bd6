"""Column and feature names: the single source for ingest, Feast, training, serving and monitoring.

Every module that touches a column imports its name from here, so renaming a column is a
one-line change and Feast, the BentoML request model and Evidently's data definition
can never disagree about it.
"""

from __future__ import annotations

# Canonical event table (one row per interaction).
USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
EVENT_TIMESTAMP = "event_timestamp"
EVENT_COLUMNS: tuple[str, ...] = (USER_ID, ITEM_ID, RATING, EVENT_TIMESTAMP)

# Canonical item table (one row per item).
TITLE = "title"
GENRES = "genres"  # pipe-separated genre names, e.g. "Action|Comedy"
RELEASE_YEAR = "release_year"
ITEM_COLUMNS: tuple[str, ...] = (ITEM_ID, TITLE, GENRES, RELEASE_YEAR)
GENRE_SEPARATOR = "|"

# Feast: entities and bookkeeping columns.
USER_ENTITY = "user"
ITEM_ENTITY = "item"
CREATED_TIMESTAMP = "created_timestamp"

# Feast feature views and their features.
USER_ACTIVITY_VIEW = "user_activity"
USER_EVENT_COUNT = "event_count"
USER_LAST_EVENT_TS = "last_event_ts"  # epoch seconds; recency is computed against "now" at read time
USER_MEAN_GAP_DAYS = "mean_gap_days"
USER_GENRE_MIX = "genre_mix"  # share of the user's events per genre, ordered as ItemCatalog.genres
USER_RECENT_ITEMS = "recent_items"  # last-N item ids, oldest first
USER_ACTIVITY_FEATURES: tuple[str, ...] = (
    USER_EVENT_COUNT,
    USER_LAST_EVENT_TS,
    USER_MEAN_GAP_DAYS,
    USER_GENRE_MIX,
    USER_RECENT_ITEMS,
)

USER_LAYER_VIEW = "user_interest_layer"
LAYER_COARSE = "layer_coarse"
LAYER_FINE = "layer_fine"
LAYER_NAME = "layer_name"
USER_LAYER_FEATURES: tuple[str, ...] = (LAYER_COARSE, LAYER_FINE, LAYER_NAME)

ITEM_CATALOG_VIEW = "item_catalog"
ITEM_POPULARITY = "popularity"
ITEM_TEXT_EMBEDDING = "text_embedding"
ITEM_CATALOG_FEATURES: tuple[str, ...] = (TITLE, GENRES, RELEASE_YEAR, ITEM_POPULARITY, ITEM_TEXT_EMBEDDING)

FEATURE_SERVICE = "recommender_v1"

# Monitoring: the served-request log and the drift report's columns.
SERVED_AT = "served_at"
RECOMMENDED_ITEMS = "recommended_items"
SERVED_LAYER = "served_layer"
LATENCY_MS = "latency_ms"
DEGRADED = "degraded"


def feature_ref(view: str, feature: str) -> str:
    """Return the Feast feature reference ``view:feature``."""
    return f"{view}:{feature}"
