"""Gradient Leakage Lab: the Gradio face.

It only builds the Blocks and wires them: handlers live in :mod:`labui.handlers`,
input checks in :mod:`labui.inputs`, display transforms in :mod:`labui` views, and
every attack step in ``dager`` / ``dlg``. Run ``python app.py`` (honours
``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT``; default 127.0.0.1:7860).

Privacy: nothing typed or uploaded is logged or written anywhere except Gradio's cache
folder, which is purged hourly (uploads and every file made from them) and at
shutdown; analytics are off; the page loads nothing from outside (system fonts, no CDN).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fedclient.threads import configure_cpu_threads  # noqa: E402

configure_cpu_threads()  # before gradio or torch import torch

import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gradio as gr  # noqa: E402

from dager.zoo import embedded_models  # noqa: E402
from dlg.images import MAX_IMAGES as MAX_BATCH_IMAGES  # noqa: E402
from labui import handlers as h  # noqa: E402
from labui import inputs  # noqa: E402
from labui.components import UndecodedImage  # noqa: E402
from labui.text_view import DagerView  # noqa: E402
from labui.inputs import ASSETS, MAX_ITERATIONS, MAX_SENTENCES, NUM_CLASSES, ON_GPU, SWEEPS  # noqa: E402

log = logging.getLogger("gradient_leakage_lab.app")

DEFAULT_TEXT_MODEL = "gpt2-small-random"
PURGE_EVERY_S = int(os.environ.get("GLL_PURGE_EVERY_S", "3600"))
"""Uploads and files made from them are deleted this long after they were written."""

THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)

# Queue layout. On the 2-core CPU Space two attacks of the same kind fight over the cores
# (measured 10x slower per step), but the kinds differ in cost: DAGER finishes in
# seconds, a DLG image run or a DLG text race takes up to its time budget, a sweep
# several budgets. One lane (concurrency id) per kind, each running one job at a time,
# so a short DAGER run never waits behind a DLG run or a sweep, and within a lane
# the wait is bounded by the per-run time budget (h.TIME_BUDGET_S, passed to the
# engines). DLG runs single-threaded, so the text and image lanes share the two cores.
LANES = {
    "text": 2 if ON_GPU else 1,  # /dager
    "image": 2 if ON_GPU else 1,  # /dlg
    "slow": 1,  # /dlg_text and /sweep: long by nature
}


PAGE_JS = """<script>
/* The first-token figure a visitor sees is measured here, in their browser: from the
   click on Run DAGER to the first recovered token in the token grid's DOM. Tokens
   already on screen from an earlier run are marked stale at the click. */
(() => {
  let watching = null;
  document.addEventListener("click", (event) => {
    const run = event.target.closest && event.target.closest("#gll-run-text");
    const grid = document.getElementById("gll-grid");
    const out = document.querySelector("#gll-first-token .gll-first-token");
    if (!run || run.disabled || !grid || !out) return;
    const t0 = event.timeStamp;
    grid.querySelectorAll(".gll-tok").forEach((el) => el.setAttribute("data-gll-stale", ""));
    out.textContent = "";
    delete out.dataset.seconds;
    if (watching) watching.disconnect();
    watching = new MutationObserver(() => {
      if (!grid.querySelector(".gll-tok:not([data-gll-stale])")) return;
      watching.disconnect();
      watching = null;
      const seconds = (performance.now() - t0) / 1000;
      out.dataset.seconds = seconds.toFixed(3);
      out.textContent = "First recovered tokens on screen " + seconds.toFixed(2) +
        " s after you pressed Run (measured in this browser).";
    });
    watching.observe(grid, {subtree: true, childList: true});
  }, true);
})();
/* Gradio's sketchpad starts with no tool chosen ("select the draw tool to start") and
   ignored strokes until Brush was clicked. When the sketchpad is on screen and no tool
   of it is highlighted, choose the brush (the first of its tool buttons). */
