"""Gradient Leakage Lab: the Gradio face.

It builds the UI and maps attack events to components; every attack step lives in
``dager`` / ``dlg`` and every display transform in ``labui``. Run ``python app.py``
(honours ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT``; default 127.0.0.1:7860).

Privacy: nothing typed or uploaded is logged or written anywhere except Gradio's own
temporary files (purged hourly); analytics are off; the page loads nothing from
outside (system fonts, no CDN).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fedclient.threads import configure_cpu_threads  # noqa: E402

configure_cpu_threads()  # before gradio or torch import torch

import functools  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dager.zoo import embedded_models, load_model  # noqa: E402
from dlg.images import MAX_IMAGES as MAX_BATCH_IMAGES  # noqa: E402
from fedclient import ImageBatch, compute_update  # noqa: E402
from fedclient.errors import LabInputError  # noqa: E402
from labui.image_view import IMAGE_KEYS, DlgView, to_grid  # noqa: E402
from labui.text_view import TEXT_DLG_KEYS, TEXT_KEYS, DagerView, TextDlgView  # noqa: E402

log = logging.getLogger("gradient_leakage_lab.app")

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"

# -- limits (the CPU Space is the reference machine) ----------------------------
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
MAX_SENTENCES = 32 if ON_GPU else 16
MAX_SENTENCE_CHARS = 300
MAX_SENTENCE_TOKENS = 64
MAX_ITERATIONS = 2000 if ON_GPU else 500
MAX_IMAGE_SIDE = 4096
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
DEFAULT_TEXT_MODEL = "gpt2-small-random"
GIF_MAX_FRAMES = 60
YIELD_EVERY_S = 0.1
"""Stream at most ~10 updates a second (plots are re-sent only when they change)."""

FALLBACK_SENTENCES = {
    "everyday": "The patient was prescribed a low dose of insulin.\n"
    "My password is the name of my first dog.\n"
    "We will meet at the station at nine.\n"
    "Her salary rose by twelve percent this year.",
}

THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)


def launch_options() -> dict[str, object]:
    """Keyword arguments for ``Blocks.launch`` (Gradio 6 takes theme and CSS there)."""
    return {
        "theme": THEME,
        "css_paths": [ASSETS / "app.css"],
        "max_file_size": "10mb",
        "footer_links": ["api", "settings"],
    }


# -- engines (imported lazily: the app starts before any model is touched) ------------


def _dager_engine():  # noqa: ANN202
    try:
        from dager import attack
        from dager.config import DagerConfig
    except ImportError as exc:  # the engine is not part of this build
        raise gr.Error("The DAGER engine is not available in this build.") from exc
    return attack, DagerConfig


def dager_events(bundle, update, *, noise_tolerant: bool = False) -> Iterator[object]:  # noqa: ANN001
    """The DAGER event stream for a shared update (monkeypatched in handler tests)."""
    attack, config_cls = _dager_engine()
    options = {"device": DEVICE, "noise_tolerant": bool(noise_tolerant)}
    config = config_cls(**{k: v for k, v in options.items() if _has_field(config_cls, k)})
    return attack.iter_dager(bundle, update, config=config)


def dager_parameters(bundle) -> list[str] | None:  # noqa: ANN001
    """The parameter names DAGER reads (the client shares only those: faster)."""
    attack, _ = _dager_engine()
    return list(attack.required_parameters(bundle))


def text_baseline_events(bundle, update, iterations: int, seq_len: int | None = None) -> Iterator[object]:  # noqa: ANN001
    """The DLG text baseline's event stream on the same update."""
    try:
        from dlg.text import TextDlgConfig, iter_dlg_text
    except ImportError as exc:
        raise gr.Error("The DLG text baseline is not available in this build.") from exc
    config = TextDlgConfig(iterations=iterations, seq_len=seq_len, device=DEVICE)
    return iter_dlg_text(bundle, update, config=config)


def dlg_events(model, update, *, method: str, iterations: int, name: str) -> Iterator[object]:  # noqa: ANN001
    """The DLG image attack's event stream."""
    from dlg.attack import DlgConfig, iter_dlg

    # A frame every iteration, throttled in time by the engine: smooth previews and GIFs.
    config = DlgConfig(method=method, iterations=iterations, preview_every=1, preview_seconds=0.15)
    return iter_dlg(model, update, config=config, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                    model_name=name)


def _has_field(cls: type, name: str) -> bool:
    return name in getattr(cls, "__dataclass_fields__", {})


@functools.cache
def vision_model(name: str) -> torch.nn.Module:
    """The image model, built once per name (seeded, shared read-only by all users)."""
    from dlg.models import build_model

    return build_model(name, num_classes=NUM_CLASSES, seed=0).to(DEVICE)


