"""KFP adapter: hierarchical interest layers from the trained model's user vectors."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def layer_users(config_json: str, model: Input[Model], training_set: Input[Dataset], layered_model: Output[Model]) -> NamedTuple(
    "LayerOutputs", n_coarse=int, layer_names=str
):
    """Copy the bundle, cluster users into coarse/fine layers, name them, and store them in it."""
    import json
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table
    from stratarec.stages import stage_record
    from stratarec.steps import layer_users as build_layers

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "layer") as summary:
        shutil.copytree(model.path, layered_model.path, dirs_exist_ok=True)
        layers = build_layers(Path(layered_model.path), read_table(training_set.path), cfg)
        table = layers.layers[["level", "layer", "parent", "name", "size"]].to_dict(orient="records")
        summary.update(layers=table, shares=layers.layer_shares())
    names = {int(r["layer"]): r["name"] for r in table if r["level"] == "coarse"}
    return namedtuple("LayerOutputs", ["n_coarse", "layer_names"])(len(names), json.dumps(names))
