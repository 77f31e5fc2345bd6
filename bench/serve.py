"""Serving load benchmark: the production Bento under ``bentoml serve``, driven by a separate load generator.

    python bench/serve.py                                  # 30 s phases, production (Redis) features
    python bench/serve.py --duration 3 --warmup 1          # smoke run
    python bench/serve.py --features workspace             # the Bento's own (SQLite) feature repo

What runs:

1. The production Bento and model (``<workspace>/registry/production.json``, written by
   ``make run``) are copied into a private BentoML home, ``<workspace>/bench/serve/bentoml``:
   the benchmark never adds to or edits the workspace's stores.
2. Features. ``production`` (default): the workspace's published feature sources are
   published into a private Redis + PostgreSQL repository (its own Feast project and schema,
   removed at the end unless ``--keep-store``), and the private model copy's ``config.json``
   is switched to the production profile, because the service takes the feature store's
   profile from the model's config and only its folder from ``$STRATAREC_FEATURE_REPO``.
   ``workspace``: the Bento as packaged, reading ``<workspace>/feature_repo``.
3. ``bentoml serve <bento>`` on 127.0.0.1 (``STRATAREC_MODEL_TAG``, ``STRATAREC_FEATURE_REPO``,
   and ``STRATAREC_REQUEST_LOG`` pointing into the private folder, so monitoring's request
   log never sees benchmark traffic). Ready when ``GET /readyz`` answers 200.
4. A load generator in a separate process (asyncio + aiohttp), per route: a warm-up, closed
   loops at concurrency 1, 8 and 32, and an open loop at a fixed arrival rate (latency is
   measured from each request's scheduled send time, so a slow server cannot hide queueing).
   ML-100K users are drawn uniformly (seeded).
5. Adaptive batching. BentoML 1.4 batches only APIs declared ``batchable=True`` (the
   ``batching`` config section applies to legacy runners only, checked in
   ``_bentoml_impl/server/app.py``), so batching on/off means two routes of one server. The
   Bento's ``bento.yaml`` lists each route's ``batchable`` flag: with a batchable recommend
   route the phases run against ``/recommend`` (off) and that route (on); without one the
   report says batching could not be toggled.
6. Time in the Feast lookup vs model scoring: taken from a ``Server-Timing`` response header
   (``feast;dur=1.2, score;dur=3.4``) or a ``timing_ms`` object in the response when the
   service sends one; otherwise an in-process breakdown after the load phases (same service
   class, model and feature repository, one request at a time) times
   ``features.get_many`` and ``bundle.recommend_batch`` separately.

Prints a table and writes JSON to ``bench/results/serve.json``. On this 2-core machine the
load generator shares the CPU with the server; the report records the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from stratarec.tables import text_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("bench.serve")

READY_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 30  # the service's traffic timeout
MAX_OPEN_LOOP_IN_FLIGHT = 2000


# -- statistics ------------------------------------------------------------------------------


def summarize(latencies_ms: list[float]) -> dict:
    """p50/p95/p99/max of latencies in ms."""
    if not latencies_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(a.max()), 2),
    }


_SERVER_TIMING = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:;[^,]*?dur=([0-9.]+))?[^,]*")


def parse_server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: feast;dur=1.2, score;dur=3.4`` -> ``{"feast": 1.2, "score": 3.4}``."""
    out = {}
    for part in header.split(","):
        m = _SERVER_TIMING.match(part)
        if m and m.group(2):
            out[m.group(1)] = float(m.group(2))
    return out


# -- load generator (runs in its own process) ------------------------------------------------