def text_scorer(bundle) -> Callable[[Sequence[str], Sequence[str]], object]:  # noqa: ANN001
    """ROUGE / exact match, judged on what the tokenizer can represent."""
    from dager.metrics import evaluate_text

    return functools.partial(evaluate_text, normalize=functools.partial(_normalize, bundle))


def _normalize(bundle, text: str) -> str:  # noqa: ANN001
    return " ".join(bundle.decode(bundle.tokenize(text.strip())).split())


# -- defenses -------------------------------------------------------------------------

SWEEPS = {"noise σ": "noise", "prune fraction": "prune", "DP-SGD noise multiplier": "dp", "precision": "precision"}


def build_defense(sigma: float, dp: bool, clip: float, z: float, prune: float, precision: str,
                  fedavg_steps: int, clients: int):  # noqa: ANN201
    """The client-side defense from the panel's settings (None when all are off).

    Raises:
        gr.Error: for an out-of-range setting (the message says which).
    """
    from fedclient import defenses as dfn

    try:
        sigma = float(sigma or 0)
        steps, clients = int(fedavg_steps or 1), int(clients or 1)
        if dp and steps > 1:
            raise gr.Error("DP-SGD and FedAvg both change how the update is computed: pick one.")
        computing = None
        if dp:
            computing = dfn.DPSGD(clip_norm=float(clip), noise_multiplier=float(z))
        elif steps > 1:
            computing = dfn.FedAvg(local_steps=steps)
        return dfn.compose(
            computing,
            dfn.GaussianNoise(sigma) if sigma != 0 else None,
            dfn.Prune(float(prune)) if float(prune or 0) != 0 else None,
            dfn.Quantize(str(precision)) if precision and precision != "fp32" else None,
            dfn.SecureAggregation(clients=clients) if clients > 1 else None,
        )
    except (LabInputError, TypeError) as exc:
        raise gr.Error(str(exc)) from None


def describe_defense(*settings) -> str:
    """One line about the panel's current defense (with DP's epsilon)."""
    from fedclient.defenses import describe

    try:
        return "**Shared update:** " + describe(build_defense(*settings))
    except gr.Error as exc:
        return f"⚠️ {exc.message}"


# -- input checks ---------------------------------------------------------------------


def parse_sentences(text: str | None) -> list[str]:
    """One sentence per non-empty line, within the app's limits.

    Raises:
        gr.Error: no sentences, too many, or one too long.
    """
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise gr.Error("Type at least one sentence (one per line), or pick a sample set.")
    if len(lines) > MAX_SENTENCES:
        raise gr.Error(f"{len(lines)} sentences given; this machine attacks at most {MAX_SENTENCES} "
                       "at once. Remove some lines.")
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_SENTENCE_CHARS:
            raise gr.Error(f"Sentence {i} has {len(line)} characters; keep each under "
                           f"{MAX_SENTENCE_CHARS} (split it into several lines).")
    return lines


def _bundle(model: str, hub_id: str | None, task: str):  # noqa: ANN202
    name = (hub_id or "").strip() or model
    try:
        return load_model(name, task, device=DEVICE)
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


def _check_lengths(bundle, sentences: Sequence[str]) -> None:  # noqa: ANN001
    for i, s in enumerate(sentences, 1):
        n = len(bundle.tokenize(s))
        if n > MAX_SENTENCE_TOKENS:
            raise gr.Error(f"Sentence {i} is {n} tokens long; the demo attacks sentences of at most "
                           f"{MAX_SENTENCE_TOKENS} tokens. Shorten or split it.")


def model_note(bundle) -> str:  # noqa: ANN001
    """An honest line about the model's weights."""
    if bundle.pretrained:
        return f"ℹ️ {bundle.description}"
    return (f"ℹ️ **Random weights.** {bundle.description} DAGER does not need trained weights: "
            "the leak comes from the gradient's low rank, so the recovery shown here is the same "
            "mechanism as on a trained model.")


# -- text tab handlers ----------------------------------------------------------------


def _emit(view, keys: Sequence[str], force: bool = False) -> tuple:  # noqa: ANN001
    """Component values in ``keys`` order; unchanged ones are skipped (not re-sent)."""
    values = view.render()
    dirty = view.take_dirty()
    return tuple(values[k] if (force or k in dirty) else gr.skip() for k in keys)


def _result_json(view: DagerView) -> dict[str, object]:
    out: dict[str, object] = {"recovered": view.predictions,
                              "exact_check": [s.exact for s in view.recovered]}
    if view.finished is not None:
        r = view.finished.result
        out.update(rank=r.rank, hidden_size=r.hidden_size, over_capacity=r.over_capacity,
                   budget_exhausted=r.budget_exhausted, seconds=round(r.seconds, 3),
                   first_tokens_seconds=None if view.first_tokens_s is None else round(view.first_tokens_s, 3))
    if view.scores is not None:
        sc = view.scores
        out.update(rouge1=sc.rouge1, rouge2=sc.rouge2, rougeL=sc.rougeL, exact_match=sc.exact_match)
    out["done"] = view.finished is not None
    return out