(() => {
  let pending = false;
  const chooseBrush = () => {
    pending = false;
    const pad = document.getElementById("gll-sketch");
    if (!pad || pad.offsetParent === null || pad.querySelector("button.highlight")) return;
    const brush = pad.querySelector("button[aria-label='Brush']") ||
      pad.querySelector("button.quite-round");
    if (brush) brush.click();
  };
  new MutationObserver(() => {
    if (!pending) { pending = true; requestAnimationFrame(chooseBrush); }
  }).observe(document.documentElement, {subtree: true, childList: true, attributes: true,
                                         attributeFilter: ["class", "style", "hidden"]});
})();
</script>"""
"""Page scripts: the first-token time measured where it is seen (the server cannot know
when the page drew), and the sketchpad's brush chosen from the start."""


def launch_options() -> dict[str, object]:
    """Keyword arguments for ``Blocks.launch`` (Gradio 6 takes theme, CSS and head there)."""
    return {
        "theme": THEME,
        "css_paths": [ASSETS / "app.css"],
        "max_file_size": "10mb",
        "footer_links": ["api", "settings"],
        "head": PAGE_JS,
    }


def _defense_panel() -> list[gr.components.Component]:
    with gr.Accordion("Defenses (apply to both tabs)", open=False):
        gr.Markdown("Client-side defenses applied to the update before it is shared. "
                    "All off means the plain FedSGD gradient.")
        with gr.Row():
            sigma = gr.Dropdown([0.0, 1e-4, 1e-3, 1e-2, 1e-1], value=0.0, label="Gaussian noise σ (std)",
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
        summary = gr.Markdown(h.describe_defense())
        for component in settings:
            component.change(h.describe_defense, inputs=settings, outputs=summary, api_name=False,
                             queue=False, show_progress="hidden")
    return settings


def _run_stop(run: gr.Button, stop: gr.Button, status: gr.components.Component, kind: str, fn: Callable,
              inputs_: list, outputs: list, api_name: str, lane: str) -> None:
    """Wire Run and Stop: Run is disabled until the worker has let go; Stop says
    "Stopping…" at once and "Stopped at …" when the worker has stopped.

    Locking and unlocking the buttons run in the browser (``js=True``: Gradio
    transpiles them to JavaScript), so the job's request leaves at the click instead
    of after a server round trip."""
    event = run.click(h.lock_run, outputs=[run, stop], queue=False, api_name=False, show_progress="hidden",
                      js=True)
    job = event.then(h.face(fn), inputs=inputs_, outputs=outputs, api_name=api_name, concurrency_id=lane,
                     concurrency_limit=LANES[lane])
    job.then(h.unlock_run, outputs=[run, stop], queue=False, api_name=False, show_progress="hidden", js=True)
    stop.click(h.stopping_for(kind), outputs=status, cancels=[job], queue=False, api_name=False,
               show_progress="hidden").then(
        h.stopped_for(kind), outputs=[status, run, stop], queue=False, api_name=False, show_progress="hidden")


def _sweep_panel() -> SimpleNamespace:
    """The defense sweep's accordion (its components, for wiring)."""
    with gr.Accordion("Defense sweep: attack success and utility against defense strength", open=False):
        gr.Markdown("Runs the attack once per setting on the current text or image "
                    "(the other panel settings are ignored here). Each row appears as it finishes, "
                    "with what was recovered; *utility cosine* is how much of its direction the "
                    "update kept (1: unharmed).")
        with gr.Row():
            sweep_target = gr.Radio([("Text (DAGER)", "text"), ("Images (DLG)", "images")], value="text",
                                    label="Attack")
            sweep_axis = gr.Dropdown(list(SWEEPS), value="noise σ", label="Vary")
            sweep_run = gr.Button("Run sweep", variant="primary", elem_id="gll-run-sweep")
            sweep_stop = gr.Button("Stop sweep", variant="stop", interactive=False, elem_id="gll-stop-sweep")
        sweep_status = gr.Markdown(elem_id="gll-sweep-status")
        with gr.Row():
            sweep_plot = gr.Plot(label="Attack success and utility")
            sweep_table = gr.Dataframe(label="Rows", interactive=False, wrap=True,
                                       datatype=["str", "number", "number", "number", "number", "html"])
    return SimpleNamespace(target=sweep_target, axis=sweep_axis, run=sweep_run, stop=sweep_stop,
                           status=sweep_status, plot=sweep_plot, table=sweep_table)


def _text_tab(sets: dict[str, str], models: list[str]) -> SimpleNamespace:
    """The DAGER tab, with the DLG text race (its components, for wiring)."""
    first_set = next(iter(sets))
    with gr.Row():
        with gr.Column(scale=3):
            sentences = gr.Textbox(value=sets[first_set], lines=6, max_lines=MAX_SENTENCES + 2,
                                   label=f"Private sentences (one per line, at most {MAX_SENTENCES})",
                                   elem_id="gll-sentences")
            sample = gr.Dropdown(list(sets), value=first_set, label="Sample sets")
        with gr.Column(scale=2):
            model = gr.Dropdown(models, value=DEFAULT_TEXT_MODEL if DEFAULT_TEXT_MODEL in models
                                else models[0], label="Model")
            hub_id = gr.Textbox(value="", label="…or a Hugging Face model id, owner/name (needs the hub)",
                                placeholder="e.g. openai-community/gpt2")
            task = gr.Radio(["classification", "next-token"], value="classification", label="Task")
            tolerant = gr.Checkbox(value=False, label="Noise-tolerant mode (for defended updates)")
            client = gr.Dropdown(list(inputs.CLIENT_SETUPS), value=inputs.DEFAULT_CLIENT_SETUP,
                                 label="Client training",
                                 info="How the client fine-tunes: LoRA shares only its adapters' gradients")
            with gr.Row():
                run = gr.Button("Run DAGER", variant="primary", elem_id="gll-run-text")
                stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="gll-stop-text")
    text_status = gr.Markdown(elem_id="gll-text-status")
    with gr.Row():
        # Waiting figures from the start: the browser loads plotly.js with the
        # page, not when the first run's spectrum arrives.
        blank = DagerView().render(["spectrum", "distances"])
        spectrum = gr.Plot(blank["spectrum"], label="Gradient spectrum", elem_id="gll-spectrum")
        distances = gr.Plot(blank["distances"], label="Layer-1 token filter", elem_id="gll-distances")
    with gr.Row():
        with gr.Column(scale=3):
            grid = gr.HTML(label="Token grid", elem_id="gll-grid")
        with gr.Column(scale=2):
            recovered = gr.HTML(label="Recovered sentences", elem_id="gll-recovered")
            gr.HTML('<p class="gll-note gll-first-token"></p>', elem_id="gll-first-token")
            metrics = gr.Markdown(elem_id="gll-metrics")
    with gr.Accordion("Race the DLG text baseline on the same update", open=False):
        gr.Markdown("DLG optimises continuous embeddings until their gradient matches; "
                    "on text it usually recovers a few words, not sentences. The default "
                    f"takes about a minute here (capped at {h.TIME_BUDGET_S:.0f} s); the status "
                    "shows an estimate as it runs.")
        with gr.Row():
            race_iters = gr.Slider(10, MAX_ITERATIONS, value=min(h.DEFAULT_RACE_ITERATIONS, MAX_ITERATIONS),
                                   step=10, label="Baseline iterations")
            race = gr.Button("Race DLG baseline", elem_id="gll-run-race")
            race_stop = gr.Button("Stop baseline", variant="stop", interactive=False,
                                  elem_id="gll-stop-race")
        race_status = gr.Markdown(elem_id="gll-race-status")
        with gr.Row():
            race_sentences = gr.HTML()
            race_loss = gr.Plot(label="DLG text: gradient distance")
    with gr.Accordion("Raw result (JSON)", open=False):
        text_json = gr.JSON(label="Result")
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.components.Component)})


