"""KFP adapter: train (or warm-start) the transformer recommender. Requests a GPU on a cluster."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from stratarec.components.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train_recommender(
    config_json: str, training_set: Input[Dataset], catalog: Input[Dataset], data_start: str, data_end: str, model: Output[Model]
) -> float:
    """Fit on the training set and write a model bundle (safetensors + lineage); returns val NDCG@10."""
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table
    from stratarec.registry import read_production
    from stratarec.stages import stage_record
    from stratarec.steps import train_candidate

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "train") as summary:
        prod = read_production(cfg.workspace_path) if cfg.train.warm_start else None
        warm = Path(prod.model_dir) if prod else None
        result = train_candidate(
            read_table(training_set.path),
            read_table(catalog.path),
            cfg,
            Path(model.path),
            data_window=(data_start, data_end),
            warm_start_dir=warm,
            progress=lambda s: print(f"[train] {s}", flush=True),
        )
        summary.update(result)
        model.metadata.update({"best_val_ndcg@10": result["best_val_ndcg@10"], "device": result["device"]})
    return float(result["best_val_ndcg@10"])
