"""Drift detection with Evidently 0.7: data drift on the event frame, prediction drift on served layers.

Stat tests are pinned rather than left to Evidently's auto-selection. Auto-selection switches
from p-value tests (KS, chi-squared: drift when the score is *below* the threshold) to
distances (Wasserstein, Jensen-Shannon: drift when the score is *at or above* it) once the
reference has more than 1000 rows, so one ``stattest_threshold`` would mean opposite things
for a small test window and a production window. Distances also do not flag every negligible
shift the way p-values do on windows of 100k events. ``MonitorConfig.stattest_threshold`` is
therefore a distance: normed Wasserstein (in reference standard deviations) for numerical
columns, Jensen-Shannon distance for categorical ones.

Results are read from the snapshot's dict by metric type and column name, never by position.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, Field

from stratarec.atomic import write_atomic as _atomic_write
from stratarec.config import MonitorConfig
from stratarec.monitoring.frames import MONITORED_COLUMNS, PREDICTION_COLUMNS, ColumnSet
from stratarec.schema import LAYER_COARSE, SERVED_LAYER

logger = logging.getLogger(__name__)

NUM_METHOD = "wasserstein"  # normed by the reference std, so one threshold fits every numeric column
CAT_METHOD = "jensenshannon"  # bounded in [0, 1], defined when a category is missing from one window

_VALUE_DRIFT = "ValueDrift"
_DRIFTED_COLUMNS_COUNT = "DriftedColumnsCount"
_FAILED = "FAIL"


class DriftResult(BaseModel):
    """Outcome of one drift check; every per-column value is keyed by column name.

    Attributes:
        drift_detected: ``dataset_drift`` or ``prediction_drift``.
        dataset_drift: ``drifted_share >= MonitorConfig.drift_share`` on the event frame.
        drifted_share: Share of monitored event columns that drifted.
        n_drifted: Number of monitored event columns that drifted.
        n_columns: Number of monitored event columns compared.
        column_drift: Drift score (a distance, see module docstring) per event column.
        drifted_columns: Event columns whose score reached the threshold, sorted by name.
        threshold: The per-column distance threshold used.
        layer_share_reference: Share of reference events per user layer ("unknown" included).
        layer_share_current: Share of current events per user layer.
        prediction_drift: Whether ``served_layer`` drifted; ``None`` without prediction frames.
        prediction_column_drift: Drift score per prediction column.
        served_layer_share_reference: Share of reference requests per served layer ("-1" is cold).
        served_layer_share_current: Share of current requests per served layer.
        metrics: Flat, name-keyed numbers for pipeline metric logging.
        report_html: Path of the Evidently HTML report of the event frame.
        prediction_report_html: Path of the Evidently HTML report of the prediction frames.
        report_png: Path of the summary PNG (drift scores and layer shares).

    """

    drift_detected: bool
    dataset_drift: bool
    drifted_share: float
    n_drifted: int
    n_columns: int
    column_drift: dict[str, float]
    drifted_columns: list[str]
    threshold: float
    layer_share_reference: dict[str, float] = Field(default_factory=dict)
    layer_share_current: dict[str, float] = Field(default_factory=dict)
    prediction_drift: bool | None = None
    prediction_column_drift: dict[str, float] = Field(default_factory=dict)
    served_layer_share_reference: dict[str, float] = Field(default_factory=dict)
    served_layer_share_current: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float]
    report_html: str
    prediction_report_html: str | None = None
    report_png: str


@dataclass(frozen=True)
class _DriftRun:
    """What one Evidently drift report said, already keyed by column."""

    html: str
    scores: dict[str, float]
    drifted: list[str]
    n_drifted: int
    share: float


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    cfg: MonitorConfig,
    report_path: Path,
    *,
    reference_predictions: pd.DataFrame | None = None,
    current_predictions: pd.DataFrame | None = None,
) -> DriftResult:
    """Compare a current window with a reference window and write the reports.

    Args:
        reference: Event frame of the reference window (:func:`~stratarec.monitoring.frames.build_event_frame`).
        current: Event frame of the current window, built with the reference's popularity.
        cfg: ``drift_share`` (share of drifted columns that means dataset drift) and
            ``stattest_threshold`` (per-column distance threshold).
        report_path: Where the Evidently HTML goes. The PNG summary is written next to it with
            a ``.png`` suffix, and the prediction report as ``<stem>.predictions.html``.
        reference_predictions: Prediction frame of the reference window
            (:func:`~stratarec.monitoring.frames.build_prediction_frame`); pass both or neither.
        current_predictions: Prediction frame of the current window.

    Returns:
        The drift result; ``metrics`` holds every number by name.

    Raises:
        ValueError: If a frame is empty, the frames disagree on their monitored columns, or only
            one prediction frame is given.

    """
    started = time.perf_counter()
    if (reference_predictions is None) != (current_predictions is None):
        raise ValueError("pass both reference_predictions and current_predictions, or neither")
    # Validate every input before the (slow) reports run, and write files only after both ran,
    # so a bad prediction frame never leaves a fresh data report beside a stale prediction one.
    columns = _common_columns(reference, current, MONITORED_COLUMNS, what="event")
    pred_columns: ColumnSet | None = None
    if reference_predictions is not None and current_predictions is not None:
        pred_columns = _common_columns(reference_predictions, current_predictions, PREDICTION_COLUMNS, what="prediction")
        if SERVED_LAYER not in pred_columns.all:
            raise ValueError(f"prediction frames need a {SERVED_LAYER!r} column")

    data = _run_drift_report(reference, current, columns, cfg)
    dataset_drift = data.share >= cfg.drift_share
    layer_ref = _shares(reference, LAYER_COARSE)
    layer_cur = _shares(current, LAYER_COARSE)

    preds: _DriftRun | None = None
    prediction_drift: bool | None = None
    served_ref: dict[str, float] = {}
    served_cur: dict[str, float] = {}
    if pred_columns is not None and reference_predictions is not None and current_predictions is not None:
        preds = _run_drift_report(reference_predictions, current_predictions, pred_columns, cfg)
        # Only the served-layer mix decides: it is the model's own output. Popularity rank and
        # list length are in the report for diagnosis, but they move with catalogue and traffic.
        prediction_drift = SERVED_LAYER in preds.drifted
        served_ref = _shares(reference_predictions, SERVED_LAYER)
        served_cur = _shares(current_predictions, SERVED_LAYER)
    drift_detected = dataset_drift or bool(prediction_drift)

    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(report_path, lambda tmp: tmp.write_text(data.html, encoding="utf-8"))
    prediction_html: Path | None = None
    if preds is not None:
        prediction_html = report_path.with_name(f"{report_path.stem}.predictions{report_path.suffix or '.html'}")
        _atomic_write(prediction_html, lambda tmp: tmp.write_text(preds.html, encoding="utf-8"))

    png_path = report_path.with_suffix(".png")
    _write_summary_png(
        png_path,
        scores=data.scores,
        drifted=set(data.drifted),
        threshold=cfg.stattest_threshold,
        layer_shares=(layer_ref, layer_cur),
        served_shares=(served_ref, served_cur),
    )

    metrics: dict[str, float] = {
        "dataset_drift": float(dataset_drift),
        "drift_detected": float(drift_detected),
        "drifted_share": data.share,
        "n_drifted_columns": float(data.n_drifted),
        "n_columns": float(len(columns.all)),
        "reference_rows": float(len(reference)),
        "current_rows": float(len(current)),
    }
    metrics.update({f"drift_score.{name}": score for name, score in data.scores.items()})
    if layer_ref or layer_cur:
        metrics["layer_share_tvd"] = _total_variation(layer_ref, layer_cur)
    prediction_scores = preds.scores if preds is not None else {}
    if prediction_drift is not None:
        metrics["prediction_drift"] = float(prediction_drift)
        metrics["served_layer_share_tvd"] = _total_variation(served_ref, served_cur)
        metrics.update({f"prediction_drift_score.{name}": score for name, score in prediction_scores.items()})
    metrics["seconds"] = time.perf_counter() - started

    result = DriftResult(
        drift_detected=drift_detected,
        dataset_drift=dataset_drift,
        drifted_share=data.share,
        n_drifted=data.n_drifted,
        n_columns=len(columns.all),
        column_drift=data.scores,
        drifted_columns=data.drifted,
        threshold=cfg.stattest_threshold,
        layer_share_reference=layer_ref,
        layer_share_current=layer_cur,
        prediction_drift=prediction_drift,
        prediction_column_drift=prediction_scores,
        served_layer_share_reference=served_ref,
        served_layer_share_current=served_cur,
        metrics=metrics,
        report_html=str(report_path),
        prediction_report_html=None if prediction_html is None else str(prediction_html),
        report_png=str(png_path),
    )
    logger.info(
        "drift: %d/%d columns drifted (%s), prediction drift %s, %.1fs",
        data.n_drifted,
        len(columns.all),
        ", ".join(data.drifted) or "none",
        prediction_drift,
        metrics["seconds"],
    )
    return result


def _common_columns(reference: pd.DataFrame, current: pd.DataFrame, declared: ColumnSet, *, what: str) -> ColumnSet:
    """Return the declared columns both frames carry; a column in only one of them is a caller bug."""
    if reference.empty or current.empty:
        raise ValueError(f"{what} frames must not be empty (reference={len(reference)}, current={len(current)})")
    ref_cols, cur_cols = declared.present_in(reference), declared.present_in(current)
    if ref_cols != cur_cols:
        only = sorted(set(ref_cols.all) ^ set(cur_cols.all))
        raise ValueError(f"{what} frames disagree on monitored columns: {only} present in only one")
    # Evidently drops missing values and then fails on an empty column; an all-missing column
    # (e.g. no request carried items to rank) has nothing to compare, so it is skipped, loudly.
    empty = {c for c in ref_cols.all if reference[c].isna().all() or current[c].isna().all()}
    if empty:
        logger.warning("skipping %s columns with no values in one window: %s", what, sorted(empty))
    kept = ColumnSet(
        numerical=tuple(c for c in ref_cols.numerical if c not in empty),
        categorical=tuple(c for c in ref_cols.categorical if c not in empty),
    )
    if not kept.all:
        raise ValueError(f"{what} frames have none of the monitored columns {list(declared.all)} with values")
    return kept


def _run_drift_report(reference: pd.DataFrame, current: pd.DataFrame, columns: ColumnSet, cfg: MonitorConfig) -> _DriftRun:
    """Run Evidently's drift preset on ``columns`` and read its results by metric type and column."""
    definition = DataDefinition(numerical_columns=list(columns.numerical), categorical_columns=list(columns.categorical))
    names = list(columns.all)
    report = Report(
        [
            DataDriftPreset(
                columns=names,
                drift_share=cfg.drift_share,
                num_method=NUM_METHOD,
                cat_method=CAT_METHOD,
                threshold=cfg.stattest_threshold,
            )
        ],
        # The per-column tests carry Evidently's own drifted/not verdict, so we never re-derive
        # "score >= threshold" (whose direction depends on the method) ourselves.
        include_tests=True,
    )
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # A constant column (e.g. every list has k items) makes Evidently's correlation widget
        # divide by a zero std; the drift score itself is well defined (0).
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(current[names], data_definition=definition),
            Dataset.from_pandas(reference[names], data_definition=definition),
        )
        html = snapshot.get_html_str(as_iframe=False)
    return _parse_snapshot(snapshot.dict(), names, html)