def _image_tab() -> SimpleNamespace:
    """The DLG tab (its components, for wiring)."""
    with gr.Row():
        with gr.Column(scale=2):
            # One control chooses the image source: the sub-tabs. The radio is the
            # endpoint's `source` input (kept for the /dlg and /sweep APIs), hidden.
            source = gr.Radio([("one image", "upload"), ("sketch", "sketch"), ("batch", "batch")],
                              value="upload", label="Image source", visible=False)
            with gr.Tabs():
                with gr.Tab("Upload or sample", id="upload") as tab_upload:
                    upload = UndecodedImage(type="filepath", label="Private image", image_mode="RGB",
                                            sources=["upload", "clipboard"], height=220,
                                            elem_id="gll-upload")
                    samples = inputs.sample_images()
                    if samples:
                        gr.Examples(samples, inputs=[upload], label="Sample images")
                with gr.Tab("Draw", id="sketch") as tab_sketch:
                    # No crop/resize tools and one layer: the brush is the active tool
                    # from the first stroke.
                    sketch = gr.Sketchpad(label="Draw your image", type="numpy", height=260,
                                          canvas_size=(256, 256), transforms=(), layers=False,
                                          brush=gr.Brush(default_size=12, colors=["#111827", "#dc2626",
                                                                                "#2563eb", "#16a34a"],
                                                         default_color="#111827"),
                                          elem_id="gll-sketch")
                with gr.Tab("Batch", id="batch") as tab_batch:
                    batch = gr.File(file_count="multiple", file_types=["image"], height=180,
                                    label=f"Private images (1 to {MAX_BATCH_IMAGES}, one client batch)")
                    batch_samples = gr.Button("Use the sample images", size="sm")
                    gr.Markdown("Image *i* gets class label + *i*. Batches are harder: "
                                "iDLG and gradient matching add a smoothness prior.")
        with gr.Column(scale=2):
            vmodel = gr.Dropdown(inputs.vision_models(), value="lenet", label="Model")
            method = gr.Radio([("DLG", "dlg"), ("iDLG", "idlg"), ("Gradient matching (IG)", "ig")],
                              value="idlg", label="Method")
            iterations = gr.Slider(1, MAX_ITERATIONS,
                                   value=min(h.DEFAULT_IMAGE_ITERATIONS, MAX_ITERATIONS), step=1,
                                   label="Iterations")
            label = gr.Number(value=7, label=f"Class label (0-{NUM_CLASSES - 1})", precision=0)
            with gr.Row():
                run_img = gr.Button("Run DLG", variant="primary", elem_id="gll-run-image")
                stop_img = gr.Button("Stop", variant="stop", interactive=False, elem_id="gll-stop-image")
            img_status = gr.Markdown(elem_id="gll-image-status")
    with gr.Row():
        preview = gr.Image(label="Reconstruction (live)", elem_id="gll-preview", height=200,
                           interactive=False, format="png")
        comparison = gr.Image(label="Original vs reconstruction",
                              elem_id="gll-comparison", height=200, interactive=False, format="png")
    with gr.Row():
        loss_plot = gr.Plot(label="Gradient distance")
        psnr_plot = gr.Plot(label="PSNR")
    gif = gr.File(label="Reconstruction GIF", interactive=False)
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, (gr.components.Component, gr.Tab))})


