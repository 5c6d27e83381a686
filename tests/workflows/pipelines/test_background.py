"""`background.SerialWorker`: in order, bounded, failures re-raised in the submitting thread; no sleeps
(a worker held by an event shows what waits)."""

from __future__ import annotations

import threading

import pytest

from workflows.pipelines.background import SerialWorker


def test_calls_run_in_submission_order_and_join_waits_for_all():
    done: list[int] = []
    with SerialWorker(max_pending=2) as worker:
        for i in range(20):
            worker.submit(done.append, i)
            assert worker.pending <= 2
        worker.join()
        assert worker.pending == 0
    assert done == list(range(20))


def test_submit_waits_while_the_queue_is_full():
    release, started, order = threading.Event(), threading.Event(), []

    def held():
        started.set()
        release.wait()
        order.append("held")

    with SerialWorker(max_pending=1) as worker:
        worker.submit(held)
        started.wait()
        submitter = threading.Thread(target=worker.submit, args=(order.append, "next"))
        submitter.start()
        assert submitter.is_alive() and order == []  # full: submit waits for the held call
        release.set()
        submitter.join()
        worker.join()
    assert order == ["held", "next"]


def test_a_failure_is_raised_at_the_next_submit_or_at_join():
    def fail():
        raise ValueError("bad batch")

    with SerialWorker(max_pending=1) as worker:
        worker.submit(fail)
        with pytest.raises(ValueError, match="bad batch"):
            worker.submit(lambda: None)  # full: waits for the failed call, raises its error
    with SerialWorker(max_pending=2) as worker:
        worker.submit(fail)
        with pytest.raises(ValueError, match="bad batch"):
            worker.join()


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        SerialWorker(max_pending=0)
