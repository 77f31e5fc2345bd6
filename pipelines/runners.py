"""Compile, run locally, submit and schedule the pipelines. The DAGs themselves live apart.

``run_local`` executes the *same* pipeline object that ``compile_pipelines`` writes to YAML,
through ``kfp.local.SubprocessRunner(use_venv=False)``: each component runs as a
subprocess of this virtualenv, as it would run in its container on a cluster.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path

from kfp import compiler, local

from stratarec.config import StrataConfig
from stratarec.pipelines.retrain import retrain_on_drift_pipeline
from stratarec.pipelines.training import training_pipeline

log = logging.getLogger(__name__)

PIPELINES = {"training_pipeline": training_pipeline, "retrain_on_drift_pipeline": retrain_on_drift_pipeline}


def compile_pipelines(out_dir: Path) -> list[Path]:
    """Write one KFP IR YAML file per pipeline into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written


def new_run_id(prefix: str = "run") -> str:
    """Sortable, unique run id."""
    return f"{prefix}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def with_run_paths(cfg: StrataConfig, run_id: str) -> StrataConfig:
    """Absolute workspace and runs paths (subprocesses must agree on them) and the run id."""
    return cfg.model_copy(
        update={
            "run_id": run_id,
            "workspace": str(Path(cfg.workspace).expanduser().resolve()),
            "runs_dir": str(Path(cfg.runs_dir).expanduser().resolve()),
            "data": cfg.data.model_copy(update={"data_dir": str(Path(cfg.data.data_dir).expanduser().resolve())})
            if cfg.data.data_dir
            else cfg.data,
        }
    )


def run_local(cfg: StrataConfig, pipeline_root: Path | None = None) -> dict:
    """Run ``training_pipeline`` with kfp.local. Raises ``RuntimeError`` when a task fails.

    Returns:
        The pipeline's task outputs (kfp.local returns them for inspection).
    """
    root = Path(pipeline_root) if pipeline_root else Path(cfg.runs_dir) / cfg.run_id / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    task = training_pipeline(config_json=cfg.to_json())
    return {"outputs": getattr(task, "outputs", {})}


def run_retrain_local(monitor_cfg: StrataConfig, retrain_cfg: StrataConfig, pipeline_root: Path | None = None) -> dict:
    """Run the drift-check-then-retrain pipeline with kfp.local."""
    root = Path(pipeline_root) if pipeline_root else Path(monitor_cfg.runs_dir) / monitor_cfg.run_id / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    task = retrain_on_drift_pipeline(monitor_config_json=monitor_cfg.to_json(), retrain_config_json=retrain_cfg.to_json())
    return {"outputs": getattr(task, "outputs", {})}


def submit(host: str, cfg: StrataConfig, experiment: str = "stratarec", namespace: str | None = None) -> str:
    """Submit one training run to a Kubeflow Pipelines endpoint; returns the run id."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace)
    run = client.create_run_from_pipeline_func(
        training_pipeline, arguments={"config_json": cfg.to_json()}, experiment_name=experiment, run_name=cfg.run_id or None
    )
    return run.run_id


def schedule(
    host: str, monitor_cfg: StrataConfig, retrain_cfg: StrataConfig, package_path: Path, cron: str, experiment: str = "stratarec"
) -> str:
    """Create a recurring run of the retrain-on-drift pipeline (KFP cron has six fields, seconds first)."""
    import kfp

    compiler.Compiler().compile(retrain_on_drift_pipeline, str(package_path))
    client = kfp.Client(host=host)
    exp = client.create_experiment(experiment)
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name="stratarec-retrain-on-drift",
        cron_expression=cron,
        pipeline_package_path=str(package_path),
        params={"monitor_config_json": monitor_cfg.to_json(), "retrain_config_json": retrain_cfg.to_json()},
        max_concurrency=1,
        no_catchup=True,
    )
    return job.recurring_run_id
