"""Command-line input rules (issues 12 and 13): bad defense specs, labels, model folders and
unrepresentable text are one sentence before any work; the shared text rule; and the threat
model's two leaks closed (the text baseline infers the sequence length from the update, and
DP-SGD's clipped fraction stays with the client).
"""

from __future__ import annotations

import pytest

import dlg.cli as dlg_cli
import fedclient
from dager.textio import UntokenizableTextError, check_text, unrepresentable
from dlg.text import TextDlgConfig, infer_seq_len, run_dlg_text
from fedclient.errors import InvalidConfigError
from tests.cli_support import (  # noqa: F401 - fixtures are found by name in this module
    PARAM, SENTENCES, SMILEY, Engine, _restore_threads, dager_cli, one_line, sentences, tiny_zoo, use,
)
from tests.conftest import tiny_bundle


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "empty spec"),
        ("dp:clip=1,noise=1,steps=1000000,accountant=prv", "from 1 to 100,000"),
        ("dp:clip=1,noise=0.3,steps=1000,accountant=prv", "use accountant=rdp"),
        ("noise:1e9", "from 0 to 1e+06"),
        ("noise:nan", "finite number"),
        ("fedavg:steps=50000,lr=0.1", "from 1 to 10,000"),
        ("secagg:clients=5000", "from 1 to 1,000"),
    ],
)
def test_bad_defense_specs_are_one_sentence(spec, expected, tmp_path, capsys, monkeypatch, tiny_zoo):
    engine = Engine()
    use(monkeypatch, engine)
    code = dager_cli.main(["--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "2",
                           "--output", str(tmp_path / "r.json"), "--defense", spec])
    assert code == 2
    assert expected in one_line(capsys.readouterr().err)
    assert engine.calls == 0 and not (tmp_path / "r.json").exists()


def test_empty_spec_is_refused_by_the_library_too():
    from fedclient.defenses import parse_defenses

    with pytest.raises(InvalidConfigError, match="empty"):
        parse_defenses([""])
    with pytest.raises(InvalidConfigError, match="empty"):
        parse_defenses(["noise:1e-3", " ; "])
    assert parse_defenses([]) is None and parse_defenses(None) is None


def test_an_accountant_failure_becomes_one_sentence(monkeypatch):
    from opacus.accountants import RDPAccountant

    from fedclient.dp import dp_epsilon

    def boom(self, delta, **kwargs):
        raise MemoryError

    monkeypatch.setattr(RDPAccountant, "get_epsilon", boom)
    with pytest.raises(InvalidConfigError, match="could not compute epsilon.*MemoryError"):
        dp_epsilon(noise_multiplier=0.77, sample_rate=0.5, steps=13, delta=1e-6)


def test_a_large_rdp_budget_is_accounted_at_once():
    from opacus.accountants import RDPAccountant

    from fedclient.dp import dp_epsilon

    acc = RDPAccountant()
    for _ in range(500):
        acc.step(noise_multiplier=1.3, sample_rate=0.02)
    assert dp_epsilon(noise_multiplier=1.3, sample_rate=0.02, steps=500, delta=1e-5) == pytest.approx(
        acc.get_epsilon(delta=1e-5), rel=1e-12
    )


@pytest.mark.parametrize("label", ["7.5", "7.0", "x", "-1"])
def test_non_integer_or_negative_labels_are_refused(label, tmp_path, capsys):
    code = dlg_cli.main(["--image", str(SMILEY), "--label", label, "--output", str(tmp_path / "r.json")])
    assert code == 2
    assert "class id" in one_line(capsys.readouterr().err)


