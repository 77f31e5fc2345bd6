"""Feast online read latency: one user's ``recommender_v1`` features, the read serving makes per request.

    python bench/feast_read.py                      # 2,000 timed reads per profile and reader
    python bench/feast_read.py --reads 200 --warmup 20   # smoke run

For each profile, local (SQLite online store, file registry) and production (Redis online
store, SQL registry on PostgreSQL), the ML-100K features are published into a private
feature repository (production: its own Feast project and PostgreSQL schema, removed at
the end), then single-user reads are timed in this process:

* ``online_user_features``: ``stratarec.feature_repo.store.online_user_features(store, [u])``,
  the Feast call serving makes (cached feature service, ``get_online_features().to_dict()``);
* ``serving_reader``: ``FeastUserFeatures.get(u)`` from ``stratarec.serving.service``, i.e. the
  same call plus the service's deadline thread pool (skipped if the service cannot be imported).

Features come from the workspace's published sources (``.stratarec/feature_repo/data``,
written by ``make run``), else they are computed from ML-100K in ``$STRATAREC_DATA_DIR``.
Users are drawn uniformly (seeded) from the users in the source. Prints a table and
writes JSON to ``bench/results/feast_read.json``. Target: p99 <= 3 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from stratarec.tables import text_table

ROOT = Path(__file__).resolve().parents[1]
TARGET_P99_MS = 3.0
log = logging.getLogger("bench.feast_read")


# -- feature repositories (also used by bench/serve.py) --------------------------------------


Features = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]


def load_features(source_repo: Path, data_dir: Path | None, recent_items_len: int) -> Features:
    """Activity, catalogue and layer rows: the workspace's published sources if present, else computed from ML-100K.

    Args:
        source_repo: A feature repository whose ``data/`` holds the published Parquet sources.
        data_dir: Folder holding ``ml-100k/``, used when ``source_repo`` has no sources.
        recent_items_len: Sequence length when computing from ML-100K.

    Returns:
        (user_activity, item_catalog, user layers or None).
    """
    from stratarec.feature_repo.definitions import ITEM_CATALOG_FILE, USER_ACTIVITY_FILE, USER_LAYER_FILE

    data = source_repo / "data"
    if (data / USER_ACTIVITY_FILE).is_file() and (data / ITEM_CATALOG_FILE).is_file():
        log.info("features from the published sources in %s", data)
        layers = pd.read_parquet(data / USER_LAYER_FILE) if (data / USER_LAYER_FILE).is_file() else None
        return pd.read_parquet(data / USER_ACTIVITY_FILE), pd.read_parquet(data / ITEM_CATALOG_FILE), layers
    from stratarec.data.movielens import load_movielens_100k
    from stratarec.features import compute_item_catalog, compute_user_activity, genre_vocabulary, order_events
    from stratarec.text_encoder import embed_texts, item_text

    root = data_dir or Path(os.environ.get("STRATAREC_DATA_DIR", ROOT.parent / "shared" / "data"))
    log.info("no published sources in %s: computing features from %s/ml-100k", data, root)
    events, items = load_movielens_100k(root)
    ordered = order_events(events)
    activity = compute_user_activity(ordered, items, genre_vocabulary(items), recent_items_len)
    catalog = compute_item_catalog(ordered, items, embed_texts(item_text(items), encoder="hashing"), ordered.event_timestamp.min())
    return activity, catalog, None


def bench_feature_config(profile: str, tag: str, **overrides):
    """A FeatureConfig for a private benchmark repository; production gets its own project and schema."""
    from stratarec.config import FeatureConfig

    name = f"stratarec_bench_{tag}"
    if profile == "production":
        return FeatureConfig(profile="production", project=name, registry_schema=name, **overrides)
    return FeatureConfig(profile="local", project=name, **overrides)


def publish_repo(repo: Path, cfg, activity: pd.DataFrame, catalog: pd.DataFrame, layers: pd.DataFrame | None) -> dict:
    """Publish the features (and layers) into ``repo`` with ``cfg``; returns publish_features' summary."""
    from stratarec.feature_repo.store import publish_features, publish_user_layers

    summary = publish_features(repo, cfg, activity, catalog)
    if layers is not None and len(layers):
        publish_user_layers(repo, cfg, layers)
    return summary


