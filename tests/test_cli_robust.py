"""The command lines are robust and private (issues 13 and 14).

Output paths are checked before any work, results are written with mode 0600 and kept
when the chosen path fails at the end, interrupts keep finished work, and argument errors
come before torch loads. Bad input and the threat-model checks are in test_cli_input.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dager
import dlg.cli as dlg_cli
from dlg.events import TextDlgResult
from dlg.text import TextDlgConfig
from tests.cli_support import (  # noqa: F401 - fixtures are found by name in this module
    ROOT, SENTENCES, SMILEY, Engine, _restore_threads, dager_cli, mode, one_line, sentences, tiny_zoo, use,
)
from tests.conftest import tiny_bundle

# --------------------------------------------------------------------------- output paths


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    return {
        "missing folder": (tmp_path / "no" / "such" / "out.x", "does not exist: create it first"),
        "under a file": (a_file / "out.x", "which is a file, not a folder"),
        "into /proc": (Path("/proc/out.x"), "Cannot write to the folder '/proc'"),
        "a folder": (tmp_path, "is a folder"),
        "a device": (Path("/dev/null"), "not a regular file"),
    }


def _argv(kind: str, tmp_path: Path, path: Path) -> list[str]:
    text = str(sentences(tmp_path))
    good_json = str(tmp_path / "r.json")
    if kind == "dager --output":
        return ["dager", "--model", "tiny-gpt2", "--input", text, "--batch-size", "2", "--output", str(path)]
    if kind == "dager sweep --csv":
        return ["dager", "sweep", "--model", "tiny-gpt2", "--input", text, "--batch-size", "2",
                "--grid", "noise", "--csv", str(path)]
    if kind == "dager sweep --plot":
        return ["dager", "sweep", "--model", "tiny-gpt2", "--input", text, "--batch-size", "2",
                "--grid", "noise", "--csv", str(tmp_path / "s.csv"), "--plot", str(path)]
    if kind == "dlg --output":
        return ["dlg", "--image", str(SMILEY), "--iterations", "2", "--output", str(path)]
    if kind == "dlg --gif":
        return ["dlg", "--image", str(SMILEY), "--iterations", "2", "--output", good_json, "--gif", str(path)]
    if kind == "dlg text --output":
        return ["dlg", "text", "--model", "tiny-gpt2", "--input", text, "--batch-size", "2", "--output", str(path)]
    if kind == "dlg sweep --csv":
        return ["dlg", "sweep", "--image", str(SMILEY), "--grid", "noise", "--csv", str(path)]
    raise ValueError(kind)


OUTPUT_OPTIONS = [
    "dager --output", "dager sweep --csv", "dager sweep --plot", "dlg --output", "dlg --gif",
    "dlg text --output", "dlg sweep --csv",
]


@pytest.mark.parametrize("kind", OUTPUT_OPTIONS)
@pytest.mark.parametrize("case", ["missing folder", "under a file", "into /proc", "a folder", "a device"])
def test_unwritable_outputs_are_refused_before_any_work(kind, case, tmp_path, capsys, monkeypatch):
    loaded: list[str] = []
    monkeypatch.setattr(dager, "load_model", lambda *a, **k: loaded.append("model") or tiny_bundle("gpt2"))
    import dlg.attack

    monkeypatch.setattr(dlg.attack, "run_dlg", lambda *a, **k: loaded.append("attack"))
    path, expected = _bad_paths(tmp_path)[case]
    prog, *argv = _argv(kind, tmp_path, path)
    code = (dager_cli if prog == "dager" else dlg_cli).main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert expected in line and line.startswith(f"{prog}: error:")
    assert loaded == [] and out == ""
    assert not (tmp_path / "r.json").exists()


def test_argument_errors_come_before_torch_loads(tmp_path):
    """Each bad invocation exits 2 with one line and leaves torch (and friends) unimported."""
    text = sentences(tmp_path)
    script = f"""
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
from dager.cli import main as dager_main
from dlg.cli import main as dlg_main
cases = [
    (dager_main, ["--model", "gpt2-small-random", "--input", {str(text)!r}, "--batch-size", "0", "--output", "r.json"]),
    (dager_main, ["--model", "gpt2-small-random", "--input", {str(text)!r}, "--batch-size", "1", "--output", "/proc/r.json"]),
    (dager_main, ["--model", "gpt2-small-random", "--input", "missing.txt", "--batch-size", "1", "--output", "r.json"]),
    (dager_main, ["--model", "gpt2-small-random", "--input", {str(text)!r}, "--batch-size", "1", "--output", "r.json", "--defense", ""]),
    (dager_main, ["sweep", "--model", "gpt2-small-random", "--input", {str(text)!r}, "--batch-size", "1", "--grid", "bogus", "--csv", "s.csv"]),
    (dlg_main, ["--image", {str(SMILEY)!r}, "--label", "7.5", "--output", "r.json"]),
    (dlg_main, ["--image", "missing.png", "--output", "r.json"]),
    (dlg_main, ["text", "--model", "gpt2-small-random", "--input", {str(text)!r}, "--batch-size", "1", "--output", "r.json", "--defense", " "]),
]
codes = [main(argv) for main, argv in cases]
heavy = sorted(m for m in ("torch", "transformers", "gradio", "plotly") if m in sys.modules)
print(codes, heavy, os.environ.get("OMP_WAIT_POLICY"))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    # Every case answered with exit 2, torch never imported, and the console-script entry
    # applied the CPU thread policy first.
    assert proc.stdout.strip() == "[2, 2, 2, 2, 2, 2, 2, 2] [] PASSIVE"
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 8 and all(": error:" in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "whole-number class id" in errors[5] and "empty spec" in errors[7]


def test_cli_choice_lists_match_the_libraries():
    import dlg.attack
    import dlg.models
    from fedclient.sweep import GRIDS
    from labcli.sweep import GRID_NAMES

    assert dlg_cli.IMAGE_METHODS == dlg.attack.METHODS
    assert dlg_cli.IMAGE_MODELS == tuple(dlg.models.MODELS)
    assert GRID_NAMES == tuple(GRIDS)


# --------------------------------------------------------------------------- private outputs


def test_result_json_is_private_even_over_a_readable_file(tmp_path, capsys, monkeypatch, tiny_zoo):
    use(monkeypatch, Engine())
    out = tmp_path / "r.json"
    out.write_text("old")
    out.chmod(0o644)
    old_umask = os.umask(0)  # the most permissive umask: the mode must still be 0600
    try:
        code = dager_cli.main(["--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "2",
                               "--output", str(out), "--quiet"])
    finally:
        os.umask(old_umask)
    assert code == 0
    assert mode(out) == 0o600
    assert json.loads(out.read_text())["batches"][0]["references"] == SENTENCES[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "r.json"]  # no scratch left


def test_dlg_json_and_gif_are_private(tmp_path, capsys):
    out, gif = tmp_path / "r.json", tmp_path / "o.gif"
    code = dlg_cli.main(["--image", str(SMILEY), "--method", "idlg", "--iterations", "2", "--restarts", "1",
                         "--output", str(out), "--gif", str(gif)])
    assert code == 0
    assert mode(out) == 0o600 and mode(gif) == 0o600
    assert json.loads(out.read_text())["batch_size"] == 1


def test_sweep_csv_and_plot_are_private_and_an_interrupt_keeps_the_finished_rows(
    tmp_path, capsys, monkeypatch, tiny_zoo
):
    use(monkeypatch, Engine())
    csv_path, plot = tmp_path / "s.csv", tmp_path / "s.html"
    argv = ["sweep", "--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "2",
            "--grid", "noise", "--values", "0,1e-3,1e-2", "--csv", str(csv_path), "--plot", str(plot)]
    assert dager_cli.main(argv) == 0
    assert mode(csv_path) == 0o600 and mode(plot) == 0o600
    csv_path.unlink()

    def stop():
        raise KeyboardInterrupt

    use(monkeypatch, Engine(stop, when=2))
    code = dager_cli.main(argv)
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted after 1 of 3 point(s)" in err
    with csv_path.open(newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["none"]
    assert mode(csv_path) == 0o600


# --------------------------------------------------------------------------- write failures


def test_results_survive_their_folder_vanishing_during_the_run(tmp_path, capsys, monkeypatch, tiny_zoo):
    folder = tmp_path / "results"
    folder.mkdir()
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    use(monkeypatch, Engine(lambda: shutil.rmtree(folder), when=1))
    code = dager_cli.main(["--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "2",
                           "--output", str(folder / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    line = one_line(err)
    assert "could not write --output" in line and "written to" in line
    (kept,) = list(here.iterdir())
    assert kept.name.startswith("dager-") and kept.name.endswith("r.json") and str(kept) in line
    assert mode(kept) == 0o600
    assert json.loads(kept.read_text())["batches"][1]["references"] == SENTENCES[2:]


def test_json_goes_to_stdout_when_no_file_can_be_written(tmp_path, monkeypatch, capsys):
    from labcli import outputs

    def refuse(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_private_text", refuse)
    saved = outputs.save_json(tmp_path / "r.json", '{"a": 1}\n', prog="dager")
    assert saved.to_stdout and saved.error == "No space left on device"
    assert capsys.readouterr().out == '{"a": 1}\n\n'
    assert "printed to standard output" in outputs.lost_sentence("--output", tmp_path / "r.json", saved)


# --------------------------------------------------------------------------- interrupts


def test_sigterm_writes_a_partial_json_marked_interrupted(tmp_path, capsys, monkeypatch, tiny_zoo):
    use(monkeypatch, Engine(lambda: os.kill(os.getpid(), signal.SIGTERM), when=2))
    out = tmp_path / "r.json"
    before = signal.getsignal(signal.SIGTERM)
    code = dager_cli.main(["--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "1",
                           "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "terminated after 1 of 4 batch(es)" in err
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and len(report["batches"]) == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


@pytest.mark.parametrize("prog", ["dager", "dlg text"])
def test_ctrl_c_during_start_up_is_one_line(prog, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dager, "load_model", interrupted)
    argv = ["--model", "gpt2-small-random", "--input", str(sentences(tmp_path)), "--batch-size", "1",
            "--output", str(tmp_path / "r.json")]
    code = dager_cli.main(argv) if prog == "dager" else dlg_cli.main(["text", *argv])
    assert code == 130
    assert one_line(capsys.readouterr().err) == f"{prog.split()[0]}: interrupted."
    assert not (tmp_path / "r.json").exists()


def test_dlg_text_ctrl_c_writes_the_finished_batches(tmp_path, capsys, monkeypatch, tiny_zoo):
    import dlg.text

    calls: list[TextDlgConfig] = []

    def fake(bundle, update, *, config):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return TextDlgResult(sentences=("x", "y"), token_ids=((), ()), losses=(1.0,), seconds=0.1,
                             seq_len=7, seq_len_source="inferred")

    monkeypatch.setattr(dlg.text, "run_dlg_text", fake)
    out = tmp_path / "r.json"
    code = dlg_cli.main(["text", "--model", "tiny-gpt2", "--input", str(sentences(tmp_path)), "--batch-size", "2",
                         "--iterations", "2", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "interrupted after 1 of 2 batch(es)" in err
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and [b["references"] for b in report["batches"]] == [SENTENCES[:2]]
    assert report["batches"][0]["seq_len_source"] == "inferred"
    assert mode(out) == 0o600
    # The CLI no longer hands the attack the private batch's length.
    assert all(c.seq_len is None for c in calls)


@pytest.mark.parametrize("prog", ["dager", "dlg text"])
def test_an_interrupt_a_library_rewrapped_is_still_an_interrupt(prog, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        try:  # what transformers' lazy import does to an interrupt during `import`
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:
            raise ModuleNotFoundError("Could not import module 'GPT2ForSequenceClassification'.") from None

    monkeypatch.setattr(dager, "load_model", load)
    argv = ["--model", "gpt2-small-random", "--input", str(sentences(tmp_path)), "--batch-size", "1",
            "--output", str(tmp_path / "r.json")]
    code = dager_cli.main(argv) if prog == "dager" else dlg_cli.main(["text", *argv])
    assert code == 143
    assert one_line(capsys.readouterr().err) == f"{prog.split()[0]}: terminated."
