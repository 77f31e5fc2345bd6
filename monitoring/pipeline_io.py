"""The monitor stage: which windows to compare, with which layers and predictions.

Reference is the data the model was trained on: events up to the end of its recorded data
window. Current is everything after it. When nothing newer exists yet (a first run on a
static dump), the latest ``monitor.current_fraction`` of the timeline stands in for it, so
every run still produces a report against a baseline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from stratarec.bundle import LINEAGE_FILE, RecommenderBundle, load_layers
from stratarec.config import StrataConfig
from stratarec.monitoring.drift import DriftResult, detect_drift
from stratarec.monitoring.frames import build_event_frame, build_prediction_frame, split_windows
from stratarec.schema import EVENT_TIMESTAMP, ITEM_ID, RECOMMENDED_ITEMS, SERVED_AT, SERVED_LAYER, USER_ID

log = logging.getLogger(__name__)


def request_log_dir(cfg: StrataConfig) -> Path:
    """Where the service writes its served-request JSONL files."""
    return cfg.workspace_path / cfg.serving.request_log


def read_request_log(directory: Path) -> pd.DataFrame | None:
    """All served requests logged so far, or None when there are none."""
    files = sorted(Path(directory).glob("*.jsonl")) if Path(directory).exists() else []
    rows = []
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a crash must not stop monitoring
                    log.warning("skipping unreadable request-log line in %s", f)
    return pd.DataFrame(rows) if rows else None


def choose_windows(ordered_events: pd.DataFrame, bundle_dir: Path, current_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Reference = the model's training window; current = later events (or the latest fraction)."""
    lineage_path = Path(bundle_dir) / LINEAGE_FILE
    end = None
    if lineage_path.exists():
        end = json.loads(lineage_path.read_text()).get("data_window", {}).get("end")
    ts = pd.to_datetime(ordered_events[EVENT_TIMESTAMP], utc=True)
    if end:
        cut = pd.Timestamp(end)
        cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut
        newer = ts > cut
        if newer.any() and (~newer).any():
            return ordered_events[~newer], ordered_events[newer], f"training window (<= {cut}) vs newer events"
    ref, cur = split_windows(ordered_events, current_fraction)
    return ref, cur, f"earliest {1 - current_fraction:.0%} vs latest {current_fraction:.0%} of the timeline"


def reference_predictions(bundle_dir: Path, reference_events: pd.DataFrame, k: int) -> pd.DataFrame:
    """What the model serves the reference users: real top-k lists and each user's layer.

    This is the prediction baseline the served-request log is compared with.
    """
    bundle = RecommenderBundle(bundle_dir)
    hist = reference_events.groupby(USER_ID, sort=False)[ITEM_ID].apply(list)
    last_seen = reference_events.groupby(USER_ID, sort=False)[EVENT_TIMESTAMP].max()
    recs = bundle.recommend_batch(hist.tolist(), k)
    rows = []
    for user, rec in zip(hist.index, recs, strict=True):
        layer = bundle.layer_of_user(int(user))
        rows.append(
            {
                SERVED_AT: pd.Timestamp(last_seen[user]).isoformat(),
                USER_ID: int(user),
                RECOMMENDED_ITEMS: [r.item_id for r in rec],
                SERVED_LAYER: -1 if layer is None else layer,
            }
        )
    return pd.DataFrame(rows)


def monitor_windows(
    ordered_events: pd.DataFrame,
    items: pd.DataFrame,
    bundle_dir: Path,
    cfg: StrataConfig,
    report_path: Path,
    request_log: pd.DataFrame | None = None,
) -> DriftResult:
    """Build the monitoring frames for reference and current windows and run the drift check.

    Args:
        ordered_events: All validated events.
        items: The item table.
        bundle_dir: The model whose training window is the reference (its layers label users).
        cfg: Monitor thresholds.
        report_path: Evidently HTML output (a PNG summary is written beside it).
        request_log: Served requests (the service's log); compared with the layer mix the
            model assigns to reference users. None skips prediction drift.

    Returns:
        The drift result with metrics by name.
    """
    reference, current, how = choose_windows(ordered_events, bundle_dir, cfg.monitor.current_fraction)
    log.info("drift windows: %s (%d vs %d events)", how, len(reference), len(current))
    layers = load_layers(bundle_dir)
    user_layers = layers.assignments if layers is not None else None
    ref_frame = build_event_frame(reference, items, user_layers, reference_events=reference)
    cur_frame = build_event_frame(current, items, user_layers, reference_events=reference)
    ref_pred = cur_pred = None
    if request_log is not None and len(request_log):
        ref_pred = build_prediction_frame(reference_predictions(bundle_dir, reference, cfg.serving.default_k))
        cur_pred = build_prediction_frame(request_log)
    return detect_drift(ref_frame, cur_frame, cfg.monitor, Path(report_path), reference_predictions=ref_pred, current_predictions=cur_pred)


def monitor_from_config(cfg: StrataConfig, report_path: Path) -> DriftResult:
    """CLI entry: ingest the configured data, compare it with the production model's window."""
    from stratarec.data.ingest import load_raw_tables
    from stratarec.features import order_events
    from stratarec.registry import read_production

    record = read_production(cfg.workspace_path)
    if record is None:
        raise SystemExit(f"no production model in {cfg.workspace_path}/registry: run `stratarec run` first")
    events, items = load_raw_tables(cfg.data)
    return monitor_windows(order_events(events), items, Path(record.model_dir), cfg, report_path, read_request_log(request_log_dir(cfg)))
