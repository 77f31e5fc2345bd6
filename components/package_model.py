"""KFP adapter: release a promoted candidate (model store, Bento, Feast layers, production registry)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def package_model(config_json: str, model: Input[Model], reason: str) -> NamedTuple("PackageOutputs", model_tag=str, bento_tag=str):
    """Save to the BentoML model store, build the Bento, publish layers, mark production."""
    from collections import namedtuple
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.serving.release import release_candidate
    from stratarec.stages import stage_record

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "package") as summary:
        info = release_candidate(Path(model.path), cfg, reason=reason)
        summary.update(info)
    return namedtuple("PackageOutputs", ["model_tag", "bento_tag"])(info["model_tag"], info["bento_tag"])
