"""Data loading: MovieLens 100K, generic CSV/Parquet, the synthetic generator and canonicalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stratarec import schema
from stratarec.config import ColumnMapping, DataConfig, SyntheticConfig
from stratarec.data.errors import DataSourceError
from stratarec.data.generic import load_generic
from stratarec.data.ingest import canonicalize, load_raw_tables, read_table, write_parquet_atomic
from stratarec.data.movielens import fetch_movielens_100k, load_movielens_100k, merge_duplicate_titles, verify_movielens_100k
from stratarec.data.synthetic import CORRUPTIONS, DRIFT_START, GENRE_NAMES, generate_synthetic, inject_corruption

pytestmark = pytest.mark.unit

CANONICAL_EVENT_DTYPES = {
    schema.USER_ID: "Int64",
    schema.ITEM_ID: "Int64",
    schema.RATING: "float64",
    schema.EVENT_TIMESTAMP: "datetime64[ns, UTC]",
}
CANONICAL_ITEM_DTYPES = {schema.ITEM_ID: "Int64", schema.TITLE: "string", schema.GENRES: "string", schema.RELEASE_YEAR: "Int64"}


def assert_canonical(events: pd.DataFrame, items: pd.DataFrame) -> None:
    assert tuple(events.columns) == schema.EVENT_COLUMNS
    assert tuple(items.columns) == schema.ITEM_COLUMNS
    assert {c: str(t) for c, t in events.dtypes.items()} == CANONICAL_EVENT_DTYPES
    assert {c: str(t) for c, t in items.dtypes.items()} == CANONICAL_ITEM_DTYPES


@pytest.fixture(scope="module")
def ml100k(shared_data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return load_movielens_100k(shared_data_dir)


# --------------------------------------------------------------------------- MovieLens 100K


def test_movielens_counts_and_schema(ml100k):
    events, items = ml100k
    assert_canonical(events, items)
    # u.data's 100,000 ratings less 307 second ratings of a film listed twice (18 of them).
    assert len(events) == 100_000 - 307
    assert events[schema.USER_ID].nunique() == 943
    assert events[schema.ITEM_ID].nunique() == 1682 - 18
    assert len(items) == 1682 - 18 and items[schema.ITEM_ID].is_unique and items[schema.TITLE].is_unique
    assert not events.duplicated([schema.USER_ID, schema.ITEM_ID]).any()
    by_id = items.set_index(schema.ITEM_ID)
    assert 246 in by_id.index and 268 not in by_id.index  # Chasing Amy (1997) keeps its lower id
    assert events[schema.EVENT_TIMESTAMP].min() >= pd.Timestamp("1997-09-01", tz="UTC")
    assert events[schema.EVENT_TIMESTAMP].max() < pd.Timestamp("1998-05-01", tz="UTC")


def test_movielens_items_parse_genres_years_and_latin1(ml100k):
    _, items = ml100k
    by_id = items.set_index(schema.ITEM_ID)
    assert by_id.loc[1, schema.TITLE] == "Toy Story (1995)"
    assert by_id.loc[1, schema.GENRES] == "Animation|Children's|Comedy"  # u.genre order
    assert by_id.loc[1, schema.RELEASE_YEAR] == 1995
    assert pd.isna(by_id.loc[267, schema.RELEASE_YEAR])  # the one item without a date
    assert not by_id[schema.TITLE].str.contains("\ufffd").any()  # latin-1 decoded, no replacement chars
    assert by_id.loc[1633, schema.TITLE].isascii() is False


def test_movielens_accepts_the_ml100k_folder_itself(shared_data_dir):
    events, items = load_movielens_100k(shared_data_dir / "ml-100k")
    assert len(events) == 99_693 and len(items) == 1664


def _merge_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    ts = pd.to_datetime([10, 20, 20, 30, 40, 50, 60, 60], unit="s", utc=True)
    events = pd.DataFrame(
        {
            schema.USER_ID: [1, 1, 2, 2, 3, 3, 4, 4],
            schema.ITEM_ID: [7, 3, 3, 7, 9, 9, 5, 8],
            schema.RATING: [5.0, 1.0, 2.0, 4.0, 3.0, 3.0, 1.0, 2.0],
            schema.EVENT_TIMESTAMP: ts,
        }
    )
    items = pd.DataFrame(
        {
            schema.ITEM_ID: [3, 5, 7, 8, 9],
            schema.TITLE: ["Film (1997)", None, "Film (1997)", None, "Other (1990)"],
            schema.GENRES: ["Drama", "", "Drama", "", "Comedy"],
            schema.RELEASE_YEAR: [1997, None, 1997, None, 1990],
        }
    )
    return canonicalize(events, items)


def test_merge_duplicate_titles_keeps_each_users_first_rating_under_the_lowest_id():
    events, items = _merge_case()
    ev, it, merged = merge_duplicate_titles(events, items)
    assert merged == {7: 3}
    assert it[schema.ITEM_ID].tolist() == [3, 5, 8, 9]  # null titles (5, 8) are never merged
    # User 1 rated copy 7 first (t=10): that rating survives, moved to id 3. User 2 rated both
    # at t=20/30: the t=20 one survives. User 3's own duplicate of item 9 is not the merge's to
    # drop (validation reports it); user 4's items 5 and 8 share a null title and stay apart.
    assert ev[schema.USER_ID].tolist() == [1, 2, 3, 3, 4, 4]
    assert ev[schema.ITEM_ID].tolist() == [3, 3, 9, 9, 5, 8]
    assert ev[schema.RATING].tolist() == [5.0, 2.0, 3.0, 3.0, 1.0, 2.0]
    assert str(ev[schema.ITEM_ID].dtype) == "Int64"


def test_merge_duplicate_titles_breaks_a_timestamp_tie_by_the_lower_original_id():
    events, items = _merge_case()
    events.loc[1, schema.EVENT_TIMESTAMP] = events.loc[0, schema.EVENT_TIMESTAMP]  # user 1: ids 7 and 3 both at t=10
    ev, _, _ = merge_duplicate_titles(events, items)
    assert ev[ev[schema.USER_ID] == 1][schema.RATING].tolist() == [1.0]  # the rating given under id 3


def test_merge_duplicate_titles_leaves_rows_without_an_id_to_validation():
    events, items = _merge_case()
    items.loc[0, schema.ITEM_ID] = pd.NA  # "Film (1997)" now has one row with an id
    ev, it, merged = merge_duplicate_titles(events, items)
    assert merged == {} and len(it) == len(items) and len(ev) == len(events)


def test_merge_duplicate_titles_leaves_unique_catalogues_alone():
    events, items = _merge_case()
    items.loc[2, schema.TITLE] = "Film (2001)"
    ev, it, merged = merge_duplicate_titles(events, items)
    assert merged == {} and ev is events and it is items


def test_movielens_missing_file_names_it_and_says_how_to_fix(tmp_path):
    (tmp_path / "ml-100k").mkdir()
    with pytest.raises(DataSourceError) as err:
        load_movielens_100k(tmp_path)
    message = str(err.value)
    assert "u.data" in message
    assert "stratarec data fetch ml-100k" in message and "STRATAREC_DATA_DIR" in message


def test_checksums_verify_on_the_shared_copy(shared_data_dir):
    assert verify_movielens_100k(shared_data_dir / "ml-100k") == shared_data_dir / "ml-100k"


def test_checksum_mismatch_names_the_file(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in ("u.data", "u.item", "u.user", "u.genre"):
        (folder / name).write_text("not the GroupLens file\n")
    with pytest.raises(DataSourceError, match=r"checksum mismatch for .*u\.data"):
        verify_movielens_100k(folder)


def test_fetch_returns_an_existing_verified_folder_without_downloading(shared_data_dir):
    # The network is closed here; an existing folder must be verified, not re-downloaded.
    assert fetch_movielens_100k(shared_data_dir) == shared_data_dir / "ml-100k"


def test_load_raw_tables_movielens_and_min_rating(shared_data_dir):
    events, items = load_raw_tables(DataConfig(source="movielens-100k", data_dir=str(shared_data_dir), min_rating=4.0))
    assert_canonical(events, items)
    assert len(events) == 34059 + 21135  # 4- and 5-star events left after merging films listed twice
    assert events.index.equals(pd.RangeIndex(len(events)))


def test_load_raw_tables_without_data_dir_explains_what_to_do():
    with pytest.raises(DataSourceError, match="STRATAREC_DATA_DIR") as err:
        load_raw_tables(DataConfig(source="movielens-100k", data_dir=None))
    assert "--data-dir" in str(err.value) and "synthetic" in str(err.value)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_schema_and_shape():
    cfg = SyntheticConfig()
    events, items = generate_synthetic(cfg)
    assert_canonical(events, items)
    assert len(items) == cfg.n_items and events[schema.USER_ID].nunique() == cfg.n_users
    assert 0.7 * cfg.n_users * cfg.events_per_user < len(events) < 1.3 * cfg.n_users * cfg.events_per_user
    assert events.groupby(schema.USER_ID).size().min() >= 3
    assert set(events[schema.ITEM_ID]) <= set(items[schema.ITEM_ID])
    assert events[schema.RATING].between(1, 5).all() and set(events[schema.RATING]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    start = pd.Timestamp(cfg.start, tz="UTC")
    assert events[schema.EVENT_TIMESTAMP].min() >= start
    assert events[schema.EVENT_TIMESTAMP].max() < start + pd.Timedelta(days=cfg.days, minutes=1)
    per_user = events.sort_values([schema.USER_ID, schema.EVENT_TIMESTAMP])
    assert (per_user.groupby(schema.USER_ID)[schema.EVENT_TIMESTAMP].diff().dropna() > pd.Timedelta(0)).all()
    assert not events.duplicated([schema.USER_ID, schema.ITEM_ID]).any()  # nobody sees an item twice


def test_synthetic_items_have_one_or_two_real_genres_named_in_the_title():
    _, items = generate_synthetic(SyntheticConfig(n_genres=6))
    genres = items[schema.GENRES].str.split(schema.GENRE_SEPARATOR)
    assert genres.map(len).between(1, 2).all()
    assert set(genres.explode()) == set(GENRE_NAMES[:6])
    assert all(all(g in title for g in gs) for title, gs in zip(items[schema.TITLE], genres, strict=True))
    assert items[schema.RELEASE_YEAR].between(1950, 2025).all()


def test_synthetic_is_seeded():
    a = generate_synthetic(SyntheticConfig(seed=3))
    b = generate_synthetic(SyntheticConfig(seed=3))
    c = generate_synthetic(SyntheticConfig(seed=4))
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert not a[0].equals(c[0])


def test_synthetic_next_item_follows_the_previous_one():
    """The process is sequential: 'the next items of the last item's genre chain' beats popularity."""
    events, items = generate_synthetic(SyntheticConfig())
    primary = items.set_index(schema.ITEM_ID)[schema.GENRES].str.split(schema.GENRE_SEPARATOR).str[0]
    chains = {g: sorted(ids) for g, ids in primary.groupby(primary).groups.items()}
    popular = events[schema.ITEM_ID].value_counts().index.tolist()
    hits_chain = hits_pop = 0
    for _, user in events.sort_values(schema.EVENT_TIMESTAMP).groupby(schema.USER_ID):
        *history, target = user[schema.ITEM_ID].tolist()
        seen = set(history)
        chain = chains[primary[history[-1]]]
        after = chain[chain.index(history[-1]) + 1 :]
        hits_chain += target in [i for i in after if i not in seen][:10]
        hits_pop += target in [i for i in popular if i not in seen][:10]
    assert hits_chain > 2 * hits_pop


