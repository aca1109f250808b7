"""The DAGER benchmark's sentence sets, row selection, targets and tables (no timed runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import dager
from dager.textio import check_sentences, read_sentences

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("dager_bench", ROOT / "benchmarks" / "dager_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def count():
    return bench.gpt2_counter()


@pytest.mark.parametrize(
    ("name", "min_lines", "min_mean", "max_mean"),
    [("short", 64, 7.0, 9.5), ("medium", 128, 13.0, 25.0), ("reviews", 64, 25.0, 40.0)],
)
def test_sets_have_the_lengths_they_stand_for(count, name, min_lines, min_mean, max_mean):
    stats = bench.token_stats(bench.read_set(name), count)
    assert stats.lines >= min_lines
    assert min_mean <= stats.mean_tokens <= max_mean


def test_documents_are_200_to_350_tokens_each(count):
    lines = bench.read_set("documents")
    assert len(lines) >= 4
    assert all(200 <= count(doc) <= 350 for doc in lines)


def test_sets_have_no_duplicate_lines():
    for name in bench.SETS:
        lines = bench.read_set(name)
        assert len(set(lines)) == len(lines), name


@pytest.mark.parametrize("model", ["gpt2-small-random", "minilm-l6"])
def test_every_benchmark_line_passes_the_cli_checks(model):
    bundle = dager.load_model(model)
    for name in ("short", "medium", "reviews", "documents"):
        file = read_sentences(bench.SENTENCES / bench.SETS[name])
        assert not file.blank_lines
        check_sentences(bundle, file.sentences)  # raises on a line the CLI would refuse


def _args(*argv):
    return bench.build_parser().parse_args(list(argv))


def test_rows_select_by_id_substring_model_and_set():
    ids = lambda *argv: [r.id for r in bench.select_rows(_args(*argv))]  # noqa: E731
    assert ids("--rows", "gpt2-med-8") == ["gpt2-med-8"]
    assert ids("--rows", "wide") == ["wide-med-64", "wide-med-128"]
    assert ids("--rows", "documents") == ["gpt2-doc-1", "gpt2-doc-2"]
    assert ids("--rows", "minilm-l6", "gpt2-med-32") == ["minilm-med-4", "minilm-med-8", "gpt2-med-32"]
    assert ids("--quick") == list(bench.QUICK_ROWS)
    assert ids() == [r.id for r in bench.ROWS if r.default]
    with pytest.raises(SystemExit, match="matches no row"):
        bench.select_rows(_args("--rows", "nope"))


def test_every_issue_target_has_a_row():
    targets = {r.id: r.target.text for r in bench.ROWS if r.target is not None}
    assert targets["gpt2-med-8"] == "all exact, <= 0.5 s"
    assert targets["gpt2-med-32"] == "all exact, <= 3 s"
    assert targets["gpt2-rev-16"] == "all exact, <= 4 s"
    assert targets["gpt2-doc-1"] == targets["gpt2-doc-2"] == "all exact, <= 10 s"
    assert targets["wide-med-64"] == ">= 95% exact, <= 60 s, < 16 GB"
    assert targets["wide-med-128"] == ">= 95% exact, <= 180 s, < 16 GB"
    assert bench.ROWS_BY_ID["wide-med-128"].target_for("cuda").text == ">= 95% exact, <= 10 s"
    assert targets["minilm-med-4"] == ">= 95% exact, <= 3 s"
    assert targets["minilm-med-8"] == ">= 90% exact, <= 10 s"
    assert targets["llama-med-8"] == targets["gpt2-next-1"] == targets["gpt2-next-8"] == "all exact"


def _result(**changes):
    row = {
        "id": "wide-med-128", "model": "llama2-7b-width-random", "task": "classification", "set": "medium",
        "batch_size": 128, "batches": 1, "mean_tokens": 15.4, "max_tokens": 22, "exact_match": 0.97,
        "rouge1": 0.99, "rouge2": 0.98, "attack_s": 50.0, "client_s": 3.0, "peak_bytes": 6 * bench.GB,
        "cuda_peak_bytes": 3 * bench.GB,
    }
    return {**row, **changes}


def test_table_checks_targets_per_device_and_states_the_input():
    cols, body = bench._table([_result(), _result(exact_match=0.9)], cuda=False)
    met, tokens = cols.index("met"), cols.index("tokens mean/max")
    assert [r[met] for r in body] == ["yes", "no"]
    assert body[0][tokens] == "15.4 / 22" and body[0][cols.index("set")] == "medium"
    cols, body = bench._table([_result()], cuda=True)
    assert body[0][cols.index("met")] == "no"  # 50 s is over the GPU goal of 10 s
    assert body[0][cols.index("GPU peak")] == "3.00 GB"


def test_a_timed_out_row_is_reported_as_such():
    timed_out = {k: v for k, v in _result().items() if k in ("id", "model", "task", "set", "batch_size")}
    timed_out.update(error="timed out after 5 s", timed_out=True)
    cols, body = bench._table([timed_out], cuda=False)
    assert body[0][cols.index("exact")] == "timed out" and body[0][cols.index("met")] == "no"


def test_compare_prints_both_runs_side_by_side(tmp_path, capsys):
    old = {"meta": {"label": "old"}, "rows": [_result(attack_s=100.0)]}
    new = {"meta": {"label": "new"}, "rows": [_result(attack_s=20.0)]}
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    assert bench.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "attack s old" in out and "attack s new" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("wide-med-128"))
    assert "100.00" in line and "20.00" in line and "5.0x" in line