class PhaseStats:
    """What one phase observed."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.degraded = 0
        self.cold_start = 0
        self.timings: dict[str, list[float]] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _one(session, url: str, body: bytes, batched: bool, stats: PhaseStats, t_start: float) -> None:
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            payload = await resp.read()
            header = resp.headers.get("Server-Timing")
            status = resp.status
    except TimeoutError:
        stats.error("timeout")
        return
    except aiohttp.ClientError as exc:
        stats.error(type(exc).__name__)
        return
    elapsed = (time.perf_counter() - t_start) * 1000
    if status != 200:
        stats.error(f"http_{status}")
        return
    try:
        answer = json.loads(payload)
        if batched:
            answer = answer[0] if isinstance(answer, list) else next(v for v in answer.values() if isinstance(v, list))[0]
    except (ValueError, KeyError, IndexError, StopIteration, TypeError):
        stats.error("bad_body")
        return
    stats.latencies.append(elapsed)
    stats.degraded += bool(answer.get("degraded"))
    stats.cold_start += bool(answer.get("cold_start"))
    timing = parse_server_timing(header) if header else {}
    if isinstance(answer.get("timing_ms"), dict):
        timing.update({k: float(v) for k, v in answer["timing_ms"].items() if isinstance(v, int | float)})
    for name, ms in timing.items():
        stats.timings.setdefault(name, []).append(ms)


def _body(user_id: int, k: int, body_mode: str) -> bytes:
    request = {"user_id": user_id, "k": k}
    if body_mode == "object":
        return json.dumps(request).encode()
    if body_mode == "list":
        return json.dumps([request]).encode()
    return json.dumps({body_mode: [request]}).encode()  # a batchable API taking one named list argument


async def closed_loop(session, url: str, body_mode: str, pick, k: int, concurrency: int, duration: float) -> tuple[PhaseStats, float]:
    """``concurrency`` clients, each sending its next request when the previous one is answered."""
    stats = PhaseStats()
    batched = body_mode != "object"
    started = time.perf_counter()
    deadline = started + duration

    async def client() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await _one(session, url, _body(pick(), k, body_mode), batched, stats, t)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return stats, time.perf_counter() - started


async def open_loop(session, url: str, body_mode: str, pick, k: int, rate: float, duration: float) -> tuple[PhaseStats, float, int, int]:
    """Requests sent at fixed intervals whatever the answers; latency counts from the scheduled time."""
    stats = PhaseStats()
    batched = body_mode != "object"
    started = time.perf_counter()
    n = int(rate * duration)
    tasks: set[asyncio.Task] = set()
    dropped = 0
    for i in range(n):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_OPEN_LOOP_IN_FLIGHT:
            dropped += 1  # the client itself is saturated: count it rather than queue without bound
            continue
        task = asyncio.create_task(_one(session, url, _body(pick(), k, body_mode), batched, stats, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S + 5)
    return stats, time.perf_counter() - started, n, dropped


async def run_plan(plan: dict) -> list[dict]:
    """Every route's warm-up and phases, one after the other."""
    import aiohttp

    users = [int(u) for u in plan["users"]]
    rng = random.Random(plan["seed"])

    def pick() -> int:
        return users[rng.randrange(len(users))]

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False), timeout=timeout) as session:
        for route in plan["routes"]:
            url = plan["url"] + route["route"]
            if plan["warmup"] > 0:
                await closed_loop(session, url, route["body"], pick, plan["k"], 8, plan["warmup"])
            for phase in plan["phases"]:
                row = {"route": route["route"], "batching": route["batching"], "mode": phase["mode"]}
                if phase["mode"] == "closed":
                    stats, elapsed = await closed_loop(
                        session, url, route["body"], pick, plan["k"], phase["concurrency"], phase["duration"]
                    )
                    row.update(load=f"c={phase['concurrency']}", concurrency=phase["concurrency"])
                else:
                    stats, elapsed, sent, dropped = await open_loop(
                        session, url, route["body"], pick, plan["k"], phase["rate"], phase["duration"]
                    )
                    row.update(load=f"{phase['rate']:g} req/s", rate=phase["rate"], scheduled=sent, dropped=dropped)
                done = len(stats.latencies)
                row.update(
                    duration_s=round(elapsed, 2),
                    ok=done,
                    errors=sum(stats.errors.values()),
                    error_kinds=stats.errors,
                    degraded=stats.degraded,
                    cold_start=stats.cold_start,
                    throughput_rps=round(done / elapsed, 1) if elapsed else None,
                    **summarize(stats.latencies),
                    server_timing={name: summarize(v) for name, v in stats.timings.items()} or None,
                )
                print(json.dumps({k: v for k, v in row.items() if k != "server_timing"}), flush=True)
                results.append(row)
    return results


def loadgen_main(plan_path: Path, out_path: Path) -> int:
    """Entry point of the load-generator process."""
    plan = json.loads(plan_path.read_text())
    results = asyncio.run(run_plan(plan))
    out_path.write_text(json.dumps(results))
    return 0


# -- in-process breakdown (runs in its own process, with the server's environment) ----------