def stream_dager(view: DagerView, events: Iterator[object], *, clock: Callable[[], float] = time.perf_counter
                 ) -> Iterator[tuple]:
    """Fold events into ``view`` and yield component tuples (text outputs + JSON).

    Yields at most every :data:`YIELD_EVERY_S` seconds, and at once for sentence,
    start and finish events, so Stop is honoured promptly between yields.
    """
    last = clock()
    for event in events:
        view.apply(event)
        urgent = type(event).__name__ in ("AttackStarted", "SentenceRecovered", "AttackFinished",
                                          "PrefixesExtended")
        now = clock()
        if urgent or now - last >= YIELD_EVERY_S:
            last = now
            yield (*_emit(view, TEXT_KEYS), _result_json(view))
    yield (*_emit(view, TEXT_KEYS, force=True), _result_json(view))


def run_text_attack(sentences_text: str, model: str, hub_id: str, task: str, noise_tolerant: bool = False,
                    *defense_settings) -> Iterator[tuple]:
    """Gradio handler: the client shares its gradient; DAGER reconstructs; the app scores."""
    sentences = parse_sentences(sentences_text)
    name = (hub_id or "").strip() or model
    yield (f"**Preparing:** loading {name} (only the first run of a model takes long)…",
           *(gr.skip() for _ in TEXT_KEYS[1:]), gr.skip())
    bundle = _bundle(model, hub_id, task)
    _check_lengths(bundle, sentences)
    view = DagerView(
        references=sentences,
        token_text=lambda i: bundle.tokenizer.decode([int(i)]),
        special_ids=frozenset(int(i) for i in bundle.tokenizer.all_special_ids),
        normalize=functools.partial(_normalize, bundle),
        model_note=model_note(bundle),
        scorer=text_scorer(bundle),
    )
    yield (*_emit(view, TEXT_KEYS, force=True), _result_json(view))
    try:
        defense = build_defense(*defense_settings) if defense_settings else None
        batch = bundle.encode(sentences, seed=0)
        update = compute_update(bundle.model, batch, parameters=dager_parameters(bundle),
                                defense=defense, seed=0)
        view.mark_update_done()
        yield (*_emit(view, TEXT_KEYS), _result_json(view))
        yield from stream_dager(view, dager_events(bundle, update, noise_tolerant=noise_tolerant))
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


def run_text_baseline(sentences_text: str, model: str, hub_id: str, task: str, iterations: float,
                      *defense_settings) -> Iterator[tuple]:
    """Gradio handler: DLG's text baseline on the same shared update, for comparison."""
    sentences = parse_sentences(sentences_text)
    bundle = _bundle(model, hub_id, task)
    _check_lengths(bundle, sentences)
    iterations = _iterations(iterations)
    view = TextDlgView(references=sentences, normalize=functools.partial(_normalize, bundle),
                       scorer=text_scorer(bundle))
    yield _emit_plain(view, TEXT_DLG_KEYS)
    try:
        defense = build_defense(*defense_settings) if defense_settings else None
        batch = bundle.encode(sentences, seed=0)
        update = compute_update(bundle.model, batch, defense=defense, seed=0)
        last = time.perf_counter()
        # The baseline is told the batch's padded length (DAGER finds lengths itself).
        for event in text_baseline_events(bundle, update, iterations, int(batch.input_ids.shape[1])):
            view.apply(event)
            if time.perf_counter() - last >= 0.25 or type(event).__name__ != "TextDlgStep":
                last = time.perf_counter()
                yield _emit_plain(view, TEXT_DLG_KEYS)
        yield _emit_plain(view, TEXT_DLG_KEYS)
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


def _emit_plain(view, keys: Sequence[str]) -> tuple:  # noqa: ANN001
    values = view.render()
    return tuple(values[k] for k in keys)


# -- image tab handlers ---------------------------------------------------------------


def _iterations(value: float | None) -> int:
    try:
        n = int(value or 0)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_ITERATIONS:
        raise gr.Error(f"Iterations must be between 1 and {MAX_ITERATIONS} on this machine.")
    return n


def _sketch_array(sketch: object) -> np.ndarray | None:
    """The composite of a Sketchpad value (None when nothing was drawn)."""
    if sketch is None:
        return None
    comp = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if comp is None:
        return None
    arr = np.asarray(comp)
    if arr.ndim == 3 and arr.shape[2] == 4:  # flatten transparency onto white
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if arr.size == 0 or (arr.min() == arr.max()):
        return None  # an empty canvas
    return arr


def _batch_paths(batch: object) -> list[str]:
    """File paths from a multi-file component value (paths, file objects or dicts)."""
    if batch is None:
        return []
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
        if path:
            paths.append(str(path))
    return paths