def _parse_snapshot(snapshot: dict[str, Any], names: list[str], html: str) -> _DriftRun:
    """Key the snapshot dict's metrics and tests by type and column name."""
    scores: dict[str, float] = {}
    count: dict[str, float] | None = None
    for metric in snapshot["metrics"]:
        config = metric.get("config", {})
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == _VALUE_DRIFT:
            scores[config["column"]] = float(metric["value"])
        elif kind == _DRIFTED_COLUMNS_COUNT:
            count = metric["value"]
    missing = [name for name in names if name not in scores]
    if count is None or missing:
        raise RuntimeError(
            f"Evidently snapshot lacks expected results (DriftedColumnsCount found: {count is not None}, "
            f"ValueDrift missing for {missing}); has its result format changed?"
        )

    drifted = sorted(
        test["metric_config"]["params"]["column"]
        for test in snapshot["tests"]
        if str(test["metric_config"]["params"].get("type", "")).endswith(_VALUE_DRIFT) and test["status"] == _FAILED
    )
    n_drifted, share = int(round(count["count"])), float(count["share"])
    if n_drifted != len(drifted):
        logger.warning("Evidently counts %d drifted columns but %d column tests failed: %s", n_drifted, len(drifted), drifted)
    return _DriftRun(html=html, scores={name: scores[name] for name in names}, drifted=drifted, n_drifted=n_drifted, share=share)