def test_model_folder_without_config_is_one_sentence(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    code = dager_cli.main(["--model", str(folder), "--input", str(sentences(tmp_path)), "--batch-size", "1",
                           "--output", str(tmp_path / "r.json"), "--quiet"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "is a folder but has no config.json" in line and "gpt2-small-random" in line


# --------------------------------------------------------------------------- shared text rule


def test_unrepresentable_names_the_characters():
    bert, gpt2 = tiny_bundle("bert"), tiny_bundle("gpt2")
    assert unrepresentable(bert, "party \U0001f600 now") == ("\U0001f600",)
    assert unrepresentable(bert, "hello [SEP] there") == ("[SEP]",)
    assert unrepresentable(bert, "Café crème") == ()  # uncased: accents are normalised away, not lost
    assert unrepresentable(gpt2, "party \U0001f600 now") == ()  # byte-level BPE represents every character
    assert unrepresentable(gpt2, "say <|endoftext|> now") == ("<|endoftext|>",)
    with pytest.raises(UntokenizableTextError, match=r"sentence 2: '\U0001f600' \(U\+1F600\)"):
        check_text(bert, "party \U0001f600", where="sentence 2")


@pytest.mark.parametrize("prog", ["dager", "dlg text"])
def test_both_clis_refuse_an_emoji_on_an_encoder_naming_it(prog, tmp_path, capsys, monkeypatch, tiny_zoo):
    use(monkeypatch, Engine())
    argv = ["--model", "tiny-bert", "--input", str(sentences(tmp_path, ["ok", "party \U0001f600"])),
            "--batch-size", "2", "--output", str(tmp_path / "r.json")]
    code = dager_cli.main(argv) if prog == "dager" else dlg_cli.main(["text", *argv])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot represent line 2" in line and "U+1F600" in line


# --------------------------------------------------------------------------- threat model


@pytest.mark.parametrize(("family", "task"), [("gpt2", "classification"), ("gpt2", "next-token"), ("bert", "classification")])
def test_seq_len_is_inferred_from_the_update(family, task):
    bundle = tiny_bundle(family, task)
    batch = bundle.encode(["the cat sat on the mat today", "hi there"], seed=0)
    update = fedclient.compute_update(bundle.model, batch)
    assert infer_seq_len(bundle, update) == batch.input_ids.shape[1]


def test_seq_len_is_a_marked_guess_when_the_update_cannot_tell():
    gpt2 = tiny_bundle("gpt2")
    batch = gpt2.encode(["the cat sat on the mat today", "hi there"], seed=0)
    from fedclient.defenses import GaussianNoise

    noisy = fedclient.compute_update(gpt2.model, batch, defense=GaussianNoise(1e-3))
    assert infer_seq_len(gpt2, noisy) is None  # noise fills the zero rows

    llama = tiny_bundle("llama")  # RoPE: no position embedding
    batch = llama.encode(["the cat sat on the mat", "hi"], seed=0)
    update = fedclient.compute_update(llama.model, batch)
    assert infer_seq_len(llama, update) is None
    result = run_dlg_text(llama, update, config=TextDlgConfig(iterations=2))
    assert result.seq_len_source == "guessed" and result.seq_len >= 2
    assert len(result.token_ids[0]) == result.seq_len

    given = run_dlg_text(llama, update, config=TextDlgConfig(iterations=2, seq_len=5))
    assert (given.seq_len, given.seq_len_source) == (5, "given")


def test_text_baseline_uses_the_inferred_length():
    bundle = tiny_bundle("gpt2")
    batch = bundle.encode(["the cat sat on the mat today", "hi there"], seed=0)
    update = fedclient.compute_update(bundle.model, batch)
    result = run_dlg_text(bundle, update, config=TextDlgConfig(iterations=2))
    assert (result.seq_len, result.seq_len_source) == (batch.input_ids.shape[1], "inferred")
    assert all(len(row) == batch.input_ids.shape[1] for row in result.token_ids)


def test_clipped_fraction_stays_with_the_client(tiny_zoo):
    from fedclient.client import ClientReport
    from fedclient.defenses import DPSGD, SecureAggregation, compose

    bundle = tiny_bundle("gpt2")
    batch = bundle.encode(SENTENCES, seed=0)
    report = ClientReport()
    d = compose(DPSGD(clip_norm=1e-6, noise_multiplier=0.0), SecureAggregation(clients=2))
    update = fedclient.compute_update(bundle.model, batch, parameters=[PARAM], defense=d, report=report)
    assert report.diagnostics["clipped_fraction"] == 1.0
    assert "clipped_fraction" not in update.info
    # Without a report the statistic is simply not kept.
    plain = fedclient.compute_update(bundle.model, batch, parameters=[PARAM], defense=DPSGD(clip_norm=1.0))
    assert "clipped_fraction" not in plain.info
