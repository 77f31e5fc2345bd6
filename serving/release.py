"""Release a promoted candidate: registry copy, Feast layers, BentoML model store, Bento, production record.

Order matters for safety: everything that can fail (copy, Feast write, model store, Bento
build) happens before the production record is replaced, and that replacement is one atomic
rename. A crash part-way leaves the previous production model in charge.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from stratarec.bundle import load_layers
from stratarec.config import StrataConfig
from stratarec.registry import ProductionRecord, copy_bundle_atomic, promote, read_production, utc_now
from stratarec.schema import CREATED_TIMESTAMP, EVENT_TIMESTAMP, LAYER_COARSE, LAYER_FINE, LAYER_NAME, USER_ID

log = logging.getLogger(__name__)


def layer_feature_rows(bundle_dir: Path, as_of: pd.Timestamp) -> pd.DataFrame:
    """The bundle's user layers as rows of the ``user_interest_layer`` feature view."""
    layers = load_layers(bundle_dir)
    if layers is None:
        raise ValueError(f"{bundle_dir} has no layers: the layer stage must run before packaging")
    rows = layers.assignments[[USER_ID, LAYER_COARSE, LAYER_FINE, LAYER_NAME]].copy()
    rows[EVENT_TIMESTAMP] = as_of
    rows[CREATED_TIMESTAMP] = as_of
    return rows


def release_candidate(bundle_dir: Path, cfg: StrataConfig, reason: str = "") -> dict:
    """Make the candidate the production model and build the Bento that serves it.

    Returns:
        model_id, model_tag, bento_tag and where the production copy lives.
    """
    from stratarec.feature_repo.pipeline_io import feature_repo_dir
    from stratarec.feature_repo.store import publish_user_layers
    from stratarec.serving.package import build_bento, save_to_model_store

    workspace = cfg.workspace_path
    model_id = cfg.run_id or f"model-{utc_now().replace(':', '').replace('-', '')}"
    prod_dir = copy_bundle_atomic(Path(bundle_dir), workspace, model_id)
    now = pd.Timestamp.now(tz="UTC")
    publish_user_layers(feature_repo_dir(cfg), cfg.features, layer_feature_rows(prod_dir, now))
    previous = read_production(workspace)
    labels = {"stage": "production", "run_id": cfg.run_id or "", "feature_service": "recommender_v1"}
    metadata = {"promoted_at": now.isoformat(), "reason": reason, "previous": previous.model_id if previous else ""}
    model_tag = save_to_model_store(prod_dir, cfg, labels, metadata)
    bento_tag = build_bento(cfg, model_tag) if cfg.serving.build_bento else ""
    metrics_path = prod_dir / "metrics.json"
    overall = json.loads(metrics_path.read_text())["candidate"]["overall"] if metrics_path.exists() else {}
    record = ProductionRecord(
        model_id=model_id,
        model_dir=str(prod_dir),
        model_tag=model_tag,
        bento_tag=bento_tag,
        run_id=cfg.run_id,
        promoted_at=now.isoformat(),
        metrics={k: float(v) for k, v in overall.items()},
        reason=reason,
    )
    promote(record, workspace)
    log.info("promoted %s (model %s, bento %s)", model_id, model_tag, bento_tag)
    return {
        "model_id": model_id,
        "model_tag": model_tag,
        "bento_tag": bento_tag,
        "model_dir": str(prod_dir),
        "previous": metadata["previous"],
    }
