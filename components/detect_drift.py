"""KFP adapter: Evidently drift report between the training reference and the current window."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def detect_drift(
    config_json: str, ordered_events: Input[Dataset], items: Input[Dataset], model: Input[Model], report: Output[HTML]
) -> NamedTuple("DriftOutputs", drift_detected=bool, drifted_share=float):
    """Compare the reference window with the latest window; report and return the decision inputs."""
    from collections import namedtuple
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table
    from stratarec.monitoring.pipeline_io import monitor_windows
    from stratarec.stages import stage_record

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "monitor") as summary:
        result = monitor_windows(read_table(ordered_events.path), read_table(items.path), Path(model.path), cfg, Path(report.path))
        summary.update(result.model_dump())
    return namedtuple("DriftOutputs", ["drift_detected", "drifted_share"])(result.drift_detected, result.drifted_share)
