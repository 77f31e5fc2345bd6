"""KFP adapter: read the configured source into canonical event and item tables."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest_data(config_json: str, events: Output[Dataset], items: Output[Dataset]) -> NamedTuple(
    "IngestOutputs", n_events=int, n_items=int
):
    """Load events and items (MovieLens, generic files or synthetic) and write them as Parquet."""
    from collections import namedtuple

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import load_raw_tables, write_parquet_atomic
    from stratarec.stages import stage_record

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "ingest") as summary:
        ev, it = load_raw_tables(cfg.data)
        write_parquet_atomic(ev, events.path)
        write_parquet_atomic(it, items.path)
        summary.update(source=cfg.data.source, events=len(ev), items=len(it))
    return namedtuple("IngestOutputs", ["n_events", "n_items"])(len(ev), len(it))
