"""The training pipeline: validate -> features -> train -> layer -> evaluate/gate -> package, plus monitor.

Only the DAG lives here. Compiling, local runs, submission and schedules are in
``pipelines/runners.py``; nothing here reads the environment, because pipeline defaults are
frozen into the compiled spec.
"""

from kfp import dsl

from stratarec.components.build_features import build_features
from stratarec.components.detect_drift import detect_drift
from stratarec.components.evaluate_candidate import evaluate_candidate
from stratarec.components.ingest_data import ingest_data
from stratarec.components.layer_users import layer_users
from stratarec.components.package_model import package_model
from stratarec.components.train_recommender import train_recommender
from stratarec.components.validate_data import validate_data

GATE_NAME = "candidate-beats-production-and-baselines"
TASK_NAMES = (
    "ingest-data",
    "validate-data",
    "build-features",
    "train-recommender",
    "layer-users",
    "evaluate-candidate",
    "package-model",
    "detect-drift",
)


@dsl.pipeline(name="stratarec-training", description="Interest-layered sequential recommender: train, gate, package.")
def training_pipeline(config_json: str):
    """One run of the product: every stage passes typed artifacts or parameters to the next.

    Args:
        config_json: The serialised ``StrataConfig`` (one typed config for every step).
    """
    ingest = ingest_data(config_json=config_json).set_display_name("ingest")
    validate = validate_data(config_json=config_json, events=ingest.outputs["events"], items=ingest.outputs["items"]).set_display_name(
        "validate"
    )
    features = build_features(
        config_json=config_json,
        events=validate.outputs["validated_events"],
        items=validate.outputs["validated_items"],
    ).set_display_name("features")
    features.set_cpu_limit("2").set_memory_limit("8G")

    train = train_recommender(
        config_json=config_json,
        training_set=features.outputs["training_set"],
        catalog=features.outputs["catalog"],
        data_start=features.outputs["data_start"],
        data_end=features.outputs["data_end"],
    ).set_display_name("train")
    # One GPU on a cluster (kfp.local ignores resource requests; the code falls back to CPU).
    train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    train.set_cpu_request("2").set_cpu_limit("8").set_memory_request("8G").set_memory_limit("32G")
    train.set_retry(num_retries=2, backoff_duration="60s")  # resumes from its per-epoch checkpoint

    layer = layer_users(
        config_json=config_json, model=train.outputs["model"], training_set=features.outputs["training_set"]
    ).set_display_name("layer")
    evaluate = evaluate_candidate(
        config_json=config_json,
        model=layer.outputs["layered_model"],
        training_set=features.outputs["training_set"],
        ordered_events=features.outputs["ordered_events"],
    ).set_display_name("evaluate")
    with dsl.If(evaluate.outputs["promote"] == True, name=GATE_NAME):  # noqa: E712 (KFP builds a condition from ==)
        package_model(config_json=config_json, model=layer.outputs["layered_model"], reason=evaluate.outputs["reason"]).set_display_name(
            "package"
        )
    detect_drift(
        config_json=config_json,
        ordered_events=features.outputs["ordered_events"],
        items=validate.outputs["validated_items"],
        model=layer.outputs["layered_model"],
    ).set_display_name("monitor")
