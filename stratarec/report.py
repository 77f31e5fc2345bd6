"""Run summary (``summary.json``) and the one HTML report a person opens after a run."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from stratarec.atomic import write_json_atomic
from stratarec.stages import STAGES


def collect_summary(run_dir: Path, run_id: str, total_seconds: float, status: str, error: str = "") -> dict:
    """Assemble ``summary.json`` from the per-stage records the components wrote."""
    stages = {}
    for name in STAGES:
        path = Path(run_dir) / "stages" / f"{name}.json"
        stages[name] = json.loads(path.read_text()) if path.exists() else {"stage": name, "status": "skipped"}
    ev = stages["evaluate"].get("summary", {})
    summary = {
        "run_id": run_id,
        "status": status,
        "error": error,
        "total_seconds": round(total_seconds, 1),
        "stages": {n: {"status": s.get("status"), "seconds": s.get("seconds"), "reason": s.get("reason", "")} for n, s in stages.items()},
        "validation": stages["validate"].get("summary", {}),
        "features": stages["features"].get("summary", {}),
        "training": stages["train"].get("summary", {}),
        "metrics": {
            "candidate": ev.get("candidate"),
            "baselines": ev.get("baselines"),
            "production": ev.get("production"),
        },
        "gate": ev.get("gate"),
        "model_tag": stages["package"].get("summary", {}).get("model_tag"),
        "bento_tag": stages["package"].get("summary", {}).get("bento_tag"),
        "layers": stages["layer"].get("summary", {}).get("layers"),
        "layer_shares": stages["layer"].get("summary", {}).get("shares"),
        "drift": stages["monitor"].get("summary", {}),
    }
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metrics_chart(summary: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = summary["metrics"]
    if not m.get("candidate"):
        return None
    names = ["candidate"] + [f"baseline:{b}" for b in (m.get("baselines") or {})] + (["production"] if m.get("production") else [])
    reports = [m["candidate"]] + list((m.get("baselines") or {}).values()) + ([m["production"]] if m.get("production") else [])
    keys = [k for k in m["candidate"]["overall"] if k.split("@")[0] in ("ndcg", "recall", "mrr")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(names)
    for i, (name, rep) in enumerate(zip(names, reports, strict=True)):
        ax.bar([j + i * width for j in range(len(keys))], [rep["overall"].get(k, 0) for k in keys], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_title("Full-ranking metrics on the test events (seen items excluded)")
    ax.legend(fontsize=8)
    return _png(fig)


def _layer_chart(summary: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cand = summary["metrics"].get("candidate") or {}
    layers = [k for k in cand if k.startswith("layer_")]
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(layers, [cand[k].get("ndcg@10", 0) for k in layers], color="#4c72b0")
    for i, k in enumerate(layers):
        ax.annotate(f"n={int(cand[k]['users'])}", (i, cand[k].get("ndcg@10", 0)), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("NDCG@10")
    ax.set_title("Candidate NDCG@10 per coarse interest layer")
    return _png(fig)


def _training_chart(history: list[dict]) -> str | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([h["epoch"] for h in history], [h["val_ndcg@10"] for h in history], marker="o")
    ax2 = ax.twinx()
    ax2.plot([h["epoch"] for h in history], [h["loss"] for h in history], color="grey", alpha=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax2.set_ylabel("training loss")
    ax.set_title("Training curve")
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report_html(summary: dict, run_dir: Path, history: list[dict] | None = None) -> Path:
    """One self-contained HTML page: stages, validation, metrics, layers, drift, with plots."""
    parts = [
        f"<h1>stratarec run {html.escape(summary['run_id'])}</h1>",
        f"<p>Status: <b>{html.escape(summary['status'])}</b> {html.escape(summary.get('error') or '')}</p>",
    ]
    parts.append(
        "<h2>Stages</h2>"
        + _table(
            [[n, s["status"], s.get("seconds"), s.get("reason", "")] for n, s in summary["stages"].items()],
            ["stage", "status", "seconds", "reason"],
        )
    )
    val = summary.get("validation") or {}
    parts.append(f"<h2>Validation</h2><p>success: {val.get('success')}</p>")
    for f in val.get("failures") or []:
        parts.append(f"<p>failed: {html.escape(json.dumps(f, default=str)[:400])}</p>")
    gate = summary.get("gate") or {}
    parts.append(f"<h2>Gate</h2><p>promote: <b>{gate.get('promote')}</b> — {html.escape(str(gate.get('reason', '')))}</p>")
    m = summary["metrics"]
    if m.get("candidate"):
        rows = []
        for name, rep in (
            [("candidate", m["candidate"])]
            + [(f"baseline:{k}", v) for k, v in (m.get("baselines") or {}).items()]
            + ([("production", m["production"])] if m.get("production") else [])
        ):
            rows.append([name] + [round(v, 4) for v in rep["overall"].values()])
        parts.append("<h2>Metrics</h2>" + _table(rows, ["model"] + list(m["candidate"]["overall"].keys())))
        slices = [[k] + [round(v, 4) for v in rep.values()] for k, rep in m["candidate"].items() if k != "overall"]
        parts.append("<h3>Candidate by slice</h3>" + _table(slices, ["slice"] + list(m["candidate"]["overall"].keys())))
    for chart in (_metrics_chart(summary), _layer_chart(summary), _training_chart(history or [])):
        if chart:
            parts.append(f'<img src="{chart}" style="max-width:100%">')
    if summary.get("layers"):
        parts.append(
            "<h2>Interest layers</h2>"
            + _table(
                [[r["level"], r["layer"], r["parent"], r["name"], r["size"]] for r in summary["layers"]],
                ["level", "layer", "parent", "name", "users"],
            )
        )
    drift = summary.get("drift") or {}
    if drift:
        parts.append(
            "<h2>Drift (Evidently)</h2>"
            f"<p>drift_detected: <b>{drift.get('drift_detected')}</b>, drifted share {drift.get('drifted_share')}</p>"
        )
        if drift.get("report_html"):
            parts.append(f'<p><a href="{html.escape(str(drift["report_html"]))}">Evidently report</a></p>')
    style = (
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>"
    )
    out = Path(run_dir) / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>stratarec {summary['run_id']}</title>{style}</head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    tmp.replace(out)
    return out