def load_client_image(source: str, upload: object, sketch: object, batch_files: object = None) -> torch.Tensor:
    """The client's private images as ``(B, 3, 32, 32)`` in [0, 1]: one from the upload or
    sketchpad, or 1 to 8 from the batch files.

    Raises:
        gr.Error: nothing given, too many images, an unreadable file, or an absurd size.
    """
    from dlg.images import load_images

    if source == "batch":
        paths = _batch_paths(batch_files)
        if not paths:
            raise gr.Error("The batch is empty: add 1 to 8 image files, or press 'Use the sample images'.")
        try:
            return load_images(paths)
        except LabInputError as exc:
            raise gr.Error(str(exc)) from None
    if source == "sketch":
        value = _sketch_array(sketch)
        if value is None:
            raise gr.Error("The sketchpad is empty: draw something, or switch the source to 'upload'.")
    else:
        value = upload
        if value is None:
            raise gr.Error("No image yet: upload one, pick a sample below, or switch the source to 'sketch'.")
        if isinstance(value, np.ndarray) and max(value.shape[:2]) > MAX_IMAGE_SIDE:
            raise gr.Error(f"The image is {value.shape[1]}x{value.shape[0]} pixels; use one under "
                           f"{MAX_IMAGE_SIDE} pixels a side.")
    try:
        return load_images([value])
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


def class_label(label: float) -> int:
    """The class label typed in the image tab.

    Raises:
        gr.Error: the label is not a whole number in range.
    """
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = -1
    if value != label or not 0 <= value < NUM_CLASSES:
        raise gr.Error(f"The class label must be a whole number from 0 to {NUM_CLASSES - 1}.")
    return value


def client_labels(label: float, batch_size: int) -> torch.Tensor:
    """The client's labels: ``label`` for the first image, the next classes for the rest.

    Raises:
        gr.Error: the label is not a whole number in range.
    """
    return (class_label(label) + torch.arange(batch_size)) % NUM_CLASSES


def stream_dlg(view: DlgView, events: Iterator[object], *, clock: Callable[[], float] = time.perf_counter
               ) -> Iterator[tuple]:
    """Fold DLG events into ``view`` and yield the image outputs (throttled)."""
    last = clock()
    for event in events:
        view.apply(event)
        now = clock()
        if type(event).__name__ != "DlgStep" or now - last >= YIELD_EVERY_S:
            last = now
            yield (*_emit(view, IMAGE_KEYS), gr.skip())
    yield (*_emit(view, IMAGE_KEYS, force=True), write_gif(view))


def write_gif(view: DlgView) -> str | None:
    """The reconstruction over iterations as a GIF in Gradio's temp folder (None if no frames)."""
    if view.finished is None or not view.finished.result.frames:
        return None
    frames = list(view.finished.result.frames)
    if len(frames) > GIF_MAX_FRAMES:  # keep the first and last, evenly spaced between
        picks = np.linspace(0, len(frames) - 1, GIF_MAX_FRAMES).round().astype(int)
        frames = [frames[i] for i in sorted(set(picks.tolist()))]
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="dlg-", suffix=".gif", dir=folder)
    os.close(fd)
    try:
        from dlg import gif as dlg_gif

        dlg_gif.save_gif(frames, path)
    except (ImportError, AttributeError):
        import imageio.v2 as imageio

        imageio.mimsave(path, [to_grid(images) for _, images in frames], duration=0.08, loop=0)
    return path


def run_image_attack(source: str, upload: object, sketch: object, batch_files: object, label: float, model: str,
                     method: str, iterations: float, *defense_settings) -> Iterator[tuple]:
    """Gradio handler: the client shares its gradient on its images; DLG reconstructs them."""
    iterations = _iterations(iterations)
    class_label(label)  # a bad label is reported before any file is read
    images = load_client_image(source, upload, sketch, batch_files)
    labels = client_labels(label, images.shape[0])
    view = DlgView(originals=images, labels=labels)
    yield (*_emit(view, IMAGE_KEYS, force=True), None)
    try:
        net = vision_model(model)
        defense = build_defense(*defense_settings) if defense_settings else None
        update = compute_update(net, ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE)),
                                defense=defense, seed=0)
        yield from stream_dlg(view, dlg_events(net, update, method=method, iterations=iterations, name=model))
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


# -- defense sweep ---------------------------------------------------------------------


def _drain(events: Iterator[object]) -> object:
    last = None
    for event in events:
        last = event
    return getattr(last, "result", None)


