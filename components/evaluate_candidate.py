"""KFP adapter: full-ranking evaluation and the promotion decision (a primitive bool for dsl.If)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_candidate(
    config_json: str, model: Input[Model], training_set: Input[Dataset], ordered_events: Input[Dataset], metrics: Output[Metrics]
) -> NamedTuple("GateOutputs", promote=bool, reason=str, candidate_ndcg=float):
    """Score candidate, baselines and production on the same split; decide promotion."""
    from collections import namedtuple
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table
    from stratarec.stages import stage_record
    from stratarec.steps import evaluate_candidate as evaluate
    from stratarec.steps import seen_before_test

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "evaluate") as summary:
        report = evaluate(Path(model.path), read_table(training_set.path), seen_before_test(read_table(ordered_events.path)), cfg)
        for name, value in report["candidate"]["overall"].items():
            metrics.log_metric(f"candidate_{name}", value)
        summary.update(report)
    gate = report["gate"]
    return namedtuple("GateOutputs", ["promote", "reason", "candidate_ndcg"])(gate["promote"], gate["reason"], float(gate["candidate"]))
