"""Bounded cost (issue 13): span-full verdict, time budgets, thread state, sweep budgets."""

from __future__ import annotations

import pytest
import torch

import fedclient
from dager.attack import iter_dager, required_parameters
from dager.config import DagerConfig
from dager.events import (
    AttackFinished,
    AttackWarning,
    PrefixesExtended,
    SearchProgress,
    SentenceRecovered,
    StopReason,
    TokensFiltered,
    WarningCode,
)
from dlg.attack import DlgConfig, iter_dlg
from dlg.events import DlgFinished, DlgStep
from dlg.models import build_model
from dlg.text import TextDlgConfig, run_dlg_text
from fedclient import InvalidConfigError, compute_update
from fedclient.defenses import GaussianNoise
from fedclient.sweep import SweepPoint, iter_sweep
from fedclient.threads import on_threads

SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
    "A red kite flew high.",
]
LONGER = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "My grandmother baked fresh bread every Sunday morning.",
    "Please send the quarterly report to the finance team by Friday.",
    "The museum will be closed for renovations until next spring.",
]


class FakeClock:
    """A clock the test moves by hand (injected as the engines' ``_now``)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _update(bundle, sentences, defense=None):
    batch = bundle.encode(sentences, seed=0)
    return compute_update(bundle.model, batch, parameters=required_parameters(bundle), defense=defense, seed=0)


def _check_finished(events):
    assert sum(isinstance(e, AttackFinished) for e in events) == 1 and isinstance(events[-1], AttackFinished)
    result = events[-1].result
    n = len(result.sentences)
    assert len(result.token_ids) == n and len(result.exact) == n
    return result


def _warnings(events):
    return [e.code for e in events if isinstance(e, AttackWarning)]


# ------------------------------------------------------------------ DAGER: full span


@pytest.mark.parametrize("case", ["heavy_noise", "over_capacity"])
def test_full_span_stops_at_the_rank_step(tiny, case):
    if case == "heavy_noise":
        bundle = tiny("gpt2", "classification", d=64, layers=3)
        update = _update(bundle, SENTENCES, GaussianNoise(1e-2))
    else:
        bundle = tiny("gpt2", "classification", d=32, layers=3)
        update = _update(bundle, LONGER)  # ~50 distinct inputs > d = 32
    events = list(iter_dager(bundle, update))
    result = _check_finished(events)
    assert result.stop_reason == StopReason.SPAN_FULL and result.over_capacity
    assert result.rank >= 0.95 * bundle.hidden_size
    assert WarningCode.SPAN_FULL in _warnings(events)
    assert result.sentences == ()
    # The verdict comes before any filtering or searching.
    assert not any(isinstance(e, (TokensFiltered, PrefixesExtended, SearchProgress, SentenceRecovered)) for e in events)


def test_noise_tolerant_best_effort_runs_within_the_prefix_budget(tiny):
    bundle = tiny("gpt2", "classification", d=32, layers=3)
    update = _update(bundle, LONGER)
    config = DagerConfig(noise_tolerant=True, max_prefixes=8)
    events = list(iter_dager(bundle, update, config=config))
    result = _check_finished(events)
    assert result.stop_reason == StopReason.COMPLETE
    steps = [e for e in events if isinstance(e, PrefixesExtended)]
    assert steps and max(s.num_prefixes for s in steps) <= 8
    assert len(steps[0].prefixes) <= 8
    assert 1 <= len(result.sentences) <= len(LONGER) and not all(result.exact)


def test_clean_batch_is_not_stopped(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    events = list(iter_dager(bundle, _update(bundle, SENTENCES)))
    result = _check_finished(events)
    assert result.stop_reason == StopReason.COMPLETE and all(result.exact)
    assert sorted(result.token_ids) == sorted(tuple(bundle.tokenize(s)) for s in SENTENCES)
    assert WarningCode.SPAN_FULL not in _warnings(events)


# ------------------------------------------------------------------ DAGER: time budget


def test_tiny_time_budget_ends_with_a_well_formed_result(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    events = list(iter_dager(bundle, _update(bundle, SENTENCES), config=DagerConfig(time_budget_s=1e-6)))
    result = _check_finished(events)
    assert result.stop_reason == StopReason.TIME_BUDGET
    assert _warnings(events).count(WarningCode.TIME_BUDGET) == 1
    assert not any(isinstance(e, PrefixesExtended) for e in events)


def test_time_budget_keeps_exact_sentences_exact(tiny, monkeypatch):
    import dager.attack

    clock = FakeClock()
    monkeypatch.setattr(dager.attack, "_now", clock)
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    stream = iter_dager(bundle, _update(bundle, SENTENCES), config=DagerConfig(time_budget_s=10.0))
    events = []
    for event in stream:
        events.append(event)
        if isinstance(event, SentenceRecovered) and clock.t == 0.0:
            clock.t = 11.0  # the budget runs out right after the first sentence
    result = _check_finished(events)
    assert result.stop_reason == StopReason.TIME_BUDGET
    assert WarningCode.TIME_BUDGET in _warnings(events)
    expected = {tuple(bundle.tokenize(s)) for s in SENTENCES}
    assert result.exact[0] and result.token_ids[0] in expected  # found before the deadline: exact
    assert 1 <= len(result.sentences) <= len(SENTENCES)
    # What the search still held is reported as partial, never as exact.
    assert not any(result.exact[1:])


def test_time_budget_bounds_the_greedy_completion(tiny, monkeypatch):
    import dager.attack

    clock = FakeClock()
    monkeypatch.setattr(dager.attack, "_now", clock)
    bundle = tiny("gpt2", "classification", d=32, layers=3)
    config = DagerConfig(noise_tolerant=True, max_prefixes=8, time_budget_s=10.0)
    events = []
    for event in iter_dager(bundle, _update(bundle, LONGER), config=config):
        events.append(event)
        if isinstance(event, SentenceRecovered) and not event.exact:
            clock.t = 11.0
    result = _check_finished(events)
    # Unbounded, the greedy completion fills all four sentences; the deadline after the
    # first one ends it there.
    assert result.stop_reason == StopReason.TIME_BUDGET
    assert _warnings(events).count(WarningCode.TIME_BUDGET) == 1
    assert len(result.sentences) == 1 and not result.exact[0]


# ------------------------------------------------------------------ DLG


def _image_update(batch_size=1):
    model = build_model("lenet")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((batch_size, 3, 32, 32), generator=gen)
    labels = torch.arange(batch_size)
    return model, fedclient.compute_update(model, fedclient.ImageBatch(images, labels))


def test_dlg_tiny_time_budget():
    model, update = _image_update(2)
    config = DlgConfig(method="idlg", iterations=50, restarts=3, time_budget_s=1e-6)
    events = list(iter_dlg(model, update, config=config))
    assert isinstance(events[-1], DlgFinished)
    result = events[-1].result
    assert result.stop_reason == "time_budget"
    assert result.images.shape == (2, 3, 32, 32) and result.labels.shape == (2,)
    assert torch.isfinite(result.images).all() and len(result.losses) <= 1


def test_dlg_time_budget_stops_across_restarts(monkeypatch):
    import dlg.attack

    clock = FakeClock()
    monkeypatch.setattr(dlg.attack, "_now", clock)
    model, update = _image_update(1)
    config = DlgConfig(method="dlg", iterations=50, restarts=3, patience=0, tolerance=0.0, time_budget_s=5.0)
    steps = []
    for event in iter_dlg(model, update, config=config):
        if isinstance(event, DlgStep):
            steps.append(event)
            if len(steps) == 3:
                clock.t = 6.0
        last = event
    assert isinstance(last, DlgFinished) and last.result.stop_reason == "time_budget"
    assert [s.iteration for s in steps] == [1, 2, 3] and {s.restart for s in steps} == {0}
    assert len(last.result.losses) == 3


def test_dlg_leaves_the_thread_count_alone_while_paused():
    model, update = _image_update(1)
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    outside = 2 if before == 1 else before
    torch.set_num_threads(outside)
    try:
        stream = iter_dlg(model, update, config=DlgConfig(iterations=3, restarts=1, cpu_threads=1))
        for _ in stream:
            assert torch.get_num_threads() == outside  # the consumer's setting between events
        assert seen and set(seen) == {1}  # the attack itself ran on one thread
        closed = iter_dlg(model, update, config=DlgConfig(iterations=3, restarts=1, cpu_threads=1))
        next(closed)
        next(closed)
        closed.close()
        assert torch.get_num_threads() == outside
    finally:
        torch.set_num_threads(before)


def test_on_threads_passes_items_and_restores():
    before = torch.get_num_threads()

    def gen():
        for i in range(3):
            yield i, torch.get_num_threads()

    items = list(on_threads(gen(), 1))
    assert [i for i, _ in items] == [0, 1, 2] and {n for _, n in items} == {1}
    assert torch.get_num_threads() == before
    assert list(on_threads(iter([4, 5]), None)) == [4, 5]


def test_dlg_text_tiny_time_budget(tiny):
    bundle = tiny("gpt2", "classification")
    batch = bundle.encode(["the cat sat on the mat", "gradients leak data"], labels=[0, 1])
    update = fedclient.compute_update(bundle.model, batch)
    config = TextDlgConfig(iterations=50, seq_len=batch.input_ids.shape[1], time_budget_s=1e-6)
    result = run_dlg_text(bundle, update, config=config)
    assert result.stop_reason == "time_budget"
    assert len(result.sentences) == 2 and len(result.token_ids) == 2 and len(result.losses) == 0


# ------------------------------------------------------------------ sweeps


def test_sweep_passes_a_per_point_budget_and_streams_rows():
    calls: list[tuple[object, float | None]] = []

    def attack(defense, time_budget_s=None):
        calls.append((defense, time_budget_s))
        return {"score": 1.0}

    points = [SweepPoint("none", 0.0, None), SweepPoint("noise", 1.0, GaussianNoise(0.1))]
    rows = iter_sweep(points, attack, time_budget_s=2.5)
    first = next(rows)
    assert len(calls) == 1 and first["label"] == "none" and first["time_budget_s"] == 2.5
    rest = list(rows)
    assert len(rest) == 1 and [b for _, b in calls] == [2.5, 2.5]
    # Without a budget the attack is called with the defense alone (the old contract).
    assert list(iter_sweep(points[:1], lambda d: {"score": 0.5}))[0]["score"] == 0.5
    with pytest.raises(InvalidConfigError, match="time_budget_s"):
        next(iter_sweep(points, attack, time_budget_s=0))
