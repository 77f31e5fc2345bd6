"""The ``stratarec`` command: run, compile, serve, monitor, submit, schedule, data fetch.

The entry point owns the side effects (logging, folders, environment); the library and the
pipeline definitions stay pure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from stratarec.config import StrataConfig, load_config

log = logging.getLogger("stratarec")

DATA_DIR_ENV = "STRATAREC_DATA_DIR"


def _parse_set(values: list[str]) -> dict:
    """``--set train.epochs=3`` -> ``{"train": {"epochs": 3}}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for item in values:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def build_config(args: argparse.Namespace) -> StrataConfig:
    """Config file, then ``--set`` overrides, then the data directory from flag or environment."""
    overrides = _parse_set(getattr(args, "set", None) or [])
    data_dir = getattr(args, "data_dir", None) or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        overrides.setdefault("data", {}).setdefault("data_dir", data_dir)
    try:
        return load_config(getattr(args, "config", None), overrides)
    except Exception as exc:  # pydantic errors name the field; show them without a traceback
        raise SystemExit(f"invalid config: {exc}") from None


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"stratarec run {summary['run_id']} — {summary['status']} in {summary['total_seconds']} s")
    for col in ("stage", "status", "seconds", "note"):
        t.add_column(col)
    for name, s in summary["stages"].items():
        t.add_row(name, str(s["status"]), str(s["seconds"] or ""), (s.get("reason") or "")[:80])
    console.print(t)
    m = summary.get("metrics") or {}
    if m.get("candidate"):
        mt = Table(title="Full-ranking metrics (test events, seen items excluded)")
        keys = list(m["candidate"]["overall"].keys())
        mt.add_column("model")
        for k in keys:
            mt.add_column(k)
        rows = [("candidate", m["candidate"])] + [(f"baseline:{k}", v) for k, v in (m.get("baselines") or {}).items()]
        if m.get("production"):
            rows.append(("production", m["production"]))
        for name, rep in rows:
            mt.add_row(name, *[f"{rep['overall'].get(k, float('nan')):.4f}" for k in keys])
        console.print(mt)
    if summary.get("gate"):
        console.print(f"gate: promote={summary['gate']['promote']} — {summary['gate']['reason']}")
    if summary.get("bento_tag"):
        console.print(f"bento: {summary['bento_tag']}  model: {summary['model_tag']}")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the training pipeline through kfp.local and write summary.json and report.html."""
    from stratarec.pipelines.runners import new_run_id, run_local, with_run_paths
    from stratarec.report import collect_summary, write_report_html

    cfg = build_config(args)
    if args.warm_start:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"warm_start": True})})
    cfg = with_run_paths(cfg, new_run_id())
    run_dir = Path(cfg.runs_dir) / cfg.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    os.environ.setdefault("BENTOML_HOME", str(Path(cfg.workspace) / "bentoml"))
    print(f"stratarec: run {cfg.run_id} (data: {cfg.data.source} from {cfg.data.data_dir}, workspace {cfg.workspace})", flush=True)
    started = time.monotonic()
    status, error = "succeeded", ""
    try:
        run_local(cfg)
    except Exception as exc:  # a failed task: report the stage and its one-line reason
        status = "failed"
        error = _failure_line(run_dir, exc)
    summary = collect_summary(run_dir, cfg.run_id, time.monotonic() - started, status, error)
    history = (summary.get("training") or {}).get("history")
    report = write_report_html(summary, run_dir, history)
    _print_summary(summary)
    print(f"summary: {run_dir / 'summary.json'}\nreport:  {report}")
    if status != "succeeded":
        print(f"stratarec: FAILED — {error}", file=sys.stderr)
        return 1
    return 0


def _failure_line(run_dir: Path, exc: Exception) -> str:
    """Name the failed stage and its reason from the stage records, else from the exception."""
    for path in sorted((run_dir / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        rec = json.loads(path.read_text())
        if rec.get("status") == "failed":
            return f"stage '{rec['stage']}' failed: {rec.get('reason', '')}"
    return f"pipeline failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile every pipeline to KFP YAML."""
    from stratarec.pipelines.runners import compile_pipelines

    for path in compile_pipelines(Path(args.out)):
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the production Bento on localhost."""
    from stratarec.registry import read_production

    cfg = build_config(args)
    record = read_production(cfg.workspace_path)
    if record is None or not record.bento_tag:
        print(f"no production Bento in {cfg.workspace_path}/registry: run `stratarec run` first", file=sys.stderr)
        return 2
    env = dict(os.environ, BENTOML_HOME=str(cfg.workspace_path / "bentoml"), STRATAREC_MODEL_TAG=record.model_tag)
    cmd = [sys.executable, "-m", "bentoml", "serve", record.bento_tag, "--host", args.host, "--port", str(args.port)]
    print("+", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Drift check on the latest data; with --retrain, run the retrain-on-drift pipeline."""
    from stratarec.pipelines.runners import new_run_id, run_retrain_local, with_run_paths

    cfg = build_config(args)
    if not args.retrain:
        from stratarec.monitoring.pipeline_io import monitor_from_config

        result = monitor_from_config(cfg, Path(args.report))
        print(json.dumps(result.model_dump(), indent=2, default=str))
        return 0
    run_id = new_run_id("retrain")
    monitor_cfg = with_run_paths(cfg, run_id + "-monitor")
    retrain_cfg = with_run_paths(cfg.model_copy(update={"train": cfg.train.model_copy(update={"warm_start": True})}), run_id)
    os.environ.setdefault("BENTOML_HOME", str(Path(monitor_cfg.workspace) / "bentoml"))
    run_retrain_local(monitor_cfg, retrain_cfg)
    drift = json.loads((Path(monitor_cfg.runs_dir) / monitor_cfg.run_id / "stages" / "monitor.json").read_text())
    print(
        f"drift_detected={drift['summary'].get('drift_detected')} "
        f"retrained={(Path(retrain_cfg.runs_dir) / run_id / 'stages' / 'train.json').exists()}"
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a training run to a Kubeflow Pipelines endpoint."""
    from stratarec.pipelines.runners import new_run_id, submit

    cfg = build_config(args).model_copy(update={"run_id": new_run_id()})
    print(submit(args.host, cfg))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Create the recurring retrain-on-drift run on a cluster."""
    from stratarec.pipelines.runners import schedule

    cfg = build_config(args)
    retrain = cfg.model_copy(update={"train": cfg.train.model_copy(update={"warm_start": True})})
    print(schedule(args.host, cfg, retrain, Path(args.out), args.cron or cfg.monitor.schedule_cron))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Download a MovieLens data set from GroupLens and verify its checksums."""
    from stratarec.data.movielens import fetch_movielens_100k

    if args.dataset != "ml-100k":
        print("only ml-100k can be fetched; the ml-1m SASRec split comes from its authors' repository", file=sys.stderr)
        return 2
    print(fetch_movielens_100k(Path(args.dest)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="stratarec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (see configs/)")
        p.add_argument("--data-dir", help=f"data root holding ml-100k/ (default ${DATA_DIR_ENV})")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. train.epochs=5")

    p = sub.add_parser("run", help="run the training pipeline locally with kfp.local")
    common(p)
    p.add_argument("--warm-start", action="store_true", help="fine-tune the production model instead of training from scratch")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compile", help="compile the pipelines to KFP YAML")
    p.add_argument("--out", default="build")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("serve", help="serve the production Bento on localhost")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("monitor", help="Evidently drift check (and retrain on drift)")
    common(p)
    p.add_argument("--report", default="runs/drift_report.html")
    p.add_argument("--retrain", action="store_true", help="run the retrain-on-drift pipeline with kfp.local")
    p.set_defaults(func=cmd_monitor)
    p = sub.add_parser("submit", help="submit a training run to a KFP endpoint")
    common(p)
    p.add_argument("--host", required=True)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("schedule", help="create the recurring retrain-on-drift run on a KFP endpoint")
    common(p)
    p.add_argument("--host", required=True)
    p.add_argument("--cron", help="six-field KFP cron (default monitor.schedule_cron)")
    p.add_argument("--out", default="build/retrain_on_drift_pipeline.yaml")
    p.set_defaults(func=cmd_schedule)
    p = sub.add_parser("data", help="data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download and verify a MovieLens data set")
    f.add_argument("dataset", choices=["ml-100k"])
    f.add_argument("--dest", default="data")
    f.set_defaults(func=cmd_data)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
