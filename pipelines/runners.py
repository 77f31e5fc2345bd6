"""Compile, run locally, submit and schedule the pipelines. The DAGs themselves live apart.

``run_local`` executes the *same* pipeline object that ``compile_pipelines`` writes to YAML,
through ``kfp.local.SubprocessRunner(use_venv=False)``: each component runs as a
subprocess of this virtualenv, as it would run in its container on a cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def _conditions_on_named_outputs() -> Iterator[None]:
    """Let kfp.local (2.17) evaluate ``dsl.If`` on a named output of a multi-output component.

    The compiler names such a channel ``<task>-<output>`` (one dash). kfp.local's condition
    evaluator only recognises ``<task>-Output`` or ``<task>--<output>``, takes anything else
    for a parent input, fails to find it and skips the branch: the gate would never open.
    This adds the missing lookup (split at each dash, try it as a task output) for the
    duration of a local run only; the compiled YAML and a cluster run are untouched.
    """
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dag

    evaluator = dag.ConditionEvaluator
    original = evaluator.__dict__["_resolve_pipeline_channel"]

    def resolve(channel_ref: str, io_store: Any) -> Any:
        ref = channel_ref.removeprefix("pipelinechannel--")
        for i in [i for i, ch in enumerate(ref) if ch == "-"]:
            with contextlib.suppress(Exception):
                return io_store.get_task_output(ref[:i], ref[i + 1 :])
        return original.__func__(channel_ref, io_store)

    evaluator._resolve_pipeline_channel = staticmethod(resolve)
    try:
        yield
    finally:
        evaluator._resolve_pipeline_channel = original


def run_local(cfg: StrataConfig, pipeline_root: Path | None = None) -> dict:
    """Run ``training_pipeline`` with kfp.local. Raises ``RuntimeError`` when a task fails.

    Returns:
        The pipeline's task outputs (kfp.local returns them for inspection).
    """
    root = Path(pipeline_root) if pipeline_root else Path(cfg.runs_dir) / cfg.run_id / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with _conditions_on_named_outputs():
        task = training_pipeline(config_json=cfg.to_json())
    return {"outputs": getattr(task, "outputs", {})}


def run_and_report(cfg: StrataConfig, announce: Callable[[str], None] = log.info) -> tuple[dict, Path]:
    """Run ``training_pipeline`` locally under a new run id; write summary.json and report.html.

    A failed task does not raise: the summary says which stage failed and why, so callers
    (the CLI, tests) decide what a failure means.

    Args:
        cfg: The run's config; the workspace, runs and data paths are made absolute.
        announce: Receives one line naming the run before it starts.

    Returns:
        ``(summary, run_dir)``.
    """
    from stratarec.report import collect_summary, write_report_html

    cfg = with_run_paths(cfg, new_run_id())
    run_dir = Path(cfg.runs_dir) / cfg.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    announce(f"stratarec: run {cfg.run_id} (data: {cfg.data.source} from {cfg.data.data_dir}, workspace {cfg.workspace})")
    started = time.monotonic()
    status, error = "succeeded", ""
    try:
        run_local(cfg)
    except Exception as exc:  # a failed task: report the stage and its one-line reason
        status, error = "failed", failure_line(run_dir, exc)
    summary = collect_summary(run_dir, cfg.run_id, time.monotonic() - started, status, error)
    write_report_html(summary, run_dir, (summary.get("training") or {}).get("history"))
    return summary, run_dir


def retrain_and_report(cfg: StrataConfig, announce: Callable[[str], None] = log.info) -> tuple[dict, dict | None]:
    """Run ``retrain_on_drift_pipeline`` locally: a drift check, then warm-started training on drift.

    Args:
        cfg: Config of the latest data; the retraining run gets ``train.warm_start = true``.
        announce: Receives one line naming the runs before they start.

    Returns:
        ``(drift, summary)``: the monitor stage's drift result, and the retraining run's
        summary (``None`` when no drift, so nothing was retrained).
    """
    from stratarec.report import collect_summary, write_report_html

    run_id = new_run_id("retrain")
    monitor_cfg = with_run_paths(cfg, run_id + "-monitor")
    retrain_cfg = with_run_paths(cfg.model_copy(update={"train": cfg.train.model_copy(update={"warm_start": True})}), run_id)
    monitor_dir, run_dir = (Path(c.runs_dir) / c.run_id for c in (monitor_cfg, retrain_cfg))
    monitor_dir.mkdir(parents=True, exist_ok=True)
    announce(f"stratarec: drift check {monitor_cfg.run_id}; on drift, warm-started retraining {retrain_cfg.run_id}")
    started = time.monotonic()
    status, error = "succeeded", ""
    try:
        run_retrain_local(monitor_cfg, retrain_cfg)
    except Exception as exc:
        status, error = "failed", failure_line(run_dir if (run_dir / "stages").exists() else monitor_dir, exc)
    monitor_record = monitor_dir / "stages" / "monitor.json"
    drift = json.loads(monitor_record.read_text()).get("summary", {}) if monitor_record.exists() else {}
    if error and not drift:
        raise RuntimeError(error)
    if not (run_dir / "stages").exists():
        return drift, None
    summary = collect_summary(run_dir, retrain_cfg.run_id, time.monotonic() - started, status, error)
    write_report_html(summary, run_dir, (summary.get("training") or {}).get("history"))
    return drift, summary


def failure_line(run_dir: Path, exc: Exception) -> str:
    """Name the failed stage and its reason from the stage records, else from the exception."""
    for path in sorted((run_dir / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        rec = json.loads(path.read_text())
        if rec.get("status") == "failed":
            return f"stage '{rec['stage']}' failed: {rec.get('reason', '')}"
    text = str(exc).strip()
    return f"pipeline failed: {text.splitlines()[0] if text else type(exc).__name__}"


def run_retrain_local(monitor_cfg: StrataConfig, retrain_cfg: StrataConfig, pipeline_root: Path | None = None) -> dict:
    """Run the drift-check-then-retrain pipeline with kfp.local."""
    root = Path(pipeline_root) if pipeline_root else Path(monitor_cfg.runs_dir) / monitor_cfg.run_id / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with _conditions_on_named_outputs():
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
