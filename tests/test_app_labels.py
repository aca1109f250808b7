"""Honest labels, fed hand-built DAGER events (no engine): one vocabulary, counts that
agree with the metrics table, wrong guesses never green, the span_full sentence."""

from __future__ import annotations

import os
import re

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from dager.events import (  # noqa: E402
    AttackFinished,
    AttackStarted,
    AttackWarning,
    DagerResult,
    SentenceRecovered,
    StopReason,
    WarningCode,
)
from fedclient.errors import LabInputError  # noqa: E402
from labui import handlers as h  # noqa: E402
from labui import inputs  # noqa: E402
from labui.text_view import SPAN_FULL, DagerView  # noqa: E402
from labui.textdiff import diff_html  # noqa: E402


def _view(bundle, refs, **kw):
    return DagerView(references=refs, token_text=lambda i: bundle.tokenizer.decode([int(i)]),
                     normalize=lambda s: h.normalize(bundle, s), scorer=h.text_scorer(bundle), **kw)


def _run(view, bundle, texts, exact, *, stop_reason=StopReason.COMPLETE, warnings=()):
    ids = [tuple(bundle.tokenize(t)) for t in texts]
    view.apply(AttackStarted("tiny", "classification", len(texts), bundle.hidden_size, 9, False, ()))
    for i, (t, ok) in enumerate(zip(texts, exact)):
        view.apply(SentenceRecovered(i, ids[i], t, ok, 1e-7))
    for w in warnings:
        view.apply(w)
    view.apply(AttackFinished(DagerResult(tuple(texts), tuple(ids), tuple(exact), 9, bundle.hidden_size, False,
                                          False, 0.4, stop_reason)))
    return view.render()


def _li(sentences_html: str) -> list[str]:
    return re.findall(r'<li class="gll-sent">(.*?)</li>', sentences_html)


def test_pruned_run_counts_agree_and_wrong_guesses_are_never_green(tiny):
    """Under pruning DAGER's span check can pass on a wrong sentence: the badge says what the
    attacker knows, the evaluation says it differs, and nothing about it is green."""
    bundle = tiny("gpt2")
    refs = ["the cat sat on the mat", "a dog ran home", "we meet at nine"]
    texts = ["the cat sat on the mat", "a dog ran away", "we meet at nine"]
    out = _run(_view(bundle, refs), bundle, texts, [True, True, True])
    items = _li(out["sentences"])
    wrong = next(i for i in items if "away" in i)
    assert "span check passed" in wrong and "differs" in wrong
    assert "gll-same" not in wrong and "matches original" not in wrong  # the green badge
    assert '<ins class="gll-ins">away</ins>' in wrong
    css = (inputs.ASSETS / "app.css").read_text()
    ins_rule = re.search(r"ins\.gll-ins \{([^}]*)\}", css).group(1)
    assert "#16a34a" not in ins_rule and "#15803d" not in ins_rule and "#dcfce7" not in ins_rule
    # Grid: the wrong sentence's row is not the green (match) row.
    assert out["grid"].count("gll-row gll-row-match") == 2 and out["grid"].count("gll-row gll-row-differs") == 1
    # Status counts = metrics table.
    assert "3 passed the span check; 2 of 3 match the original" in out["status"]
    assert "| exact match (matches original) | 67 % (2 of 3) |" in out["metrics"]
    assert "*span check passed*" in out["metrics"]  # the vocabulary, explained once


def test_tokenizer_normalisation_is_labelled_not_called_equal(tiny):
    bundle = tiny("bert")  # MiniLM's uncased tokenizer: lowercases, strips accents
    refs = ["Café au lait, s'il vous plaît"]
    seen = h.normalize(bundle, refs[0])
    assert seen != refs[0]
    out = _run(_view(bundle, refs), bundle, [seen], [True])
    assert "matches original" in out["sentences"] and "as the tokenizer sees it" in out["sentences"]


def test_span_full_is_one_clear_sentence(tiny):
    bundle = tiny("gpt2")
    out = _run(_view(bundle, ["the cat sat"]), bundle, [], [], stop_reason=StopReason.SPAN_FULL,
               warnings=[AttackWarning(code=WarningCode.SPAN_FULL, value=64)])
    assert "The span is full: this defense stopped the exact attack." in out["status"]
    assert out["status"].count(SPAN_FULL) == 1
    assert "span check can be exact" not in out["status"]


def test_noise_tolerant_status_never_promises_exactness(tiny):
    bundle = tiny("gpt2")
    out = _run(_view(bundle, ["the cat sat"], noise_tolerant=True), bundle, ["the cat sat"], [False])
    assert "nothing is guaranteed exact" in out["status"]
    assert "exact recovery expected" not in out["status"] and "span check passed" not in out["sentences"]
    assert "ranked guess" in out["sentences"]


def test_defended_run_ends_with_a_verdict(tiny):
    bundle = tiny("gpt2")
    view = _view(bundle, ["the cat sat", "a dog ran"])
    view.mark_update_done({"utility_cosine": 0.9987, "utility_norm_ratio": 1.0})
    out = _run(view, bundle, ["the dog", "cat ran"], [False, False])
    assert re.search(r"\*\*Verdict:\*\* defense held: no sentence recovered, ROUGE-1 [\d.]+ \(below 50\); "
                     r"the update kept 0\.999 of its direction\.", out["status"]), out["status"]