def _genre_shift(cfg: SyntheticConfig) -> tuple[float, float]:
    """(total variation between early and late primary-genre mix, late minus early mean rating)."""
    events, items = generate_synthetic(cfg)
    primary = items.set_index(schema.ITEM_ID)[schema.GENRES].str.split(schema.GENRE_SEPARATOR).str[0]
    genre = events[schema.ITEM_ID].map(primary).astype(str)
    late = events[schema.EVENT_TIMESTAMP] >= pd.Timestamp(cfg.start, tz="UTC") + pd.Timedelta(days=cfg.days * DRIFT_START)
    diff = genre[late].value_counts(normalize=True).sub(genre[~late].value_counts(normalize=True), fill_value=0.0)
    rating = events[schema.RATING]
    return 0.5 * float(diff.abs().sum()), float(rating[late].mean() - rating[~late].mean())


def test_drift_shifts_the_late_genre_mix_and_ratings_and_no_drift_does_not():
    stationary_tv, stationary_dr = _genre_shift(SyntheticConfig(n_users=400, drift=0.0))
    drifted_tv, drifted_dr = _genre_shift(SyntheticConfig(n_users=400, drift=0.5))
    assert stationary_tv < 0.08, stationary_tv  # sampling noise only
    assert drifted_tv > 0.15 and drifted_tv > 3 * stationary_tv, (drifted_tv, stationary_tv)
    assert abs(stationary_dr) < 0.1
    assert drifted_dr < stationary_dr - 0.05


