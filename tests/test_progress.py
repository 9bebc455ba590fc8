"""Progress in a log file: plain lines at the start, at least every 30 s while a task advances, and at the end."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from edgecc.progress import Reporter, duration


class Clock:
    """A clock the test moves by hand, instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def logged(quiet: bool = False) -> tuple[Reporter, io.StringIO, Clock]:
    text, clock = io.StringIO(), Clock()
    return Reporter(quiet, console=Console(file=text, width=200), clock=clock), text, clock


def test_a_log_gets_a_line_at_start_every_30_s_with_an_eta_and_at_the_end() -> None:
    reporter, text, clock = logged()
    with reporter.task("training float teacher", 4, unit="epoch") as advance:
        for epoch in range(4):
            for batch in range(1, 11):  # heartbeats: 10 batches of 5 s, so a line about every 30 s
                clock.now += 5
                advance(0, partial=batch / 10)
            advance(status=f"loss {1 / (epoch + 1):.3f}")
    lines = text.getvalue().splitlines()
    assert lines[0] == "training float teacher: epoch 0/4, 0s elapsed, started"
    assert lines[-1] == "training float teacher: epoch 4/4, loss 0.250, 3m20s elapsed, done"
    middle = lines[1:-1]
    assert len(middle) == 200 // 30  # 200 s of work, one line per 30 s
    # 30 s in: 0.6 epoch done at 50 s an epoch, so 3.4 epochs (2m50s) to go; no figures yet
    assert middle[0] == "training float teacher: epoch 0/4, 30s elapsed, ETA 2m50s"
    # the figures of the last finished epoch stay on the heartbeat lines
    assert middle[2] == "training float teacher: epoch 1/4, loss 1.000, 1m30s elapsed, ETA 1m50s"


def test_a_quiet_reporter_prints_nothing() -> None:
    reporter, text, clock = logged(quiet=True)
    reporter.info("hello")
    reporter.warning("careful")
    with reporter.task("evaluating", 3) as advance:
        clock.now += 100
        advance()
        advance(0, partial=0.5)
    assert text.getvalue() == ""


def test_fast_tasks_print_two_lines_and_a_task_that_fails_says_it_stopped() -> None:
    reporter, text, clock = logged()
    with reporter.task("evaluating int8", 100) as advance:
        for _ in range(100):
            clock.now += 0.01
            advance()
    with pytest.raises(RuntimeError), reporter.task("training", 10) as advance:
        clock.now += 31
        advance(0, partial=0.0)
        raise RuntimeError("out of memory")
    assert text.getvalue().splitlines() == [
        "evaluating int8: step 0/100, 0s elapsed, started",
        "evaluating int8: step 100/100, 1s elapsed, done",
        "training: step 0/10, 0s elapsed, started",
        "training: step 0/10, 31s elapsed, ETA unknown",
        "training: step 0/10, 31s elapsed, stopped",
    ]


def test_a_terminal_gets_the_bar() -> None:
    text = io.StringIO()
    reporter = Reporter(console=Console(file=text, force_terminal=True, width=120))
    with reporter.task("timing model.tflite", 5) as advance:
        for _ in range(5):
            advance(0, partial=0.5)
            advance(status="p50 1.2 ms")
    shown = text.getvalue()
    assert "timing model.tflite" in shown and "5/5" in shown and "p50 1.2 ms" in shown
    assert "elapsed" not in shown  # the plain lines are for logs only


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.6, "1m00s"), (185, "3m05s"), (7620, "2h07m")])
def test_durations_read_like_a_clock(seconds: float, text: str) -> None:
    assert duration(seconds) == text
