"""Isolated production-profile Feast stores (Redis online store, SQL registry on Postgres) for tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from stratarec.config import FeatureConfig


def redis_client(cfg: FeatureConfig) -> redis.Redis:
    """A client for the first host of ``cfg.redis_connection``."""
    host, port = cfg.redis_connection.split(",")[0].rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_connect_timeout=3)


@contextlib.contextmanager
def isolated_production(prefix: str) -> Iterator[tuple[Callable[..., FeatureConfig], redis.Redis, Engine]]:
    """Make production configs, each with its own Feast project and Postgres schema; remove them after.

    The project name suffixes every Redis key Feast writes and the schema holds the registry,
    so concurrent runs never see each other's features. Unreachable servers fail the test
    (a skipped integration test would hide that the profile is no longer checked).

    Args:
        prefix: Start of the project and schema names.

    Yields:
        ``(make, client, engine)``: ``make(**overrides)`` returns a new isolated config.
    """
    probe = FeatureConfig(profile="production")
    client = redis_client(probe)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {probe.redis_connection} is unreachable ({exc}); start it, e.g. `redis-server --daemonize yes`")
    engine = create_engine(probe.registry_url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # sqlalchemy wraps the driver's error types
        pytest.fail(f"PostgreSQL at {probe.registry_url} is unreachable ({type(exc).__name__}: {exc}); start it first")
    made: list[FeatureConfig] = []

    def make(**overrides) -> FeatureConfig:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        cfg = FeatureConfig(**{"profile": "production", "project": name, "registry_schema": name, **overrides})
        made.append(cfg)
        return cfg

    try:
        yield make, client, engine
    finally:
        for cfg in made:
            suffix = cfg.project.encode()
            keys = list(client.scan_iter(match=b"*" + suffix, count=1000))
            if keys:
                client.delete(*keys)
            with engine.begin() as conn:
                conn.execute(text("SET lock_timeout = '20s'"))
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{cfg.registry_schema}" CASCADE'))
            assert not list(client.scan_iter(match=b"*" + suffix, count=1000)), f"Redis keys of {cfg.project} survived cleanup"
            with engine.connect() as conn:
                left = conn.execute(
                    text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"), {"s": cfg.registry_schema}
                ).all()
            assert not left, f"schema {cfg.registry_schema} survived cleanup"
        engine.dispose()
        client.close()