def _wire(t: SimpleNamespace, i: SimpleNamespace, sw: SimpleNamespace, defense_inputs: list,
          sets: dict[str, str]) -> None:
    """Every event: Run/Stop of the four jobs, the sample sets, the image sub-tabs, the task radio."""
    t.sample.change(lambda name: sets.get(name, ""), inputs=t.sample, outputs=t.sentences,
                    api_name=False, queue=False)
    text_inputs = [t.sentences, t.model, t.hub_id, t.task]
    _run_stop(t.run, t.stop, t.text_status, "text", h.run_text_attack,
              [*text_inputs, t.tolerant, *defense_inputs, t.client],
              [t.text_status, t.spectrum, t.distances, t.grid, t.recovered, t.metrics, t.text_json], "dager", "text")
    _run_stop(t.race, t.race_stop, t.race_status, "race", h.run_text_baseline,
              [*text_inputs, t.race_iters, *defense_inputs], [t.race_status, t.race_loss, t.race_sentences],
              "dlg_text", "slow")
    image_inputs = [i.source, i.upload, i.sketch, i.batch, i.label, i.vmodel, i.method, i.iterations]
    _run_stop(i.run_img, i.stop_img, i.img_status, "image", h.run_image_attack,
              [*image_inputs, *defense_inputs],
              [i.img_status, i.preview, i.loss_plot, i.psnr_plot, i.comparison, i.gif], "dlg", "image")
    _run_stop(sw.run, sw.stop, sw.status, "sweep", h.run_defense_sweep,
              [sw.target, sw.axis, *text_inputs, t.tolerant, *image_inputs],
              [sw.status, sw.plot, sw.table], "sweep", "slow")
    for tab, value in ((i.tab_upload, "upload"), (i.tab_sketch, "sketch"), (i.tab_batch, "batch")):
        tab.select(functools.partial(lambda v: v, value), outputs=i.source, api_name=False, queue=False,
                   show_progress="hidden")
    t.model.change(h.task_choices, inputs=[t.model, t.task], outputs=t.task, api_name=False,
                   concurrency_id="models", show_progress="hidden")
    i.batch_samples.click(lambda: inputs.sample_images()[:MAX_BATCH_IMAGES], outputs=i.batch, api_name=False,
                          queue=False)


