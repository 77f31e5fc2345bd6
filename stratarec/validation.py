"""The data gate: a Great Expectations 1.x suite over the canonical event and item tables.

Three batches are validated, each through its own GX suite and ``ValidationDefinition`` in
one ephemeral context: ``events``, ``items`` and ``events_per_user`` (a small frame derived
here, one row per user with their event count, because GX has no expectation on group
sizes). Each check carries a human description in its ``meta``; results are read back by
that key, never by position, since GX does not keep the suite's order.

The result is written as ``report.html`` (self-contained), ``report.md`` and
``result.json``; :class:`DataValidationError` turns a failed result into a one-line message
that names every failed check.
"""

from __future__ import annotations

import html
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from stratarec import schema
from stratarec.atomic import write_text_atomic as _write_atomic
from stratarec.config import ValidationConfig

__all__ = [
    "EVENTS_PER_USER",
    "CheckOutcome",
    "DataValidationError",
    "ValidationFailure",
    "ValidationResult",
    "validate_or_raise",
    "validate_tables",
]

logger = logging.getLogger(__name__)

EVENTS_TABLE = "events"
ITEMS_TABLE = "items"
USERS_TABLE = "events_per_user"
EVENTS_PER_USER = "n_events"  # column of the derived per-user table

# Canonical dtypes, as pandas spells them (see stratarec.data.ingest.canonicalize).
EVENT_DTYPES: dict[str, str] = {
    schema.USER_ID: "Int64",
    schema.ITEM_ID: "Int64",
    schema.RATING: "float64",
    schema.EVENT_TIMESTAMP: "datetime64[ns, UTC]",
}
ITEM_DTYPES: dict[str, str] = {
    schema.ITEM_ID: "Int64",
    schema.TITLE: "string",
    schema.GENRES: "string",
    schema.RELEASE_YEAR: "Int64",
}
_META_KEY = "stratarec_check"


class CheckOutcome(BaseModel):
    """One expectation and whether it held."""

    table: str
    expectation: str
    column: str | None = None
    description: str
    success: bool
    unexpected_count: int | None = None
    observed: str | None = None


class ValidationFailure(BaseModel):
    """A failed expectation with up to ``max_failed_examples`` offending rows."""

    table: str
    expectation: str
    column: str | None = None
    description: str
    unexpected_count: int | None = None
    examples: list[dict[str, Any]] = []


class ValidationResult(BaseModel):
    """Outcome of :func:`validate_tables`; also saved as ``result.json``."""

    success: bool
    statistics: dict[str, Any]
    checks: list[CheckOutcome]
    failures: list[ValidationFailure]
    report_html: Path
    report_md: Path
    result_json: Path

    def summary(self) -> str:
        """One line naming every failed check, e.g. ``validate: 1 of 21 expectations failed: ...``."""
        total = self.statistics.get("evaluated_expectations", len(self.checks))
        if self.success:
            return f"validate: all {total} expectations passed"
        parts = [f.description + (f" ({f.unexpected_count} {_unit(f.table)})" if f.unexpected_count else "") for f in self.failures]
        return f"validate: {len(self.failures)} of {total} expectations failed: " + ", ".join(parts)


class DataValidationError(RuntimeError):
    """Raised when the tables fail the suite; ``result`` holds the details and report paths."""

    def __init__(self, result: ValidationResult) -> None:
        super().__init__(f"{result.summary()} (report: {result.report_html})")
        self.result = result


@dataclass
class _Check:
    """One expectation plus what the report says about it."""

    key: str
    table: str
    description: str
    expectation: Any  # a great_expectations.expectations.Expectation
    column: str | None = None
    example_columns: list[str] = field(default_factory=list)


