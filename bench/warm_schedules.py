"""Which warm-start recipe? A study on ML-100K.

For each seed: the default model trained from scratch on all events, and a base model trained
on the first 80% of the timeline; the base is then fine-tuned on all events under every
recipe in ``--variants`` (learning-rate schedule / training windows / epochs [/ learning-rate
multiple]). Prints, per seed and recipe, the test NDCG@10 of the warm model, its gap to the
from-scratch model and its time ratio, and writes JSON. The other options are the quality
benchmark's (``bench/quality.py --help``), e.g. ``--new-item-neighbours`` and ``--val-smoothing``.

Run it on seeds the benchmark of record does not use (the default here), so that choosing
the library's defaults does not tune on the seeds that then report them::

    python bench/warm_schedules.py --seeds 3,4 --variants constant/all/10,cosine/all/10
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import K, _cap, _configs, _content, _ml100k_split, _test_inputs, _write_report, build_parser  # noqa: E402

from stratarec.evaluation.ranking import evaluate_scorer  # noqa: E402
from stratarec.sequences import split_from_events  # noqa: E402
from stratarec.tables import text_table  # noqa: E402
from stratarec.training import ModelScorer, save_trained_model, train_sequential  # noqa: E402

log = logging.getLogger("warm_schedules")


def main() -> None:
    p = build_parser()
    p.set_defaults(dataset="ml-100k", budget_minutes=5.0, seeds=[3, 4], threads=2)
    p.add_argument(
        "--variants",
        default="constant/all/10,cosine/all/10,warmup_cosine/all/10",
        help="comma-separated warm-start recipes, each schedule/history windows/epochs[/lr multiple]",
    )
    args = p.parse_args(["--dataset", "ml-100k", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ckpt = Path(args.checkpoint_dir or f"bench/results/checkpoints/warm-schedules-{time.strftime('%Y%m%d-%H%M%S')}")
    ordered, items, index, text, cap = _ml100k_split(Path(args.data_dir), args.max_history)
    n = len(index)
    split = _cap(split_from_events(ordered, index), cap)
    inputs, seen = _test_inputs(split)
    model_cfg, train_cfg = _configs(args, max_len=args.max_len, text_init=True)
    content = _content(items, text, ordered, model_cfg)
    ts = ordered["event_timestamp"]
    early = ordered[ts <= ts.quantile(0.8)]
    early_split = _cap(split_from_events(early, index), cap)
    early_content = _content(items, text, early, model_cfg)

    def test_ndcg(model) -> float:
        return evaluate_scorer(ModelScorer(model), inputs, seen, split.test_targets, K, n)["overall"]["ndcg@10"]

    rows = []
    for seed in args.seeds:
        cfg = train_cfg.model_copy(update={"seed": seed})
        scratch = train_sequential(split, index, content, model_cfg, cfg, ckpt / f"scratch-{seed}")
        s = test_ndcg(scratch.model)
        base = train_sequential(early_split, index, early_content, model_cfg, cfg, ckpt / f"base-{seed}")
        save_trained_model(base.model, index, ckpt / f"base-model-{seed}")
        for variant in args.variants.split(","):
            schedule, windows, epochs, *lr_scale = variant.split("/")
            warm_cfg = cfg.model_copy(
                update={
                    "warm_start_epochs": int(epochs),
                    "warm_start_lr_factor": args.warm_lr_factor,
                    "warm_start_lr_schedule": schedule,
                    "history_windows": windows,
                    "learning_rate": cfg.learning_rate * float(lr_scale[0] if lr_scale else 1.0),
                    "warm_start_new_item_neighbours": args.new_item_neighbours,
                }
            )
            name = f"{variant.replace('/', '-')}-n{args.new_item_neighbours}"
            warm = train_sequential(
                split, index, content, model_cfg, warm_cfg, ckpt / f"warm-{name}-{seed}", init_from=ckpt / f"base-model-{seed}"
            )
            w = test_ndcg(warm.model)
            rows.append(
                {
                    "seed": seed,
                    "variant": variant,
                    "scratch_ndcg@10": s,
                    "warm_ndcg@10": w,
                    "relative_gap": (s - w) / s,
                    "scratch_val": scratch.best_val_ndcg,
                    "warm_val": warm.best_val_ndcg,
                    "warm_best_epoch": warm.best_epoch,
                    "warm_epochs": warm.epochs_run,
                    "warm_s": warm.seconds,
                    "scratch_s": scratch.seconds,
                    "time_ratio": warm.seconds / scratch.seconds,
                }
            )
            log.info("%s", rows[-1])
    summary = [
        {
            "variant": sch,
            "mean_gap": statistics.mean(r["relative_gap"] for r in rows if r["variant"] == sch),
            "worst_gap": max(r["relative_gap"] for r in rows if r["variant"] == sch),
            "mean_warm_val": statistics.mean(r["warm_val"] for r in rows if r["variant"] == sch),
            "mean_time_ratio": statistics.mean(r["time_ratio"] for r in rows if r["variant"] == sch),
        }
        for sch in args.variants.split(",")
    ]
    print(text_table(rows, list(rows[0])))
    print(text_table(summary, list(summary[0])))
    _write_report({"per_seed": rows, "summary": summary, "args": vars(args)}, Path(args.out or "bench/results/warm-schedules.json"))


if __name__ == "__main__":
    main()