def build_app() -> gr.Blocks:
    """The whole app (tests launch it on a free port)."""
    sets = inputs.sentence_sets()
    # A CPU Space keeps the server under 4 GB: the 2.4 GB paper-width model is for the CLI and GPUs.
    models = list(embedded_models(max_weights_gb=None if ON_GPU else 1.0))
    with gr.Blocks(title="Gradient Leakage Lab", analytics_enabled=False,
                   delete_cache=(PURGE_EVERY_S, PURGE_EVERY_S)) as demo:
        gr.Markdown(
            "# Gradient Leakage Lab\n"
            "Federated learning shares gradients, not data. Watch two published attacks "
            "rebuild the private data from what a client shares. Everything runs here; "
            "nothing you type or draw is stored or sent anywhere."
        )
        defense_inputs = _defense_panel()
        sweep = _sweep_panel()
        with gr.Tabs():
            with gr.Tab("Text (DAGER)", id="text"):
                text = _text_tab(sets, models)
            with gr.Tab("Images (DLG)", id="images"):
                image = _image_tab()
            with gr.Tab("How it works", id="how"):
                gr.Markdown(inputs.how_it_works(), latex_delimiters=[
                    {"left": "$$", "right": "$$", "display": True},
                    {"left": "$", "right": "$", "display": False},
                ])
        _wire(text, image, sweep, defense_inputs, sets)
        demo.unload(h.forget_session)
    h.start_purger(PURGE_EVERY_S)

    demo.queue(max_size=16)
    return demo


def _shutdown(signum: int, _frame: object) -> None:
    """SIGINT/SIGTERM: delete every file made from visitors' data, then let Gradio close
    (its own shutdown empties its cache of uploads and outputs)."""
    removed = h.purge_user_files()
    log.info("shutdown (signal %d): removed %d user file(s)", signum, removed)
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torch's one-off optimizer start-up (~3 s on the CPU Space), paid while the page loads
    # rather than in the first visitor's DLG text race (Adam).
    from dlg.attack import warm_up_optimizers

    threading.Thread(target=warm_up_optimizers, name="warm-up", daemon=True).start()
    # The default text model, DAGER's first linear-algebra calls and plotly's first
    # figures are paid here too, so the first visitor's Run is as fast as the next one's.
    threading.Thread(target=h.prewarm, args=(DEFAULT_TEXT_MODEL,), name="prewarm", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _shutdown)
    demo = build_app()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
        **launch_options(),
    )


if __name__ == "__main__":
    main()
