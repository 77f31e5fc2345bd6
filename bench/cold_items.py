"""The temporal cold-item study alone, at as many seeds as it takes to read it.

Does the text-init model beat the ID-only one on items with at most 5 training events? Each
seed's temporal study (``bench/quality.py``) has 664 such events but only a handful of hits
per model, so three seeds leave the answer to chance. This runs just that study, text-init
against ID-only, at every seed of ``--seeds`` and pools them (exact McNemar on paired cases).

Checkpoint names are the quality benchmark's, so pointing ``--checkpoint-dir`` at one of its
runs reuses that run's models for the seeds it trained (a finished run is returned as it was)::

    python bench/cold_items.py --seeds 42,1,2,3,4,5,6,7 \\
        --checkpoint-dir bench/results/checkpoints/ml-100k-<time> --out bench/results/cold-items.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (
    _PAIRED,
    _cap,
    _configs,
    _content,
    _ml100k_split,
    _write_report,
    build_parser,
    pool_temporal_studies,
    temporal_cold_items,
)  # noqa: E402

from stratarec.sequences import split_from_events  # noqa: E402
from stratarec.tables import text_table  # noqa: E402
from stratarec.training import train_sequential  # noqa: E402

log = logging.getLogger("cold_items")


def main() -> None:
    p = build_parser()
    p.set_defaults(budget_minutes=5.0, seeds=[42, 1, 2, 3, 4, 5, 6, 7], threads=2)
    args = p.parse_args(["--dataset", "ml-100k", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ckpt = Path(args.checkpoint_dir or f"bench/results/checkpoints/cold-items-{time.strftime('%Y%m%d-%H%M%S')}")
    args.checkpoint_dir = str(ckpt)
    started = time.perf_counter()
    ordered, items, index, text, cap = _ml100k_split(Path(args.data_dir), args.max_history)
    model_cfg, train_cfg = _configs(args, max_len=args.max_len, text_init=True)
    ts = ordered["event_timestamp"]
    early = ordered[ts <= ts.quantile(0.8)]
    early_split = _cap(split_from_events(early, index), cap)
    early_content = _content(items, text, early, model_cfg)
    studies = []
    for seed in args.seeds:
        seed_cfg = train_cfg.model_copy(update={"seed": seed})
        suffix = "" if seed == args.seeds[0] else f"-seed{seed}"
        # The quality benchmark's warm-start base model: text-init, first 80% of the timeline.
        base = train_sequential(early_split, index, early_content, model_cfg, seed_cfg, ckpt / f"warm-base{suffix}")
        studies.append({"seed": seed, **temporal_cold_items(ordered, items, index, text, base.model, model_cfg, seed_cfg, args, suffix)})
    pooled = pool_temporal_studies(studies)
    text_init, id_only = _PAIRED[0], _PAIRED[1]
    rows = [
        {"seed": r["seed"], **{k: v for k, v in r.items() if k.split(" ")[0] in (text_init, id_only) and "ndcg" not in k}}
        for r in pooled["per_seed"]
    ]
    print(text_table(rows, list(rows[0])))
    print("pooled, cold hits in the top 10, text-init (A) vs ID-only (B):", json.dumps(pooled["pooled_top10"]))
    print("pooled, with a discovery slot:", json.dumps(pooled["pooled_slot"]))
    report = {
        "seeds": args.seeds,
        "per_seed": pooled["per_seed"],
        "pooled_top10": pooled["pooled_top10"],
        "pooled_slot": pooled["pooled_slot"],
        # Which cold cases each model hit, per seed: any subset of seeds can be re-pooled from these.
        "hit_cases": [
            {"seed": st["seed"], "cold_cases": st["cold_cases"], **{k: st[k] for k in ("cold_hit_cases", "cold_slot_hit_cases")}}
            for st in studies
        ],
        "wall_seconds": time.perf_counter() - started,
        "args": vars(args),
    }
    _write_report(report, Path(args.out or "bench/results/cold-items.json"))


if __name__ == "__main__":
    main()
