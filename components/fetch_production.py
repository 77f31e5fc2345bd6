"""KFP adapter: expose the current production bundle as a Model artifact."""

from kfp import dsl
from kfp.dsl import Model, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def fetch_production_model(config_json: str, model: Output[Model]) -> str:
    """Copy the production bundle from the registry; fail clearly when nothing is in production."""
    import shutil

    from stratarec.config import StrataConfig
    from stratarec.registry import read_production

    cfg = StrataConfig.from_json(config_json)
    record = read_production(cfg.workspace_path)
    if record is None:
        raise RuntimeError(f"no production model in {cfg.workspace_path}/registry: run the training pipeline first")
    shutil.copytree(record.model_dir, model.path, dirs_exist_ok=True)
    model.metadata["model_id"] = record.model_id
    return record.model_id