def run_defense_sweep(target: str, axis: str, sentences_text: str, model: str, hub_id: str, task: str,
                      noise_tolerant: bool, source: str, upload: object, sketch: object, batch_files: object,
                      label: float,
                      vmodel: str, method: str, iterations: float) -> Iterator[tuple]:
    """Gradio handler: attack success against defense strength, one row at a time."""
    from fedclient.defenses import utility_cost
    from fedclient.sweep import grid, iter_sweep, plot_sweep
    from labui.image_view import matched_psnr

    if axis not in SWEEPS:
        raise gr.Error(f"Unknown sweep {axis!r}; choose one of {', '.join(SWEEPS)}.")
    points = grid(SWEEPS[axis])
    if target == "text":
        sentences = parse_sentences(sentences_text)
        bundle = _bundle(model, hub_id, task)
        _check_lengths(bundle, sentences)
        batch = bundle.encode(sentences, seed=0)
        params = dager_parameters(bundle)
        scorer = text_scorer(bundle)
        metrics = ["rouge1", "exact_match"]

        def attack(defense):  # noqa: ANN001, ANN202
            update = compute_update(bundle.model, batch, parameters=params, defense=defense, seed=0)
            result = _drain(dager_events(bundle, update, noise_tolerant=noise_tolerant))
            sc = scorer(sentences, list(result.sentences))
            return {"rouge1": sc.rouge1, "exact_match": sc.exact_match,
                    **utility_cost(bundle.model, batch, update)}
    elif target == "images":
        n_iter = _iterations(iterations)
        images = load_client_image(source, upload, sketch, batch_files)
        labels = client_labels(label, images.shape[0])
        net = vision_model(vmodel)
        batch = ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE))
        metrics = ["psnr"]

        def attack(defense):  # noqa: ANN001, ANN202
            update = compute_update(net, batch, defense=defense, seed=0)
            result = _drain(dlg_events(net, update, method=method, iterations=n_iter, name=vmodel))
            return {"psnr": matched_psnr(images, result.images), **utility_cost(net, batch, update)}
    else:
        raise gr.Error(f"Unknown sweep target {target!r}.")
    rows: list[dict[str, object]] = []
    title = f"{'DAGER' if target == 'text' else method.upper()} under {axis}"
    yield f"**Sweep:** {len(points)} settings of {axis}…", gr.skip(), gr.skip()
    try:
        for row in iter_sweep(points, attack):
            rows.append(row)
            table = [[str(r["label"]), *(round(float(r[m]), 4) for m in metrics),
                      round(float(r.get("utility_cosine", float("nan"))), 4),
                      round(float(r["seconds"]), 2)] for r in rows]
            done = len(rows) == len(points)
            status = f"**Sweep:** {len(rows)} of {len(points)} settings done" + ("." if done else "…")
            yield status, plot_sweep(rows, y=metrics, title=title), {"headers": ["setting", *metrics,
                                                                                 "utility cosine", "seconds"],
                                                                     "data": table}
    except LabInputError as exc:
        raise gr.Error(str(exc)) from None


# -- assets ---------------------------------------------------------------------------


def sentence_sets() -> dict[str, str]:
    """Sample sentence sets: ``assets/sentences/*.txt`` (name -> text), or a fallback."""
    folder = ASSETS / "sentences"
    sets: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.txt")):
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                     if ln.strip() and not ln.lstrip().startswith("#")]
            if lines:
                sets[path.stem.replace("_", " ")] = "\n".join(lines[:8])
    return sets or dict(FALLBACK_SENTENCES)


def sample_images() -> list[str]:
    folder = ASSETS / "images"
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]


def vision_models() -> list[str]:
    try:
        from dlg.models import MODELS

        return list(MODELS)
    except ImportError:
        return ["lenet", "resnet"]