def validate_tables(
    events: pd.DataFrame,
    items: pd.DataFrame,
    cfg: ValidationConfig,
    report_dir: Path,
    now: pd.Timestamp | None = None,
) -> ValidationResult:
    """Validate canonical events and items and write the reports.

    Args:
        events: Event table as produced by ingest (not repaired).
        items: Item table.
        cfg: Thresholds: rating range, timestamp floor, minimum events per user and how
            many example rows to keep per failure.
        report_dir: Folder for ``report.html``, ``report.md`` and ``result.json`` (created).
        now: Latest allowed event time; defaults to the current time. Naive values are UTC.

    Returns:
        The result; ``success`` is False when any expectation failed. Nothing is raised
        for bad data, see :func:`validate_or_raise`.
    """
    # Set before GX is imported so the library never tries to phone home from a pipeline
    # step; setdefault keeps an explicit choice made by whoever runs us.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    started = time.perf_counter()
    now = _utc(now if now is not None else pd.Timestamp.now(tz="UTC"))
    floor = _utc(pd.Timestamp(cfg.timestamp_floor))
    users = _events_per_user(events)
    frames = {EVENTS_TABLE: events.reset_index(drop=True), ITEMS_TABLE: items.reset_index(drop=True), USERS_TABLE: users}
    checks = _build_checks(cfg, frames, now, floor)

    context = gx.get_context(mode="ephemeral")
    # Progress bars would interleave with pipeline logs (tqdm writes to stderr per metric).
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("stratarec")
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": cfg.max_failed_examples,
        "include_unexpected_rows": True,
    }
    results: dict[str, Any] = {}
    for table, frame in frames.items():
        table_checks = [c for c in checks if c.table == table]
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=f"stratarec_{table}"))
        for check in table_checks:
            suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"validate_{table}", data=batch, suite=suite))
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        for res in run.results:
            results[(res.expectation_config.meta or {}).get(_META_KEY)] = res

    outcomes, failures = [], []
    for check in checks:
        res = results.get(check.key)
        outcome, failure = _read_result(check, res, frames[check.table], cfg.max_failed_examples)
        outcomes.append(outcome)
        if failure is not None:
            failures.append(failure)
    seconds = time.perf_counter() - started
    n_ok = sum(o.success for o in outcomes)
    statistics = {
        "evaluated_expectations": len(outcomes),
        "successful_expectations": n_ok,
        "unsuccessful_expectations": len(outcomes) - n_ok,
        "success_percent": round(100.0 * n_ok / max(len(outcomes), 1), 2),
        "events": len(events),
        "items": len(items),
        "users": len(users),
        "now": now.isoformat(),
        "seconds": round(seconds, 3),
    }
    report_dir = Path(report_dir)
    result = ValidationResult(
        success=not failures,
        statistics=statistics,
        checks=outcomes,
        failures=failures,
        report_html=report_dir / "report.html",
        report_md=report_dir / "report.md",
        result_json=report_dir / "result.json",
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(result.report_html, _render_html(result))
    _write_atomic(result.report_md, _render_md(result))
    _write_atomic(result.result_json, result.model_dump_json(indent=2))
    logger.info("%s in %.2fs; report %s", result.summary(), seconds, result.report_html)
    return result


def validate_or_raise(
    events: pd.DataFrame,
    items: pd.DataFrame,
    cfg: ValidationConfig,
    report_dir: Path,
    now: pd.Timestamp | None = None,
) -> ValidationResult:
    """Like :func:`validate_tables`, but raise when any expectation fails.

    Raises:
        DataValidationError: The tables failed; the reports are written before raising.
    """
    result = validate_tables(events, items, cfg, report_dir, now=now)
    if not result.success:
        raise DataValidationError(result)
    return result


# --------------------------------------------------------------------------- the suite


def _build_checks(cfg: ValidationConfig, frames: dict[str, pd.DataFrame], now: pd.Timestamp, floor: pd.Timestamp) -> list[_Check]:
    import great_expectations.expectations as gxe

    checks: list[_Check] = []

    def add(key: str, table: str, description: str, expectation: Any, column: str | None = None) -> None:
        expectation.meta = {_META_KEY: key}
        # A missing column makes GX raise inside the metric; catching turns it into a failed
        # check in the report instead of a crash before any report is written.
        expectation.catch_exceptions = True
        checks.append(_Check(key, table, description, expectation, column))

    for table, dtypes in ((EVENTS_TABLE, EVENT_DTYPES), (ITEMS_TABLE, ITEM_DTYPES)):
        add(
            f"{table}.columns",
            table,
            f"{table} columns are {', '.join(dtypes)}",
            gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(dtypes)),
        )
        for column, dtype in dtypes.items():
            add(
                f"{table}.{column}.type",
                table,
                f"{table}.{column} is {dtype}",
                gxe.ExpectColumnTypeToBe(column=column, type_=dtype),
                column,
            )

    for column in schema.EVENT_COLUMNS:
        add(
            f"events.{column}.not_null", EVENTS_TABLE, f"events.{column} not null", gxe.ExpectColumnValuesToNotBeNull(column=column), column
        )
    add(
        "events.rating.range",
        EVENTS_TABLE,
        f"rating between {cfg.rating_min:g} and {cfg.rating_max:g}",
        gxe.ExpectColumnValuesToBeBetween(column=schema.RATING, min_value=cfg.rating_min, max_value=cfg.rating_max),
        schema.RATING,
    )
    add(
        "events.event_timestamp.range",
        EVENTS_TABLE,
        f"event_timestamp between {floor:%Y-%m-%d} and now ({now:%Y-%m-%d %H:%M} UTC)",
        gxe.ExpectColumnValuesToBeBetween(column=schema.EVENT_TIMESTAMP, min_value=floor.to_pydatetime(), max_value=now.to_pydatetime()),
        schema.EVENT_TIMESTAMP,
    )
    items = frames[ITEMS_TABLE]
    known = items[schema.ITEM_ID].dropna().unique().tolist() if schema.ITEM_ID in items.columns else []
    add(
        "events.item_id.known",
        EVENTS_TABLE,
        "every event item_id is in items.item_id",
        gxe.ExpectColumnValuesToBeInSet(column=schema.ITEM_ID, value_set=[int(v) for v in known]),
        schema.ITEM_ID,
    )
    key_columns = [schema.USER_ID, schema.ITEM_ID, schema.EVENT_TIMESTAMP]
    add(
        "events.duplicates",
        EVENTS_TABLE,
        f"no duplicate ({', '.join(key_columns)}) events",
        gxe.ExpectCompoundColumnsToBeUnique(column_list=key_columns),
    )

    add(
        "items.item_id.not_null",
        ITEMS_TABLE,
        "items.item_id not null",
        gxe.ExpectColumnValuesToNotBeNull(column=schema.ITEM_ID),
        schema.ITEM_ID,
    )
    add(
        "items.item_id.unique", ITEMS_TABLE, "items.item_id unique", gxe.ExpectColumnValuesToBeUnique(column=schema.ITEM_ID), schema.ITEM_ID
    )
    add("items.title.not_null", ITEMS_TABLE, "items.title not null", gxe.ExpectColumnValuesToNotBeNull(column=schema.TITLE), schema.TITLE)
    if cfg.unique_titles:
        add(
            "items.title.unique",
            ITEMS_TABLE,
            "items.title unique (one catalogue entry per title)",
            gxe.ExpectColumnValuesToBeUnique(column=schema.TITLE),
            schema.TITLE,
        )

    add(
        "users.min_events",
        USERS_TABLE,
        f"each user has at least {cfg.min_events_per_user} events",
        gxe.ExpectColumnValuesToBeBetween(column=EVENTS_PER_USER, min_value=cfg.min_events_per_user),
        EVENTS_PER_USER,
    )
    order = {EVENTS_TABLE: 0, ITEMS_TABLE: 1, USERS_TABLE: 2}
    return sorted(checks, key=lambda c: order[c.table])  # stable: the report lists each table's checks together


