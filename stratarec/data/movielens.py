"""MovieLens 100K: load the original GroupLens files, or fetch and verify them.

The files are research-only (see the data README): they are read from a folder the user
points at and are never copied into the project or bundled into anything it publishes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from stratarec import schema
from stratarec.data.errors import DATA_HINT, DataSourceError
from stratarec.data.ingest import canonicalize

__all__ = [
    "ML100K_DIR",
    "ML100K_SHA256",
    "ML100K_URL",
    "fetch_movielens_100k",
    "load_movielens_100k",
    "merge_duplicate_titles",
    "verify_movielens_100k",
]

logger = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_DIR = "ml-100k"
# From the shared data folder's README.md (../shared/data), checked on the original GroupLens files.
ML100K_SHA256: dict[str, str] = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
}
_N_GENRE_FLAGS = 19
_ITEM_FIXED = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]


def load_movielens_100k(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read MovieLens 100K as canonical ``(events, items)``.

    ``u.item`` lists 18 films twice under two ids (e.g. *Chasing Amy (1997)* as 246 and 268),
    and 307 users rated a film under both. Left apart, the copies split the film's events, a
    user who rated one copy can be recommended the other, and "rated copy A, then copy B" is a
    trivially predictable next event. The loader merges them with
    :func:`merge_duplicate_titles` and logs what it merged.

    Args:
        data_dir: The folder holding ``ml-100k/``, or the ``ml-100k`` folder itself.

    Returns:
        Events (99,693 rows: the 100,000 of ``u.data`` less each user's second rating of a
        merged film; ``event_timestamp`` from the Unix seconds) and items (1,664 rows;
        ``genres`` joins the flagged names from ``u.genre`` in file order, ``release_year``
        from the release date, null for the one item without it).

    Raises:
        DataSourceError: A needed file is missing; the message names it and how to get it.
    """
    folder = _resolve_folder(Path(data_dir))
    for name in ("u.data", "u.item", "u.genre"):
        if not (folder / name).is_file():
            raise DataSourceError(f"MovieLens 100K file {folder / name} is missing: {DATA_HINT}")
    events = pd.read_csv(
        folder / "u.data",
        sep="\t",
        header=None,
        names=[schema.USER_ID, schema.ITEM_ID, schema.RATING, "unix_ts"],
        dtype={schema.USER_ID: "int64", schema.ITEM_ID: "int64", schema.RATING: "float64", "unix_ts": "int64"},
        engine="c",
    )
    events[schema.EVENT_TIMESTAMP] = pd.to_datetime(events.pop("unix_ts"), unit="s", utc=True)
    genres = _read_genre_names(folder / "u.genre")
    raw = pd.read_csv(
        folder / "u.item",
        sep="|",
        header=None,
        names=_ITEM_FIXED + genres,
        encoding="latin-1",  # u.item is not UTF-8 (e.g. line 1633)
        dtype={"item_id": "int64", "title": "string", "release_date": "string"},
        keep_default_na=False,
        na_values={"release_date": [""]},
    )
    flags = raw[genres].to_numpy(dtype=bool)  # (n_items, 19)
    names = np.array(genres, dtype=object)
    items = pd.DataFrame(
        {
            schema.ITEM_ID: raw["item_id"],
            schema.TITLE: raw["title"],
            schema.GENRES: [schema.GENRE_SEPARATOR.join(names[row]) for row in flags],
            schema.RELEASE_YEAR: pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year,
        }
    )
    events, items = canonicalize(events, items)
    n_events = len(events)
    events, items, merged = merge_duplicate_titles(events, items)
    if merged:
        logger.info(
            "merged %d catalogue entries listed twice onto the lowest id of their title; dropped %d repeated ratings",
            len(merged),
            n_events - len(events),
        )
    return events, items


