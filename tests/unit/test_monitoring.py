"""Monitoring: frame builders, Evidently drift detection, served-layer drift and the retrain policy.

The event frames come from a small seeded generator written here: users with a preferred
genre rate items over 120 days. Its drifted twin sends most late events (the last 20% of the
timeline) to one trending genre and lowers late ratings by a star, which is the kind of
interest shift the retrain trigger exists for.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stratarec.config import MonitorConfig
from stratarec.monitoring.drift import DriftResult, detect_drift
from stratarec.monitoring.frames import (
    HOUR_OF_DAY,
    ITEM_POPULARITY_PCT,
    MEAN_POPULARITY_RANK,
    MONITORED_COLUMNS,
    N_RECOMMENDED,
    PREDICTION_COLUMNS,
    PRIMARY_GENRE,
    UNKNOWN,
    USER_RECENT_EVENTS,
    build_event_frame,
    build_prediction_frame,
    item_popularity,
    split_windows,
)
from stratarec.monitoring.policy import decide_retrain
from stratarec.schema import (
    DEGRADED,
    EVENT_TIMESTAMP,
    GENRES,
    ITEM_ID,
    LATENCY_MS,
    LAYER_COARSE,
    LAYER_NAME,
    RATING,
    RECOMMENDED_ITEMS,
    RELEASE_YEAR,
    SERVED_AT,
    SERVED_LAYER,
    TITLE,
    USER_ID,
)

pytestmark = pytest.mark.unit

CFG = MonitorConfig()
START = pd.Timestamp("2024-01-01", tz="UTC")
N_GENRES = 6
N_LAYERS = 4


# --------------------------------------------------------------------------- synthetic data


def _items(n_items: int = 120) -> pd.DataFrame:
    genre = np.arange(n_items) % N_GENRES
    return pd.DataFrame(
        {
            ITEM_ID: pd.array(np.arange(1, n_items + 1), dtype="Int64"),
            TITLE: [f"item {i}" for i in range(1, n_items + 1)],
            # Every third item lists a second genre, so "primary" (the first) is exercised.
            GENRES: [f"G{g}" + (f"|G{(g + 1) % N_GENRES}" if i % 3 == 0 else "") for i, g in enumerate(genre)],
            RELEASE_YEAR: pd.array(1990 + np.arange(n_items) % 30, dtype="Int64"),
        }
    )


def _events(*, drifted: bool, seed: int = 0, n_users: int = 400, per_user: int = 50, days: float = 120.0):
    """(events, items, user_layers): ~n_users * per_user events, stationary unless ``drifted``."""
    rng = np.random.default_rng(seed)
    items = _items()
    pref = rng.integers(N_GENRES, size=n_users)
    user = np.repeat(np.arange(n_users), rng.poisson(per_user, n_users) + 3)
    n = len(user)
    t_days = rng.uniform(0.0, days, n)
    late = t_days >= 0.8 * days
    genre = np.where(rng.random(n) < 0.7, pref[user], rng.integers(N_GENRES, size=n))
    if drifted:
        genre = np.where(late & (rng.random(n) < 0.9), 0, genre)  # genre 0 trends late on
    per_genre = len(items) // N_GENRES
    within = np.minimum(rng.zipf(1.6, n) - 1, per_genre - 1)  # Zipf popularity inside a genre
    rating = np.where(genre == pref[user], 4.2, 3.0) + rng.normal(0.0, 0.7, n) - (1.0 * late if drifted else 0.0)
    events = pd.DataFrame(
        {
            USER_ID: pd.array(user + 1, dtype="Int64"),
            ITEM_ID: pd.array(within * N_GENRES + genre + 1, dtype="Int64"),
            RATING: np.clip(np.round(rating), 1.0, 5.0),
            EVENT_TIMESTAMP: START + pd.to_timedelta(t_days, unit="D"),
        }
    )
    events = events.sort_values(EVENT_TIMESTAMP, kind="stable").reset_index(drop=True)
    layers = pd.DataFrame(
        {
            USER_ID: pd.array(np.arange(1, n_users + 1), dtype="Int64"),
            LAYER_COARSE: pref % N_LAYERS,
            LAYER_NAME: [f"layer {p % N_LAYERS}" for p in pref],
        }
    )
    return events, items, layers[np.arange(n_users) % 20 != 0]  # 5% of users not layered yet


def _frames(events: pd.DataFrame, items: pd.DataFrame, layers: pd.DataFrame | None):
    reference, current = split_windows(events, CFG.current_fraction)
    return (
        build_event_frame(reference, items, layers),
        build_event_frame(current, items, layers, reference_events=reference),
    )


def _request_log(layer_probs: list[float], *, n: int = 2000, seed: int = 0) -> list[dict]:
    """Served-request log rows; ``layer_probs`` are the shares of layers -1 (cold), 0, 1, ..."""
    rng = np.random.default_rng(seed)
    layers = rng.choice(np.arange(-1, len(layer_probs) - 1), size=n, p=layer_probs)
    return [
        {
            SERVED_AT: (START + pd.Timedelta(minutes=int(i))).isoformat(),
            USER_ID: int(i % 300) + 1,
            RECOMMENDED_ITEMS: [int(x) for x in rng.choice(np.arange(1, 121), size=10, replace=False)],
            SERVED_LAYER: int(layer),
            LATENCY_MS: float(rng.gamma(2.0, 5.0)),
            DEGRADED: bool(layer == -1),
        }
        for i, layer in enumerate(layers)
    ]


@pytest.fixture(scope="module")
def stationary_frames():
    return _frames(*_events(drifted=False))


@pytest.fixture(scope="module")
def stationary(stationary_frames, tmp_path_factory) -> DriftResult:
    reference, current = stationary_frames
    return detect_drift(reference, current, CFG, tmp_path_factory.mktemp("stationary") / "drift.html")


@pytest.fixture(scope="module")
def drifted(tmp_path_factory) -> DriftResult:
    reference, current = _frames(*_events(drifted=True))
    return detect_drift(reference, current, CFG, tmp_path_factory.mktemp("drifted") / "drift.html")


# --------------------------------------------------------------------------- frames


def test_monitored_columns_are_declared_once_and_built():
    assert not set(MONITORED_COLUMNS.numerical) & set(MONITORED_COLUMNS.categorical)
    assert RATING in MONITORED_COLUMNS.numerical and LAYER_COARSE in MONITORED_COLUMNS.categorical
    assert SERVED_LAYER in PREDICTION_COLUMNS.categorical

    events, items, layers = _events(drifted=False, n_users=30, per_user=10)
    frame = build_event_frame(events, items, layers)
    assert set(MONITORED_COLUMNS.all) <= set(frame.columns)
    for column in MONITORED_COLUMNS.categorical:
        assert frame[column].map(type).eq(str).all(), column
    # Without layers the column is left out rather than filled with one constant value.
    assert LAYER_COARSE not in build_event_frame(events, items).columns


def test_split_windows_cuts_the_latest_fraction_of_the_timeline():
    # One event a day on days 0..9: the cut is at day 0 + 9 * 0.8 = 7.2, so days 8 and 9 are current.
    events = pd.DataFrame(
        {
            USER_ID: pd.array([1] * 10, dtype="Int64"),
            ITEM_ID: pd.array(range(1, 11), dtype="Int64"),
            RATING: [4.0] * 10,
            EVENT_TIMESTAMP: START + pd.to_timedelta(np.arange(10), unit="D"),
        }
    )
    reference, current = split_windows(events, 0.2)
    assert reference[ITEM_ID].tolist() == list(range(1, 9))
    assert current[ITEM_ID].tolist() == [9, 10]
    with pytest.raises(ValueError):
        split_windows(events, 1.0)
    with pytest.raises(ValueError):
        split_windows(events.iloc[:1], 0.2)  # one instant: one window would be empty


def test_event_frame_columns_worked_out_by_hand():
    items = pd.DataFrame(
        {
            ITEM_ID: pd.array([1, 2, 3, 4], dtype="Int64"),
            TITLE: ["a", "b", "c", "d"],
            GENRES: ["Action|Comedy", "Drama", None, "Horror"],
            RELEASE_YEAR: pd.array([2000, 2001, None, 2003], dtype="Int64"),
        }
    )
    t = lambda day, hour=0: START + pd.Timedelta(days=day, hours=hour)  # noqa: E731
    # Reference: item 1 three times, item 2 once -> percentile ranks 1.0 and 0.5.
    reference = pd.DataFrame(
        {
            USER_ID: pd.array([1, 1, 2, 2], dtype="Int64"),
            ITEM_ID: pd.array([1, 1, 1, 2], dtype="Int64"),
            RATING: [5.0, 4.0, 3.0, 2.0],
            EVENT_TIMESTAMP: [t(0), t(9), t(1), t(5)],
        }
    )
    current = pd.DataFrame(
        {
            USER_ID: pd.array([1, 2, 3], dtype="Int64"),
            ITEM_ID: pd.array([2, 3, 4], dtype="Int64"),
            RATING: [1.0, 2.0, 3.0],
            EVENT_TIMESTAMP: [t(10, 13), t(20, 5), t(20, 23)],
        }
    )
    layers = pd.DataFrame({USER_ID: pd.array([1, 2], dtype="Int64"), LAYER_COARSE: [2, 0], LAYER_NAME: ["x", "y"]})
    frame = build_event_frame(current, items, layers, reference_events=reference)

    assert frame[RATING].tolist() == [1.0, 2.0, 3.0]
    assert frame[ITEM_POPULARITY_PCT].tolist() == [0.5, 0.0, 0.0]  # items 3 and 4 unseen in the reference
    assert frame[PRIMARY_GENRE].tolist() == ["Drama", UNKNOWN, "Horror"]
    assert frame[HOUR_OF_DAY].tolist() == [13, 5, 23]
    assert frame[LAYER_COARSE].tolist() == ["2", "0", UNKNOWN]
    # User 1 at day 10.54: own reference event at day 9 is inside 7 days -> 2 (itself included).
    # User 2 at day 20.2: reference events at days 1 and 5 are older than 7 days -> 1. User 3 -> 1.
    assert frame[USER_RECENT_EVENTS].tolist() == [2.0, 1.0, 1.0]

    # The reference's own frame: events whose 7-day lookback starts before day 0 have no value.
    own = build_event_frame(reference, items).set_index(EVENT_TIMESTAMP)[USER_RECENT_EVENTS]
    assert np.isnan(own[t(0)]) and np.isnan(own[t(1)]) and np.isnan(own[t(5)])
    assert own[t(9)] == 1.0  # user 1's day-0 event is 9 days back, outside the lookback


def test_prediction_frame_from_rows_and_from_a_jsonl_file(tmp_path: Path):
    rows = [
        {
            SERVED_AT: "2024-03-01T10:00:00+00:00",
            USER_ID: 1,
            RECOMMENDED_ITEMS: [10, 20],
            SERVED_LAYER: 2,
            LATENCY_MS: 12.5,
            DEGRADED: False,
        },
        {
            SERVED_AT: "2024-03-01T10:00:01+00:00",
            USER_ID: 2,
            RECOMMENDED_ITEMS: [30, 99],
            SERVED_LAYER: -1,
            LATENCY_MS: 8.0,
            DEGRADED: True,
        },
        {
            SERVED_AT: "2024-03-01T10:00:02+00:00",
            USER_ID: 3,
            RECOMMENDED_ITEMS: [],
            SERVED_LAYER: 0,
            LATENCY_MS: 3.0,
            DEGRADED: True,
        },
    ]
    # Popularity ranks: 10 -> 1, 20 -> 2, 30 -> 3, anything unseen -> 4.
    popularity = pd.Series({10: 5, 20: 3, 30: 1})
    log_file = tmp_path / "requests.jsonl"
    log_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    for source in (rows, pd.read_json(log_file, lines=True)):
        frame = build_prediction_frame(source, item_popularity_counts=popularity)
        assert frame[SERVED_LAYER].tolist() == ["2", "-1", "0"]
        assert frame[N_RECOMMENDED].tolist() == [2, 2, 0]
        assert frame[MEAN_POPULARITY_RANK].iloc[:2].tolist() == [1.5, 3.5]
        assert np.isnan(frame[MEAN_POPULARITY_RANK].iloc[2])
        assert str(frame[SERVED_AT].dt.tz) == "UTC"
    assert MEAN_POPULARITY_RANK not in build_prediction_frame(rows).columns


def test_item_popularity_counts_events_per_item():
    events = pd.DataFrame({ITEM_ID: pd.array([3, 1, 3, 3, 2, 1], dtype="Int64")})
    assert item_popularity(events).to_dict() == {3: 3, 1: 2, 2: 1}


# --------------------------------------------------------------------------- data drift


def test_stationary_windows_do_not_drift(stationary: DriftResult):
    assert stationary.drift_detected is False
    assert stationary.dataset_drift is False
    assert stationary.prediction_drift is None
    assert set(stationary.column_drift) == set(MONITORED_COLUMNS.all)
    assert stationary.n_columns == len(MONITORED_COLUMNS.all)
    assert stationary.drifted_share < CFG.drift_share
    assert stationary.n_drifted == len(stationary.drifted_columns)


def test_drifted_windows_drift_on_the_shifted_columns(drifted: DriftResult):
    assert drifted.drift_detected is True and drifted.dataset_drift is True
    # Late events moved genre and lost a star; the user-layer mix and time of day did not move.
    assert {RATING, PRIMARY_GENRE} <= set(drifted.drifted_columns)
    assert LAYER_COARSE not in drifted.drifted_columns and HOUR_OF_DAY not in drifted.drifted_columns
    assert drifted.drifted_share == pytest.approx(drifted.n_drifted / drifted.n_columns)
    assert drifted.drifted_share >= CFG.drift_share
    for column in drifted.drifted_columns:
        assert drifted.column_drift[column] >= drifted.threshold


def test_metrics_are_keyed_by_name(drifted: DriftResult):
    metrics = drifted.metrics
    assert metrics["drifted_share"] == drifted.drifted_share
    assert metrics["dataset_drift"] == 1.0 and metrics["drift_detected"] == 1.0
    assert metrics["n_columns"] == len(MONITORED_COLUMNS.all)
    assert metrics[f"drift_score.{RATING}"] == drifted.column_drift[RATING]
    assert metrics["current_rows"] > 0 and metrics["seconds"] > 0
    assert "layer_share_tvd" in metrics and "prediction_drift" not in metrics
    DriftResult.model_validate_json(drifted.model_dump_json())  # round-trips for a KFP output


def test_reports_are_written_atomically(drifted: DriftResult):
    html, png = Path(drifted.report_html), Path(drifted.report_png)
    assert html.suffix == ".html" and png == html.with_suffix(".png")
    assert "<html" in html.read_text(encoding="utf-8")[:2000].lower()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in html.parent.iterdir()) == ["drift.html", "drift.png"]  # no temp files left


def test_layer_shares_compare_events_per_user_layer(stationary: DriftResult, stationary_frames):
    reference, _ = stationary_frames
    expected = reference[LAYER_COARSE].value_counts(normalize=True)
    assert stationary.layer_share_reference == pytest.approx({k: float(v) for k, v in expected.items()})
    assert set(stationary.layer_share_reference) == {"0", "1", "2", "3", UNKNOWN}
    assert sum(stationary.layer_share_current.values()) == pytest.approx(1.0)
    assert stationary.metrics["layer_share_tvd"] < 0.05


def test_frames_must_agree_on_columns(stationary_frames, tmp_path: Path):
    reference, current = stationary_frames
    with pytest.raises(ValueError, match=LAYER_COARSE):
        detect_drift(reference, current.drop(columns=[LAYER_COARSE]), CFG, tmp_path / "r.html")
    with pytest.raises(ValueError, match="both"):
        detect_drift(reference, current, CFG, tmp_path / "r.html", reference_predictions=current)


# --------------------------------------------------------------------------- prediction drift

UNIFORM = [0.2, 0.2, 0.2, 0.2, 0.2]  # cold, layers 0-3


@pytest.mark.parametrize(
    ("current_probs", "expect_drift"),
    [
        (UNIFORM, False),  # same mix, new sample
        ([0.05, 0.7, 0.1, 0.1, 0.05], True),  # layer 0 takes most traffic
    ],
)
def test_prediction_drift_follows_served_layer_shares(stationary_frames, tmp_path, current_probs, expect_drift):
    reference, current = stationary_frames
    popularity = item_popularity(reference)
    ref_preds = build_prediction_frame(_request_log(UNIFORM, seed=1), item_popularity_counts=popularity)
    cur_preds = build_prediction_frame(_request_log(current_probs, seed=2), item_popularity_counts=popularity)

    result = detect_drift(reference, current, CFG, tmp_path / "drift.html", reference_predictions=ref_preds, current_predictions=cur_preds)
    assert result.prediction_drift is expect_drift
    assert result.drift_detected is expect_drift  # the event windows themselves are stationary
    assert set(result.prediction_column_drift) == set(PREDICTION_COLUMNS.all)
    assert set(result.served_layer_share_current) == {"-1", "0", "1", "2", "3"}
    assert result.metrics["prediction_drift"] == float(expect_drift)
    tvd = 0.5 * sum(abs(p - 0.2) for p in current_probs)  # against the reference mix, up to sampling
    assert result.metrics["served_layer_share_tvd"] == pytest.approx(tvd, abs=0.05)
    assert Path(result.prediction_report_html).name == "drift.predictions.html"
    assert Path(result.prediction_report_html).is_file()


# --------------------------------------------------------------------------- retrain policy


def _result(drifted_columns: list[str], *, prediction_drift: bool | None = None) -> DriftResult:
    columns = list(MONITORED_COLUMNS.all)
    scores = {c: (0.4 if c in drifted_columns else 0.01) for c in columns}
    share = len(drifted_columns) / len(columns)
    dataset_drift = share >= CFG.drift_share
    return DriftResult(
        drift_detected=dataset_drift or bool(prediction_drift),
        dataset_drift=dataset_drift,
        drifted_share=share,
        n_drifted=len(drifted_columns),
        n_columns=len(columns),
        column_drift=scores,
        drifted_columns=sorted(drifted_columns),
        threshold=CFG.stattest_threshold,
        prediction_drift=prediction_drift,
        metrics={},
        report_html="drift.html",
        report_png="drift.png",
    )


NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def test_policy_no_drift_no_retrain():
    decision = decide_retrain(_result([RATING]), last_trained_at=NOW - timedelta(days=30), now=NOW)
    assert decision.retrain is False and decision.warm_start is False
    assert decision.reason.startswith("no drift")
    assert "rating=0.400" in decision.reason and "1/6 columns" in decision.reason


def test_policy_retrains_on_drift_and_names_the_columns():
    decision = decide_retrain(_result([RATING, PRIMARY_GENRE]), last_trained_at=NOW - timedelta(hours=30), now=NOW)
    assert decision.retrain is True
    assert decision.warm_start is True  # a model exists and the layer mix held still
    assert "primary_genre=0.400, rating=0.400" in decision.reason and "2/6 columns" in decision.reason


def test_policy_respects_the_cool_down():
    decision = decide_retrain(_result([RATING, PRIMARY_GENRE]), last_trained_at=NOW - timedelta(hours=3), min_hours_between=24, now=NOW)
    assert decision.retrain is False
    assert "3.0 h ago" in decision.reason and "< 24 h" in decision.reason
    # A naive timestamp is read as UTC: 25 h before noon UTC is past the cool-down.
    naive = datetime(2024, 5, 31, 11, 0)
    assert decide_retrain(_result([RATING, PRIMARY_GENRE]), last_trained_at=naive, now=NOW).retrain is True


def test_policy_full_retrain_when_layers_move_or_no_model_exists():
    layer_drift = decide_retrain(_result([LAYER_COARSE, RATING]), last_trained_at=NOW - timedelta(days=2), now=NOW)
    assert layer_drift.retrain is True and layer_drift.warm_start is False
    assert "layer mix moved" in layer_drift.reason

    served = decide_retrain(_result([], prediction_drift=True), last_trained_at=NOW - timedelta(days=2), now=NOW)
    assert served.retrain is True and served.warm_start is False
    assert "served_layer drifted" in served.reason

    first = decide_retrain(_result([RATING, PRIMARY_GENRE]), now=NOW)
    assert first.retrain is True and first.warm_start is False and "no previous model" in first.reason