def drop_production(cfg) -> None:
    """Delete a benchmark project's Redis keys (``*<project>``) and PostgreSQL schema."""
    import redis
    from sqlalchemy import create_engine, text

    host, port = cfg.redis_connection.split(",")[0].rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), socket_connect_timeout=3)
    try:
        batch = []
        for key in client.scan_iter(match=b"*" + cfg.project.encode(), count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    finally:
        client.close()
    engine = create_engine(cfg.registry_url, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(text("SET lock_timeout = '20s'"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{cfg.registry_schema}" CASCADE'))
    finally:
        engine.dispose()


# -- measurement -----------------------------------------------------------------------------


def percentiles(samples_ms: list[float]) -> dict:
    """p50/p95/p99/mean/max of latencies in ms (linear interpolation)."""
    a = np.asarray(samples_ms, dtype=float)
    if not len(a):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
        "mean_ms": round(float(a.mean()), 3),
        "max_ms": round(float(a.max()), 3),
    }


def time_reads(read: Callable[[int], object], users: np.ndarray, warmup: int) -> tuple[list[float], int]:
    """Time ``read(user)`` for each user after ``warmup`` untimed reads; returns (ms per read, reads that found nothing)."""
    for u in users[:warmup]:
        read(int(u))
    samples, empty = [], 0
    for u in users[warmup:]:
        t = time.perf_counter_ns()
        got = read(int(u))
        samples.append((time.perf_counter_ns() - t) / 1e6)
        empty += got is None
    return samples, empty


def readers(repo: Path, cfg) -> Iterator[tuple[str, Callable[[int], object], Callable[[], None]]]:
    """(name, read one user, close) for each reader under test."""
    from stratarec.feature_repo.store import online_user_features, open_store

    store = open_store(repo, cfg)

    def core(u: int):
        row = online_user_features(store, [u])[u]
        return None if all(v is None for v in row.values()) else row

    yield "online_user_features", core, lambda: None
    try:
        from stratarec.serving.service import FeastUserFeatures
    except Exception as exc:  # the service is being edited elsewhere; the core read still counts
        log.warning("serving reader skipped: cannot import stratarec.serving.service (%s: %s)", type(exc).__name__, exc)
        return
    # A generous deadline: this measures the read, not the service's 50 ms timeout policy.
    reader = FeastUserFeatures(repo, cfg, timeout_s=5.0)
    yield "serving_reader", reader.get, reader.close


@contextlib.contextmanager
def bench_repo(profile: str, work: Path, features, keep: bool) -> Iterator[tuple[Path, object, dict]]:
    """A private repository of ``profile`` with the features published; removed afterwards unless ``keep``."""
    tag = uuid.uuid4().hex[:10]
    cfg = bench_feature_config(profile, tag)
    repo = work / f"{profile}_{tag}"
    try:
        started = time.perf_counter()
        summary = publish_repo(repo, cfg, *features)
        summary["setup_seconds"] = round(time.perf_counter() - started, 2)
        yield repo, cfg, summary
    finally:
        if not keep:
            if profile == "production":
                drop_production(cfg)
            shutil.rmtree(repo, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    """Publish, time every reader on every profile, and return the report."""
    features = load_features(Path(args.source_repo), Path(args.data_dir) if args.data_dir else None, args.recent_items_len)
    activity = features[0]
    user_ids = np.asarray(sorted(int(u) for u in activity["user_id"].unique()), dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    users = rng.choice(user_ids, size=args.warmup + args.reads, replace=True)
    recent_len = int(activity["recent_items"].map(len).max()) if "recent_items" in activity else None
    results = []
    work = Path(tempfile.mkdtemp(prefix="stratarec-feast-read-"))
    try:
        for profile in args.profiles:
            with bench_repo(profile, work, features, args.keep) as (repo, cfg, summary):
                log.info("%s profile published in %.1f s (%s)", profile, summary["setup_seconds"], repo)
                for name, read, close in readers(repo, cfg):
                    try:
                        samples, empty = time_reads(read, users, args.warmup)
                    finally:
                        close()
                    row = {
                        "profile": profile,
                        "online_store": "redis" if profile == "production" else "sqlite",
                        "reader": name,
                        "reads": len(samples),
                        "not_found": empty,
                        **percentiles(samples),
                        "reads_per_s": round(len(samples) / (sum(samples) / 1000), 1) if samples else None,
                    }
                    row["meets_target"] = row["p99_ms"] is not None and row["p99_ms"] <= TARGET_P99_MS
                    results.append(row)
                    log.info("%s", row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "feast_read",
        "what": "one user's recommender_v1 online features per read, in-process, sequential",
        "target_p99_ms": TARGET_P99_MS,
        "results": results,
        "setup": {
            "users": len(user_ids),
            "activity_rows": len(activity),
            "recent_items_len": recent_len,
            "warmup_reads": args.warmup,
            "seed": args.seed,
            "source": str(args.source_repo),
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
        },
        "finished_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table (milliseconds to 3 decimals)."""
    return text_table(rows, cols, digits=3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reads", type=int, default=2000, help="timed reads per profile and reader (>= 1000 for the p99 target)")
    p.add_argument("--warmup", type=int, default=100, help="untimed reads first (opens connections, loads the registry)")
    p.add_argument("--profiles", nargs="+", choices=["local", "production"], default=["local", "production"])
    p.add_argument("--source-repo", default=str(ROOT / ".stratarec" / "feature_repo"), help="repository whose data/ has published sources")
    p.add_argument("--data-dir", help="folder holding ml-100k/ (when the source repo has no sources)")
    p.add_argument("--recent-items-len", type=int, default=200, help="sequence length when computing from ML-100K")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the benchmark repositories, Redis keys and schemas")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "feast_read.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Feast's materialization prints progress to stdout; keep this script's stdout for the table.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(args)
    print(f"Feast online read, one user, in-process ({report['setup']['users']} users, target p99 <= {TARGET_P99_MS} ms)")
    print(table(report["results"], ["profile", "reader", "reads", "p50_ms", "p95_ms", "p99_ms", "max_ms", "not_found", "meets_target"]))
    if args.reads < 1000:
        print(f"note: {args.reads} reads is a smoke run; the p99 needs >= 1000 reads")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