def test_image_verdict(tiny):
    from dlg.events import DlgFinished, DlgResult, DlgStarted
    from labui.image_view import DlgView

    originals = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    view = DlgView(originals=originals)
    view.mark_update_done({"utility_cosine": 0.95})
    view.apply(DlgStarted("idlg", "lenet", 1, 10))
    view.apply(DlgFinished(DlgResult(torch.zeros_like(originals), torch.tensor([1]), (1.0,), None, "budget", (),
                                     1.0)))
    assert re.search(r"defense held: [\d.]+ dB, below 20 dB; the update kept 0\.950 of its direction",
                     view.status_markdown())


def test_diff_marks_wrong_words_and_missing_words():
    out = diff_html("a dog ran home", "a dog ran away")
    assert '<del class="gll-del">home</del>' in out and '<ins class="gll-ins">away</ins>' in out


@pytest.mark.parametrize("typed", ["/etc", "/nonexistent", "../secrets", "etc", "dager", "C:\\Windows",
                                   "owner/../x", ".hidden/x", "a/b/c"])
def test_hub_box_takes_hub_ids_only_and_answers_every_path_alike(typed):
    with pytest.raises(LabInputError) as err:
        inputs.parse_hub_id(typed)
    assert str(err.value) == ("The model box takes a Hugging Face model id of the form owner/name "
                              "(e.g. openai-community/gpt2); local folders work only with the command-line tool.")


def test_hub_ids_pass_the_syntax_check():
    assert inputs.parse_hub_id("  openai-community/gpt2 ") == "openai-community/gpt2"
    assert inputs.parse_hub_id("") is None and inputs.parse_hub_id(None) is None


def test_typed_sigma_that_is_not_a_number_gets_a_specific_sentence():
    with pytest.raises(LabInputError, match=r"The noise σ must be a number such as 0\.001; 'abc' is not one\."):
        inputs.DefenseSettings.from_inputs("abc", False, 1.0, 1.0, 0.0, "fp32", 1, 1)
    assert "must be a number" in h.describe_defense("abc", False, 1.0, 1.0, 0.0, "fp32", 1, 1)
    assert inputs.DefenseSettings.from_inputs("1e-3", False, 1.0, 1.0, 0.0, "fp32", 1, 1).sigma == 1e-3


def test_unknown_modes_raise():
    with pytest.raises(LabInputError, match="Unknown image source"):
        inputs.load_client_image("webcam", None, None)
    with pytest.raises(LabInputError, match="Unknown precision"):
        inputs.DefenseSettings(precision="fp8").build()


def test_face_turns_library_errors_into_one_sentence():
    import gradio as gr

    def handler(text):
        inputs.parse_sentences(text)
        yield "never"

    with pytest.raises(gr.Error, match="Type at least one sentence"):
        list(h.face(handler)(" "))


def test_files_made_from_user_data_are_purged(tmp_path, monkeypatch):
    """The GIF written after a DLG run goes to Gradio's cache folder and is deleted by the
    purge that runs on the upload schedule (and at shutdown)."""
    from dlg.events import DlgFinished, DlgResult, DlgStarted
    from labui.image_view import DlgView

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    originals = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    frames = tuple((i, originals * i / 3) for i in (1, 2, 3))
    view = DlgView(originals=originals)
    view.apply(DlgStarted("idlg", "lenet", 1, 3))
    view.apply(DlgFinished(DlgResult(originals, torch.tensor([1]), (1.0,), None, "budget", frames, 0.1)))
    gif = h.write_gif(view)
    assert gif is not None and os.path.dirname(gif) == str(tmp_path) and os.path.getsize(gif) > 0
    other = tmp_path / "not-ours.txt"
    other.write_text("x")
    assert h.purge_user_files(older_than_s=3600) == 0 and os.path.exists(gif)  # too young for the schedule
    assert h.purge_user_files(older_than_s=0) == 1  # the schedule's turn, or shutdown
    assert not os.path.exists(gif) and other.exists()  # only the app's own files


def test_filter_plot_says_which_distances_are_lower_bounds():
    """The fast layer-1 filter reports lower bounds above its cut; the plot must not claim more."""
    from dager.events import TokensFiltered
    from labui import plots

    f = TokensFiltered(position=0, token_ids=torch.tensor([5]), distances=torch.tensor([1e-9]), threshold=1e-3,
                       vocab_distances=torch.tensor([1e-9, 0.3]), vocab_token_ids=torch.tensor([5, 7]),
                       exact_below=0.05)
    fig = plots.distances_figure([f])
    assert "lower bound above 0.05" in fig.layout.yaxis.title.text
    rejected = next(t for t in fig.data if t.name == "rejected")
    assert list(rejected.text) == ["7, at least"]
    exact = TokensFiltered(position=0, token_ids=torch.tensor([5]), distances=torch.tensor([1e-9]), threshold=1e-3,
                           vocab_distances=torch.tensor([1e-9, 0.3]), vocab_token_ids=torch.tensor([5, 7]))
    assert "lower bound" not in plots.distances_figure([exact]).layout.yaxis.title.text