def _events_per_user(events: pd.DataFrame) -> pd.DataFrame:
    """(n_users, 2): user_id and their number of events; null users are left to the not-null check."""
    if schema.USER_ID not in events.columns:
        return pd.DataFrame({schema.USER_ID: pd.array([], dtype="Int64"), EVENTS_PER_USER: np.array([], dtype=np.int64)})
    counts = events.groupby(schema.USER_ID, dropna=True, sort=True).size()
    return pd.DataFrame({schema.USER_ID: counts.index.to_numpy(), EVENTS_PER_USER: counts.to_numpy(dtype=np.int64)})


def _read_result(check: _Check, res: Any, frame: pd.DataFrame, max_examples: int) -> tuple[CheckOutcome, ValidationFailure | None]:
    """Turn one GX ExpectationValidationResult into our outcome (and failure, if it failed)."""
    expectation = check.expectation.expectation_type
    if res is None:  # GX returned nothing for this check: report it rather than pass silently
        success, payload, error = False, {}, "no result returned by Great Expectations"
    else:
        payload = dict(res.result or {})
        error = _exception_message(res.exception_info)
        success = bool(res.success) and error is None
    observed = payload.get("observed_value")
    count = payload.get("unexpected_count")
    description = check.description
    if error is not None:
        description = f"{description} — could not be evaluated: {error}"
    elif observed is not None and not success:
        description = f"{description} (observed: {_short(observed)})"
    outcome = CheckOutcome(
        table=check.table,
        expectation=expectation,
        column=check.column,
        description=check.description,
        success=success,
        unexpected_count=int(count) if count is not None else None,
        observed=_short(observed) if observed is not None else error,
    )
    if success:
        return outcome, None
    rows = payload.get("unexpected_rows")
    examples: list[dict[str, Any]] = []
    if isinstance(rows, pd.DataFrame):
        examples = _records(rows.head(max_examples))
    elif isinstance(rows, list):
        examples = [_jsonable_dict(r) for r in rows[:max_examples] if isinstance(r, dict)]
    failure = ValidationFailure(
        table=check.table,
        expectation=expectation,
        column=check.column,
        description=description,
        unexpected_count=outcome.unexpected_count,
        examples=examples,
    )
    return outcome, failure


