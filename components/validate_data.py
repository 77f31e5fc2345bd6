"""KFP adapter: the Great Expectations gate. Only rows that pass leave this step."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from stratarec.components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate_data(
    config_json: str,
    events: Input[Dataset],
    items: Input[Dataset],
    validated_events: Output[Dataset],
    validated_items: Output[Dataset],
    report: Output[HTML],
) -> bool:
    """Run the suite; on failure raise (the run stops here), on success re-emit the tables."""
    import shutil
    from pathlib import Path

    from stratarec.config import StrataConfig
    from stratarec.data.ingest import read_table, write_parquet_atomic
    from stratarec.stages import run_dir, stage_record
    from stratarec.validation import DataValidationError, validate_tables

    cfg = StrataConfig.from_json(config_json)
    with stage_record(cfg, "validate") as summary:
        ev, it = read_table(events.path), read_table(items.path)
        out = (run_dir(cfg) or Path(report.path).parent) / "validation"
        result = validate_tables(ev, it, cfg.validation, out)
        shutil.copyfile(result.report_html, report.path)
        summary.update(success=result.success, failures=[f.model_dump() for f in result.failures][:20], report=str(result.report_html))
        if not result.success:
            raise DataValidationError(result)
        write_parquet_atomic(ev, validated_events.path)
        write_parquet_atomic(it, validated_items.path)
    return True
