"""The app's handlers fed hand-built event streams (no attack engine, no browser)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import app  # noqa: E402
from labui import engines  # noqa: E402
from labui import handlers as h  # noqa: E402
from labui import inputs  # noqa: E402
from fedclient.errors import LabInputError  # noqa: E402
from dager.events import (  # noqa: E402
    AttackFinished,
    AttackStarted,
    AttackWarning,
    DagerResult,
    PrefixesExtended,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dager.metrics import evaluate_text  # noqa: E402
from dlg.events import (  # noqa: E402
    DlgFinished,
    DlgResult,
    DlgStarted,
    DlgStep,
    LabelsInferred,
    TextDlgFinished,
    TextDlgResult,
    TextDlgStep,
)
from labui import DagerView, DlgView, TextDlgView  # noqa: E402
from labui.image_view import matched_psnr, to_grid  # noqa: E402
from labui.text_view import TEXT_KEYS  # noqa: E402

REFS = ["the cat sat", "a dog ran home"]


def _skipped(value) -> bool:
    return value == gr.skip()


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _ids(bundle, text):
    return tuple(bundle.tokenize(text))


def _dager_stream(bundle, sentences, *, wrong_last: bool = False):
    """A plausible DAGER stream that recovers ``sentences`` (the last one garbled if asked)."""
    rows = [_ids(bundle, s) for s in sentences]
    d = bundle.hidden_size
    rank = sum(len(r) for r in rows)
    yield AttackStarted("tiny", bundle.task, len(rows), d, rank, False, ("transformer.h.0.attn.c_attn.weight",))
    sv = torch.cat([torch.logspace(0, -2, rank, dtype=torch.float64), torch.full((d - rank,), 1e-14, dtype=torch.float64)])
    yield SpectrumComputed(1, sv, rank, 1e-6)
    width = max(len(r) for r in rows)
    for p in range(width):
        true = sorted({r[p] for r in rows if p < len(r)})
        others = [t for t in range(1000, 1010) if t not in true]
        yield TokensFiltered(
            position=p,
            token_ids=torch.tensor(true),
            distances=torch.full((len(true),), 1e-7),
            threshold=1e-4,
            vocab_distances=torch.tensor([1e-7] * len(true) + [0.3] * len(others)),
            vocab_token_ids=torch.tensor(true + others),
        )
        prefixes = tuple(r[: p + 1] for r in rows if len(r) > p)
        yield PrefixesExtended(p, prefixes, len(prefixes), 10 * len(prefixes))
    texts, exact = [], []
    for i, r in enumerate(rows):
        text = bundle.decode(r)
        ok = True
        if wrong_last and i == len(rows) - 1:
            text, ok = text.replace("home", "away"), False
        texts.append(text), exact.append(ok)
        yield SentenceRecovered(i, r, text, ok, 1e-7)
    yield AttackWarning("incomplete", 1.0) if wrong_last else AttackWarning("budget_exhausted", 5000)
    yield AttackFinished(DagerResult(tuple(texts), tuple(rows), tuple(exact), rank, d, False, False, 0.5))


def _view(bundle, refs, clock=None):
    return DagerView(
        references=refs,
        token_text=lambda i: bundle.tokenizer.decode([int(i)]),
        special_ids=frozenset(bundle.tokenizer.all_special_ids),
        normalize=lambda s: h.normalize(bundle, s),
        model_note=h.model_note(bundle),
        scorer=h.text_scorer(bundle),
        clock=clock or FakeClock(),
    )


def test_dager_view_renders_every_stage(tiny):
    bundle = tiny("gpt2")
    clock = FakeClock()
    view = _view(bundle, REFS, clock)
    out = view.render()
    assert "computing the client's update" in out["status"]
    assert "Random weights" in out["status"]  # honest note for a seeded init
    assert "fills in" in out["grid"] and "appear here" in out["sentences"]

    events = list(_dager_stream(bundle, REFS, wrong_last=True))
    for e in events[:2]:
        view.apply(e)
    out = view.render()
    rank = events[0].rank
    assert f"rank **{rank}** of d = {bundle.hidden_size}" in out["status"]
    fig = out["spectrum"]
    assert len(fig.data) == 1 and fig.layout.yaxis.type == "log"
    assert np.allclose(fig.data[0].y[:rank], events[1].singular_values[:rank].numpy())
    cuts = [s.x0 for s in fig.layout.shapes]
    assert rank + 0.5 in cuts and bundle.hidden_size in cuts  # rank cut and capacity line

    clock.t += 0.8
    for e in events[2:4]:  # first filter + first prefixes
        view.apply(e)
    assert view.first_tokens_s == pytest.approx(0.8)
    out = view.render()
    dist = out["distances"]
    accepted = next(t for t in dist.data if t.name == "accepted")
    rejected = next(t for t in dist.data if t.name == "rejected")
    threshold = next(t for t in dist.data if t.name == "threshold")
    first_tokens = {r[0] for r in (_ids(bundle, s) for s in REFS)}
    assert len(accepted.y) == len(first_tokens) and max(accepted.y) < threshold.y[0] < min(rejected.y)
    assert out["grid"].count("gll-row gll-row-live") == 2  # two live prefixes of length 1

    for e in events[4:]:
        view.apply(e)
    out = view.render()
    # Grid: one row matching its original (green), one differing, no stale live prefixes.
    assert out["grid"].count("gll-row gll-row-match") == 1
    assert out["grid"].count("gll-row gll-row-differs") == 1
    assert "gll-row-live" not in out["grid"]
    assert ">the</span>" in out["grid"] or "·cat" in out["grid"]
    # Sentences: the first equals its original, the second shows a word diff.
    assert "matches original" in out["sentences"] and "differs" in out["sentences"]
    assert "span check passed" in out["sentences"] and "span check failed" in out["sentences"]
    assert '<del class="gll-del">home</del>' in out["sentences"]
    assert '<ins class="gll-ins">away</ins>' in out["sentences"]
    expected = evaluate_text(REFS, [bundle.decode(_ids(bundle, REFS[0])), "a dog ran away"])
    assert f"| ROUGE-1 F1 | {100 * expected.rouge1:.1f} |" in out["metrics"]
    assert "| exact match (matches original) | 50 % (1 of 2) |" in out["metrics"]
    assert "1 passed the span check; 1 of 2 match the original" in out["status"]
    assert "could not be completed exactly" in out["status"]
    assert "Done:** 2 sentence(s)" in out["status"]


def test_dager_view_rejects_unknown_events(tiny):
    view = _view(tiny("gpt2"), REFS)
    with pytest.raises(TypeError, match="cannot display a DlgStep"):
        view.apply(DlgStep(1, 0, 0.5))
    with pytest.raises(TypeError):
        DlgView().apply(AttackWarning("x"))
    with pytest.raises(TypeError):
        TextDlgView().apply(object())


def test_stream_throttles_and_skips_unchanged_plots(tiny):
    bundle = tiny("gpt2")
    clock = FakeClock()
    view = _view(bundle, REFS, clock)
    view.render(), view.take_dirty()
    events = list(_dager_stream(bundle, REFS))
    outs = list(h.stream_dager(view, iter(events), clock=clock))  # the clock never moves
    urgent = sum(isinstance(e, h.URGENT_TEXT) for e in events)
    assert len(outs) == urgent + 1  # only urgent events yield when no time passes, plus the final
    assert all(len(o) == len(TEXT_KEYS) + 1 for o in outs)
    first = outs[0]  # after AttackStarted: the status changed, the grid did not
    assert not _skipped(first[0]) and _skipped(first[3])
    # The first tokens travel alone: no plot is built or sent before them (no time
    # passes, so the plots wait for the tokens), and the plots follow in a later frame.
    tokens_at = next(i for i, o in enumerate(outs) if not _skipped(o[3]) and "gll-tok" in o[3])
    assert all(_skipped(o[1]) and _skipped(o[2]) for o in outs[: tokens_at + 1])
    assert any(not _skipped(o[1]) and not _skipped(o[2]) for o in outs[tokens_at + 1:])
    final = outs[-1]
    assert not any(_skipped(v) for v in final)
    assert final[-1]["recovered"] == [bundle.decode(_ids(bundle, s)) for s in REFS]
    assert final[-1]["exact_match"] == 1.0 and final[-1]["done"] is True


def test_run_text_attack_end_to_end_with_a_hand_built_stream(tiny, monkeypatch):
    bundle = tiny("gpt2")
    seen = {}

    def fake_events(b, update, **options):
        seen["update"] = update
        return _dager_stream(b, typed)

    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": bundle)
    monkeypatch.setattr(engines, "dager_parameters", lambda b, dropout=False: ["transformer.h.0.attn.c_attn.weight"])
    monkeypatch.setattr(engines, "dager_events", fake_events)
    typed = ["Alice owes Bob ten pounds.", "The meeting is at noon."]
    outs = list(h.run_text_attack("\n".join(typed) + "\n\n", "tiny", "", "classification"))
    final = outs[-1]
    assert final[-1]["recovered"] == typed and final[-1]["exact_match"] == 1.0
    assert set(seen["update"]) == {"transformer.h.0.attn.c_attn.weight"}  # only what DAGER reads
    assert seen["update"].batch_size == 2
    assert "matches original" in final[4] and "differs" not in final[4]


def test_input_limits_become_clear_messages(tiny, monkeypatch):
    with pytest.raises(LabInputError, match="at least one sentence"):
        inputs.parse_sentences(" \n \n")
    with pytest.raises(LabInputError, match=f"at most {inputs.MAX_SENTENCES}"):
        inputs.parse_sentences("\n".join(f"s{i}" for i in range(inputs.MAX_SENTENCES + 1)))
    with pytest.raises(LabInputError, match="characters"):
        inputs.parse_sentences("x" * (inputs.MAX_SENTENCE_CHARS + 1))
    with pytest.raises(LabInputError, match="unreachable"):
        h.model_name("gpt2-small-random", "someone/some-model")
    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": tiny("gpt2"))
    with pytest.raises(LabInputError, match="tokens long"):
        list(h.run_text_attack(" ".join(["a"] * 80), "tiny", "", "classification"))
    with pytest.raises(LabInputError, match="between 1 and"):
        inputs.iterations(inputs.MAX_ITERATIONS + 1)
    with pytest.raises(LabInputError, match="sketchpad is empty"):
        inputs.load_client_image("sketch", None, {"composite": np.full((64, 64, 4), 0, np.uint8)})


def _dlg_stream(originals):
    b = originals.shape[0]
    yield DlgStarted("idlg", "lenet", b, 50)
    yield LabelsInferred(torch.tensor([7] * b), torch.zeros(100))
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(originals.shape, generator=gen)
    losses = []
    for it in range(1, 51):
        w = it / 50
        losses.append(10 ** (-it / 10))
        preview = (1 - w) * noise + w * originals if it % 10 == 0 else None
        yield DlgStep(it, 0, losses[-1], preview)
    frames = tuple((it, (1 - it / 50) * noise + it / 50 * originals) for it in (10, 20, 30, 40, 50))
    yield DlgFinished(DlgResult(originals.clone(), torch.tensor([7] * b), tuple(losses), 50, "tolerance", frames, 1.5))


def test_dlg_view_and_stream():
    originals = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    view = DlgView(originals=originals, labels=torch.tensor([7]), clock=FakeClock())
    outs = list(h.stream_dlg(view, _dlg_stream(originals), clock=FakeClock()))
    # Start, labels, the 5 preview-free... only non-step events yield when no time passes, plus the final.
    assert len(outs) == 3 + 1
    status, preview, loss, psnr, comparison, gif = outs[-1]
    assert "✓ (correct)" in status and "stopped at iteration 50" in status
    assert "fell below the tolerance" in status and "PSNR **100.0 dB**" in status
    assert preview.shape == (128, 128, 3) and preview.dtype == np.uint8
    assert comparison.shape == (128, 128 * 2 + 8, 3)  # original | reconstruction
    assert loss.layout.yaxis.type == "log" and len(loss.data[0].x) == 50
    psnrs = list(psnr.data[0].y)
    assert len(psnrs) == 5 and psnrs == sorted(psnrs) and psnrs[-1] == pytest.approx(100.0)
    assert gif is not None and os.path.getsize(gif) > 0
    import imageio.v2 as imageio

    assert len(imageio.mimread(gif)) == 5
    os.remove(gif)


def test_image_attack_on_a_batch_of_files(monkeypatch):
    """The batch source sends every file as one client batch, labels label, label+1, ..."""
    paths = inputs.sample_images()[:3]
    seen = {}

    def fake_events(model, update, *, method, iterations, time_budget_s=None):  # noqa: ANN001
        seen["batch_size"], seen["method"] = update.batch_size, method
        return _dlg_stream(inputs.load_client_image("batch", None, None, paths))

    monkeypatch.setattr(engines, "dlg_events", fake_events)
    files = [{"path": p} for p in paths]  # the shape Gradio gives a handler for uploaded files
    outs = list(h.run_image_attack("batch", None, None, files, 98, "lenet", "idlg", 50))
    assert seen == {"batch_size": 3, "method": "idlg"}
    status, preview, _loss, _psnr, comparison, gif = outs[-1]
    assert "stopped at iteration 50" in status
    assert preview.shape == (128, 3 * 128 + 2 * 2, 3)  # three reconstructions side by side
    assert comparison.shape == (2 * 128 + 8, 3 * 128 + 2 * 2, 3)  # originals above, reconstructions below
    os.remove(gif)
    torch.testing.assert_close(inputs.client_labels(98, 3), torch.tensor([98, 99, 0]))


def test_batch_input_errors_are_specific():
    with pytest.raises(LabInputError, match="batch is empty"):
        inputs.load_client_image("batch", None, None, [])
    with pytest.raises(LabInputError, match="at most 8"):
        inputs.load_client_image("batch", None, None, inputs.sample_images()[:1] * 9)
    with pytest.raises(LabInputError, match="whole number from 0 to 99"):
        inputs.client_labels(100, 1)
    with pytest.raises(LabInputError, match="whole number"):
        inputs.client_labels(2.5, 1)


def test_matched_psnr_ignores_batch_order():
    a = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert matched_psnr(a, a[[2, 0, 1]]) == pytest.approx(100.0)
    assert to_grid(a, scale=2, pad=2).shape == (16, 3 * 16 + 2 * 2, 3)


def test_text_baseline_view(tiny):
    bundle = tiny("gpt2")
    view = TextDlgView(references=REFS, scorer=h.text_scorer(bundle))
    view.apply(DlgStarted("dlg-text", "tiny", 2, 100))
    view.apply(TextDlgStep(10, 0.5, torch.zeros(2, 3, dtype=torch.long), ("the dog sat", "a cat ran")))
    out = view.render()
    assert "iteration 10 of 100" in out["race_status"] and "gll-del" in out["race_sentences"]
    view.apply(TextDlgFinished(TextDlgResult(("the cat sat", "a dog ran"), ((1,), (2,)), (0.5, 0.1), 2.0)))
    out = view.render()
    assert "done" in out["race_status"] and "exact match 50 %" in out["race_status"]
    assert list(out["race_loss"].data[0].y) == [0.5]


def test_app_builds_with_named_endpoints():
    demo = app.build_app()
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"dager", "dlg", "dlg_text"} <= names
    assert demo.analytics_enabled is False


def test_defense_panel_settings_build_the_shared_defense():
    from fedclient import defenses as dfn

    off = (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1)
    assert inputs.DefenseSettings.from_inputs(*off).build() is None
    assert "No defense" in h.describe_defense(*off)
    d = inputs.DefenseSettings.from_inputs(1e-3, False, 1.0, 1.0, 0.3, "fp16", 1, 4).build()
    assert isinstance(d, dfn.Compose)
    kinds = [type(x) for x in d.defenses]
    assert kinds[:3] == [dfn.GaussianNoise, dfn.Prune, dfn.Quantize] and kinds[-1] is dfn.SecureAggregation
    dp = inputs.DefenseSettings.from_inputs(0.0, True, 2.0, 1.1, 0.0, "fp32", 1, 1).build()
    assert isinstance(dp, dfn.DPSGD) and dp.clip_norm == 2.0 and dp.noise_multiplier == 1.1
    assert f"epsilon = {dp.epsilon:.3g}" in h.describe_defense(0.0, True, 2.0, 1.1, 0.0, "fp32", 1, 1)
    with pytest.raises(LabInputError, match="pick one"):
        inputs.DefenseSettings.from_inputs(0.0, True, 1.0, 1.0, 0.0, "fp32", 3, 1).build()
    with pytest.raises(LabInputError):
        inputs.DefenseSettings.from_inputs(-1.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1).build()  # caught by the defense's checks
    assert "⚠️" in h.describe_defense(0.0, False, 1.0, 1.0, 1.5, "fp32", 1, 1)


def test_text_baseline_handler_runs_the_real_baseline(tiny, monkeypatch):
    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": tiny("gpt2"))
    outs = list(h.run_text_baseline("the cat sat\na dog ran home", "tiny", "", "classification", 5))
    status, loss, sentences = outs[-1]
    assert "DLG baseline done" in status and "ROUGE-1" in status
    assert sentences.count('<li class="gll-sent">') == 2  # one guess per client sentence
    assert len(loss.data[0].x) >= 1


def test_defense_sweep_handler_streams_one_row_per_setting(tiny, monkeypatch):
    from fedclient.sweep import grid

    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": tiny("gpt2"))
    outs = list(h.run_defense_sweep("text", "precision", "the cat sat\na dog ran home", "tiny", "",
                                      "classification", False, "upload", None, None, None, 7, "lenet", "idlg", 10))
    points = grid("precision")
    assert len(outs) == 1 + len(points)  # a first status, then one yield per finished setting
    status, fig, table = outs[-1]
    assert f"{len(points)} of {len(points)} settings done." in status
    assert [row[0] for row in table["data"]] == [p.label for p in points]
    rouge = [row[1] for row in table["data"]]
    assert rouge[0] == 1.0  # the undefended (or fp16) update still leaks everything
    assert {t.name for t in fig.data} == {"rouge1", "exact_match", "utility_cosine"}  # success next to utility
    assert table["headers"][-1] == "recovered" and "the cat sat" in table["data"][0][-1]


def test_secure_aggregation_past_dlg_batch_ends_in_a_verdict():
    """16 clients mix 16 images: DLG cannot start, and the page says the defense held."""
    from dlg.attack import MAX_BATCH

    assert engines.DLG_MAX_BATCH == MAX_BATCH
    path = inputs.sample_images()[0]
    outs = list(h.run_image_attack("upload", path, None, None, 7, "lenet", "idlg", 10, 0.0, False, 1.0, 1.0, 0.0,
                                   "fp32", 1, 16))
    assert len(outs) == 1
    status = outs[0][0]
    assert "**Verdict:** defense held" in status and "16 clients" in status and f"at most {MAX_BATCH}" in status


def test_spectrum_labels_sit_on_separate_rows():
    """Two close ranks and the capacity: each label has its own row or edge, so none overlap."""
    from labui.plots import spectrum_figure

    values = [10.0 ** -i for i in range(64)]
    fig = spectrum_figure({1: (values, 30), 2: (values, 33)}, 64)
    placed = {(a.text, a.yanchor, a.yshift or 0) for a in fig.layout.annotations}
    assert placed == {("rank 30", "top", 0), ("rank 33 (L2)", "top", -18), ("capacity d=64", "bottom", 0)}
    assert {a.xanchor for a in fig.layout.annotations if a.text.startswith("rank")} == {"left"}


def test_client_training_choice_reaches_the_client_and_the_server(tiny, monkeypatch):
    """The "Client training" selector: LoRA ships only adapters, the attack reads the merged model."""
    bundle = tiny("gpt2")
    seen = {}

    def fake_events(b, update, **options):
        seen["server"], seen["update"] = b, update
        return _dager_stream(b, typed)

    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": bundle)
    monkeypatch.setattr(engines, "dager_events", fake_events)
    typed = ["Alice owes Bob ten pounds.", "The meeting is at noon."]
    outs = list(h.run_text_attack("\n".join(typed), "tiny", "", "classification",
                                  client_setup="LoRA r=16 (adapters only)"))
    assert outs[-1][-1]["recovered"] == typed
    assert seen["update"] and all("lora_" in name for name in seen["update"])  # adapters only
    assert seen["server"].model is not bundle.model  # the base with the adapters merged
    base = dict(bundle.model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    merged = dict(seen["server"].model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    assert not torch.equal(base, merged)


def test_client_training_bad_choices_get_one_sentence(tiny, monkeypatch):
    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": tiny("gpt2"))
    with pytest.raises(LabInputError, match="Unknown client training"):
        list(h.run_text_attack("a b c", "tiny", "", "classification", client_setup="lora:r=999"))
    # r=256 exceeds the tiny model's width (d=64): refused before any update is computed.
    with pytest.raises(LabInputError, match="r=256 is larger than the adapted layers. width d=64"):
        list(h.run_text_attack("a b c", "tiny", "", "classification", client_setup="LoRA r=256 (adapters only)"))


def test_lora_capacity_is_named_as_the_adapters_not_the_model_width(tiny, monkeypatch):
    """Under LoRA r=16 the span's cap is the adapters' k r (16), and the page must say so."""
    bundle = tiny("gpt2")  # d = 64: the width alone would leave plenty of room
    monkeypatch.setattr(engines, "load_model", lambda name, task, device="cpu": bundle)
    typed = ["Alice owes Bob ten pounds before the end of May.", "The meeting is at noon in room four.",
             "My card number ends in four two four two.", "Please water the plants on Sunday."]
    final = list(h.run_text_attack("\n".join(typed), "tiny", "", "classification",
                                   client_setup="LoRA r=16 (adapters only)"))[-1]
    status = final[0]
    assert "of the LoRA adapters' capacity 16 (d = 64)" in status
    assert "LoRA adapters' rank caps what the update can hold" in status
    assert "as many distinct tokens as the model is wide" not in status
    assert "| layer-1 rank / d | 16 / 64 |" in final[5]  # the metrics beside it agree: rank 16


def test_run_buttons_lock_and_unlock_in_the_browser():
    """Run's lock and unlock are JavaScript in the page (transpiled by Gradio at launch):
    the job's request leaves at the click, not after a server round trip."""
    demo = app.build_app()
    demo.transpile_to_js(quiet=True)  # what launch() does
    deps = demo.get_config_file()["dependencies"]
    run_ids = {app_id for app_id, block in demo.blocks.items()
               if getattr(block, "elem_id", None) in {"gll-run-text", "gll-run-image", "gll-run-race",
                                                      "gll-run-sweep"}}
    locks = [d for d in deps if any(t[0] in run_ids and t[1] == "click" for t in d["targets"])]
    assert len(locks) == 4
    for lock in locks:
        assert lock["js_implementation"] and "interactive" in lock["js_implementation"]
        job = next(d for d in deps if d["trigger_after"] == lock["id"])  # the attack, right after
        assert job["api_name"] in {"dager", "dlg", "dlg_text", "sweep"} and job["js_implementation"] is None
        unlock = next(d for d in deps if d["trigger_after"] == job["id"])
        assert unlock["js_implementation"]
