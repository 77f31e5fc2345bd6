"""Pipeline stages as plain, typed functions: train, layer, evaluate and gate.

KFP components are thin adapters over these; tests and the CLI call them directly. They
read and write ordinary files (Parquet, safetensors, JSON) and never import KFP, Feast or
BentoML.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stratarec.baselines import Scorer, build_baselines
from stratarec.bundle import (
    CONFIG_FILE,
    ITEMS_FILE,
    LINEAGE_FILE,
    METRICS_FILE,
    RecommenderBundle,
    item_table,
    load_layers,
    save_layers,
    write_json_atomic,
    write_parquet_atomic,
)
from stratarec.config import StrataConfig
from stratarec.evaluation.ranking import evaluate_scorer
from stratarec.item_content import item_content
from stratarec.layering import InterestLayers, build_interest_layers, genre_matrix
from stratarec.registry import git_sha, read_production, utc_now
from stratarec.schema import FEATURE_SERVICE, GENRES, ITEM_ID, ITEM_TEXT_EMBEDDING, RELEASE_YEAR, TITLE
from stratarec.sequences import ItemIndex, SequenceSplit, split_from_frame
from stratarec.training import ModelScorer, save_trained_model, train_sequential

log = logging.getLogger(__name__)


def catalog_index(catalog: pd.DataFrame) -> tuple[ItemIndex, np.ndarray]:
    """Item index in catalogue order and the (n_items, d) text embeddings aligned with it."""
    cat = catalog.sort_values(ITEM_ID)
    index = ItemIndex(cat[ITEM_ID].to_numpy(dtype=np.int64))
    text = np.stack([np.asarray(v, dtype=np.float32) for v in cat[ITEM_TEXT_EMBEDDING]])
    return index, text


def catalog_content(catalog: pd.DataFrame, cfg: StrataConfig, reference: str | pd.Timestamp) -> tuple[ItemIndex, np.ndarray]:
    """Item index and the content vectors the model's projection reads (text, plus release age if configured).

    Args:
        catalog: Item catalogue with text embeddings and release years (from the feature store).
        cfg: The run config (``model.release_age``).
        reference: The newest training event's time; release ages count back from its year.
    """
    index, text = catalog_index(catalog)
    years = catalog.sort_values(ITEM_ID)[RELEASE_YEAR].to_numpy()
    return index, item_content(text, years, pd.Timestamp(reference).year, release_age=cfg.model.release_age)


def train_candidate(
    training_set: pd.DataFrame,
    catalog: pd.DataFrame,
    cfg: StrataConfig,
    out_dir: Path,
    *,
    data_window: tuple[str, str],
    warm_start_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train the candidate and write a complete model bundle with lineage.

    Args:
        training_set: Point-in-time training set (user_id, train_items, val_item, test_item).
        catalog: Item catalogue with text embeddings (from the feature store).
        cfg: The run config (saved into the bundle).
        out_dir: Bundle directory to create.
        data_window: First and last event timestamps the split covers.
        warm_start_dir: Production bundle to fine-tune from (continual training).
        checkpoint_dir: Per-epoch checkpoints (default ``out_dir/../checkpoints``).
        progress: Per-epoch callback.

    Returns:
        Training summary (also stored in ``lineage.json``).
    """
    index, content = catalog_content(catalog, cfg, data_window[1])
    split = split_from_frame(training_set, index, window=data_window)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else Path(out_dir).parent / (Path(out_dir).name + "_checkpoints")
    result = train_sequential(
        split,
        index,
        content if cfg.model.text_init else None,
        cfg.model,
        cfg.train,
        ckpt,
        init_from=warm_start_dir,
        progress=progress,
    )
    out = Path(out_dir)
    save_trained_model(result.model, index, out)
    popularity = split.train_item_counts(len(index))
    write_parquet_atomic(item_table(catalog, index, popularity), out / ITEMS_FILE)
    (out / CONFIG_FILE).write_text(cfg.to_json())
    summary = {
        "best_val_ndcg@10": result.best_val_ndcg,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
        "device": result.device,
        "warm_started": result.warm_started,
        "warm_start_skipped": result.warm_start_skipped,
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    lineage = {
        "trained_at": utc_now(),
        "git_sha": git_sha(),
        "config_fingerprint": cfg.fingerprint(),
        "seed": cfg.train.seed,
        "data_window": {"start": data_window[0], "end": data_window[1]},
        "feature_service": FEATURE_SERVICE,
        "n_users": len(split.users),
        "n_items": len(index),
        "warm_start_from": str(warm_start_dir) if warm_start_dir else None,
        "training": summary,
        "history": result.history,
    }
    write_json_atomic(out / LINEAGE_FILE, lineage)
    shutil.rmtree(ckpt, ignore_errors=True)  # the bundle now holds the best weights
    return {**summary, "history": result.history}


def layer_users(bundle_dir: Path, training_set: pd.DataFrame, cfg: StrataConfig) -> InterestLayers:
    """Cluster users' interest vectors from the trained model and store the layers in the bundle.

    The interest vector is computed from everything the user did up to the test cutoff
    (training history plus the validation item), the state serving would use.
    """
    bundle = RecommenderBundle(bundle_dir)
    split = split_from_frame(training_set, bundle.index)
    histories = split.test_inputs()
    vectors = ModelScorer(bundle.model).user_vectors(histories)
    items = bundle.items
    genres = sorted({g for text in items[GENRES].astype(str) for g in text.split("|") if g})
    layers = build_interest_layers(
        split.users,
        vectors,
        histories,
        items[GENRES].astype(str).tolist(),
        items[TITLE].astype(str).tolist(),
        genres,
        cfg.layers,
        seed=cfg.train.seed,
    )
    save_layers(bundle_dir, layers)
    return layers


class _ReindexedScorer:
    """Scores a model trained on another catalogue in the current catalogue's columns.

    Production may predate new items: they get -inf (never recommended by it), and history
    items it never saw are dropped from its input.
    """

    name = "production"

    def __init__(self, bundle: RecommenderBundle, current: ItemIndex) -> None:
        self.bundle = bundle
        self.current = current
        self.cols = bundle.index.to_index(current.item_ids)  # current column -> production row

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        mapped = [self.bundle.index.to_index(self.current.to_ids(h)) for h in histories]
        mapped = [m[m > 0] for m in mapped]
        raw = self.bundle.scorer.score(mapped)  # (B, n_prod)
        out = np.full((len(histories), len(self.current)), -np.inf, dtype=np.float32)
        known = self.cols > 0
        out[:, known] = raw[:, self.cols[known] - 1]
        return out


def _cold_item_mask(split: SequenceSplit, n_items: int, max_train: int) -> np.ndarray:
    counts = split.train_item_counts(n_items)
    return (split.test_targets > 0) & (counts[split.test_targets] <= max_train)


def evaluate_candidate(
    bundle_dir: Path,
    training_set: pd.DataFrame,
    seen_before_test: dict[int, list[int]] | None,
    cfg: StrataConfig,
) -> dict:
    """Full-ranking metrics for the candidate, the baselines and production, plus the gate.

    Args:
        bundle_dir: Candidate bundle (already layered).
        training_set: The same split the candidate was trained on.
        seen_before_test: Per user, every item seen before the test event (from the full
            event history, which may be longer than the feature store's sequence). None uses
            the split's own histories.
        cfg: Run config (k, cold thresholds, gate policy).

    Returns:
        ``{"candidate": {...}, "baselines": {name: {...}}, "production": {...} | None,
        "gate": {"promote": bool, "reason": str, ...}}`` with per-slice metric dicts.
    """
    k = cfg.evaluation.k
    bundle = RecommenderBundle(bundle_dir)
    index = bundle.index
    split = split_from_frame(training_set, index)
    inputs = split.test_inputs()
    if seen_before_test is not None:
        seen = []
        for u, h in zip(split.users, inputs, strict=True):
            extra = index.to_index(np.asarray(seen_before_test.get(int(u), []), dtype=np.int64))
            seen.append(np.union1d(h, extra[extra > 0]))
    else:
        seen = inputs
    n = len(index)
    genres = sorted({g for text in bundle.items[GENRES].astype(str) for g in text.split("|") if g})
    vectors = np.vstack([np.zeros((1, len(genres))), genre_matrix(bundle.items[GENRES].astype(str).tolist(), genres)])
    popularity = split.train_item_counts(n)
    slices: dict[str, np.ndarray] = {}
    layers = load_layers(bundle_dir)
    if layers is not None:
        layer_of = dict(zip(layers.assignments["user_id"], layers.assignments["layer_coarse"], strict=True))
        user_layer = np.array([layer_of.get(int(u), -1) for u in split.users])
        for c in sorted(set(user_layer.tolist()) - {-1}):
            slices[f"layer_{c}"] = user_layer == c
    train_len = np.array([len(h) for h in split.train])
    slices["cold_users"] = train_len <= cfg.evaluation.cold_user_max_train
    slices["cold_items"] = _cold_item_mask(split, n, cfg.evaluation.cold_item_max_train)

    def run(scorer: Scorer) -> dict:
        return evaluate_scorer(
            scorer, inputs, seen, split.test_targets, k, n, item_vectors=vectors, item_popularity=popularity, slices=slices
        )

    report: dict = {"k": k, "candidate": run(bundle.scorer)}
    baselines = build_baselines(list(cfg.gate.baselines), split.train, n, validation=(split.train, split.val_targets))
    report["baselines"] = {b.name: run(b) for b in baselines}
    report["baseline_params"] = {b.name: {"l2": b.l2} for b in baselines if hasattr(b, "l2")}
    production = read_production(cfg.workspace_path)
    report["production"] = None
    if production is not None and Path(production.model_dir).exists():
        try:
            report["production"] = run(_ReindexedScorer(RecommenderBundle(Path(production.model_dir)), index))
            report["production_model"] = production.model_id
        except (OSError, ValueError, KeyError) as exc:  # an unreadable production model must not block a better one
            log.warning("production model %s could not be scored: %s", production.model_id, exc)
            report["production_error"] = str(exc)
    report["gate"] = gate_decision(report, cfg)
    write_json_atomic(Path(bundle_dir) / METRICS_FILE, report)
    lineage_path = Path(bundle_dir) / LINEAGE_FILE
    if lineage_path.exists():
        lineage = json.loads(lineage_path.read_text())
        lineage["metrics"] = report["candidate"]["overall"]
        write_json_atomic(lineage_path, lineage)
    return report


def gate_decision(report: dict, cfg: StrataConfig) -> dict:
    """Promote only if the candidate beats every configured baseline and production.

    Each reference must be beaten by ``gate.min_relative_gain`` (relative) on ``gate.metric``.
    """
    metric = cfg.gate.metric
    cand = report["candidate"]["overall"].get(metric)
    if cand is None:
        raise ValueError(f"gate.metric {metric!r} is not among the evaluated metrics {sorted(report['candidate']['overall'])}")
    refs = {f"baseline:{name}": r["overall"][metric] for name, r in report["baselines"].items()}
    if cfg.gate.must_beat_production and report.get("production"):
        refs["production"] = report["production"]["overall"][metric]
    failures = [f"{name} {value:.4f}" for name, value in refs.items() if not cand > value * (1.0 + cfg.gate.min_relative_gain)]
    if failures:
        reason = f"candidate {metric} {cand:.4f} does not beat " + ", ".join(failures)
        promote = False
    else:
        best = max(refs.items(), key=lambda kv: kv[1]) if refs else ("nothing", 0.0)
        reason = f"candidate {metric} {cand:.4f} beats all references (strongest: {best[0]} {best[1]:.4f})"
        promote = True
    return {"promote": promote, "reason": reason, "metric": metric, "candidate": cand, "references": refs}


def seen_before_test(ordered_events: pd.DataFrame) -> dict[int, list[int]]:
    """Every item each user saw before their test (last) event, from the full event history.

    The feature store's sequence is capped at ``features.recent_items_len``; exclusion must
    still cover older items, so evaluation reads them from the events.
    """
    from stratarec.schema import USER_ID

    ev = ordered_events[[USER_ID, ITEM_ID]]
    last = ev.groupby(USER_ID, sort=False).cumcount(ascending=False) == 0
    size = ev.groupby(USER_ID, sort=False)[ITEM_ID].transform("size")
    before = ev[~(last & (size >= 3))]
    return {int(u): g.to_numpy(dtype=np.int64).tolist() for u, g in before.groupby(USER_ID)[ITEM_ID]}