def breakdown_main(out_path: Path, users: list[int], n: int, k: int, seed: int) -> int:
    """Feast lookup vs model scoring vs the whole answer, one request at a time, in-process.

    Uses the service's public pieces only (its feature source, its bundle and the API
    method itself), so it follows the service as it changes.
    """
    import stratarec.feature_repo.store  # noqa: F401  (imported here, not inside the service's first, deadline-bound read)
    from stratarec.schema import USER_RECENT_ITEMS
    from stratarec.serving.models import RecommendRequest
    from stratarec.serving.service import RecommenderService

    svc = RecommenderService.inner()  # the user class BentoML instantiates in each worker
    deadline = time.monotonic() + 120
    while True:  # the store opens on the first read; wait until it answers, as /readyz would
        try:
            svc.features.ping(timeout_s=30)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.info("feature store not ready yet (%s); retrying", exc)
            time.sleep(1.5)
    rng = random.Random(seed)
    sample = [users[rng.randrange(len(users))] for _ in range(n + 20)]
    feast_ms, score_ms, answer_ms, no_history = [], [], [], 0
    for i, u in enumerate(sample):
        t0 = time.perf_counter()
        feats = svc.features.get_many([u], timeout_s=5.0)  # time the read, not the 50 ms deadline policy
        t1 = time.perf_counter()
        history = [int(x) for x in (feats.get(u) or {}).get(USER_RECENT_ITEMS) or []]
        if history:
            svc.bundle.recommend_batch([history], k)
        t2 = time.perf_counter()
        svc.recommend(RecommendRequest.model_validate({"user_id": u, "k": k}))  # the API method, called in-process
        t3 = time.perf_counter()
        if i < 20:  # warm-up
            continue
        feast_ms.append((t1 - t0) * 1000)
        answer_ms.append((t3 - t2) * 1000)
        if history:
            score_ms.append((t2 - t1) * 1000)
        else:
            no_history += 1
    out_path.write_text(
        json.dumps(
            {
                "requests": n,
                "feast_lookup": summarize(feast_ms),
                "model_scoring": summarize(score_ms),
                "whole_answer": summarize(answer_ms),
                "users_without_history": no_history,
                "feature_source": svc.features.name,
                "what": "features.get_many([u]) | bundle.recommend_batch([history], k) | recommend(request), sequential, in-process",
            }
        )
    )
    return 0


# -- orchestration ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_store_entry(src_home: Path, dst_home: Path, kind: str, tag: str) -> Path:
    name, version = tag.split(":", 1)
    src, dst = src_home / kind / name / version, dst_home / kind / name / version
    if not src.is_dir():
        raise SystemExit(f"{tag} is not in {src_home / kind}: run `make run` first")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst.parent / "latest").write_text(version)
    return dst