def _shares(frame: pd.DataFrame, column: str) -> dict[str, float]:
    """Share of rows per value of ``column`` (empty when the frame lacks it), ordered by value."""
    if column not in frame.columns:
        return {}
    shares = frame[column].astype(str).value_counts(normalize=True)
    return {str(k): float(v) for k, v in sorted(shares.items(), key=lambda kv: _layer_sort_key(kv[0]))}


def _layer_sort_key(label: str) -> tuple[int, float, str]:
    """Numeric layers first in numeric order ("-1", "0", "2", "10"), then other labels."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def _total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance between two share dicts: the share of mass that moved layer."""
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def _write_summary_png(
    path: Path,
    *,
    scores: dict[str, float],
    drifted: set[str],
    threshold: float,
    layer_shares: tuple[dict[str, float], dict[str, float]],
    served_shares: tuple[dict[str, float], dict[str, float]],
) -> None:
    """Bar charts of per-column drift scores and of layer shares, reference vs current."""
    share_panels = [
        (title, pair)
        for title, pair in (
            ("user layer share of events", layer_shares),
            ("served layer share of requests", served_shares),
        )
        if pair[0] or pair[1]
    ]
    # A Figure on an explicit Agg canvas, not pyplot: no global backend switch, so calling this
    # from a notebook or a GUI process leaves its backend alone.
    fig = Figure(figsize=(5.0 * (1 + len(share_panels)), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(share_panels), squeeze=False)[0]

    names = list(scores)
    ax = axes[0]
    ax.barh(names, [scores[n] for n in names], color=["tab:red" if n in drifted else "tab:blue" for n in names])
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.invert_yaxis()
    ax.set_xlabel("drift score (normed Wasserstein / Jensen-Shannon)")
    ax.set_title("per-column drift (red = drifted)")
    ax.legend(loc="lower right")

    for ax, (title, (ref, cur)) in zip(axes[1:], share_panels, strict=True):
        labels = sorted(set(ref) | set(cur), key=_layer_sort_key)
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [ref.get(k, 0.0) for k in labels], width=0.4, label="reference")
        ax.bar(x + 0.2, [cur.get(k, 0.0) for k in labels], width=0.4, label="current")
        ax.set_xticks(x, labels)
        ax.set_ylabel("share")
        ax.set_title(title)
        ax.legend()

    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
