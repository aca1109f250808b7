"""Stop and the worker thread: handlers stay responsive while the worker is busy,
Stop stops the worker and says where, and a new run starts after a Stop.

Hand-built streams and blocking fakes, no browser: each step waits on an Event the
test controls, so nothing depends on the machine's speed.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from dager.events import SearchProgress  # noqa: E402
from labui import engines, session  # noqa: E402
from labui import handlers as h  # noqa: E402
from labui.jobs import Job, JobRegistry, Tick  # noqa: E402


def test_job_yields_ticks_while_the_worker_is_busy_and_stop_closes_the_producer():
    gate, closed = threading.Event(), threading.Event()

    def produce():
        try:
            yield "first"
            gate.wait(10)  # a long non-yielding call (a DP-SGD update, say)
            for i in range(10_000):
                yield i
                gate.wait(0.01)
        finally:
            closed.set()

    job = Job("text")
    items = job.run(produce, poll_s=0.02)
    assert next(items) == "first"
    assert isinstance(next(items), Tick)  # the worker is blocked, the handler is not
    assert job.running
    job.stop.set()
    gate.set()
    rest = list(items)
    assert len(rest) < 10_000 and closed.is_set()  # stopped between items, generator closed
    assert job.wait_released(5) and not job.running


def test_worker_errors_reach_the_handler():
    def produce():
        yield 1
        raise ValueError("boom")

    items = Job("image").run(produce, poll_s=0.02)
    assert next(items) == 1
    with pytest.raises(ValueError, match="boom"):
        list(items)


def test_registry_stops_only_a_running_job():
    reg = JobRegistry()
    job = reg.start("s1", "text")
    assert reg.stop("s1", "text") is job and not job.user_stopped  # never ran: nothing to stop
    gate = threading.Event()
    items = job.run(lambda: iter([gate.wait(5)]), poll_s=0.02)
    assert isinstance(next(items), Tick)
    reg.stop("s1", "text")
    assert job.user_stopped and job.stop.is_set()
    gate.set()
    list(items)
    other = reg.start("s1", "image")
    assert reg.get("s1", "text") is job and reg.get("s1", "image") is other
    reg.forget("s1")
    assert reg.get("s1", "text") is None and other.stop.is_set()


@pytest.fixture
def endless_dager(tiny, monkeypatch):
    """DAGER that never finishes on its own: heartbeats until stopped."""
    bundle = tiny("gpt2")
    update_gate = threading.Event()
    closed = threading.Event()

    def slow_update(*args, **kwargs):
        update_gate.wait(10)  # the client's update takes as long as the test wants
        from fedclient import compute_update

        return compute_update(*args, **kwargs)

    def events(b, update, **options):
        from dager.events import AttackStarted

        try:
            yield AttackStarted("tiny", "classification", 1, b.hidden_size, 5, False, ())
            i = 0
            while True:
                i += 1
                yield SearchProgress(position=3, checked=i, seconds=0.0)
                threading.Event().wait(0.005)
        finally:
            closed.set()

    monkeypatch.setattr(engines, "load_model", lambda name, task="classification", device="cpu": bundle)
    monkeypatch.setattr(engines, "dager_parameters", lambda b, dropout=False: ["transformer.h.0.attn.c_attn.weight"])
    monkeypatch.setattr(engines, "compute_update", slow_update)
    monkeypatch.setattr(engines, "dager_events", events)
    monkeypatch.setattr(session, "JOBS", JobRegistry())
    return update_gate, closed


def test_stop_says_stopping_then_where_it_stopped_and_run_comes_back(endless_dager):
    update_gate, closed = endless_dager
    outs = h.run_text_attack("the cat sat", "tiny", "", "classification")
    first = next(outs)
    assert "Preparing" in first[0]
    # While the client's update is being computed the handler keeps yielding (Stop
    # stays live); the status says what is happening.
    statuses = []
    for _ in range(3):
        statuses.append(next(outs)[0])
    assert any("computing the client's update" in str(s) for s in statuses), statuses
    update_gate.set()
    for out in outs:  # the search runs: heartbeats keep coming
        if "search" in str(session.JOBS.get("local", "text").where):
            break
    assert h.stopping_for("text")(None) == "**Stopping…**"
    message, run_button, stop_button = h.stopped_for("text")(None)
    assert message.startswith("**Stopped** at position 4 of the search"), message
    assert run_button.interactive is True and stop_button.interactive is False
    assert closed.is_set()  # the engine's generator was closed
    rest = list(outs)  # the handler ends by itself, with a final frame
    assert rest and "Running" in rest[-1][0]
    # A Run after the Stop starts (a fresh job), and the stopped one is not reported again.
    again = h.run_text_attack("the cat sat", "tiny", "", "classification")
    assert "Preparing" in next(again)[0]
    assert not session.JOBS.get("local", "text").user_stopped
    again.close()


def test_stop_before_the_run_started():
    session.JOBS.forget("never-ran")
    message, run_button, _ = h.stopped_for("image")(None)
    assert "before the run started" in message and run_button.interactive is True


def test_the_worker_starts_at_run_and_closing_the_stream_early_stops_it():
    started, closed, gate = threading.Event(), threading.Event(), threading.Event()

    def produce():
        started.set()
        try:
            while not gate.is_set():
                yield "beat"
                gate.wait(0.01)
        finally:
            closed.set()

    job = Job("text")
    items = job.run(produce, poll_s=0.02)
    # Working before anyone asked for an item (a handler yields its first frame meanwhile).
    assert started.wait(5)
    items.close()  # the handler was cancelled at its first frame: no item was ever taken
    assert job.stop.is_set() and closed.wait(5)
    assert job.wait_released(5) and not job.running


def test_the_client_update_starts_while_the_first_frame_is_on_its_way(endless_dager, monkeypatch):
    update_gate, closed = endless_dager
    entered = threading.Event()
    slow_update = engines.compute_update

    def update(*args, **kwargs):
        entered.set()
        return slow_update(*args, **kwargs)

    monkeypatch.setattr(engines, "compute_update", update)
    outs = h.run_text_attack("the cat sat", "tiny", "", "classification")
    assert "Preparing" in next(outs)[0]
    # Only the first frame was taken, and the worker is already computing the update.
    assert entered.wait(5)
    job = session.JOBS.get("local", "text")
    outs.close()  # the visitor left at the first frame: the worker stops
    update_gate.set()
    assert job.stop.is_set() and job.wait_released(5) and not closed.is_set()  # stopped before the attack
