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

    # Logs and CI capture are not terminals (rich would assume 80 columns and cut the metrics).
    console = Console(width=max(Console().width, 120))
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
            mt.add_row(name, *[_cell(k, rep["overall"].get(k)) for k in keys])
        console.print(mt)
    if summary.get("gate"):
        console.print(f"gate: promote={summary['gate']['promote']} — {summary['gate']['reason']}")
    if summary.get("bento_tag"):
        console.print(f"bento: {summary['bento_tag']}  model: {summary['model_tag']}")


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if key == "users" else f"{value:.4f}"


def cmd_run(args: argparse.Namespace) -> int:
    """Run the training pipeline through kfp.local and write summary.json and report.html."""
    from stratarec.pipelines.runners import run_and_report

    cfg = build_config(args)
    if args.warm_start:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"warm_start": True})})
    os.environ.setdefault("BENTOML_HOME", str(cfg.workspace_path / "bentoml"))
    summary, run_dir = run_and_report(cfg, announce=lambda line: print(line, flush=True))
    _print_summary(summary)
    print(f"summary: {run_dir / 'summary.json'}\nreport:  {run_dir / 'report.html'}")
    if summary["status"] != "succeeded":
        print(f"stratarec: FAILED — {summary['error']}", file=sys.stderr)
        return 1
    return 0


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
    cfg = build_config(args)
    if not args.retrain:
        from stratarec.monitoring.pipeline_io import monitor_from_config

        result = monitor_from_config(cfg, Path(args.report))
        print(json.dumps(result.model_dump(), indent=2, default=str))
        return 0
    from stratarec.pipelines.runners import retrain_and_report

    os.environ.setdefault("BENTOML_HOME", str(cfg.workspace_path / "bentoml"))
    drift, summary = retrain_and_report(cfg, announce=lambda line: print(line, flush=True))
    print(f"drift_detected={drift.get('drift_detected')} drifted_share={drift.get('drifted_share')}")
    if summary is None:
        print("no drift past the policy: nothing retrained")
        return 0
    _print_summary(summary)
    if summary["status"] != "succeeded":
        print(f"stratarec: retraining FAILED — {summary['error']}", file=sys.stderr)
        return 1
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
