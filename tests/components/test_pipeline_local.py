"""The whole ``training_pipeline`` through kfp.local (SubprocessRunner, no cluster, no Docker).

One workspace lives through the module, as it would on a team's machine:

1. a first run on stationary synthetic data trains, gates (no production yet), packages a
   Bento, promotes it and finds no drift;
2. runs on corrupted data stop at validate, and every file of the production workspace
   (registry, model copies, Feast registry and online store, BentoML store) is byte-identical;
3. ``retrain_on_drift_pipeline`` on drifted data detects the drift and runs the training
   pipeline again, warm-started from production and compared with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from stratarec.config import StrataConfig, load_config
from stratarec.data.ingest import write_parquet_atomic
from stratarec.data.synthetic import CORRUPTIONS, generate_synthetic, inject_corruption
from stratarec.pipelines.runners import retrain_and_report, run_and_report
from stratarec.registry import read_production

pytestmark = pytest.mark.components

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "validate", "features", "train", "layer", "evaluate", "package", "monitor"]
# Enough users that a stationary population's late window matches its early one (with a few
# hundred users, which users happen to be active late already moves the genre mix).
SYNTHETIC = {"n_users": 2000, "n_items": 120, "events_per_user": 20, "seed": 7}


def _config(tmp: Path, **data) -> StrataConfig:
    return load_config(
        ROOT / "configs" / "synthetic.yaml",
        {
            "workspace": str(tmp / "workspace"),
            "runs_dir": str(tmp / "runs"),
            "data": data,
            "train": {"epochs": 3, "patience": 3, "max_minutes": 1},
        },
    )


def _synthetic(tmp: Path, drift: float) -> StrataConfig:
    return _config(tmp, source="synthetic", synthetic={**SYNTHETIC, "drift": drift})


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline")
    # The package stage's BentoML store; subprocesses inherit it.
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(path / "workspace" / "bentoml")
    yield path
    if previous is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = previous


@pytest.fixture(scope="module")
def first_run(tmp) -> tuple[dict, Path]:
    return run_and_report(_synthetic(tmp, drift=0.0))


@pytest.fixture(scope="module")
def production_before(tmp, first_run) -> dict[str, str]:
    return _digest(tmp / "workspace")


@pytest.fixture(scope="module")
def retrained(tmp, first_run, production_before, corrupted_runs) -> tuple[dict, dict | None]:
    return retrain_and_report(_synthetic(tmp, drift=0.6))


@pytest.fixture(scope="module")
def corrupted_runs(tmp, first_run, production_before) -> dict[str, tuple[dict, Path]]:
    events, items = generate_synthetic(_synthetic(tmp, 0.0).data.synthetic)
    out = {}
    for kind in CORRUPTIONS:
        folder = tmp / "corrupted" / kind
        bad_events, bad_items = inject_corruption(events, items, kind)
        write_parquet_atomic(bad_events, folder / "events.parquet")
        write_parquet_atomic(bad_items, folder / "items.parquet")
        out[kind] = run_and_report(_config(tmp, source="generic", data_dir=str(folder)))
    return out


def test_first_run_trains_gates_packages_and_promotes(tmp, first_run):
    summary, run_dir = first_run
    assert summary["status"] == "succeeded", summary["error"]
    assert list(summary["stages"]) == STAGES
    assert all(s["status"] == "succeeded" for s in summary["stages"].values()), summary["stages"]
    assert all(s["seconds"] > 0 for s in summary["stages"].values())
    assert summary["validation"]["success"] is True

    candidate = summary["metrics"]["candidate"]["overall"]
    baseline = summary["metrics"]["baselines"]["most_popular"]["overall"]
    assert summary["metrics"]["production"] is None  # first run: nothing to compare with
    assert summary["gate"]["promote"] is True
    assert candidate["ndcg@10"] > baseline["ndcg@10"] > 0
    assert "most_popular" in summary["gate"]["reason"]

    record = read_production(tmp / "workspace")
    assert record is not None and record.run_id == summary["run_id"] and record.model_tag == summary["model_tag"]
    assert record.bento_tag == summary["bento_tag"] and summary["bento_tag"].startswith("stratarec_service:")
    model_dir = Path(record.model_dir)
    lineage = json.loads((model_dir / "lineage.json").read_text())
    for key in ("seed", "data_window", "feature_service", "git_sha", "metrics", "config_fingerprint"):
        assert lineage.get(key) is not None, key
    assert lineage["feature_service"] == "recommender_v1"
    assert lineage["metrics"]["ndcg@10"] == candidate["ndcg@10"]
    assert StrataConfig.from_json((model_dir / "config.json").read_text()).fingerprint() == lineage["config_fingerprint"]
    assert (model_dir / "model.safetensors").is_file()

    # Layers: 3 coarse layers, each named, with shares summing to one.
    layers = summary["layers"]
    coarse = [layer for layer in layers if layer["level"] == "coarse"]
    assert len(coarse) == 3 and sum(layer["size"] for layer in coarse) == SYNTHETIC["n_users"]
    assert all(layer["name"] for layer in layers)
    assert sum(summary["layer_shares"].values()) == pytest.approx(1.0)

    assert summary["drift"]["drift_detected"] is False, summary["drift"]
    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and summary["run_id"] in report
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_data_stops_at_validate_and_production_is_untouched(tmp, corrupted_runs, production_before, kind):
    summary, run_dir = corrupted_runs[kind]
    assert summary["status"] == "failed"
    assert summary["error"].startswith("stage 'validate' failed:"), summary["error"]
    statuses = {name: s["status"] for name, s in summary["stages"].items()}
    assert statuses == {"ingest": "succeeded", "validate": "failed"} | {s: "skipped" for s in STAGES[2:]}
    report = Path(summary["validation"]["report"])
    assert report.is_file() and "FAILED" in report.read_text()
    assert _digest(tmp / "workspace") == production_before


def test_drift_triggers_warm_started_retraining_compared_with_production(tmp, first_run, retrained):
    drift, summary = retrained
    assert drift["drift_detected"] is True, drift
    assert drift["drifted_share"] >= 0.3 and drift["drifted_share"] == pytest.approx(drift["n_drifted"] / drift["n_columns"])
    assert summary is not None, "drift was detected but nothing was retrained"
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["training"]["warm_started"] is True
    production = summary["metrics"]["production"]
    assert production is not None and production["overall"]["ndcg@10"] > 0
    assert summary["gate"]["references"]["production"] == production["overall"]["ndcg@10"]
    record = read_production(tmp / "workspace")
    expected_tag = summary["model_tag"] if summary["gate"]["promote"] else first_run[0]["model_tag"]
    assert record.model_tag == expected_tag
