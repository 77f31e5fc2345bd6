"""The Great Expectations gate: clean data passes, every corruption stops the run with a readable report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stratarec import schema
from stratarec.config import SyntheticConfig, ValidationConfig
from stratarec.data.ingest import read_table, write_parquet_atomic
from stratarec.data.movielens import load_movielens_100k
from stratarec.data.synthetic import generate_synthetic, inject_corruption
from stratarec.validation import EVENTS_PER_USER, DataValidationError, ValidationResult, validate_or_raise, validate_tables

pytestmark = pytest.mark.unit

CFG = ValidationConfig()
# Fixed "now" keeps the future-timestamp check independent of the wall clock.
NOW = pd.Timestamp("2030-01-01", tz="UTC")


@pytest.fixture(scope="module")
def clean() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_synthetic(SyntheticConfig(n_users=60, n_items=60, events_per_user=12))


def only_failure(result: ValidationResult):
    assert not result.success
    assert len(result.failures) == 1, result.summary()
    return result.failures[0]


def test_clean_synthetic_data_passes_and_writes_reports(clean, tmp_path):
    result = validate_tables(*clean, CFG, tmp_path / "report", now=NOW)
    assert result.success, result.summary()
    assert result.failures == []
    assert result.statistics["evaluated_expectations"] == len(result.checks) >= 14
    assert result.statistics["unsuccessful_expectations"] == 0
    for path in (result.report_html, result.report_md, result.result_json):
        assert path.is_file() and path.parent == tmp_path / "report"
    assert ValidationResult.model_validate_json(result.result_json.read_text()) == result
    assert "PASSED" in result.report_html.read_text()
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("kind", "expectation", "column", "bad_value", "count"),
    [
        ("nulls", "expect_column_values_to_not_be_null", schema.USER_ID, None, 3),
        ("rating_out_of_range", "expect_column_values_to_be_between", schema.RATING, 7.0, 3),
        ("unknown_item", "expect_column_values_to_be_in_set", schema.ITEM_ID, None, 3),
        ("duplicates", "expect_compound_columns_to_be_unique", None, None, 6),  # both copies of 3 rows
        ("future_timestamp", "expect_column_values_to_be_between", schema.EVENT_TIMESTAMP, "2100-01-01T00:00:00+00:00", 3),
    ],
)
def test_each_corruption_fails_the_right_expectation_with_examples(clean, tmp_path, kind, expectation, column, bad_value, count):
    events, items = inject_corruption(*clean, kind)
    result = validate_tables(events, items, CFG, tmp_path, now=NOW)
    failure = only_failure(result)
    assert (failure.table, failure.expectation, failure.column) == ("events", expectation, column)
    assert failure.unexpected_count == count
    assert 1 <= len(failure.examples) <= CFG.max_failed_examples
    assert all(set(schema.EVENT_COLUMNS) <= set(ex) for ex in failure.examples)
    if kind == "unknown_item":
        known = set(items[schema.ITEM_ID])
        assert all(ex[schema.ITEM_ID] not in known for ex in failure.examples)
    elif column is not None:
        assert all(ex[column] == bad_value for ex in failure.examples)
    else:  # duplicates: the example rows repeat a key
        keys = [(ex[schema.USER_ID], ex[schema.ITEM_ID], ex[schema.EVENT_TIMESTAMP]) for ex in failure.examples]
        assert len(set(keys)) < len(keys)

    page = result.report_html.read_text()
    assert expectation in page and failure.description in page and "FAILED" in page
    assert failure.description in result.report_md.read_text()
    saved = json.loads(result.result_json.read_text())
    assert saved["success"] is False and saved["failures"][0]["expectation"] == expectation

    with pytest.raises(DataValidationError) as err:
        validate_or_raise(events, items, CFG, tmp_path, now=NOW)
    message = str(err.value)
    assert message.startswith(f"validate: 1 of {len(result.checks)} expectations failed: {failure.description} ({count} rows)")
    assert err.value.result.failures[0].expectation == expectation


def test_user_with_too_few_events_is_reported_by_user(clean, tmp_path):
    events, items = clean
    lonely = events.iloc[[0]].assign(**{schema.USER_ID: pd.array([9999], dtype="Int64")})
    events = pd.concat([events, lonely], ignore_index=True)
    failure = only_failure(validate_tables(events, items, CFG, tmp_path, now=NOW))
    assert failure.table == "events_per_user" and failure.column == EVENTS_PER_USER
    assert failure.examples == [{"row": failure.examples[0]["row"], schema.USER_ID: 9999, EVENTS_PER_USER: 1}]
    assert "(1 users)" in DataValidationError(validate_tables(events, items, CFG, tmp_path, now=NOW)).args[0]


def test_duplicate_item_ids_and_wrong_dtypes_fail(clean, tmp_path):
    events, items = clean
    items = pd.concat([items, items.iloc[[0]]], ignore_index=True)
    events = events.astype({schema.RATING: "object"})
    result = validate_tables(events, items, CFG, tmp_path, now=NOW)
    failed = {(f.table, f.expectation, f.column) for f in result.failures}
    assert failed == {
        ("items", "expect_column_values_to_be_unique", schema.ITEM_ID),
        ("items", "expect_column_values_to_be_unique", schema.TITLE),  # the copied row repeats its title too
        ("events", "expect_column_type_to_be", schema.RATING),
    }


def test_a_title_listed_twice_fails_unless_titles_may_repeat(clean, tmp_path):
    events, items = clean
    items = items.copy()
    items.loc[1, schema.TITLE] = items.loc[0, schema.TITLE]
    failure = only_failure(validate_tables(events, items, CFG, tmp_path, now=NOW))
    assert (failure.table, failure.column, failure.unexpected_count) == ("items", schema.TITLE, 2)
    assert {e[schema.TITLE] for e in failure.examples} == {items.loc[0, schema.TITLE]}
    assert validate_tables(events, items, ValidationConfig(unique_titles=False), tmp_path, now=NOW).success


def test_missing_column_is_a_failure_not_a_crash(clean, tmp_path):
    events, items = clean
    result = validate_tables(events.drop(columns=[schema.RATING]), items, CFG, tmp_path, now=NOW)
    assert not result.success
    assert any(f.expectation == "expect_table_columns_to_match_ordered_list" for f in result.failures)
    assert all(f.column in (None, schema.RATING) for f in result.failures)
    assert result.report_html.is_file()


def test_now_and_floor_bound_the_timestamps(clean, tmp_path):
    events, items = clean
    early = validate_tables(events, items, CFG, tmp_path, now=events[schema.EVENT_TIMESTAMP].max() - pd.Timedelta(days=1))
    assert only_failure(early).column == schema.EVENT_TIMESTAMP
    late_floor = ValidationConfig(timestamp_floor=str(events[schema.EVENT_TIMESTAMP].min().date() + pd.Timedelta(days=2)))
    assert only_failure(validate_tables(events, items, late_floor, tmp_path, now=NOW)).column == schema.EVENT_TIMESTAMP


def test_tables_pass_after_a_parquet_round_trip(clean, tmp_path):
    """The KFP path: ingest writes Parquet, validate reads it back; dtypes must survive."""
    events = read_table(write_parquet_atomic(clean[0], tmp_path / "events"))
    items = read_table(write_parquet_atomic(clean[1], tmp_path / "items"))
    assert validate_tables(events, items, CFG, tmp_path / "report", now=NOW).success


def test_movielens_100k_passes_quickly(shared_data_dir, tmp_path):
    events, items = load_movielens_100k(shared_data_dir)
    result = validate_or_raise(events, items, CFG, tmp_path)
    assert result.statistics["events"] == 99_693 and result.statistics["users"] == 943
    assert result.statistics["seconds"] < 15.0, result.statistics
