"""The defense sweep (``/sweep``): attack success and utility against defense strength,
one row per setting as it finishes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import gradio as gr

from fedclient import ImageBatch
from labui import engines, inputs, session, textmodel
from labui.image_view import matched_psnr
from labui.inputs import DEVICE, SWEEP_BUDGET_S, SWEEPS
from labui.jobs import Tick
from labui.session import release_memory, session_of
from labui.userfiles import shown_cell, thumbnail


def _drain(events: Iterator[object], stop) -> object:  # noqa: ANN001
    """The last event's result; stops (closing the engine) when ``stop`` is set."""
    last = None
    try:
        for event in events:
            last = event
            if stop.is_set():
                return None
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return getattr(last, "result", None)


Attack = Callable[[object], dict[str, object]]
"""One sweep point: a defense in, a row of metrics out (``_shown``: what to show)."""


class _Stopped(Exception):
    """The visitor stopped the sweep (ends the worker's generator quietly)."""


def _text_attack(sentences: list[str], name: str, task: str, noise_tolerant: bool, per_point: float,
                 stop) -> Attack:  # noqa: ANN001
    """DAGER on the typed sentences under one defense (the model loads in the worker)."""
    bundle = engines.load_bundle(name, task)
    textmodel.check_lengths(bundle, sentences)
    batch = bundle.encode(sentences, seed=0)
    params = engines.dager_parameters(bundle)
    scorer = textmodel.text_scorer(bundle)

    def attack(defense: object) -> dict[str, object]:
        update = engines.compute_update(bundle.model, batch, parameters=params, defense=defense, seed=0)
        result = _drain(engines.dager_events(bundle, update, noise_tolerant=noise_tolerant,
                                             time_budget_s=per_point), stop)
        if result is None:
            raise _Stopped
        sc = scorer(sentences, list(result.sentences))
        shown = " / ".join(result.sentences)[:160]
        return {"rouge1": sc.rouge1, "exact_match": sc.exact_match, "_shown": shown,
                **engines.utility(bundle.model, batch, update)}
    return attack


def _image_attack(images, labels, vmodel: str, method: str, n_iter: int, per_point: float,  # noqa: ANN001
                  stop) -> Attack:  # noqa: ANN001
    """DLG on the client's images under one defense."""
    net = engines.vision_model(vmodel)
    batch = ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE))

    def attack(defense: object) -> dict[str, object]:
        update = engines.compute_update(net, batch, defense=defense, seed=0)
        result = _drain(engines.dlg_events(net, update, method=method, iterations=n_iter,
                                           time_budget_s=per_point), stop)
        if result is None:
            raise _Stopped
        return {"psnr": matched_psnr(images, result.images), "_shown": thumbnail(result.images),
                **engines.utility(net, batch, update)}
    return attack


def _frame(rows: list[dict[str, object]], n_points: int, metrics: list[str], title: str) -> tuple:
    """The sweep's outputs after a row: status, plot, table."""
    from fedclient.sweep import plot_sweep

    table = [[str(r["label"]), *(round(float(r[m]), 4) for m in metrics),
              round(float(r.get("utility_cosine", float("nan"))), 4),
              round(float(r["seconds"]), 2), r["_shown"]] for r in rows]
    done = len(rows) == n_points
    status = f"**Sweep:** {len(rows)} of {n_points} settings done" + ("." if done else "…")
    fig = plot_sweep(rows, y=[*metrics, "utility_cosine"], title=f"{title}: attack success and utility")
    return status, fig, {"headers": ["setting", *metrics, "utility cosine", "seconds", "recovered"], "data": table}


def run_defense_sweep(target: str, axis: str, sentences_text: str, model: str, hub_id: str | None, task: str,
                      noise_tolerant: bool, source: str, upload: object, sketch: object, batch_files: object,
                      label: float, vmodel: str, method: str, iterations: float,
                      request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/sweep``): attack success and utility against defense strength, row by row."""
    from fedclient.sweep import grid, iter_sweep

    if axis not in SWEEPS:
        raise inputs.UnknownChoiceError(f"Unknown sweep {axis!r}; choose one of {', '.join(SWEEPS)}.")
    points = grid(SWEEPS[axis])
    per_point = SWEEP_BUDGET_S / max(len(points), 1)
    job = session.JOBS.start(session_of(request), "sweep")
    if target == "text":
        sentences = inputs.parse_sentences(sentences_text)
        name = textmodel.model_name(model, hub_id)
        metrics = ["rouge1", "exact_match"]
        factory = functools.partial(_text_attack, sentences, name, task, noise_tolerant, per_point, job.stop)
    elif target == "images":
        n_iter = inputs.iterations(iterations)
        images = inputs.load_client_image(source, upload, sketch, batch_files)
        labels = inputs.client_labels(label, images.shape[0])
        metrics = ["psnr"]
        factory = functools.partial(_image_attack, images, labels, vmodel, method, n_iter, per_point, job.stop)
    else:
        raise inputs.UnknownChoiceError(f"Unknown sweep target {target!r}; choose text or images.")

    def produce() -> Iterator[object]:
        attack = factory()
        try:
            yield from iter_sweep(points, attack)
        except _Stopped:
            return

    rows: list[dict[str, object]] = []
    title = f"{'DAGER' if target == 'text' else method.upper()} under {axis}"
    yield f"**Sweep:** {len(points)} settings of {axis}, at most {per_point:.0f} s each…", gr.skip(), gr.skip()
    items = job.run(produce)
    try:
        for item in items:
            if isinstance(item, Tick):
                continue
            elif isinstance(item, dict):
                item["_shown"] = shown_cell(item.get("_shown"))
                rows.append(item)
            else:
                raise TypeError(f"the sweep cannot show a {type(item).__name__}")
            job.where = f"setting {len(rows)} of {len(points)}"
            yield _frame(rows, len(points), metrics, title)
    finally:
        items.close()
        release_memory()