def merge_duplicate_titles(events: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, int]]:
    """Merge catalogue entries that share a title onto the lowest item id of that title.

    Only for sources known to list one film twice (MovieLens 100K's titles carry the year, so a
    shared title is the same film). Each user keeps their first event on the merged film (the
    earliest; on a tie the lower original id); later events on it are dropped, because a
    second rating of the same film is not a new interaction.

    Args:
        events: Canonical events.
        items: Canonical items; rows with a null title or id are never merged.

    Returns:
        ``(events, items, merged)``: events remapped and without the repeats, in their original
        order; items without the merged rows; ``merged`` maps each dropped item id to the id it
        was merged onto (empty when every title is unique, and then the tables are returned as given).
    """
    # Rows without a title or an id are left for validation to report.
    titled = items[items[schema.TITLE].notna() & items[schema.ITEM_ID].notna()]
    keep_id = titled.groupby(schema.TITLE, sort=False)[schema.ITEM_ID].transform("min")
    merged = {int(a): int(b) for a, b in zip(titled[schema.ITEM_ID], keep_id, strict=True) if a != b}
    if not merged:
        return events, items, merged
    ev = events.copy()
    original = ev[schema.ITEM_ID]
    ev[schema.ITEM_ID] = original.map(lambda i: merged.get(i, i) if pd.notna(i) else i).astype(original.dtype)
    # First event per (user, film): earliest timestamp, then the lower original id, then file order.
    order = pd.DataFrame({"ts": ev[schema.EVENT_TIMESTAMP], "orig": original, "pos": np.arange(len(ev))})
    order = order.sort_values(["ts", "orig", "pos"], kind="stable")
    later = ev.loc[order.index].duplicated([schema.USER_ID, schema.ITEM_ID], keep="first").reindex(ev.index)
    # Only (user, film) pairs that the merge joined lose their repeats: a user who rated one
    # id twice in the source must still reach validation as a duplicate.
    joined = original.groupby([ev[schema.USER_ID], ev[schema.ITEM_ID]], dropna=False).transform("nunique") > 1
    drop = later.to_numpy() & joined.to_numpy()
    ev = ev[~drop].reset_index(drop=True)
    it = items[~items[schema.ITEM_ID].isin(set(merged))].reset_index(drop=True)
    return ev, it, merged


def verify_movielens_100k(folder: Path) -> Path:
    """Check the sha256 of ``u.data``, ``u.item``, ``u.user`` and ``u.genre`` in ``folder``.

    Args:
        folder: An ``ml-100k`` folder (or the folder holding one).

    Returns:
        The verified ``ml-100k`` folder.

    Raises:
        DataSourceError: A file is missing or its checksum differs from the published one.
    """
    folder = _resolve_folder(Path(folder))
    for name, expected in ML100K_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise DataSourceError(f"MovieLens 100K file {path} is missing: {DATA_HINT}")
        actual = _sha256(path)
        if actual != expected:
            raise DataSourceError(
                f"checksum mismatch for {path}: sha256 {actual}, expected {expected}; the file is corrupt "
                "or not the GroupLens original: delete the folder and fetch it again"
            )
    return folder


def fetch_movielens_100k(dest: Path, url: str = ML100K_URL, timeout: float = 60.0) -> Path:
    """Download MovieLens 100K from GroupLens into ``dest/ml-100k`` and verify it.

    The archive is extracted into a temporary folder inside ``dest``, verified there, and only
    then renamed into place, so an interrupted or corrupt download never leaves a folder that
    looks complete.

    Args:
        dest: Folder that will hold ``ml-100k/`` (created if needed); use it as the data dir.
        url: Archive URL.
        timeout: Socket timeout in seconds for the connection and each read.

    Returns:
        The verified ``dest/ml-100k`` folder. An existing, verified folder is returned as is.

    Raises:
        DataSourceError: The download fails, the archive lacks ``ml-100k/``, a checksum does
            not match, or ``dest/ml-100k`` exists but does not verify.
    """
    dest = Path(dest).expanduser()
    target = dest / ML100K_DIR
    if target.exists():
        # Never overwrite a folder the user already has; tell them instead.
        return verify_movielens_100k(target)
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=dest))
    try:
        archive = work / "ml-100k.zip"
        _download(url, archive, timeout)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(work / "x")
        except zipfile.BadZipFile as err:
            raise DataSourceError(f"{url} did not return a valid zip archive: {err}") from err
        extracted = work / "x" / ML100K_DIR
        if not extracted.is_dir():
            raise DataSourceError(f"the archive from {url} has no {ML100K_DIR}/ folder")
        verify_movielens_100k(extracted)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _resolve_folder(data_dir: Path) -> Path:
    """Accept both the data root and the ``ml-100k`` folder itself."""
    if (data_dir / "u.data").exists() or data_dir.name == ML100K_DIR:
        return data_dir
    return data_dir / ML100K_DIR


def _read_genre_names(path: Path) -> list[str]:
    """Genre names ordered by their index in ``u.genre`` (lines ``name|index``)."""
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            name, index = line.rsplit("|", 1)
            pairs.append((int(index), name))
    names = [name for _, name in sorted(pairs)]
    if len(names) != _N_GENRE_FLAGS:
        raise DataSourceError(f"{path} lists {len(names)} genres, expected {_N_GENRE_FLAGS}")
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, out: Path, timeout: float) -> None:
    """Stream ``url`` to ``out``, printing progress to stderr."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, out.open("wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(1 << 16):
                fh.write(block)
                done += len(block)
                share = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"\rdownloading {url}: {done / 1e6:.1f} MB{share}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except OSError as err:  # URLError, timeouts and connection resets are all OSErrors
        raise DataSourceError(f"could not download {url}: {err}; check the network, or copy ml-100k/ by hand") from err
