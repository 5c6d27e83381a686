"""Training progress while it runs: each step's losses stream from the Ray task to the driver's bar and
callback (what MLflow gets live), in batches, and add up to the train log."""

from __future__ import annotations

import pytest

from tests.workflows.pipelines.test_train_data import TINY_RESADPP, _config
from tests.workflows.pipelines.tiny_data import write_tiny
from workflows import storage
from workflows.config import MethodConfig
from workflows.pipelines.train import LOG_NAME, TrainSpec, run_trainings
from workflows.pipelines.train_progress import FLUSH_S, ProgressBoard, ProgressSender, StepReport


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ListQueue(list):
    def put(self, item) -> None:
        self.append(item)


def test_sender_announces_the_plan_then_sends_steps_in_timed_batches():
    clock, queue = Clock(), ListQueue()
    sender = ProgressSender(queue, job=3, planned=5, clock=clock)
    assert queue == [StepReport(3, planned=5)]
    sender(1, {"loss_a": 1.0, "epoch": 0})
    sender(2, {"loss_a": 0.5, "epoch": 0})
    assert len(queue) == 1  # buffered: less than FLUSH_S since the last send
    clock.now = FLUSH_S
    record = sender(3, {"loss_a": 0.25, "epoch": 1})
    assert record == (3, {"loss_a": 0.25, "epoch": 1.0})
    assert [step for step, _ in queue[1].steps] == [1, 2, 3] and queue[1].job == 3
    sender(4, {"loss_a": 0.1, "epoch": 1})
    sender.flush()  # the end of training sends the rest
    assert [step for step, _ in queue[2].steps] == [4]


def test_board_counts_steps_against_the_plan_and_forwards_them():
    forwarded = []
    board = ProgressBoard(["a", "b"], progress=False,
                          on_steps=lambda job, steps: forwarded.append((job, steps)))
    steps = [(1, {"loss_x": 2.0, "epoch": 0.0}), (2, {"loss_x": 4.0, "epoch": 0.0})]
    board.handle(StepReport(1, planned=10))
    board.handle(StepReport(1, steps=steps))
    assert (board.steps_seen[1], board.planned[1]) == (2, 10)
    assert list(board.recent[1]["loss_x"]) == [2.0, 4.0]  # the running window shown on the bar
    assert forwarded == [(1, steps)]
    board.close()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny") / "data"), n_train=5, n_normal=2, n_anomalous=2)


def test_every_step_reaches_the_driver_while_training(local_ray, tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path, "data.datasets=[textures]")
    spec = TrainSpec(("textures",), MethodConfig("resadpp", dict(TINY_RESADPP)), 0)
    streamed = []
    [result] = run_trainings(config, [spec], progress=False,
                             on_steps=lambda which, steps: streamed.append((which, steps)))
    assert streamed and all(which == spec for which, _ in streamed)
    steps = [step for _, batch in streamed for step in batch]
    # stage 1: 10 pool images -> 2 batches of 4; stage 2: 10 + 8 test images -> 4 batches
    assert [step for step, _ in steps] == list(range(1, 7))
    assert all({"loss_occ", "epoch", "stage"} <= set(metrics) for _, metrics in steps)
    log = storage.read_json(storage.join(result.checkpoint, LOG_NAME))
    assert [[s, m] for s, m in steps] == log["losses"]  # what streamed is what the log keeps