HOW_IT_WORKS = r"""
## Why a gradient leaks its batch

In federated learning a client trains on private data and shares only an **update**: the
gradient $\nabla_W \mathcal{L}$ of its loss (FedSGD), or a weight delta (FedAvg). The server,
and so an attacker at the server, knows the model $W$ and the update. Both attacks below
see only these two things; the app itself knows your input only to score the result.

### DAGER: exact text from transformer gradients (Petrov et al., NeurIPS 2024)

A linear layer $Y = XW$ applied to the $n = B\cdot T$ token vectors of a batch has gradient

$$\nabla_W \mathcal{L} \;=\; X^\top \frac{\partial \mathcal{L}}{\partial Y} \;=\; \sum_{i=1}^{n} x_i\, \delta_i^\top .$$

So every column of the gradient is a combination of the inputs $x_i$: when $n < d$ (the model
width) the gradient has rank at most $n$ and its column space is exactly
$\mathrm{span}\{x_1, \dots, x_n\}$. The layer-1 inputs are known functions of (token, position)
(embedding + position, then LayerNorm), so the attacker tests **every vocabulary token**:

$$\mathrm{dist}(z) \;=\; \frac{\lVert z - U_r U_r^\top z \rVert_2}{\lVert z \rVert_2},$$

where $U_r$ holds the top-$r$ left singular vectors of the layer-1 gradient. Tokens with a
distance near zero were in the batch. Then the attacker **extends prefixes** one position at a
time, runs each candidate through layer 1 and keeps it only if its layer-2 input lies in the
span of the layer-2 gradient. What survives are the client's sentences, **exactly**.

**The plots.** *Singular values*: the spectrum of the layer-1 gradient on a log scale; it drops
by many orders of magnitude after the rank $r$ (red dashed cut), the number of distinct
inputs; the purple line is the capacity $d$: near it, the span fills the whole space and exact
recovery is no longer guaranteed. *Layer-1 filter*: for each position, the distances of the
nearest vocabulary tokens; green ones pass the threshold (red tick), grey ones are rejected.
*Token grid*: the prefixes the search keeps (blue) and the finished sentences (green: passed
the exact check; amber: best-effort completion).

### DLG: images by gradient matching (Zhu et al., NeurIPS 2019)

DLG starts from random noise $x'$ and a random soft label $y'$, and makes their gradient match
the shared one:

$$x'^{*}, y'^{*} \;=\; \arg\min_{x', y'} \;\big\lVert \nabla_W \ell\big(F(x'; W), y'\big) - \nabla_W \mathcal{L} \big\rVert_2^2 ,$$

optimised with L-BFGS (this needs a twice-differentiable model, hence LeNet's sigmoids).
**iDLG** reads the label first: with softmax cross-entropy, the gradient of the logits is
$p - \mathrm{onehot}(y)$, negative only at the true class; the last layer's weight gradient is
that vector times the (non-negative, after a sigmoid) features, so the sign of its rows reveals
$y$, and only $x'$ is optimised. **Gradient matching** (Geiping et al., 2020)
uses a cosine distance, which ignores the gradient's scale, plus a total-variation prior that
favours natural-looking images. The prior is what makes batches work: several images give
fewer gradient equations than unknown pixels, and the smoothest solution is the right one.
Geiping et al. optimise with Adam for thousands of steps; on this small sigmoid network L-BFGS
converges far sooner, so the app uses it:

$$\arg\min_{x'} \; 1 - \frac{\langle \nabla_W \ell(x'), \nabla_W \mathcal{L} \rangle}{\lVert \nabla_W \ell(x') \rVert \, \lVert \nabla_W \mathcal{L} \rVert} + \alpha\, \mathrm{TV}(x').$$

**The plots.** *Gradient distance*: the matching loss per iteration (log scale); it falls by
orders of magnitude when the attack succeeds. *PSNR*: how close the reconstruction is to your
image (the app's evaluation; the attacker never sees your image): above about 30 dB the two
look identical.

### Defenses

The panel applies client-side defenses to the update before it is shared: Gaussian noise
$\nabla + \mathcal{N}(0, \sigma^2 I)$, DP-SGD (clip each example's gradient to norm $C$, add
noise $z C$; the privacy budget $\varepsilon$ comes from an accountant), pruning of the
smallest gradient entries, lower precision, FedAvg (several local steps: the update is a
weight delta) and secure aggregation (the server sees only a sum over clients). Zhu et al.
report that DLG survives noise of $\sigma = 10^{-4}$ and fp16, but fails at $\sigma = 10^{-2}$ or
when more than about 20% of the gradient is pruned; DAGER needs the low-rank span, so noise
that fills the spectrum (watch the singular values flatten) hurts it.
"""


# -- UI -------------------------------------------------------------------------------


def _defense_panel() -> list[gr.components.Component]:
    with gr.Accordion("Defenses (apply to both tabs)", open=False):
        gr.Markdown("Client-side defenses applied to the update before it is shared. "
                    "All off means the plain FedSGD gradient.")
        with gr.Row():
            sigma = gr.Dropdown([0.0, 1e-4, 1e-3, 1e-2, 1e-1], value=0.0, label="Gaussian noise σ",
                                allow_custom_value=True)
            prune = gr.Slider(0.0, 0.99, value=0.0, step=0.01, label="Prune fraction p")
            precision = gr.Radio(["fp32", "fp16", "int8"], value="fp32", label="Precision")
        with gr.Row():
            dp = gr.Checkbox(value=False, label="DP-SGD")
            clip = gr.Number(value=1.0, label="DP clip norm C", minimum=0.0)
            z = gr.Number(value=1.0, label="DP noise multiplier z", minimum=0.0)
            fedavg = gr.Slider(1, 10, value=1, step=1, label="FedAvg local steps (1 = FedSGD)")
            clients = gr.Slider(1, 16, value=1, step=1, label="Secure aggregation: clients")
        settings = [sigma, dp, clip, z, prune, precision, fedavg, clients]
        summary = gr.Markdown(describe_defense(0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1))
        for component in settings:
            component.change(describe_defense, inputs=settings, outputs=summary, api_name=False,
                             queue=False, show_progress="hidden")
    return settings


