"""Defense options and defense sweeps on both command lines (issue 6)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import dager
import dager.cli as dager_cli
import dlg.attack
import dlg.cli as dlg_cli
from fedclient.defenses import DPSGD
from fedclient.errors import UnknownModelError
from tests.conftest import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
SMILEY = ROOT / "assets" / "images" / "smiley.png"
SENTENCES = [
    "The patient was admitted on Monday.",
    "My password is hunter2.",
    "Alice sent Bob the report.",
]
SWEEP_COLUMNS = {"label", "axis", "strength", "defense", "utility_cosine", "utility_norm_ratio", "seconds"}


@pytest.fixture
def tiny_zoo(monkeypatch):
    """dager.load_model serves tiny seeded models under the name 'tiny-<family>'."""

    def load(name: str, task: str = "classification", *, device: str = "cpu"):
        if not name.startswith("tiny-"):
            raise UnknownModelError(f"{name!r} is not a test model.")
        return tiny_bundle(name.removeprefix("tiny-"), task)

    monkeypatch.setattr(dager, "load_model", load)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _sentences(tmp_path: Path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- DAGER sweep


def test_dager_sweep_writes_one_row_per_point_and_noise_breaks_exact_recovery(tiny_zoo, tmp_path, capsys):
    out, plot = tmp_path / "noise.csv", tmp_path / "noise.html"
    code = dager_cli.main([
        "sweep", "--model", "tiny-gpt2", "--input", str(_sentences(tmp_path)), "--batch-size", "3",
        "--grid", "noise", "--values", "0,1e-6,1", "--csv", str(out), "--plot", str(plot),
    ])
    printed = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["none", "sigma=1e-06", "sigma=1"]
    assert SWEEP_COLUMNS | {"rouge1", "rouge2", "exact_match", "rank"} <= set(rows[0])
    # No defense: DAGER recovers the batch exactly; sigma=1 noise swamps the update.
    assert float(rows[0]["exact_match"]) == 1.0 and float(rows[0]["rouge1"]) == 1.0
    assert float(rows[0]["utility_cosine"]) == pytest.approx(1.0)
    assert float(rows[2]["exact_match"]) < 1.0
    assert float(rows[2]["utility_cosine"]) < float(rows[1]["utility_cosine"]) <= 1.0 + 1e-9
    html = plot.read_text(encoding="utf-8")
    assert "<html>" in html and "sigma=1e-06" in html and "rouge1" in html
    assert "sigma=1e-06" in printed and "rouge1" in printed
    # Nothing the user typed is printed: the table carries scores, not sentences.
    assert not any(s in printed for s in SENTENCES)


def test_dager_without_subcommand_keeps_its_json_contract(tiny_zoo, tmp_path):
    out = tmp_path / "r.json"
    code = dager_cli.main([
        "--model", "tiny-gpt2", "--input", str(_sentences(tmp_path)), "--batch-size", "3",
        "--defense", "noise:var=1e-4", "--output", str(out), "--quiet",
    ])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["defense"] == ["noise:var=1e-4"]
    assert "standard deviation 0.01" in report["defense_description"]
    assert {"rouge1", "exact_match", "batches", "epsilon"} <= set(report)


@pytest.mark.parametrize("cli", [dager_cli, dlg_cli])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", "bogus"], "Unknown --grid 'bogus': use one of noise, prune, mask, precision, dp"),
        (["--grid", "precision", "--values", "1,2"], "fixed levels"),
        (["--grid", "prune", "--values", "0.1", "--variance"], "--variance applies only to --grid noise"),
        (["--grid", "prune", "--values", "0,1.5"], "fraction"),
    ],
)
def test_bad_sweep_options_exit_2_with_one_line(cli, tiny_zoo, tmp_path, capsys, extra, message):
    out = tmp_path / "s.csv"
    if cli is dager_cli:
        head = ["sweep", "--model", "tiny-gpt2", "--input", str(_sentences(tmp_path)), "--batch-size", "2"]
    else:
        head = ["sweep", "--image", str(SMILEY), "--iterations", "1"]
    code = cli.main([*head, *extra, "--csv", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- DLG sweep


def test_dlg_sweep_writes_one_row_per_point(tmp_path, capsys):
    out = tmp_path / "prune.csv"
    code = dlg_cli.main([
        "sweep", "--image", str(SMILEY), "--label", "3", "--iterations", "2", "--restarts", "1",
        "--grid", "prune", "--values", "0,0.5,0.9", "--csv", str(out),
    ])
    printed = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["none", "prune 50%", "prune 90%"]
    assert SWEEP_COLUMNS | {"psnr", "ssim", "label_accuracy", "stop_reason"} <= set(rows[0])
    assert [r["defense"] for r in rows] == ["none", "prune:0.5", "prune:0.9"]
    assert all(math.isfinite(float(r["psnr"])) for r in rows)
    # Pruning more of the update moves it further from the clean gradient.
    cos = [float(r["utility_cosine"]) for r in rows]
    assert cos[0] == pytest.approx(1.0) and cos[0] > cos[1] > cos[2] > 0
    assert "prune 90%" in printed and "psnr" in printed


def test_dlg_dp_sweep_reports_epsilon(tmp_path):
    out = tmp_path / "dp.csv"
    code = dlg_cli.main([
        "sweep", "--image", str(SMILEY), "--label", "1", "--iterations", "1", "--restarts", "1",
        "--grid", "dp", "--values", "1.0", "--csv", str(out),
    ])
    assert code == 0
    rows = _rows(out)
    assert [r["label"].split(" ")[0] for r in rows] == ["none", "z=1"]
    assert rows[0]["epsilon"] == ""
    assert float(rows[1]["epsilon"]) == pytest.approx(DPSGD(clip_norm=1.0, noise_multiplier=1.0).epsilon)


# --------------------------------------------------------------------------- dlg --defense


def test_dlg_defense_reaches_the_update_and_the_json(tmp_path, monkeypatch):
    seen = []
    real = dlg.attack.run_dlg

    def spy(model, update, **kwargs):
        seen.append(update)
        return real(model, update, **kwargs)

    monkeypatch.setattr(dlg.attack, "run_dlg", spy)
    out = tmp_path / "r.json"
    code = dlg_cli.main([
        "--image", str(SMILEY), "--label", "2", "--iterations", "1", "--restarts", "1",
        "--defense", "prune:0.5", "--defense", "noise:var=0", "--output", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["defense"] == ["prune:0.5", "noise:var=0"]
    assert "Pruning: the 50% smallest-magnitude" in report["defense_description"]
    assert report["epsilon"] is None
    # The attacker was handed the pruned update: half of each tensor is zero.
    (update,) = seen
    for name, g in update.items():
        assert int((g == 0).sum()) >= g.numel() // 2, name


def test_dlg_dp_defense_records_epsilon(tmp_path):
    out = tmp_path / "r.json"
    code = dlg_cli.main([
        "--image", str(SMILEY), "--label", "2", "--iterations", "1", "--restarts", "1",
        "--defense", "dp:clip=1.0,noise=1.0", "--output", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["epsilon"] == pytest.approx(DPSGD(clip_norm=1.0, noise_multiplier=1.0).epsilon)
    assert report["defense_description"].startswith("DP-SGD")


def test_dlg_text_defense_in_json(tiny_zoo, tmp_path):
    out = tmp_path / "t.json"
    code = dlg_cli.main([
        "text", "--model", "tiny-gpt2", "--input", str(_sentences(tmp_path)), "--batch-size", "2",
        "--max-batches", "1", "--iterations", "1", "--defense", "fp16", "--output", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["defense"] == ["fp16"] and "fp16" in report["defense_description"]
    assert report["epsilon"] is None and len(report["batches"]) == 1


def test_dlg_bad_defense_exits_2(tmp_path, capsys):
    code = dlg_cli.main(["--image", str(SMILEY), "--defense", "prune:1.5", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "pruning fraction" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