def test_inject_corruption_copies_and_rejects_unknown_kinds():
    events, items = generate_synthetic(SyntheticConfig(n_users=20))
    before = events.copy()
    for kind in CORRUPTIONS:
        bad, _ = inject_corruption(events, items, kind)
        assert not bad.equals(events), kind
    pd.testing.assert_frame_equal(events, before)
    with pytest.raises(ValueError, match="unknown corruption"):
        inject_corruption(events, items, "typo")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- generic files and canonicalize


def _small_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    events, items = generate_synthetic(SyntheticConfig(n_users=10, n_items=20, events_per_user=5))
    return events, items


def test_generic_csv_round_trip_with_renamed_columns(tmp_path):
    events, items = _small_tables()
    mapping = ColumnMapping(user_id="customer", item_id="sku", rating="stars", event_timestamp="ts_ms", title="name")
    rename = {k: v for k, v in mapping.model_dump().items()}
    raw_events = events.rename(columns=rename)
    raw_events["ts_ms"] = raw_events["ts_ms"].astype("int64") // 1_000_000  # ns -> ms since the epoch
    raw_events["extra"] = "ignored"
    raw_events.to_csv(tmp_path / "ev.csv", index=False)
    items.rename(columns=rename).to_csv(tmp_path / "it.csv", index=False)
    cfg = DataConfig(
        source="generic", data_dir=str(tmp_path), events_file="ev.csv", items_file="it.csv", columns=mapping, timestamp_unit="ms"
    )
    got_events, got_items = load_raw_tables(cfg)
    pd.testing.assert_frame_equal(got_events, events)
    pd.testing.assert_frame_equal(got_items, items)


