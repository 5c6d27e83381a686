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


def test_off_cuda_the_calls_run_without_a_stream_and_without_autograd():
    import torch

    seen = []
    with SerialWorker(device="cpu") as worker:
        assert worker._stream is None
        worker.submit(lambda: seen.append(torch.is_grad_enabled()))
        worker.join()
    assert seen == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_call_runs_on_its_own_stream_after_what_was_queued_before_it():
    """The batch a call gets is the one scored before its submission: its stream waits for the event
    recorded then, even while the submitter's stream is still busy with it."""
    import torch

    x = torch.zeros(1 << 24, device="cuda")
    for _ in range(200):  # long enough that an unordered read would see a partial sum
        x.add_(1)
    seen = []

    def read(tensor):
        seen.append((torch.cuda.current_stream() != torch.cuda.default_stream(), tensor.sum().item()))

    with SerialWorker(device="cuda") as worker:
        worker.submit(read, x)
        worker.join()
    assert seen == [(True, 200.0 * (1 << 24))]