def _batching_routes(bento_dir: Path) -> tuple[list[dict], str]:
    """Routes to drive: the plain /recommend, plus a batchable recommend route if the Bento has one."""
    import yaml

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    routes = (info.get("schema") or {}).get("routes") or []
    plain = [{"route": "/recommend", "batching": "off", "body": "object"}]
    batchable = [r for r in routes if r.get("batchable") and "recommend" in r.get("route", "")]
    if not batchable:
        names = ", ".join(f"{r.get('route')} (batchable={r.get('batchable')})" for r in routes)
        return plain, (
            f"adaptive batching not toggled: no batchable recommend API in the Bento ({names}). BentoML 1.4 batches "
            "only @bentoml.api(batchable=True) methods; the service would need e.g. "
            "@bentoml.api(route='/recommend/adaptive', batchable=True, max_batch_size=32, max_latency_ms=20) "
            "def recommend_adaptive(self, requests: list[RecommendRequest]) -> list[RecommendResponse], answering the "
            "list as /recommend/batch does (one feature read, one forward pass); this benchmark then drives it as 'on'"
        )
    route = batchable[0]
    spec = route.get("input") or {}
    if spec.get("type") == "array":
        body = "list"
    else:
        arrays = [name for name, p in (spec.get("properties") or {}).items() if p.get("type") == "array"]
        body = arrays[0] if len(arrays) == 1 else None
    if body is None:
        return plain, f"batchable route {route['route']} found but its input shape is not a list of requests; batching not toggled"
    return plain + [{"route": route["route"], "batching": "on", "body": body}], f"adaptive batching on via {route['route']}"


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> float:
    import urllib.error
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers: the process group we created for it, by its id."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def orchestrate(args: argparse.Namespace) -> dict:
    """Set up, serve, load, break down, clean up; returns the report."""
    from feast_read import drop_production, load_features, publish_repo

    from stratarec.config import FeatureConfig
    from stratarec.registry import read_production

    workspace = Path(args.workspace).expanduser().resolve()
    record = read_production(workspace)
    if record is None or not record.bento_tag or not record.model_tag:
        raise SystemExit(f"no production Bento in {workspace}/registry: run `make run` first")
    work = workspace / "bench" / "serve"
    home = work / "bentoml"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "request_log", ignore_errors=True)  # the previous run's served requests
    bento_dir = _copy_store_entry(workspace / "bentoml", home, "bentos", record.bento_tag)
    model_dir = _copy_store_entry(workspace / "bentoml", home, "models", record.model_tag)
    routes, batching_note = _batching_routes(bento_dir)
    log.info("%s", batching_note)

    features = load_features(workspace / "feature_repo", Path(args.data_dir) if args.data_dir else None, 200)
    users = sorted(int(u) for u in features[0]["user_id"].unique())
    setup: dict = {"features": args.features}
    store_cfg, repo = None, workspace / "feature_repo"
    try:
        if args.features == "production":
            model_cfg = json.loads((model_dir / "config.json").read_text())
            name = f"stratarec_bench_{uuid.uuid4().hex[:10]}"
            store_cfg = FeatureConfig.model_validate(
                {**model_cfg["features"], "profile": "production", "project": name, "registry_schema": name}
            )
            repo = work / f"feature_repo_{name}"
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Feast prints materialization progress
                publish_repo(repo, store_cfg, *features)
            setup["publish_seconds"] = round(time.perf_counter() - started, 1)
            # The service takes the store's profile from the model's config: switch the private copy only.
            model_cfg["features"] = json.loads(store_cfg.model_dump_json())
            (model_dir / "config.json").write_text(json.dumps(model_cfg))
            setup.update(project=name, registry_schema=name, online_store="redis")
        else:
            setup.update(online_store="sqlite")
        if args.state_cache_size is not None:
            # The service reads serving.state_cache_size from the model's config: change the private copy only.
            model_cfg = json.loads((model_dir / "config.json").read_text())
            model_cfg.setdefault("serving", {})["state_cache_size"] = args.state_cache_size
            (model_dir / "config.json").write_text(json.dumps(model_cfg))
        setup["state_cache_size"] = json.loads((model_dir / "config.json").read_text()).get("serving", {}).get("state_cache_size")
        setup["feature_repo"] = str(repo)
        env = {
            **os.environ,
            "BENTOML_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "true",
            "STRATAREC_MODEL_TAG": record.model_tag,
            "STRATAREC_FEATURE_REPO": str(repo),
            "STRATAREC_REQUEST_LOG": str(work / "request_log"),
        }
        phase_rows, url, server_errors = _serve_and_load(args, record.bento_tag, env, work, routes, users, setup)
        timed = any(r.get("server_timing") for r in phase_rows)
        breakdown = None
        if args.breakdown_requests > 0 and not timed:
            out_path = work / "breakdown.json"
            out_path.unlink(missing_ok=True)
            done = subprocess.run(
                [sys.executable, __file__, "--breakdown", str(out_path), "--breakdown-requests", str(args.breakdown_requests)],
                env={**env, "STRATAREC_BENCH_USERS": json.dumps(users)},
                stdout=sys.stderr,
                stderr=sys.stderr,
            )
            breakdown = json.loads(out_path.read_text()) if done.returncode == 0 and out_path.exists() else {"error": "see stderr"}
    finally:
        if store_cfg is not None and not args.keep_store:
            drop_production(store_cfg)
            shutil.rmtree(repo, ignore_errors=True)
    return {
        "benchmark": "serve",
        "smoke": args.duration < 10,
        "bento_tag": record.bento_tag,
        "model_tag": record.model_tag,
        "url": url,
        "setup": setup,
        "batching": batching_note,
        "phases": phase_rows,
        "timing_source": "server_timing" if timed else "in_process_breakdown",
        "timing_note": None
        if timed
        else (
            "the service sends no per-request timing; to split HTTP latency into Feast lookup and scoring it needs a "
            "'Server-Timing: feast;dur=<ms>, score;dur=<ms>' response header (or a 'timing_ms' object in "
            "RecommendResponse) set in RecommenderService._answer; until then see in_process_breakdown"
        ),
        "in_process_breakdown": breakdown,
        "server_exceptions": server_errors,
        "users": len(users),
        "k": args.k,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _serve_and_load(args, bento_tag: str, env: dict, work: Path, routes: list[dict], users: list[int], setup: dict):
    """Start ``bentoml serve``, run the load generator against it, stop it; returns (phase rows, url, server log errors)."""
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = work / "server.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--arg", f"workers={args.workers}", "--arg", f"access_log={str(args.access_log).lower()}"]
    setup.update(workers=args.workers, access_log=args.access_log)
    log.info("+ %s", " ".join(cmd))
    with open(server_log, "w") as out:
        # Its own session, so the server and its workers stop together (by this group's id).
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    try:
        setup["ready_seconds"] = round(_wait_ready(url, server, server_log), 1)
        log.info("server ready on %s after %.1f s", url, setup["ready_seconds"])
        closed = [{"mode": "closed", "concurrency": c, "duration": args.duration} for c in args.concurrency]
        opened = [{"mode": "open", "rate": r, "duration": args.duration} for r in args.rate]
        # Load generators are separate processes: they must not share the server's interpreter (or GIL).
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        rows = []
        for route in routes:
            if args.client == "wrk":
                # wrk (C) drives the closed loops: at hundreds of requests/s an asyncio client
                # takes a large share of the 2 cores the server needs. wrk 4 has no fixed
                # arrival rate, so open loops stay with the asyncio client (light at 150 req/s).
                if args.warmup > 0:
                    run_wrk(url, route, users, args.k, args.seed, 8, args.warmup, work)
                rows += [run_wrk(url, route, users, args.k, args.seed, ph["concurrency"], ph["duration"], work) for ph in closed]
                plan_phases, warmup = opened, 0.0
            else:
                plan_phases, warmup = closed + opened, args.warmup
            if plan_phases:
                plan = {
                    "url": url,
                    "routes": [route],
                    "phases": plan_phases,
                    "warmup": warmup,
                    "users": users,
                    "k": args.k,
                    "seed": args.seed,
                }
                plan_path, results_path = work / "plan.json", work / "loadgen_results.json"
                plan_path.write_text(json.dumps(plan))
                results_path.unlink(missing_ok=True)
                subprocess.run([sys.executable, __file__, "--loadgen", str(plan_path), str(results_path)], check=True, stdout=sys.stderr)
                rows += [{**r, "client": "asyncio"} for r in json.loads(results_path.read_text())]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # They share the 2 cores with the server: record what they took, to judge the numbers.
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        setup["loadgen_cpu_seconds"] = round(cpu, 1)
        setup["loadgen_wall_seconds"] = round(time.monotonic() - started, 1)
        setup["client"] = args.client
        setup["status_after_load"] = _status(url)  # one worker's counters, user-state cache hits included
    finally:
        _stop(server)
    return rows, url, _server_exceptions(server_log)


