"""Continual training: check drift on the latest data and, past the policy, run training warm-started.

The training pipeline is nested as a sub-DAG, so on a cluster the whole loop is one KFP
run, and a recurring run of this pipeline is the schedule.
"""

from kfp import dsl

from stratarec.components.build_features import build_features
from stratarec.components.detect_drift import detect_drift
from stratarec.components.fetch_production import fetch_production_model
from stratarec.components.ingest_data import ingest_data
from stratarec.components.validate_data import validate_data
from stratarec.pipelines.training import training_pipeline

RETRAIN_GATE = "drift-exceeds-policy"


@dsl.pipeline(name="stratarec-retrain-on-drift", description="Evidently drift check; retrain warm-started when drift exceeds the policy.")
def retrain_on_drift_pipeline(monitor_config_json: str, retrain_config_json: str):
    """Drift check, then (only on drift) the full training pipeline with ``train.warm_start``.

    Args:
        monitor_config_json: Config for reading the latest data (the monitoring window).
        retrain_config_json: Config for the retraining run (``train.warm_start`` true).
    """
    ingest = ingest_data(config_json=monitor_config_json).set_display_name("ingest-latest")
    validate = validate_data(config_json=monitor_config_json, events=ingest.outputs["events"], items=ingest.outputs["items"])
    features = build_features(
        config_json=monitor_config_json, events=validate.outputs["validated_events"], items=validate.outputs["validated_items"]
    )
    production = fetch_production_model(config_json=monitor_config_json)
    drift = detect_drift(
        config_json=monitor_config_json,
        ordered_events=features.outputs["ordered_events"],
        items=validate.outputs["validated_items"],
        model=production.outputs["model"],
    ).set_display_name("detect-drift")
    with dsl.If(drift.outputs["drift_detected"] == True, name=RETRAIN_GATE):  # noqa: E712
        training_pipeline(config_json=retrain_config_json)
