"""The feature-read deadline counts from when the read starts, not from when it was queued.

Under CPU saturation a read can wait for a free thread before it reaches the store; the service
must not call that a slow store and degrade. These tests drive the real waiting logic with real
threads and futures: a one-thread pool made busy by an earlier task plays the saturated service.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from stratarec.serving.service import READ_START_GRACE, FeastUserFeatures, FeatureStoreUnavailable, _ReadStart

pytestmark = pytest.mark.unit

DEADLINE = 0.05


def _read(start: _ReadStart, seconds: float) -> dict[int, dict | None]:
    start.mark()
    time.sleep(seconds)
    return {1: {"ok": True}}


def test_a_read_queued_behind_busy_threads_gets_its_full_deadline_once_started():
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(release.wait, 10)  # occupies the only thread
        start = _ReadStart()
        future = pool.submit(_read, start, 0.01)  # fast once it runs
        # The thread frees up after 2 deadlines: well past the deadline counted from submission,
        # well inside the start grace.
        threading.Timer(2 * DEADLINE, release.set).start()
        t0 = time.monotonic()
        rows = FeastUserFeatures._wait(future, start, DEADLINE)
        waited = time.monotonic() - t0
    assert rows == {1: {"ok": True}}
    assert waited >= 2 * DEADLINE  # it really was queued past the old deadline
    assert start.at - start.submitted >= 2 * DEADLINE * 0.9


def test_a_started_read_slower_than_the_deadline_times_out_near_the_deadline():
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = _ReadStart()
        future = pool.submit(_read, start, 1.5)
        t0 = time.monotonic()
        with pytest.raises(FutureTimeout):
            FeastUserFeatures._wait(future, start, DEADLINE)
        waited = time.monotonic() - t0
    assert DEADLINE * 0.9 <= waited < 1.0  # not the read's full 1.5 s; loose for loaded CI machines


def test_a_read_that_never_starts_times_out_after_the_start_grace():
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(release.wait, 10)
        start = _ReadStart()
        future = pool.submit(_read, start, 0.0)
        t0 = time.monotonic()
        with pytest.raises(FutureTimeout):
            FeastUserFeatures._wait(future, start, DEADLINE)
        waited = time.monotonic() - t0
        release.set()
    assert not start.started.is_set() or start.at - start.submitted >= READ_START_GRACE * DEADLINE * 0.9
    assert READ_START_GRACE * DEADLINE * 0.9 <= waited < 2.0  # bounded, not the 10 s the thread is held


class _ScriptedFeatures(FeastUserFeatures):
    """The real breaker and deadline logic over a scripted backend: each read pops an outcome."""

    def __init__(self, outcomes: list[bool], failures_to_open: int = 3, retry_s: float = 0.2) -> None:
        from stratarec.config import FeatureConfig

        super().__init__(Path("unused"), FeatureConfig(), timeout_s=1.0, retry_s=retry_s, failures_to_open=failures_to_open)
        self.outcomes = outcomes
        self.reads = 0

    def _read(self, user_ids, start):
        start.mark()
        try:
            self.reads += 1
            if not self.outcomes.pop(0):
                raise ConnectionError("scripted outage")
            return {u: {"ok": True} for u in user_ids}
        finally:
            self._release()


def _try(source) -> str:
    try:
        source.get_many([1])
        return "ok"
    except FeatureStoreUnavailable:
        return "refused"
    except ConnectionError:
        return "failed"


def test_one_failed_read_does_not_open_the_breaker():
    source = _ScriptedFeatures([False, True, False, False, True])
    try:
        assert [_try(source) for _ in range(5)] == ["failed", "ok", "failed", "failed", "ok"]
        assert source.reads == 5  # every request reached the store: no run of three failures
    finally:
        source.close()


def test_consecutive_failures_open_the_breaker_and_a_trial_closes_it():
    source = _ScriptedFeatures([False, False, False, False, True, True], retry_s=0.2)
    try:
        assert [_try(source) for _ in range(3)] == ["failed"] * 3
        assert _try(source) == "refused" and source.reads == 3  # open: no read at all
        time.sleep(0.25)
        assert _try(source) == "failed"  # the trial fails: open again at once
        assert _try(source) == "refused" and source.reads == 4
        time.sleep(0.25)
        assert _try(source) == "ok"  # the trial succeeds: closed
        assert _try(source) == "ok" and source.reads == 6  # the next request reads again at once
    finally:
        source.close()