def _status(url: str) -> dict | None:
    """``POST /status`` of whichever worker answers, or None."""
    import urllib.request

    request = urllib.request.Request(url + "/status", data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return {key: status.get(key) for key in ("requests_served", "requests_degraded", "requests_stale", "state_cache")}


WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_recommend.lua"


def run_wrk(url: str, route: dict, users: list[int], k: int, seed: int, concurrency: int, duration: float, work: Path) -> dict:
    """One closed-loop phase with ``wrk`` (one thread, ``concurrency`` connections); a phase row."""
    users_path = work / "wrk_users.txt"
    users_path.write_text("\n".join(str(u) for u in users) + "\n")
    env = {
        **os.environ,
        "STRATAREC_WRK_USERS": str(users_path),
        "STRATAREC_WRK_BODY": route["body"],
        "STRATAREC_WRK_K": str(k),
        "STRATAREC_WRK_SEED": str(seed),
    }
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", f"--timeout={REQUEST_TIMEOUT_S}s", "-s", str(WRK_SCRIPT)]
    done = subprocess.run([*cmd, url + route["route"]], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    socket_errors = {name: n for name, n in result["socket_errors"].items() if n}
    kinds = {**{f"http_{code}": n for code, n in result["statuses"].items()}, **socket_errors}
    seconds = result["duration_us"] / 1e6
    ok = result["requests"] - result["non_2xx"]
    lat = result["latency_us"]
    timing = {name: [float(x) for x in result[f"{name}_ms"]] for name in ("feast", "score") if result[f"{name}_ms"]}
    row = {
        "route": route["route"],
        "batching": route["batching"],
        "mode": "closed",
        "client": "wrk",
        "load": f"c={concurrency}",
        "concurrency": concurrency,
        "duration_s": round(seconds, 2),
        "ok": ok,
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "degraded": result["degraded"],
        "cold_start": result["cold_start"],
        "throughput_rps": round(ok / seconds, 1) if seconds else None,
        # wrk's percentiles cover every response it timed (errors included, which a passing phase has none of).
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p95_ms": round(lat["p95"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 2),
        "server_timing": {name: summarize(v) for name, v in timing.items()} or None,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "server_timing"}), flush=True)
    return row