def test_generic_parquet_with_iso_timestamps(tmp_path):
    events, items = _small_tables()
    raw = events.assign(**{schema.EVENT_TIMESTAMP: events[schema.EVENT_TIMESTAMP].dt.strftime("%Y-%m-%dT%H:%M:%SZ")})
    raw.to_parquet(tmp_path / "events.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    got_events, got_items = load_generic(tmp_path, DataConfig(source="generic", timestamp_unit="iso"))
    pd.testing.assert_frame_equal(got_events, events)
    pd.testing.assert_frame_equal(got_items, items)


def test_generic_missing_column_names_column_and_file(tmp_path):
    events, items = _small_tables()
    events.drop(columns=[schema.RATING]).rename(columns={schema.USER_ID: "customer"}).to_csv(tmp_path / "ev.csv", index=False)
    items.to_csv(tmp_path / "it.csv", index=False)
    cfg = DataConfig(source="generic", events_file="ev.csv", items_file="it.csv", columns=ColumnMapping(user_id="customer"))
    with pytest.raises(DataSourceError) as err:
        load_generic(tmp_path, cfg)
    assert "'rating'" in str(err.value) and "ev.csv" in str(err.value)


def test_generic_missing_file(tmp_path):
    with pytest.raises(DataSourceError, match="events.parquet"):
        load_generic(tmp_path, DataConfig(source="generic"))


def test_canonicalize_keeps_bad_rows_for_validation():
    events = pd.DataFrame(
        {
            schema.USER_ID: [1.0, np.nan, 2.0, 2.0],
            schema.ITEM_ID: [10, 11, 999, 10],
            schema.RATING: [7, 3, 4, 4],
            schema.EVENT_TIMESTAMP: [0, 60, "not a time", 0],
            "extra": 1,
        }
    )
    items = pd.DataFrame(
        {schema.RELEASE_YEAR: [1999.0, None], schema.ITEM_ID: [10, 11], schema.TITLE: ["a", None], schema.GENRES: ["Drama", "Comedy|Drama"]}
    )
    ev, it = canonicalize(events.astype({schema.EVENT_TIMESTAMP: object}), items)
    assert_canonical(ev, it)
    assert len(ev) == 4 and len(it) == 2  # nothing dropped
    assert ev[schema.USER_ID].isna().sum() == 1 and ev[schema.RATING].max() == 7.0
    assert ev[schema.EVENT_TIMESTAMP].isna().sum() == 1  # unparseable -> NaT, not dropped
    assert pd.isna(it.loc[1, schema.TITLE]) and it.loc[0, schema.RELEASE_YEAR] == 1999


def test_canonicalize_rejects_non_integer_ids():
    events, items = _small_tables()
    events = events.astype({schema.USER_ID: object})
    events.loc[0, schema.USER_ID] = "alice"
    with pytest.raises(DataSourceError, match="events.user_id must hold integer ids"):
        canonicalize(events, items)


def test_parquet_round_trip_keeps_canonical_dtypes(tmp_path):
    events, items = _small_tables()
    events, _ = inject_corruption(events, items, "nulls")
    path = write_parquet_atomic(events, tmp_path / "out" / "events")  # KFP artifact paths have no suffix
    pd.testing.assert_frame_equal(read_table(path), events)
    assert [p.name for p in path.parent.iterdir()] == ["events"]  # no temporary file left behind
    with pytest.raises(DataSourceError, match="does not exist"):
        read_table(tmp_path / "missing.parquet")
