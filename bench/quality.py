"""Recommendation-quality benchmark: our transformer vs baselines, same split, same evaluation code.

    python bench/quality.py --dataset ml-1m-sasrec --budget-minutes 120
    python bench/quality.py --dataset ml-100k --budget-minutes 5

ml-1m-sasrec uses the published split and protocol (rank all items given train/input.txt,
exclude the sequence's items, score test/output.txt; early stopping on val/). ml-100k uses the
pipeline's temporal leave-last-out split and adds the text-init ablation, the cold-item
slice, the warm-start experiment and a temporal cold-item study (every event after the 80%
cut-off, several hundred of them cold; at every seed of --seeds, pooled). Prints tables and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from stratarec.baselines import MostPopular, TextSimilarity, build_baselines
from stratarec.config import ModelConfig, TrainConfig
from stratarec.evaluation.metrics import paired_relative_gap
from stratarec.evaluation.ranking import evaluate_scorer, scorer_target_ranks, target_ranks
from stratarec.model.sequential import SequentialRecommender
from stratarec.sequences import ItemIndex, NextEventCases, SequenceSplit, next_event_cases, split_from_events
from stratarec.tables import text_table
from stratarec.training import ModelScorer, train_sequential

log = logging.getLogger("bench.quality")
K = 10


def _latency_of(scorer, histories: list[np.ndarray], n_single: int, batch: int) -> dict:
    users = [histories[i % len(histories)] for i in range(n_single)]
    for h in users[:20]:  # warm-up
        scorer.score([h])
    single = []
    for h in users:
        t = time.perf_counter()
        scorer.score([h])
        single.append((time.perf_counter() - t) * 1000)
    batches = []
    for start in range(0, min(len(histories), 5 * batch), batch):
        chunk = histories[start : start + batch]
        if len(chunk) < batch:
            break
        t = time.perf_counter()
        scorer.score(chunk)
        batches.append((time.perf_counter() - t) * 1000)
    return {
        "single_user_ms_p50": statistics.median(single),
        "single_user_ms_p95": float(np.percentile(single, 95)),
        "batch256_ms_median": statistics.median(batches) if batches else None,
    }


def inference_latency(scorer: ModelScorer, histories: list[np.ndarray], n_single: int = 1000, batch: int = 256) -> dict:
    """Median time to score every item for one user (over ``n_single`` users) and for 256 users at once, in ms.

    Measured twice: through the serving scorer (:class:`InferenceScorer`, what the BentoML
    service runs, one torch thread as there) and through the evaluation scorer (the Hugging
    Face forward pass that training and the gate use, with this process's threads).
    """
    from stratarec.model.losses import cpu_has_bf16
    from stratarec.model.sequential import InferenceScorer

    histories = [h for h in histories if len(h)]
    threads = torch.get_num_threads()
    fast = InferenceScorer(scorer.model)
    try:
        torch.set_num_threads(1)
        serving = _latency_of(fast, histories, n_single, batch)
        # A batch job (re-scoring every user offline) may use every core of the machine.
        torch.set_num_threads(os.cpu_count() or 1)
        all_cores = _latency_of(fast, histories, 20, batch)
        all_cores_bf16 = _latency_of(InferenceScorer(scorer.model, low_precision=True), histories, 20, batch) if cpu_has_bf16() else {}
    finally:
        torch.set_num_threads(threads)
    evaluation = _latency_of(scorer, histories, n_single, batch)
    return {
        **serving,
        "scorer": "InferenceScorer, 1 torch thread",
        "batch256_ms_median_all_cores": all_cores["batch256_ms_median"],
        "batch256_ms_median_all_cores_bf16": all_cores_bf16.get("batch256_ms_median"),
        "all_cores_threads": os.cpu_count(),
        "evaluation_scorer": {**evaluation, "torch_threads": threads},
    }


def _configs(args: argparse.Namespace, max_len: int, text_init: bool) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs from the command line."""
    model_cfg = ModelConfig(
        architecture=args.architecture,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        max_len=max_len,
        text_init=text_init,
        id_shrinkage=args.id_shrinkage,
        id_dropout=args.id_dropout,
        positions=args.positions,
        release_age=args.release_age,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        val_smoothing=args.val_smoothing,
        max_minutes=args.budget_minutes,
        seed=args.seed,
        cpu_bf16=args.cpu_bf16,
        history_windows=args.history_windows,
        lr_schedule=args.lr_schedule,
        num_threads=args.threads,
    )
    return model_cfg, train_cfg


def run_ml1m(args: argparse.Namespace) -> dict:
    """Published ML-1M split: our causal transformer with full cross-entropy vs baselines, on two protocols.

    * ``published``: the 512 users whose input before the test item is in the files (validation
      input + validation item; see :class:`~stratarec.data.sasrec.SasrecSplit`): the protocol
      behind gSASRec's and SASRec+'s numbers, on a 512-user sample of its test users.
    * ``train_input``: all 6,040 users ranked given ``train/input.txt``, which lacks the
      second-to-last item: the test item is two steps ahead, a harder task than the published one.

    With ``--aligned-train`` the model and the baselines train on
    :meth:`~stratarec.data.sasrec.SasrecSplit.aligned_train` instead of ``train/input.txt``.
    """
    from stratarec.data.sasrec import load_sasrec_split

    data = load_sasrec_split(Path(args.data_dir))
    n = data.n_items
    split = SequenceSplit(
        users=np.arange(len(data.train)), train=data.train, val_targets=np.zeros(len(data.train), np.int64), test_targets=data.test_targets
    )
    if args.aligned_train:
        split.train = data.aligned_train()
    index = ItemIndex(np.arange(1, n + 1))
    pub_inputs, pub_targets = data.published_test()
    protocols = {"published": (pub_inputs, pub_targets), "train_input": (data.train, data.test_targets)}
    restored = _restored_inputs(args, data)
    if restored is not None:
        protocols["published_all"] = (restored, data.test_targets)

    def measure(scorer) -> dict:
        # Seen items = the input sequence, excluded from the ranking in both protocols.
        return {name: evaluate_scorer(scorer, x, x, y, K, n)["overall"] for name, (x, y) in protocols.items()}

    results = []
    t0 = time.perf_counter()
    for b in build_baselines(["most_popular", "item_knn", "ease"], split.train, n, validation=(data.val_inputs, data.val_targets)):
        start = time.perf_counter()
        results.append({"model": b.name, **_pick_protocols(measure(b)), "train_s": round(time.perf_counter() - start, 1), "epochs": None})
    log.info("baselines done in %.1fs", time.perf_counter() - t0)

    model_cfg, train_cfg = _configs(args, max_len=200, text_init=False)  # the split has no item text
    curve = []
    started = time.perf_counter()

    def test_curve(epoch: int, model) -> dict:
        if epoch % args.curve_every:
            return {}
        m = measure(ModelScorer(model))
        point = {"epoch": epoch, "minutes": (time.perf_counter() - started) / 60, **_pick_protocols(m, keys=("ndcg@10", "hr@10"))}
        curve.append(point)
        log.info("curve %s", point)
        return {f"{name}_ndcg@10": m[name]["ndcg@10"] for name in protocols}

    res = train_sequential(
        split,
        index,
        None,
        model_cfg,
        train_cfg,
        Path(args.checkpoint_dir) / "ml1m",
        validation=(data.val_inputs, data.val_targets),
        progress=lambda s: log.info("epoch %s", s),
        on_epoch_end=test_curve,
    )
    scorer = ModelScorer(res.model)
    results.insert(
        0,
        {
            "model": f"stratarec-{args.architecture}",
            **_pick_protocols(measure(scorer)),
            "train_s": round(res.seconds, 1),
            "epochs": res.epochs_run,
            "best_epoch": res.best_epoch,
            "val_ndcg@10": res.best_val_ndcg,
            "resumed_from_epoch": res.resumed_from_epoch,  # > 0: part of train_s is an earlier process's
        },
    )
    return {
        "dataset": "ml-1m-sasrec",
        # Validation is the one protocol run identically here and by gSASRec's published checkpoints.
        "published_validation_ndcg@10": PUBLISHED_VAL_NDCG10,
        "published_protocol_ci": published_protocol_ci(scorer, data),
        "full_population_estimate": full_population_estimate(scorer, data),
        **({"published_all_ci": restored_protocol_ci(scorer, restored, data.test_targets)} if restored is not None else {}),
        "training": "aligned (validation users trained on their validation input)" if args.aligned_train else "train/input.txt",
        "protocols": {
            "published": f"{len(pub_targets)} users, input = everything before the test item (gSASRec test/input.txt rows)",
            "train_input": f"{len(data.train)} users, input = train/input.txt (second-to-last item missing: test item two steps ahead)",
            **({"published_all": "every user, input = train/input.txt + the restored second-to-last item"} if restored is not None else {}),
        },
        "results": results,
        "curve": curve,
        "history": res.history,
        "latency": inference_latency(scorer, data.train),
        "config": {"model": model_cfg.model_dump(), "train": train_cfg.model_dump()},
    }


def bootstrap_ci(values: np.ndarray, seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-user values."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(rounds, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def published_protocol_ci(scorer, data) -> dict:
    """NDCG@10 and HR@10 of the published protocol's 512 users with 95% bootstrap intervals (a 512-user sample is noisy)."""
    inputs, targets = data.published_test()
    return restored_protocol_ci(scorer, inputs, targets)


def _restored_inputs(args: argparse.Namespace, data) -> list[np.ndarray] | None:
    """Every user's published test input, when ``--ml1m-ratings`` points at the raw ratings (see restore_published_test)."""
    if not args.ml1m_ratings:
        return None
    from stratarec.data.sasrec import read_ml1m_ratings, restore_published_test

    restored = restore_published_test(data, read_ml1m_ratings(Path(args.ml1m_ratings)))
    log.info(
        "restored %d second-to-last items (mapping agreement %.4f)", int((restored.restored_items > 0).sum()), restored.mapping_agreement
    )
    return restored.inputs


def restored_protocol_ci(scorer, inputs: list[np.ndarray], targets: np.ndarray) -> dict:
    """NDCG@10 and HR@10 of ``targets`` given ``inputs`` (seen = inputs) with 95% bootstrap intervals."""
    from stratarec.evaluation.metrics import ndcg_at_k, recall_at_k
    from stratarec.evaluation.ranking import rank_top_k

    ranked = rank_top_k(scorer, inputs, inputs, K)
    out = {"users": len(targets)}
    for name, per_user in (("ndcg@10", ndcg_at_k(ranked, targets, K)), ("hr@10", recall_at_k(ranked, targets, K))):
        out[name] = float(per_user.mean())
        out[f"{name}_ci95"] = bootstrap_ci(per_user)
    return out


def full_population_estimate(scorer, data) -> dict:
    """Ratio estimate of the published protocol's NDCG@10/HR@10 over all 6,040 users.

    The published protocol (input = the sequence without only its last item) runs on the 512
    validation users alone: the files lack the other 5,528 users' second-to-last item. The
    ``skip_one`` protocol runs on *everyone*: input = the sequence without its last two items
    (``train/input.txt``; for the 512, their validation input, see
    :meth:`~stratarec.data.sasrec.SasrecSplit.aligned_train`). Measured on the 512 for both,
    ``published_512 / skip_one_512`` is what the missing item is worth to this model, and
    times ``skip_one_all`` it estimates the published figure on every user
    (:func:`~stratarec.evaluation.metrics.ratio_estimate`). The assumption: the item is worth
    the same share for the 512 as for the others. The correction matters because the 512
    are a harder sample than the rest (most-popular: 0.0134 on them, 0.0179 on everyone).
    """
    from stratarec.evaluation.metrics import ndcg_at_k, ratio_estimate, recall_at_k
    from stratarec.evaluation.ranking import rank_top_k

    pub_inputs, pub_targets = data.published_test()
    skip_inputs = data.aligned_train()
    ranked_pub = rank_top_k(scorer, pub_inputs, pub_inputs, K)
    ranked_skip = rank_top_k(scorer, skip_inputs, skip_inputs, K)
    out: dict = {"users_published": len(pub_targets), "users_all": len(skip_inputs)}
    for name, metric in (("ndcg@10", ndcg_at_k), ("hr@10", recall_at_k)):
        pub = metric(ranked_pub, pub_targets, K)
        skip_all = metric(ranked_skip, data.test_targets, K)
        est = ratio_estimate(pub, skip_all[data.val_users], skip_all)
        out[name] = {
            "published_512": float(pub.mean()),
            "skip_one_512": float(skip_all[data.val_users].mean()),
            "skip_one_all": float(skip_all.mean()),
            "ratio": est["ratio"],
            "estimate_all": est["estimate"],
            "estimate_all_ci95": est["ci95"],
        }
    return out


def _pick_protocols(by_protocol: dict, keys: tuple[str, ...] = ("ndcg@10", "hr@10", "mrr@10")) -> dict:
    """Flatten {protocol: metrics} to columns: published metrics unprefixed, the others prefixed."""
    out = {}
    for name, m in by_protocol.items():
        picked = _pick(m)
        for key in keys:
            out[key if name == "published" else f"{name}_{key}"] = picked[key]
    return out


def cold_item_detail(scorer, inputs, seen, targets: np.ndarray, counts: np.ndarray, cold: np.ndarray, max_count: int = 5) -> dict:
    """Every cold-item test event of one model: its rank overall and among rare items, and the target's training count.

    Args:
        scorer: The model's scorer.
        inputs: Test inputs per user.
        seen: Items to exclude per user.
        targets: (U,) test item rows (1-based, 0 = none).
        counts: (n_items + 1,) training events per item row.
        cold: (U,) the users whose target has at most ``max_count`` training events.
        max_count: The rare pool: items with at most this many training events.
    """
    pool = counts[1:] <= max_count
    chosen = np.flatnonzero(cold)
    rank, pool_rank = scorer_target_ranks(scorer, [inputs[i] for i in chosen], [seen[i] for i in chosen], targets[chosen], pool)
    c = counts[targets[cold]]
    never = c == 0

    def median(values: np.ndarray) -> float | None:
        return float(np.median(values)) if len(values) else None

    return {
        "rank": rank.tolist(),
        "rare_pool_rank": pool_rank.tolist(),
        "train_count": c.tolist(),
        "hits@10": int((rank <= 10).sum()),
        "never_trained_users": int(never.sum()),
        "never_trained_median_rank": median(rank[never]),
        "rare_1_5_hits@10": int((rank[~never] <= 10).sum()),
        "rare_1_5_median_rank": median(rank[~never]),
        "rare_pool_size": int(pool.sum()),
        "rare_pool_median_rank": median(pool_rank),
        "rare_pool_top10": int((pool_rank <= 10).sum()),
    }


def _pick(m: dict) -> dict:
    return {"ndcg@10": m["ndcg@10"], "hr@10": m["recall@10"], "mrr@10": m["mrr@10"], "coverage@10": m.get("coverage@10")}


def _ml100k_split(data_dir: Path, max_history: int):
    from stratarec.data.movielens import load_movielens_100k
    from stratarec.features import order_events
    from stratarec.text_encoder import embed_texts, item_text

    events, items = load_movielens_100k(data_dir)
    ordered = order_events(events)
    items = items.sort_values("item_id").reset_index(drop=True)
    index = ItemIndex(items["item_id"].to_numpy(dtype=np.int64))
    text = embed_texts(item_text(items), encoder="minilm")
    return ordered, items, index, text, max_history


def _test_inputs(split: SequenceSplit) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each user's input before the test item, and the items excluded from their ranking."""
    full = split.full_histories()
    return split.test_inputs(), [h[:-1] if t > 0 else h for h, t in zip(full, split.test_targets, strict=True)]


def _cap(split: SequenceSplit, max_history: int) -> SequenceSplit:
    """Mirror the feature store: training histories are the last ``max_history`` items."""
    split.train = [h[-max_history:] for h in split.train]
    return split


def _content(items, text: np.ndarray, events, model_cfg: ModelConfig) -> np.ndarray:
    """What a text-init model's projection reads: text, plus release age counted back from the newest of ``events``."""
    from stratarec.item_content import item_content

    year = events["event_timestamp"].max().year
    return item_content(text, items["release_year"].to_numpy(), year, release_age=model_cfg.release_age)


# The ML-100K models compared at every seed: (name, text_init, release_age).
_VARIANTS = (("stratarec-text-init", True, True), ("stratarec-text-only", True, False), ("stratarec-id-only", False, False))


def _variant_cfg(model_cfg: ModelConfig, text_init: bool, release_age: bool) -> ModelConfig:
    return model_cfg.model_copy(update={"text_init": text_init, "release_age": release_age})


def run_ml100k(args: argparse.Namespace) -> dict:
    """Pipeline split on ML-100K: text-init ablation, cold items, baselines, warm start.

    The text-init and ID-only models are trained once per seed in ``args.seeds``: a cold-item
    slice of a few dozen events is too small to read from one run, so the cold-item
    comparison pools the seeds and tests the difference (exact McNemar on paired hits). The
    main table, latency and warm start use the first seed.
    """
    from stratarec.evaluation.metrics import paired_exact_test

    ordered, items, index, text, cap = _ml100k_split(Path(args.data_dir), args.max_history)
    n = len(index)
    split = _cap(split_from_events(ordered, index), cap)
    inputs, seen = _test_inputs(split)
    counts = split.train_item_counts(n)
    cold_items = (split.test_targets > 0) & (counts[split.test_targets] <= 5)
    slices = {"cold_items": cold_items}
    results = []
    for b in build_baselines(["most_popular", "item_knn", "ease"], split.train, n, validation=(split.train, split.val_targets)):
        start = time.perf_counter()
        rep = evaluate_scorer(b, inputs, seen, split.test_targets, K, n, slices=slices)
        results.append(
            {
                "model": b.name,
                **_pick(rep["overall"]),
                "cold_item_recall@10": rep["cold_items"].get("recall@10"),
                "train_s": round(time.perf_counter() - start, 1),
            }
        )
    seeds = args.seeds or [args.seed]
    model_cfg, train_cfg = _configs(args, max_len=args.max_len, text_init=True)
    trained = {}
    main = _PAIRED[0] if model_cfg.release_age else "stratarec-text-only"
    scratch_by_seed = {}  # (seed, name) -> the text models: the warm-start study's from-scratch models
    per_seed = []
    for seed in seeds:
        seed_cfg = train_cfg.model_copy(update={"seed": seed})
        row = {"seed": seed}
        for name, use_text, release_age in _VARIANTS:
            if name == "stratarec-text-init" and not model_cfg.release_age:
                continue  # --no-release-age: the text-only row is the text model
            cfg = _variant_cfg(model_cfg, use_text, release_age)
            ckpt = Path(args.checkpoint_dir) / (name if seed == seeds[0] else f"{name}-seed{seed}")
            content = _content(items, text, ordered, cfg) if use_text else None
            res = train_sequential(split, index, content, cfg, seed_cfg, ckpt, progress=lambda s: log.info("%s", s))
            scorer = ModelScorer(res.model)
            rep = evaluate_scorer(scorer, inputs, seen, split.test_targets, K, n, slices=slices)
            detail = cold_item_detail(scorer, inputs, seen, split.test_targets, counts, cold_items)
            row[name] = {"ndcg@10": rep["overall"]["ndcg@10"], "train_s": round(res.seconds, 1), **detail}
            if use_text:
                scratch_by_seed[seed, name] = (res, rep["overall"]["ndcg@10"])
            if seed != seeds[0]:
                continue
            trained[name] = res
            ranks = np.asarray(detail["rank"])
            results.insert(
                len(trained) - 1,
                {
                    "model": name,
                    **_pick(rep["overall"]),
                    "cold_item_recall@10": rep["cold_items"].get("recall@10"),
                    "cold_item_median_rank": float(np.median(ranks)) if len(ranks) else None,
                    "cold_item_recall@100": float((ranks <= 100).mean()) if len(ranks) else None,
                    "train_s": round(res.seconds, 1),
                    "epochs": res.epochs_run,
                    "best_epoch": res.best_epoch,
                    "resumed_from_epoch": res.resumed_from_epoch,
                },
            )
        per_seed.append(row)

    def seed_hits(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(r[name]["rank"]) <= K for r in per_seed])

    out = {
        "dataset": "ml-100k",
        "results": results,
        "cold_item_test_users": int(cold_items.sum()),
        "cold_items_by_seed": per_seed,
        # A = text-init, B = ID-only, over every seed's cold-item events.
        "cold_items_pooled_test": paired_exact_test(seed_hits(main), seed_hits("stratarec-id-only")),
        # The release-age ablation: A = text only (no release age), B = ID-only.
        "cold_items_pooled_test_text_only": paired_exact_test(seed_hits("stratarec-text-only"), seed_hits("stratarec-id-only")),
        "latency": inference_latency(ModelScorer(trained[main].model), inputs),
    }
    # Warm start and the temporal cold-item study at every seed: the warm start's base models
    # (first 80% of the timeline) are the temporal study's text models. With release age, the
    # text-only model's warm start is measured too: the feature's cost to continual training.
    warm_rows, warm_text_only, studies = [], [], []
    for seed in seeds:
        seed_cfg = train_cfg.model_copy(update={"seed": seed})
        suffix = "" if seed == seeds[0] else f"-seed{seed}"
        scratch, scratch_ndcg = scratch_by_seed[seed, main]
        warm, base = warm_start_experiment(ordered, items, index, text, model_cfg, seed_cfg, args, scratch, scratch_ndcg, suffix)
        warm_rows.append({"seed": seed, **warm})
        text_only_base = None
        if model_cfg.release_age:
            scratch, scratch_ndcg = scratch_by_seed[seed, "stratarec-text-only"]
            cfg = _variant_cfg(model_cfg, True, False)
            warm, text_only_base = warm_start_experiment(
                ordered, items, index, text, cfg, seed_cfg, args, scratch, scratch_ndcg, f"-text-only{suffix}"
            )
            warm_text_only.append({"seed": seed, **warm})
        study = temporal_cold_items(ordered, items, index, text, base, model_cfg, seed_cfg, args, suffix, text_only_base)
        studies.append({"seed": seed, **study})

    def summary(rows: list[dict]) -> dict:
        scratch_users, warm_users = zip(*(w.pop("_per_user_ndcg@10") for w in rows), strict=True)
        return {
            "per_seed": rows,
            "mean_relative_gap": float(np.mean([w["relative_gap"] for w in rows])),
            "mean_time_ratio": float(np.mean([w["time_ratio"] for w in rows])),
            # One gap over all seeds' test users (user-resampled bootstrap): how sure the mean is.
            "pooled_relative_gap": paired_relative_gap(np.stack(scratch_users), np.stack(warm_users)),
        }

    out["warm_start"] = warm_rows[0]
    out["warm_start_seeds"] = summary(warm_rows)
    if warm_text_only:
        out["warm_start_seeds_text_only"] = summary(warm_text_only)
    out["temporal_cold_items"] = studies[0]
    if len(seeds) > 1:
        out["temporal_cold_items_seeds"] = pool_temporal_studies(studies)
    return out


def cold_item_table(report: dict) -> list[dict]:
    """One row per seed and model of the cold-item detail, for printing."""
    rows = []
    for r in report["cold_items_by_seed"]:
        for name in (v[0] for v in _VARIANTS if v[0] in r):
            d = r[name]
            rows.append(
                {
                    "seed": r["seed"],
                    "model": name,
                    "ndcg@10": d["ndcg@10"],
                    "cold_hits@10": d["hits@10"],
                    "never_trained_median_rank": d["never_trained_median_rank"],
                    "rare_1_5_hits@10": d["rare_1_5_hits@10"],
                    "rare_1_5_median_rank": d["rare_1_5_median_rank"],
                    "rare_pool_median_rank": d["rare_pool_median_rank"],
                    "rare_pool_top10": d["rare_pool_top10"],
                }
            )
    return rows


def _per_user_ndcg(model: SequentialRecommender, inputs, seen, targets: np.ndarray) -> np.ndarray:
    """Test NDCG@10 of every user with a target, in user order (what evaluate_scorer averages)."""
    from stratarec.evaluation.metrics import ndcg_at_k
    from stratarec.evaluation.ranking import rank_top_k

    keep = np.flatnonzero(np.asarray(targets) > 0)
    ranked = rank_top_k(ModelScorer(model), [inputs[i] for i in keep], [seen[i] for i in keep], K)
    return ndcg_at_k(ranked, np.asarray(targets)[keep], K)


def warm_start_experiment(
    ordered, items, index, text, model_cfg, train_cfg, args, scratch, scratch_ndcg: float, suffix: str = ""
) -> tuple[dict, SequentialRecommender]:
    """Train on the first 80% of the timeline, fine-tune on all of it; compare with from-scratch.

    Args:
        scratch: The text model trained from scratch on all of it with the same config and seed
            (the main table's model: the same run, so it is not trained twice).
        scratch_ndcg: Its test NDCG@10.
        suffix: Checkpoint-name suffix (one per seed).

    Returns:
        The report, and the model trained on the first 80% (the temporal cold-item study reuses it).
    """
    from stratarec.training import save_trained_model

    ts = ordered["event_timestamp"]
    cut = ts.quantile(0.8)
    early = ordered[ts <= cut]
    n = len(index)
    early_split = _cap(split_from_events(early, index), args.max_history)
    early_content = _content(items, text, early, model_cfg)
    ckpt = Path(args.checkpoint_dir)
    base = train_sequential(early_split, index, early_content, model_cfg, train_cfg, ckpt / f"warm-base{suffix}")
    save_trained_model(base.model, index, ckpt / f"warm-base-model{suffix}")
    split = _cap(split_from_events(ordered, index), args.max_history)
    inputs, seen = _test_inputs(split)
    content = _content(items, text, ordered, model_cfg)
    warm_cfg = train_cfg.model_copy(
        update={
            "warm_start_epochs": args.warm_epochs,
            "warm_start_lr_factor": args.warm_lr_factor,
            "warm_start_lr_schedule": args.warm_lr_schedule,
            "warm_start_new_item_neighbours": args.new_item_neighbours,
        }
    )
    warm = train_sequential(
        split, index, content, model_cfg, warm_cfg, ckpt / f"warm-ft{suffix}", init_from=ckpt / f"warm-base-model{suffix}"
    )
    s = scratch_ndcg
    w = evaluate_scorer(ModelScorer(warm.model), inputs, seen, split.test_targets, K, n)["overall"]["ndcg@10"]
    per_user = [_per_user_ndcg(m, inputs, seen, split.test_targets) for m in (scratch.model, warm.model)]
    return {
        "relative_gap_ci95": paired_relative_gap(*per_user)["ci95"],
        "_per_user_ndcg@10": per_user,  # scratch, warm: pooled over seeds by run_ml100k, not written out
        "scratch_ndcg@10": s,
        "warm_ndcg@10": w,
        "relative_gap": (s - w) / s if s else None,
        "scratch_s": scratch.seconds,
        "warm_s": warm.seconds,
        "time_ratio": warm.seconds / scratch.seconds if scratch.seconds else None,
        "scratch_epochs": scratch.epochs_run,
        "warm_epochs": warm.epochs_run,
        "scratch_best_val_ndcg@10": scratch.best_val_ndcg,
        "warm_best_val_ndcg@10": warm.best_val_ndcg,
        "cut": str(cut),
    }, base.model


def _masked_probabilities(scores: np.ndarray, seen: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """Softmax over each row's unseen items."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    for i, h in enumerate(seen):
        h = np.asarray(h, dtype=np.int64)
        s[i, h[h > 0] - 1] = -np.inf
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


class TextExpertMixture:
    """p = (1 - lam) * p_model + lam * p_text: the model's softmax mixed with a text-similarity softmax.

    The text expert has no popularity prior, so this is the most direct way to let item text
    lift rare items; lam and the expert's temperature are fitted on validation likelihood, so
    the data decides how much to trust it.
    """

    name = "text-init + text expert"

    def __init__(self, model_scorer, text_scorer: TextSimilarity, lam: float, temperature: float) -> None:
        self.model_scorer, self.text_scorer, self.lam, self.temperature = model_scorer, text_scorer, lam, temperature

    def score(self, histories: list[np.ndarray]) -> np.ndarray:  # noqa: D102
        p = (1 - self.lam) * _masked_probabilities(self.model_scorer.score(histories), histories)
        if self.lam > 0:
            p += self.lam * _masked_probabilities(self.text_scorer.score(histories), histories, self.temperature)
        return p


def fit_text_expert(model_scorer, text_scorer: TextSimilarity, inputs: list[np.ndarray], targets: np.ndarray) -> dict:
    """The (lam, temperature) with the lowest validation negative log-likelihood of the mixture."""
    keep = np.flatnonzero(np.asarray(targets) > 0)
    hist = [inputs[i] for i in keep]
    rows = np.arange(len(keep))
    cols = np.asarray(targets)[keep] - 1
    p_model = _masked_probabilities(model_scorer.score(hist), hist)[rows, cols]
    text_scores = text_scorer.score(hist)
    best = {"nll": float("inf")}
    for temperature in (0.02, 0.03, 0.05, 0.1):
        p_text = _masked_probabilities(text_scores, hist, temperature)[rows, cols]
        for lam in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
            nll = float(-np.log((1 - lam) * p_model + lam * p_text + 1e-300).mean())
            if nll < best["nll"]:
                best = {"nll": nll, "lam": lam, "temperature": temperature}
    return best


def _slice_ranks(scorer, cases: NextEventCases, pool: np.ndarray, k: int, batch: int = 1024) -> dict:
    """Per case: full rank, rank among the rare pool, and whether a one-item discovery slot would hit.

    The slot: a list of the model's top k - 1 items plus its best rare item not already among
    them, the usual way to give new items exposure. It hits a rare target that no rare item
    outside the top k - 1 outranks.
    """
    full, in_pool, slot = [], [], []
    for start in range(0, len(cases), batch):
        h = cases.histories[start : start + batch]
        t = cases.targets[start : start + batch]
        scores = np.asarray(scorer.score(h), dtype=np.float64)
        r = target_ranks(scores, h, t)
        pr = target_ranks(scores, h, t, pool)
        masked = scores.copy()
        for i, hist in enumerate(h):
            masked[i, hist[hist != t[i]] - 1] = -np.inf
        top = np.argpartition(-masked, k - 2, axis=1)[:, : k - 1]
        rare_in_top = pool[top].sum(axis=1)
        slot.append((r <= k - 1) | (pool[t - 1] & (r > k - 1) & (pr - rare_in_top == 1)))
        full.append(r)
        in_pool.append(pr)
    return {"rank": np.concatenate(full), "pool_rank": np.concatenate(in_pool), "slot_hit": np.concatenate(slot)}


def temporal_cold_items(
    ordered,
    items,
    index,
    text,
    text_model: SequentialRecommender,
    model_cfg,
    train_cfg,
    args,
    suffix: str = "",
    text_only_model: SequentialRecommender | None = None,
) -> dict:
    """Cold items with enough events to read: train on the first 80% of the timeline, predict every later event.

    The leave-last-out test has a few dozen cold-item events (one per user at most), too few
    to tell two models apart at Recall@10. Here every event after the cut-off is a case,
    predicted from all the user did before it, and the cold slice is every case whose item
    had at most 5 events in the models' training data: several hundred events.

    Rows: the text-init model (the warm-start study's base model), the same without release
    age (text only) and an ID-only model, trained on the same data and seed, the text-init
    model mixed with a text-similarity expert
    (weight fitted on validation likelihood), text similarity alone, and most-popular.
    """
    from stratarec.evaluation.metrics import paired_exact_test

    ts = ordered["event_timestamp"]
    cut = ts.quantile(0.8)
    n = len(index)
    early = _cap(split_from_events(ordered[ts <= cut], index), args.max_history)
    counts = early.train_item_counts(n)
    pool = counts[1:] <= 5
    cases = next_event_cases(ordered, index, after=cut, max_history=args.max_history)
    c = counts[cases.targets]
    cold, never = c <= 5, c == 0
    id_cfg = _variant_cfg(model_cfg, False, False)
    id_model = train_sequential(early, index, None, id_cfg, train_cfg, Path(args.checkpoint_dir) / f"temporal-id-only{suffix}").model
    text_scorer = TextSimilarity(text)
    text_model_scorer = ModelScorer(text_model)
    # Without release age the text-init model is the text-only one.
    text_only_scorer = ModelScorer(text_only_model) if text_only_model is not None else text_model_scorer
    fit = fit_text_expert(text_model_scorer, text_scorer, early.val_inputs(), early.val_targets)
    scorers = {
        "stratarec-text-init": text_model_scorer,
        "stratarec-text-only": text_only_scorer,
        "stratarec-id-only": ModelScorer(id_model),
        "text-init + text expert": TextExpertMixture(text_model_scorer, text_scorer, fit["lam"], fit["temperature"]),
        "text_similarity": text_scorer,
        "most_popular": MostPopular(early.train, n),
    }
    rows, hits, slot_hits = [], {}, {}
    for name, scorer in scorers.items():
        started = time.perf_counter()
        r = _slice_ranks(scorer, cases, pool, K)
        rank = r["rank"]
        hits[name] = rank[cold] <= K
        slot_hits[name] = r["slot_hit"][cold]
        rows.append(
            {
                "model": name,
                "ndcg@10": float(np.where(rank <= K, 1 / np.log2(rank + 1), 0).mean()),
                "recall@10": float((rank <= K).mean()),
                "cold_hits@10": int((rank[cold] <= K).sum()),
                "never_trained_hits@10": int((rank[never] <= K).sum()),
                "rare_1_5_hits@10": int((rank[cold & ~never] <= K).sum()),
                "cold_recall@50": float((rank[cold] <= 50).mean()),
                "cold_median_rank": float(np.median(rank[cold])),
                "rare_pool_median_rank": float(np.median(r["pool_rank"][cold])),
                "slot_cold_hits": int(r["slot_hit"][cold].sum()),
                "slot_recall@10": float(r["slot_hit"].mean()),
                "score_s": round(time.perf_counter() - started, 1),
            }
        )
    return {
        "cut": str(cut),
        "cases": len(cases),
        "cold_cases": int(cold.sum()),
        "never_trained_cases": int(never.sum()),
        "rare_pool_size": int(pool.sum()),
        "text_expert_fit": fit,
        "results": rows,
        # A = text-init, B = ID-only, on the cold cases.
        "cold_paired_test": paired_exact_test(hits["stratarec-text-init"], hits["stratarec-id-only"]),
        "cold_paired_test_slot": paired_exact_test(slot_hits["stratarec-text-init"], slot_hits["stratarec-id-only"]),
        "cold_paired_test_text_only": paired_exact_test(hits["stratarec-text-only"], hits["stratarec-id-only"]),
        # Which cold cases each model hit (positions in the cold slice), so seeds can be pooled.
        "cold_hit_cases": {name: np.flatnonzero(hits[name]).tolist() for name in _PAIRED},
        "cold_slot_hit_cases": {name: np.flatnonzero(slot_hits[name]).tolist() for name in _PAIRED},
    }


_PAIRED = ("stratarec-text-init", "stratarec-id-only", "stratarec-text-only")


def pool_temporal_studies(studies: list[dict]) -> dict:
    """The temporal cold-item study of every seed, pooled.

    One seed's 664 cold cases gave text-init 12 hits with a discovery slot against ID-only's 5;
    a model's handful of cold hits moves with its seed, so the comparison is pooled over seeds
    (exact McNemar on the paired cases of every seed).

    Args:
        studies: :func:`temporal_cold_items` per seed, each with its ``seed``.
    """
    from stratarec.evaluation.metrics import paired_exact_test

    def pooled(key: str, a_name: str = _PAIRED[0], b_name: str = _PAIRED[1]) -> dict:
        a, b = [], []
        for st in studies:
            n = st["cold_cases"]
            a.append(np.isin(np.arange(n), st[key][a_name]))
            b.append(np.isin(np.arange(n), st[key][b_name]))
        return paired_exact_test(np.concatenate(a), np.concatenate(b))

    columns = ("cold_hits@10", "slot_cold_hits", "ndcg@10")
    per_seed = []
    for st in studies:
        paired = [r for r in st["results"] if r["model"] in _PAIRED]
        per_seed.append({"seed": st["seed"], **{f"{r['model']} {c}": r[c] for r in paired for c in columns}})
    return {
        "per_seed": per_seed,
        "pooled_top10": pooled("cold_hit_cases"),
        "pooled_slot": pooled("cold_slot_hit_cases"),
        # The release-age ablation: text only vs ID-only, and text-init vs text only.
        "pooled_top10_text_only": pooled("cold_hit_cases", _PAIRED[2], _PAIRED[1]),
        "pooled_top10_release_age": pooled("cold_hit_cases", _PAIRED[0], _PAIRED[2]),
    }


# Best validation NDCG@10 (val/input.txt -> val/output.txt, the same 512 users, rated items filtered) in the
# names of gSASRec-pytorch's published ML-1M checkpoints; their test NDCG@10 is 0.1726 and 0.1259.
PUBLISHED_VAL_NDCG10 = {"gSASRec": 0.1974, "SASRec (BCE, 1 negative)": 0.1428}
PUBLISHED_NDCG10 = {"SASRec+ (full CE)": 0.1821, "gSASRec": 0.1726, "BERT4Rec": 0.1537}


def plot_curve(report: dict, path: Path) -> None:
    """NDCG@10 versus training minutes (both protocols), with the published figures and the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    minutes = [p["minutes"] for p in curve]
    ax.plot(minutes, [p["ndcg@10"] for p in curve], marker="o", ms=3, label="ours, published protocol (512 users)")
    if curve and "train_input_ndcg@10" in curve[0]:
        ax.plot(minutes, [p["train_input_ndcg@10"] for p in curve], marker="s", ms=3, label="ours, train/input.txt protocol (6,040 users)")
    if curve and "published_all_ndcg@10" in curve[0]:
        ax.plot(
            minutes,
            [p["published_all_ndcg@10"] for p in curve],
            marker="^",
            ms=3,
            label="ours, published protocol, all 6,040 users (restored)",
        )
    for i, (name, value) in enumerate(PUBLISHED_NDCG10.items()):
        ax.axhline(value, ls="--", lw=0.8, color=f"C{i + 2}", label=f"published {name} {value}")
    for row in report["results"]:
        if row["model"] == "ease":
            ax.axhline(row["ndcg@10"], ls=":", color="grey", label=f"EASE here {row['ndcg@10']:.4f}")
    ax.set_xlabel("training wall time (minutes, this 2-core CPU)")
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title("ML-1M published split: quality per CPU-minute")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _write_report(report: dict, out: Path) -> None:
    """Write the report as JSON atomically and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    tmp.replace(out)
    print(f"wrote {out}")


def latency_only(args: argparse.Namespace) -> None:
    """Inference latency of a saved model on the data set's histories, printed and written as JSON."""
    from stratarec.model.sequential import load_model

    if args.dataset == "ml-1m-sasrec":
        from stratarec.data.sasrec import load_sasrec_split

        data = load_sasrec_split(Path(args.data_dir))
        histories = data.train
    else:
        ordered, _, index, _, cap = _ml100k_split(Path(args.data_dir), args.max_history)
        histories = _cap(split_from_events(ordered, index), cap).test_inputs()
    model = load_model(Path(args.latency_from))
    report = {"dataset": args.dataset, "model": args.latency_from, "latency": inference_latency(ModelScorer(model), histories)}
    if args.dataset == "ml-1m-sasrec":
        report["published_protocol_ci"] = published_protocol_ci(ModelScorer(model), data)
        report["full_population_estimate"] = full_population_estimate(ModelScorer(model), data)
        restored = _restored_inputs(args, data)
        if restored is not None:
            # The whole test set on the published protocol: the model and the baselines, same inputs.
            report["published_all"] = {"model": restored_protocol_ci(ModelScorer(model), restored, data.test_targets)}
            for b in build_baselines(
                ["most_popular", "item_knn", "ease"], data.train, data.n_items, validation=(data.val_inputs, data.val_targets)
            ):
                report["published_all"][b.name] = restored_protocol_ci(b, restored, data.test_targets)
            print("published protocol, all users:", json.dumps(report["published_all"]))
        print("published protocol:", json.dumps(report["published_protocol_ci"]))
        print("full-population estimate:", json.dumps(report["full_population_estimate"]))
    report["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "loadavg": os.getloadavg()}
    print("latency:", json.dumps(report["latency"]))
    _write_report(report, Path(args.out or f"bench/results/latency-{args.dataset}.json"))


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (exploration scripts reuse its defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-1m-sasrec", "ml-100k"], required=True)
    p.add_argument("--data-dir", default=os.environ.get("STRATAREC_DATA_DIR", "../shared/data"))
    p.add_argument("--budget-minutes", type=float, default=120.0)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument(
        "--val-smoothing",
        type=int,
        default=TrainConfig.model_fields["val_smoothing"].default,
        help="early stopping follows the mean validation NDCG@10 of this many epochs (1: each epoch alone)",
    )
    p.add_argument("--architecture", choices=["causal", "bidirectional"], default="causal")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--attention-dropout", type=float, default=0.0, help="0 lets causal attention use the fused kernel")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    p.add_argument("--history-windows", choices=["all", "latest"], default="all", help="train on every window or the newest per user")
    p.add_argument(
        "--positions",
        choices=["from_start", "from_end"],
        default="from_start",
        help="position ids from the first or back from the newest item",
    )
    p.add_argument("--id-shrinkage", type=float, default=5.0, help="text-init models: ID rows weighted by c / (c + this)")
    p.add_argument(
        "--aligned-train",
        action="store_true",
        help="ML-1M: train the 512 validation users on their validation input (see SasrecSplit.aligned_train)",
    )
    p.add_argument(
        "--release-age",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="text-init models read a release-age block beside the text (model.release_age); ML-100K also trains the"
        " text-only model for the ablation",
    )
    p.add_argument("--id-dropout", type=float, default=0.0, help="text-init models: drop ID rows with this probability while training")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 products in the loss where the CPU has them")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--max-history", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="cosine: anneal to 0 over the budget")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=None,
        help="ML-100K: train the text-init/ID-only pair once per seed (comma-separated) and pool the cold-item comparison",
    )
    p.add_argument("--warm-epochs", type=int, default=10)
    p.add_argument("--warm-lr-factor", type=float, default=1.0)
    p.add_argument(
        "--new-item-neighbours",
        type=int,
        default=TrainConfig.model_fields["warm_start_new_item_neighbours"].default,
        help="warm start: items without training events start from the mean ID row of this many content neighbours (0: zero)",
    )
    p.add_argument(
        "--warm-lr-schedule",
        choices=["constant", "cosine", "warmup_cosine"],
        default=TrainConfig.model_fields["warm_start_lr_schedule"].default,
        help="learning-rate schedule of the warm start's epochs (default: the library's)",
    )
    p.add_argument("--curve-every", type=int, default=2)
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where models checkpoint (default: a new bench/results/checkpoints/<dataset>-<time>, so every run trains afresh"
        " and its times are its own); pass an earlier run's folder to resume that run after a kill",
    )
    p.add_argument(
        "--ml1m-ratings",
        default=None,
        metavar="PATH",
        help="raw MovieLens-1M ratings (GroupLens ratings.dat or RecBole ml-1m.inter): restores every user's published test input",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--latency-from", metavar="MODEL_DIR", help="only measure inference latency of a saved model (a checkpoint's best/)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.latency_from:
        return latency_only(args)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = f"bench/results/checkpoints/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    log.info("checkpoints in %s (rerun with --checkpoint-dir %s to resume after a kill)", args.checkpoint_dir, args.checkpoint_dir)
    started = time.perf_counter()
    report = run_ml1m(args) if args.dataset == "ml-1m-sasrec" else run_ml100k(args)
    report["wall_seconds"] = time.perf_counter() - started
    report["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor(),
        "torch": torch.__version__,
    }
    report["args"] = vars(args)
    cols = ["model", "ndcg@10", "hr@10", "mrr@10", "coverage@10", "published_all_ndcg@10", "published_all_hr@10", "train_input_ndcg@10"]
    cols += ["train_input_hr@10"]
    cols += ["val_ndcg@10", "cold_item_recall@10", "cold_item_recall@100", "cold_item_median_rank", "train_s", "epochs"]
    print(text_table(report["results"], [c for c in cols if any(c in r for r in report["results"])]))
    print("latency:", json.dumps(report["latency"]))
    if "cold_items_by_seed" in report:
        rows = cold_item_table(report)
        print(f"cold-item test events ({report['cold_item_test_users']} users, target with <= 5 training events), per seed:")
        print(text_table(rows, list(rows[0])))
        print("pooled over seeds, text-init (A) vs ID-only (B), exact McNemar:", json.dumps(report["cold_items_pooled_test"]))
        print("pooled over seeds, text only (A) vs ID-only (B):", json.dumps(report["cold_items_pooled_test_text_only"]))
    if "warm_start" in report:
        print("warm start:", json.dumps(report["warm_start"]))
    if "warm_start_seeds" in report:
        ws = report["warm_start_seeds"]
        print("warm start per seed:")
        cols = ["seed", "scratch_ndcg@10", "warm_ndcg@10", "relative_gap", "relative_gap_ci95", "scratch_s", "warm_s", "time_ratio"]
        print(text_table(ws["per_seed"], cols))
        print(f"mean relative gap {ws['mean_relative_gap']:.4f}, mean time ratio {ws['mean_time_ratio']:.4f}")
        print("pooled relative gap (95% bootstrap interval over users):", json.dumps(ws["pooled_relative_gap"]))
    if "warm_start_seeds_text_only" in report:
        ws = report["warm_start_seeds_text_only"]
        print("warm start per seed, text only (no release age):")
        print(text_table(ws["per_seed"], cols))
        print(f"mean relative gap {ws['mean_relative_gap']:.4f}, mean time ratio {ws['mean_time_ratio']:.4f}")
        print("pooled relative gap (95% bootstrap interval over users):", json.dumps(ws["pooled_relative_gap"]))
    if "temporal_cold_items" in report:
        tc = report["temporal_cold_items"]
        print(
            f"temporal cold items: trained up to {tc['cut']}, {tc['cases']} later events, {tc['cold_cases']} with a target of"
            f" <= 5 training events ({tc['never_trained_cases']} never trained); text expert fit {json.dumps(tc['text_expert_fit'])}"
        )
        print(text_table(tc["results"], list(tc["results"][0])))
        print("cold hits@10, text-init (A) vs ID-only (B):", json.dumps(tc["cold_paired_test"]))
        print("cold hits with a discovery slot, text-init (A) vs ID-only (B):", json.dumps(tc["cold_paired_test_slot"]))
    if "temporal_cold_items_seeds" in report:
        ts_ = report["temporal_cold_items_seeds"]
        print("temporal cold items per seed:")
        print(text_table(ts_["per_seed"], list(ts_["per_seed"][0])))
        print("pooled over seeds, cold hits@10, text-init (A) vs ID-only (B):", json.dumps(ts_["pooled_top10"]))
        print("pooled over seeds, with a discovery slot:", json.dumps(ts_["pooled_slot"]))
        print("pooled over seeds, text only (A) vs ID-only (B):", json.dumps(ts_["pooled_top10_text_only"]))
        print("pooled over seeds, text-init (A) vs text only (B):", json.dumps(ts_["pooled_top10_release_age"]))
    if "full_population_estimate" in report:
        est = report["full_population_estimate"]
        rows = []
        for metric in ("ndcg@10", "hr@10"):
            low, high = est[metric]["estimate_all_ci95"]
            rows.append({"metric": metric, **est[metric], "ci95": f"{low:.4f}-{high:.4f}"})
        print("published protocol, estimated over all users (ratio estimator):")
        print(text_table(rows, ["metric", "published_512", "skip_one_512", "skip_one_all", "ratio", "estimate_all", "ci95"]))
    if report.get("curve"):
        curve_cols = [
            "epoch",
            "minutes",
            "ndcg@10",
            "hr@10",
            "published_all_ndcg@10",
            "published_all_hr@10",
            "train_input_ndcg@10",
            "train_input_hr@10",
        ]
        print(text_table(report["curve"], [c for c in curve_cols if c in report["curve"][0]]))
    out = Path(args.out or f"bench/results/quality-{args.dataset}.json")
    _write_report(report, out)
    if report.get("curve"):
        plot_curve(report, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