def _server_exceptions(log_path: Path) -> dict[str, int]:
    """Exceptions in the server log (warm-up included), by their final line, with counts."""
    lines = log_path.read_text(errors="replace").splitlines()
    found: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            last = next((x for x in lines[i + 1 :] if x and not x[0].isspace()), "?")
            found[last[:300]] = found.get(last[:300], 0) + 1
    return found


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table (milliseconds to 2 decimals)."""
    return text_table(rows, cols, digits=2)


def print_report(report: dict) -> None:
    """The phase table, the timing breakdown and the notes."""
    kind = "SMOKE RUN (short phases; not a measurement)" if report["smoke"] else "measurement"
    print(f"Serving benchmark: {report['bento_tag']} with {report['setup']['online_store']} features — {kind}")
    cols = [
        "route",
        "batching",
        "client",
        "load",
        "duration_s",
        "ok",
        "errors",
        "degraded",
        "throughput_rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
    ]
    print(table(report["phases"], cols))
    for row in report["phases"]:
        for name, stats in (row.get("server_timing") or {}).items():
            print(f"  {row['route']} {row['load']}: server timing {name} p50 {stats['p50_ms']} ms, p95 {stats['p95_ms']} ms")
    b = report.get("in_process_breakdown")
    if b and "feast_lookup" in b:
        rows = [{"part": part, **b[part]} for part in ("feast_lookup", "model_scoring", "whole_answer")]
        print(f"In-process breakdown ({b['requests']} sequential requests, {b['feature_source']}):")
        print(table(rows, ["part", "p50_ms", "p95_ms", "p99_ms", "max_ms"]))
    s = report["setup"]
    if "loadgen_cpu_seconds" in s:
        print(f"load generator: {s['loadgen_cpu_seconds']} CPU s over {s['loadgen_wall_seconds']} s wall (same 2 cores as the server)")
    print(f"batching: {report['batching']}")
    status = s.get("status_after_load") or {}
    if status.get("state_cache"):
        c = status["state_cache"]
        total = c["hits"] + c["misses"]
        print(
            f"user-state cache (one worker, capacity {c['capacity']}): {c['entries']} entries, "
            f"{c['hits']} hits / {total} lookups ({c['hits'] / total:.1%})"
            if total
            else "user-state cache: no lookups"
        )
    elif "state_cache_size" in s:
        print(f"user-state cache: off (state_cache_size={s['state_cache_size']})")
    if report.get("timing_note"):
        print(f"timing: {report['timing_note']}")
    for message, count in (report.get("server_exceptions") or {}).items():
        print(f"server exception ({count}x, warm-up included): {message}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default=str(ROOT / ".stratarec"), help="workspace of `make run` (registry, BentoML store, feature repo)")
    p.add_argument(
        "--features", choices=["production", "workspace"], default="production", help="Redis repo set up here, or the Bento's own"
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of concurrency-8 load before each route's phases")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop concurrencies")
    p.add_argument("--rate", type=float, nargs="*", default=[150.0], help="open-loop arrival rates, req/s")
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--client",
        choices=["wrk", "asyncio"],
        default="wrk" if shutil.which("wrk") else "asyncio",
        help="closed-loop load generator (default wrk when installed: `apt-get install wrk`); open loops always use asyncio",
    )
    p.add_argument("--workers", type=int, default=2, help="BentoML worker processes (`bentoml serve --arg workers=N`)")
    p.add_argument("--access-log", action="store_true", help="turn BentoML's per-request access log on")
    p.add_argument(
        "--state-cache-size",
        type=int,
        default=None,
        help="override serving.state_cache_size in the private model copy (0: every request runs the transformer)",
    )
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--breakdown-requests", type=int, default=300, help="in-process Feast-vs-scoring requests (0: skip)")
    p.add_argument("--data-dir", help="folder holding ml-100k/ if the workspace has no published features")
    p.add_argument("--keep-store", action="store_true", help="keep the benchmark's Redis keys, schema and feature repo")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    p.add_argument("--loadgen", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--breakdown", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.loadgen:
        return loadgen_main(Path(args.loadgen[0]), Path(args.loadgen[1]))
    if args.breakdown:
        users = json.loads(os.environ["STRATAREC_BENCH_USERS"])
        return breakdown_main(Path(args.breakdown), users, args.breakdown_requests, args.k, args.seed)
    report = orchestrate(args)
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
