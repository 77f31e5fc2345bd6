"""The retrain policy: turn a drift result into a yes/no with a reason a human can read in the run log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel

from stratarec.schema import LAYER_COARSE

if TYPE_CHECKING:
    # Type-only: the policy reads plain attributes, so a light trigger step can import it
    # without paying for Evidently's import (several seconds).
    from stratarec.monitoring.drift import DriftResult

DEFAULT_MIN_HOURS_BETWEEN = 24.0


class RetrainDecision(BaseModel):
    """Whether to retrain, why, and how.

    Attributes:
        retrain: Start a training run.
        reason: One line naming the drifted columns (or why nothing happens).
        warm_start: Fine-tune the production model instead of training from scratch.

    """

    retrain: bool
    reason: str
    warm_start: bool


def decide_retrain(
    result: DriftResult,
    *,
    last_trained_at: datetime | None = None,
    min_hours_between: float = DEFAULT_MIN_HOURS_BETWEEN,
    now: datetime | None = None,
) -> RetrainDecision:
    """Retrain when drift was detected and the last training is at least ``min_hours_between`` old.

    Warm start is chosen when a previous model exists and the interest-layer mix held still
    (neither the user-layer column nor the served-layer mix drifted): the old model's layers
    still describe the users, so fine-tuning on new events is enough. When the layer mix
    moved, the layers themselves are stale and a full retrain rebuilds them.

    Args:
        result: Output of :func:`~stratarec.monitoring.drift.detect_drift`.
        last_trained_at: When the production model was trained; ``None`` if there is none.
            A naive datetime is taken as UTC.
        min_hours_between: Cool-down between trainings, so a drift that persists over several
            scheduled checks triggers one run rather than one per check.
        now: The current time (for tests); defaults to the wall clock, UTC.

    Returns:
        The decision.

    """
    if min_hours_between < 0:
        raise ValueError(f"min_hours_between must be >= 0, got {min_hours_between}")
    what = _describe(result)
    if not result.drift_detected:
        return RetrainDecision(retrain=False, reason=f"no drift: {what}", warm_start=False)

    if last_trained_at is not None:
        hours = (_utc(now or datetime.now(UTC)) - _utc(last_trained_at)).total_seconds() / 3600.0
        if hours < min_hours_between:
            return RetrainDecision(
                retrain=False,
                reason=f"drift ({what}) but last trained {hours:.1f} h ago (< {min_hours_between:g} h)",
                warm_start=False,
            )

    layers_moved = LAYER_COARSE in result.drifted_columns or bool(result.prediction_drift)
    warm_start = last_trained_at is not None and not layers_moved
    how = (
        "warm start: layer mix stable"
        if warm_start
        else ("full retrain: no previous model" if last_trained_at is None else "full retrain: layer mix moved")
    )
    return RetrainDecision(retrain=True, reason=f"drift ({what}); {how}", warm_start=warm_start)


def _describe(result: DriftResult) -> str:
    """E.g. ``rating=0.31, primary_genre=0.22 drifted (2/6 columns, share 0.33); served_layer drifted``."""
    if result.drifted_columns:
        named = ", ".join(f"{c}={result.column_drift.get(c, float('nan')):.3f}" for c in result.drifted_columns)
    else:
        named = "no column"
    text = f"{named} drifted ({result.n_drifted}/{result.n_columns} columns, share {result.drifted_share:.2f})"
    if result.prediction_drift is not None:
        text += "; served_layer drifted" if result.prediction_drift else "; served_layer stable"
    return text


def _utc(moment: datetime) -> datetime:
    """Aware UTC datetime; naive values are taken as UTC, which is what the pipeline records."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