def _exception_message(info: Any) -> str | None:
    """The first raised exception's message, whether GX nests it per metric or not."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception").splitlines()[0][:300]
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "exception").splitlines()[0][:300]
    return None


# --------------------------------------------------------------------------- JSON-safe values


def _records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Example rows as JSON-native dicts, the frame index kept as ``row``."""
    return [
        {"row": _jsonable(idx), **{str(k): _jsonable(v) for k, v in rec.items()}}
        for idx, rec in zip(rows.index, rows.to_dict("records"), strict=True)
    ]


def _jsonable_dict(rec: dict) -> dict[str, Any]:
    return {str(k): _jsonable(v) for k, v in rec.items()}


def _jsonable(value: Any) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _short(value: Any, limit: int = 200) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unit(table: str) -> str:
    return "users" if table == USERS_TABLE else "rows"


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


# --------------------------------------------------------------------------- reports


def _render_html(result: ValidationResult) -> str:
    esc = html.escape
    stats = result.statistics
    status = "PASSED" if result.success else "FAILED"
    colour = "#1a7f37" if result.success else "#cf222e"
    rows = "".join(
        f"<tr class='{'ok' if c.success else 'bad'}'>"
        + "".join(
            f"<td>{cell}</td>"
            for cell in (
                "pass" if c.success else "FAIL",
                esc(c.table),
                esc(c.description),
                f"<code>{esc(c.expectation)}</code>",
                esc(c.column or ""),
                "" if c.unexpected_count is None else c.unexpected_count,
                esc(c.observed or ""),
            )
        )
        + "</tr>"
        for c in result.checks
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>stratarec data validation</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}"
        "tr.bad td{background:#ffebe9}tr.ok td:first-child{color:#1a7f37}tr.bad td:first-child{color:#cf222e;font-weight:bold}"
        "code{font-size:12px}</style></head><body>",
        f"<h1>Data validation: <span style='color:{colour}'>{status}</span></h1>",
        f"<p>{esc(result.summary())}</p>",
        f"<p>{stats.get('events')} events, {stats.get('items')} items, {stats.get('users')} users; "
        f"checked at {esc(str(stats.get('now')))} in {stats.get('seconds')} s with Great Expectations.</p>",
        "<h2>Expectations</h2><table><tr><th>result</th><th>table</th><th>check</th><th>expectation</th>"
        f"<th>column</th><th>unexpected</th><th>observed</th></tr>{rows}</table>",
    ]
    if result.failures:
        parts.append("<h2>Failures</h2>")
    for f in result.failures:
        count = "" if f.unexpected_count is None else f" — {f.unexpected_count} {_unit(f.table)}"
        parts.append(
            f"<h3>{esc(f.table)}: {esc(f.description)}{count}</h3><p><code>{esc(f.expectation)}</code>"
            + (f" on <code>{esc(f.column)}</code>" if f.column else "")
            + "</p>"
        )
        if f.examples:
            cols = list(dict.fromkeys(k for ex in f.examples for k in ex))
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{esc(str(ex.get(c, '')))}</td>" for c in cols) + "</tr>" for ex in f.examples)
            parts.append(f"<p>First {len(f.examples)} offending rows:</p><table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _render_md(result: ValidationResult) -> str:
    def cell(value: Any) -> str:
        return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")

    lines = [f"# Data validation: {'PASSED' if result.success else 'FAILED'}", "", result.summary(), ""]
    lines += ["| result | table | check | expectation | column | unexpected |", "| --- | --- | --- | --- | --- | --- |"]
    for c in result.checks:
        mark = "pass" if c.success else "**FAIL**"
        values = [mark, cell(c.table), cell(c.description), f"`{c.expectation}`", cell(c.column), cell(c.unexpected_count)]
        lines.append("| " + " | ".join(values) + " |")
    for f in result.failures:
        lines += ["", f"## {cell(f.table)}: {cell(f.description)}", ""]
        if f.unexpected_count is not None:
            lines.append(f"{f.unexpected_count} {_unit(f.table)} unexpected (`{f.expectation}`).")
        if f.examples:
            cols = list(dict.fromkeys(k for ex in f.examples for k in ex))
            lines += ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            lines += ["| " + " | ".join(cell(ex.get(c)) for c in cols) + " |" for ex in f.examples]
    return "\n".join(lines) + "\n"
