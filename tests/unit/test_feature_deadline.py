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

import pytest

from stratarec.serving.service import READ_START_GRACE, FeastUserFeatures, _ReadStart

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