def build_app() -> gr.Blocks:
    """The whole app (tests launch it on a free port)."""
    sets = sentence_sets()
    first_set = next(iter(sets))
    models = list(embedded_models())
    with gr.Blocks(title="Gradient Leakage Lab", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Gradient Leakage Lab\n"
            "Federated learning shares gradients, not data. Watch two published attacks "
            "rebuild the private data from what a client shares. Everything runs here; "
            "nothing you type or draw is stored or sent anywhere."
        )
        defense_inputs = _defense_panel()
        with gr.Accordion("Defense sweep: attack success against defense strength", open=False):
            gr.Markdown("Runs the attack once per setting on the current text or image "
                        "(the other panel settings are ignored here).")
            with gr.Row():
                sweep_target = gr.Radio([("Text (DAGER)", "text"), ("Images (DLG)", "images")], value="text",
                                        label="Attack")
                sweep_axis = gr.Dropdown(list(SWEEPS), value="noise σ", label="Vary")
                sweep_run = gr.Button("Run sweep", variant="primary")
                sweep_stop = gr.Button("Stop sweep", variant="stop")
            sweep_status = gr.Markdown()
            with gr.Row():
                sweep_plot = gr.Plot(label="Attack success")
                sweep_table = gr.Dataframe(label="Rows", interactive=False, wrap=True)

        with gr.Tabs():
            # ---------------------------------------------------------------- text
            with gr.Tab("Text (DAGER)", id="text"):
                with gr.Row():
                    with gr.Column(scale=3):
                        sentences = gr.Textbox(value=sets[first_set], lines=6, max_lines=MAX_SENTENCES + 2,
                                               label=f"Private sentences (one per line, at most {MAX_SENTENCES})",
                                               elem_id="gll-sentences")
                        sample = gr.Dropdown(list(sets), value=first_set, label="Sample sets")
                    with gr.Column(scale=2):
                        model = gr.Dropdown(models, value=DEFAULT_TEXT_MODEL if DEFAULT_TEXT_MODEL in models
                                            else models[0], label="Model")
                        hub_id = gr.Textbox(value="", label="…or a Hugging Face model id (needs the hub)",
                                            placeholder="e.g. gpt2")
                        task = gr.Radio(["classification", "next-token"], value="classification", label="Task")
                        tolerant = gr.Checkbox(value=False, label="Noise-tolerant mode (for defended updates)")
                        with gr.Row():
                            run = gr.Button("Run DAGER", variant="primary", elem_id="gll-run-text")
                            stop = gr.Button("Stop", variant="stop")
                text_status = gr.Markdown(elem_id="gll-text-status")
                with gr.Row():
                    spectrum = gr.Plot(label="Gradient spectrum")
                    distances = gr.Plot(label="Layer-1 token filter")
                with gr.Row():
                    with gr.Column(scale=3):
                        grid = gr.HTML(label="Token grid", elem_id="gll-grid")
                    with gr.Column(scale=2):
                        recovered = gr.HTML(label="Recovered sentences", elem_id="gll-recovered")
                        metrics = gr.Markdown(elem_id="gll-metrics")
                with gr.Accordion("Race the DLG text baseline on the same update", open=False):
                    gr.Markdown("DLG optimises continuous embeddings until their gradient matches; "
                                "on text it usually recovers a few words, not sentences.")
                    with gr.Row():
                        race_iters = gr.Slider(10, MAX_ITERATIONS, value=min(200, MAX_ITERATIONS), step=10,
                                               label="Baseline iterations")
                        race = gr.Button("Race DLG baseline")
                        race_stop = gr.Button("Stop baseline", variant="stop")
                    race_status = gr.Markdown()
                    with gr.Row():
                        race_sentences = gr.HTML()
                        race_loss = gr.Plot(label="DLG text: gradient distance")
                with gr.Accordion("Raw result (JSON)", open=False):
                    text_json = gr.JSON(label="Result")

            # ---------------------------------------------------------------- images
            with gr.Tab("Images (DLG)", id="images"):
                with gr.Row():
                    with gr.Column(scale=2):
                        source = gr.Radio([("one image", "upload"), ("sketch", "sketch"), ("batch", "batch")],
                                          value="upload", label="Image source")
                        with gr.Tabs():
                            with gr.Tab("Upload or sample"):
                                upload = gr.Image(type="numpy", label="Private image", image_mode="RGB",
                                                  sources=["upload", "clipboard"], height=220)
                                samples = sample_images()
                                if samples:
                                    gr.Examples(samples, inputs=[upload], label="Sample images")
                            with gr.Tab("Draw"):
                                sketch = gr.Sketchpad(label="Draw your image", type="numpy", height=260,
                                                      canvas_size=(256, 256))
                            with gr.Tab("Batch"):
                                batch = gr.File(file_count="multiple", file_types=["image"], height=180,
                                                label=f"Private images (1 to {MAX_BATCH_IMAGES}, one client batch)")
                                batch_samples = gr.Button("Use the sample images", size="sm")
                                gr.Markdown("Image *i* gets class label + *i*. Batches are harder: "
                                            "iDLG and gradient matching add a smoothness prior.")
                    with gr.Column(scale=2):
                        vmodel = gr.Dropdown(vision_models(), value="lenet", label="Model")
                        method = gr.Radio([("DLG", "dlg"), ("iDLG", "idlg"), ("Gradient matching (IG)", "ig")],
                                          value="idlg", label="Method")
                        iterations = gr.Slider(1, MAX_ITERATIONS, value=min(300, MAX_ITERATIONS), step=1,
                                               label="Iterations")
                        label = gr.Number(value=7, label=f"Class label (0-{NUM_CLASSES - 1})", precision=0)
                        with gr.Row():
                            run_img = gr.Button("Run DLG", variant="primary", elem_id="gll-run-image")
                            stop_img = gr.Button("Stop", variant="stop")
                        img_status = gr.Markdown()
                with gr.Row():
                    preview = gr.Image(label="Reconstruction (live)", elem_id="gll-preview", height=200,
                                       interactive=False, format="png")
                    comparison = gr.Image(label="Original vs reconstruction",
                                          elem_id="gll-comparison", height=200, interactive=False, format="png")
                with gr.Row():
                    loss_plot = gr.Plot(label="Gradient distance")
                    psnr_plot = gr.Plot(label="PSNR")
                gif = gr.File(label="Reconstruction GIF", interactive=False)

            with gr.Tab("How it works", id="how"):
                gr.Markdown(HOW_IT_WORKS, latex_delimiters=[
                    {"left": "$$", "right": "$$", "display": True},
                    {"left": "$", "right": "$", "display": False},
                ])

        # ------------------------------------------------------------------- events
        sample.change(lambda name: sets.get(name, ""), inputs=sample, outputs=sentences,
                      api_name=False, queue=False)
        text_outputs = [text_status, spectrum, distances, grid, recovered, metrics, text_json]
        text_event = run.click(run_text_attack, inputs=[sentences, model, hub_id, task, tolerant, *defense_inputs],
                               outputs=text_outputs, api_name="dager", concurrency_id="attack")
        stop.click(None, cancels=[text_event], api_name=False, queue=False)
        race_event = race.click(run_text_baseline,
                                inputs=[sentences, model, hub_id, task, race_iters, *defense_inputs],
                                outputs=[race_status, race_loss, race_sentences], api_name="dlg_text",
                                concurrency_id="attack")
        race_stop.click(None, cancels=[race_event], api_name=False, queue=False)
        img_outputs = [img_status, preview, loss_plot, psnr_plot, comparison, gif]
        img_event = run_img.click(run_image_attack,
                                  inputs=[source, upload, sketch, batch, label, vmodel, method, iterations,
                                          *defense_inputs],
                                  outputs=img_outputs, api_name="dlg", concurrency_id="attack")
        stop_img.click(None, cancels=[img_event], api_name=False, queue=False)
        sweep_event = sweep_run.click(
            run_defense_sweep,
            inputs=[sweep_target, sweep_axis, sentences, model, hub_id, task, tolerant, source, upload, sketch,
                    batch, label, vmodel, method, iterations],
            outputs=[sweep_status, sweep_plot, sweep_table], api_name="sweep", concurrency_id="attack")
        sweep_stop.click(None, cancels=[sweep_event], api_name=False, queue=False)
        sketch.change(lambda _: "sketch", inputs=sketch, outputs=source, api_name=False, queue=False,
                      show_progress="hidden")
        upload.change(lambda v: "upload" if v is not None else gr.skip(), inputs=upload, outputs=source,
                      api_name=False, queue=False, show_progress="hidden")
        batch.change(lambda v: "batch" if v else gr.skip(), inputs=batch, outputs=source,
                     api_name=False, queue=False, show_progress="hidden")
        batch_samples.click(lambda: sample_images()[:MAX_BATCH_IMAGES], outputs=batch, api_name=False,
                            queue=False)

    # On a 2-core CPU one attack at a time is fastest for everyone (two would fight over
    # the cores: measured 10x slower per step); a short queue so a busy Space says so.
    demo.queue(default_concurrency_limit=2 if ON_GPU else 1, max_size=16)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torch's one-off optimizer start-up (~3 s on the CPU Space), paid while the page loads
    # rather than in the first visitor's DLG text race (Adam).
    from dlg.attack import warm_up_optimizers

    threading.Thread(target=warm_up_optimizers, name="warm-up", daemon=True).start()
    demo = build_app()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
        **launch_options(),
    )


if __name__ == "__main__":
    main()
