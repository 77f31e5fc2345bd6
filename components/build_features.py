"""KFP adapter: compute features, publish them to Feast and build the point-in-time training set."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def build_features(
    config_json: str,
    events: Input[Dataset],
    items: Input[Dataset],
    ordered_events: Output[Dataset],
    catalog: Output[Dataset],
    training_set: Output[Dataset],
) -> NamedTuple("FeatureOutputs", feature_service=str, watermark=str, data_start=str, data_end=str):
    """Feature computation, `feast apply` + materialize, and `get_historical_features` for training."""
    from collections import namedtuple

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table
    from stratarec.feature_repo.pipeline_io import publish_and_build_training_set
    from stratarec.stages import stage_record

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "features") as summary:
        info = publish_and_build_training_set(
            read_table(events.path), read_table(items.path), cfg, ordered_events.path, catalog.path, training_set.path
        )
        summary.update(info)
    outputs = namedtuple("FeatureOutputs", ["feature_service", "watermark", "data_start", "data_end"])
    return outputs(info["feature_service"], info["watermark"], info["data_start"], info["data_end"])
