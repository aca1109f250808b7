"""The DLG text baseline: event contract, one sentence per example, the CLI's JSON."""

from __future__ import annotations

import json

import pytest
import torch

import fedclient
from dlg.cli import main
from dlg.events import DlgStarted, TextDlgFinished, TextDlgStep
from dlg.text import TextDlgConfig, iter_dlg_text, run_dlg_text
from fedclient.errors import InvalidConfigError


@pytest.fixture(autouse=True)
def _restore_threads():
    # The CLI sets one torch thread for the process; keep that from leaking into other tests.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("task", ["classification", "next-token"])
def test_text_baseline_event_contract(tiny, task):
    bundle = tiny("gpt2", task)
    sentences = ["the cat sat on the mat", "gradients leak data"]
    batch = bundle.encode(sentences, labels=[0, 1] if task == "classification" else None)
    update = fedclient.compute_update(bundle.model, batch)
    config = TextDlgConfig(iterations=6, seq_len=batch.input_ids.shape[1], preview_every=2, preview_seconds=0.0)
    events = list(iter_dlg_text(bundle, update, config=config))
    assert isinstance(events[0], DlgStarted) and events[0].method == "dlg-text" and events[0].batch_size == 2
    steps = [e for e in events if isinstance(e, TextDlgStep)]
    assert [s.iteration for s in steps if s.iteration % 2 == 0] == [2, 4, 6]  # odd ones: heartbeats
    assert all(s.token_ids.shape == (2, batch.input_ids.shape[1]) and len(s.texts) == 2 for s in steps)
    assert isinstance(events[-1], TextDlgFinished)
    result = events[-1].result
    assert len(result.sentences) == 2 and len(result.token_ids) == 2
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]


def test_text_baseline_bert_runs(tiny):
    bundle = tiny("bert")
    update = fedclient.compute_update(bundle.model, bundle.encode(["hello world"], labels=[1]))
    result = run_dlg_text(bundle, update, config=TextDlgConfig(iterations=3, seq_len=4))
    assert len(result.sentences) == 1 and len(result.token_ids[0]) == 4
    assert all(0 <= t < bundle.tokenizer.vocab_size for t in result.token_ids[0])


def test_text_config_validation():
    with pytest.raises(InvalidConfigError):
        TextDlgConfig(distance="l1")
    with pytest.raises(InvalidConfigError):
        TextDlgConfig(seq_len=0)


def test_text_cli_writes_dager_keys(tmp_path, monkeypatch, tiny):
    import dager

    bundle = tiny("gpt2")
    monkeypatch.setattr(dager, "load_model", lambda name, task="classification", device="cpu": bundle)
    src = tmp_path / "s.txt"
    src.write_text("the cat sat\ngradients leak data\nhello world\n")
    out = tmp_path / "r.json"
    code = main(["text", "--model", "tiny", "--input", str(src), "--batch-size", "2",
                 "--iterations", "3", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    keys = {"model", "task", "batch_size", "rouge1", "rouge2", "rougeL", "exact_match",
            "token_accuracy", "seconds", "client_seconds", "batches"}
    assert keys <= set(report)
    assert [len(b["references"]) for b in report["batches"]] == [2, 1]
    for b in report["batches"]:
        assert {"references", "predictions", "exact", "seconds"} <= set(b)
        assert len(b["predictions"]) == len(b["references"])
    assert 0.0 <= report["rouge1"] <= 1.0


def test_text_cli_bad_input(tmp_path, capsys):
    code = main(["text", "--model", "gpt2-small-random", "--input", str(tmp_path / "none.txt"),
                 "--batch-size", "1", "--output", str(tmp_path / "r.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_text_baseline_leaves_the_shared_models_gradients_alone(tiny):
    # The app caches the model for every visitor: the race must not fill its .grad
    # (it held 336 MB of weight gradients on gpt2-small-random after a race).
    bundle = tiny("gpt2")
    batch = bundle.encode(["the cat sat on the mat"], labels=[0])
    update = fedclient.compute_update(bundle.model, batch)
    bundle.model.zero_grad(set_to_none=True)
    run_dlg_text(bundle, update, config=TextDlgConfig(iterations=2, seq_len=batch.input_ids.shape[1]))
    assert all(p.grad is None for p in bundle.model.parameters())
