"""The features stage: compute features, publish them to Feast, and build the point-in-time training set.

The training set is read back *from Feast* with ``get_historical_features``: for each user,
the ``recent_items`` sequence as of one microsecond before the validation event is the
training history, and the validation item is appended for the test input. Because event
order is made total (``order_events``), the cut-off can never include a held-out event.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stratarec.bundle import write_parquet_atomic
from stratarec.config import StrataConfig
from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
from stratarec.schema import EVENT_TIMESTAMP, FEATURE_SERVICE, ITEM_ID, USER_ID, USER_RECENT_ITEMS
from stratarec.sequences import TEST_ITEM, TRAIN_ITEMS, VAL_ITEM, leave_last_out_cutoffs
from stratarec.text_encoder import embed_texts, item_text

log = logging.getLogger(__name__)


def feature_repo_dir(cfg: StrataConfig) -> Path:
    """The Feast repository of this workspace."""
    return cfg.workspace_path / "feature_repo"


def training_set_from_store(store, ordered_events: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time training set: per user, the Feast sequence just before the validation event.

    Args:
        store: A Feast ``FeatureStore`` with the user features published.
        ordered_events: Events in total order (``order_events``).

    Returns:
        user_id, train_items (list of item ids), val_item, test_item (-1 when absent).
    """
    from stratarec.feature_repo.store import training_frame

    cut = leave_last_out_cutoffs(ordered_events)
    has_val = cut["val_ts"].notna()
    # Users too short for a held-out pair train on everything they did.
    last_ts = ordered_events.groupby(USER_ID)[EVENT_TIMESTAMP].max()
    entity = pd.DataFrame(
        {
            USER_ID: cut[USER_ID].astype(np.int64),
            EVENT_TIMESTAMP: np.where(has_val, cut["val_ts"] - pd.Timedelta(microseconds=1), cut[USER_ID].map(last_ts)),
        }
    )
    entity[EVENT_TIMESTAMP] = pd.to_datetime(entity[EVENT_TIMESTAMP], utc=True)
    frame = training_frame(store, entity)
    seqs = frame.set_index(USER_ID)[USER_RECENT_ITEMS]
    train_items = [list(seqs.get(u)) if isinstance(seqs.get(u), list | np.ndarray) else [] for u in cut[USER_ID]]
    return pd.DataFrame(
        {
            USER_ID: cut[USER_ID].astype(np.int64),
            TRAIN_ITEMS: [[int(i) for i in s] for s in train_items],
            VAL_ITEM: cut["val_item"].astype(np.int64),
            TEST_ITEM: cut["test_item"].astype(np.int64),
        }
    )


def publish_and_build_training_set(
    events: pd.DataFrame, items: pd.DataFrame, cfg: StrataConfig, ordered_path: str, catalog_path: str, training_set_path: str
) -> dict:
    """Compute and publish features, then write ordered events, the catalogue and the PIT training set.

    Returns:
        Summary: feature service, materialization watermark, data window, row counts, seconds,
        and ``materialization``: per view, the chunks run and the chunks skipped because an
        earlier, interrupted attempt had committed them (a KFP retry of this stage resumes).
    """
    from stratarec.feature_repo.store import open_store, publish_features

    ordered = order_events(events)
    genres = genre_vocabulary(items)
    log.info("computing user activity snapshots for %d events", len(ordered))
    activity = compute_user_activity(ordered, items, genres, cfg.features.recent_items_len)
    log.info("embedding %d item texts with %s", len(items), cfg.features.text_encoder)
    embeddings = embed_texts(item_text(items), encoder=cfg.features.text_encoder)
    as_of = ordered[EVENT_TIMESTAMP].min()
    catalog = compute_item_catalog(ordered, items, embeddings, as_of)
    repo = feature_repo_dir(cfg)
    published = publish_features(repo, cfg.features, activity, catalog)
    store = open_store(repo, cfg.features)
    training_set = training_set_from_store(store, ordered)
    write_parquet_atomic(ordered, Path(ordered_path))
    write_parquet_atomic(catalog, Path(catalog_path))
    write_parquet_atomic(training_set, Path(training_set_path))
    return {
        "feature_service": FEATURE_SERVICE,
        "watermark": str(published.get("watermark", ordered[EVENT_TIMESTAMP].max())),
        "data_start": str(ordered[EVENT_TIMESTAMP].min()),
        "data_end": str(ordered[EVENT_TIMESTAMP].max()),
        "users": int(ordered[USER_ID].nunique()),
        "items": int(catalog[ITEM_ID].nunique()),
        "activity_rows": len(activity),
        "training_users": len(training_set),
        "published": {k: v for k, v in published.items() if isinstance(v, int | float | str)},
        "repo": str(repo),
        "materialization": published.get("materialization", {}),
    }
