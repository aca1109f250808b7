"""The DAGER command line: JSON contract, input rules, bad input, over capacity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dager
import dager.cli as cli
from dager.events import DagerResult
from dager.textio import read_sentences, split_batches
from tests.cli_support import tiny_zoo  # noqa: F401 - a fixture, found by name

CONTRACT_KEYS = {
    "model", "task", "batch_size", "rouge1", "rouge2", "rougeL", "exact_match",
    "token_accuracy", "seconds", "client_seconds", "batches",
}
BATCH_KEYS = {"references", "predictions", "exact", "rank", "total_tokens", "seconds"}
ROOT = Path(__file__).resolve().parents[1]


class FakeEngine:
    """Stands in for dager.attack: returns scripted sentences, checks what it is given."""

    def __init__(self, outputs, *, over_capacity=False, fail_on=()):
        self.outputs = list(outputs)
        self.calls = 0
        self.over_capacity = over_capacity
        self.fail_on = set(fail_on)

    def required_parameters(self, bundle, dropout=False):
        return ["transformer.h.0.attn.c_attn.weight"]

    def run_dager(self, bundle, update, *, config=None):
        self.calls += 1
        # The attacker is handed the model and the shared update, never the batch.
        assert set(update) == {"transformer.h.0.attn.c_attn.weight"}
        assert config is not None and config.device == "cpu"
        if self.calls in self.fail_on:
            raise RuntimeError("search exploded")
        sentences = tuple(self.outputs[self.calls - 1])
        return DagerResult(
            sentences=sentences,
            token_ids=tuple(() for _ in sentences),
            exact=tuple(True for _ in sentences),
            rank=7 * self.calls,
            hidden_size=bundle.hidden_size,
            over_capacity=self.over_capacity,
            budget_exhausted=False,
            seconds=0.0,
        )


def use_engine(monkeypatch, engine: FakeEngine) -> None:
    monkeypatch.setattr(cli, "_engine", lambda: (engine.run_dager, engine.required_parameters))


def write(tmp_path: Path, text: str, name: str = "in.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------
# Input rules


def test_read_sentences_skips_blank_lines_and_strips(tmp_path):
    path = write(tmp_path, "\ufefffirst line  \n\n   \nsecond line\r\nthird\n")
    f = read_sentences(path)
    assert [(s.line, s.text) for s in f.sentences] == [(1, "first line"), (4, "second line"), (5, "third")]
    assert f.blank_lines == (2, 3)


def test_split_batches_keeps_a_short_last_batch():
    f = [object()] * 5
    assert [len(b) for b in split_batches(f, 2)] == [2, 2, 1]
    assert [len(b) for b in split_batches(f, 2, max_batches=2)] == [2, 2]


# ---------------------------------------------------------------------------
# The JSON contract (fake engine: plumbing only)


def test_cli_writes_contract_json_with_fake_engine(tmp_path, capsys, monkeypatch, tiny_zoo):
    lines = ["the cat sat on the mat", "a dog ran home", "", "my key is under the pot", "see you at noon", "bye"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    engine = FakeEngine([
        ["a dog ran home", "the cat sat on the mat"],  # batch 1: both, in the attacker's order
        ["my key is under the mat", "extra guess", "see you at noon"],  # one wrong word, one extra
        [],  # batch 3 (short): nothing recovered
    ])
    use_engine(monkeypatch, engine)
    out_path = tmp_path / "result.json"
    code, out, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 2, "--output", out_path], capsys
    )
    assert code == 0, err
    assert "skipped 1 blank line(s) (3)" in err
    assert "last batch holds 1 sentence(s)" in err
    report = json.loads(out_path.read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["model"] == "tiny-gpt2" and report["task"] == "classification" and report["batch_size"] == 2
    assert len(report["batches"]) == 3 and engine.calls == 3
    for b in report["batches"]:
        assert BATCH_KEYS <= set(b)
        assert len(b["predictions"]) == len(b["exact"]) == len(b["references"])
    b1, b2, b3 = report["batches"]
    assert b1["references"] == ["the cat sat on the mat", "a dog ran home"]
    assert b1["predictions"] == b1["references"] and b1["exact"] == [True, True]
    assert b1["rank"] == 7 and b1["lines"] == [1, 2]
    assert b2["lines"] == [4, 5] and b2["exact"] == [False, True]
    assert b2["predictions"] == ["my key is under the mat", "see you at noon"]
    assert b2["unmatched_predictions"] == ["extra guess"]
    assert b3["references"] == ["bye"] and b3["predictions"] == [""] and b3["exact"] == [False]
    # GPT-2 tokens of "the cat sat on the mat" and "a dog ran home": 6 + 4.
    assert b1["total_tokens"] == 10
    # 3 of 5 sentences exact; ROUGE-1 of the near miss: 5 of 6 unigrams -> 5/6.
    assert report["exact_match"] == pytest.approx(3 / 5)
    assert report["rouge1"] == pytest.approx((1 + 1 + 5 / 6 + 1 + 0) / 5)
    assert report["token_accuracy"] == pytest.approx((6 + 4 + 5 + 4 + 0) / (6 + 4 + 6 + 4 + 1))
    assert report["seconds"] == pytest.approx(sum(b["seconds"] for b in report["batches"]))
    assert report["client_seconds"] > 0
    assert report["failed_batches"] == [] and report["num_exact"] == 3
    # The summary table is printed; the sentences are not, unless --show-text.
    assert "3/5 exact" in out and "the cat sat" not in out + err


def test_max_batches_and_show_text(tmp_path, capsys, monkeypatch, tiny_zoo):
    path = write(tmp_path, "one two\nthree four\nfive six\n")
    use_engine(monkeypatch, FakeEngine([["one two"]]))
    out_path = tmp_path / "r.json"
    code, out, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 1, "--max-batches", 1,
         "--output", out_path, "--show-text"],
        capsys,
    )
    assert code == 0
    assert "the file has 3 sentences; attacking the first 1" in err
    assert "one two" in out
    assert json.loads(out_path.read_text())["sentences_in_file"] == 3


def test_a_failing_batch_is_reported_and_the_run_continues(tmp_path, capsys, monkeypatch, tiny_zoo):
    path = write(tmp_path, "alpha beta\ngamma delta\n")
    use_engine(monkeypatch, FakeEngine([["alpha beta"], None], fail_on={2}))
    out_path = tmp_path / "r.json"
    code, out, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 1, "--output", out_path], capsys
    )
    assert code == 1
    assert "batch 2 (lines 2) failed (RuntimeError: search exploded)" in err
    assert "Traceback" not in err
    report = json.loads(out_path.read_text())
    assert report["failed_batches"] == [2]
    assert report["batches"][1]["error"].startswith("RuntimeError")
    assert report["exact_match"] == 0.5  # the failed batch counts as unrecovered


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing attacked


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[object], str]]:
    good = write(tmp_path, "hello there\n", "good.txt")
    out = tmp_path / "r.json"
    base = ["--batch-size", 1, "--output", out]
    return {
        "missing file": (["--model", "tiny-gpt2", "--input", tmp_path / "nope.txt", *base], "does not exist"),
        "empty file": (["--model", "tiny-gpt2", "--input", write(tmp_path, "", "e.txt"), *base], "holds no sentence"),
        "only blank lines": (
            ["--model", "tiny-gpt2", "--input", write(tmp_path, "\n  \n\n", "b.txt"), *base], "holds no sentence"
        ),
        "folder as input": (["--model", "tiny-gpt2", "--input", tmp_path, *base], "is a folder"),
        "not utf-8": (
            ["--model", "tiny-gpt2", "--input", _binary(tmp_path), *base], "is not UTF-8 text (line 2)"
        ),
        "special token typed": (
            ["--model", "tiny-gpt2", "--input", write(tmp_path, "fine\nsay <|endoftext|> now\n", "s.txt"), *base],
            "cannot represent line 2",
        ),
        "emoji on an encoder": (
            ["--model", "tiny-bert", "--input", write(tmp_path, "ok\nfine\nparty \U0001f600\n", "u.txt"), *base],
            "cannot represent line 3",
        ),
        "too long": (
            ["--model", "tiny-gpt2", "--input", write(tmp_path, "short\n" + "word " * 200 + "\n", "l.txt"), *base],
            "line 2 of the input is longer than the 128 tokens",
        ),
        "unknown model": (["--model", "no-such-model", "--input", good, *base], "is not a test model"),
        "next-token on an encoder": (
            ["--model", "tiny-bert", "--task", "next-token", "--input", good, *base], "only supports classification"
        ),
        "zero batch size": (
            ["--model", "tiny-gpt2", "--input", good, "--batch-size", 0, "--output", out], "must be at least 1"
        ),
        "output folder missing": (
            ["--model", "tiny-gpt2", "--input", good, "--batch-size", 1, "--output", tmp_path / "no" / "r.json"],
            "does not exist: create it first",
        ),
        "output is the input": (
            ["--model", "tiny-gpt2", "--input", good, "--batch-size", 1, "--output", good], "names the input file"
        ),
        "bad budget": (["--model", "tiny-gpt2", "--input", good, *base, "--max-prefixes", "-3"], "must be at least 1"),
    }


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "bin.txt"
    path.write_bytes(b"fine\n\xff\xfe bad\n")
    return path


BAD_CASES = [
    "missing file", "empty file", "only blank lines", "folder as input", "not utf-8",
    "special token typed", "emoji on an encoder", "too long", "unknown model",
    "next-token on an encoder", "zero batch size", "output folder missing", "output is the input", "bad budget",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch, tiny_zoo):
    engine = FakeEngine([])
    use_engine(monkeypatch, engine)
    if case == "next-token on an encoder":
        monkeypatch.setattr(dager, "load_model", lambda *a, **k: _real_load("minilm-l6", "next-token"))
    argv, expected = _bad_cases(tmp_path)[case]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""
    assert engine.calls == 0
    assert not (tmp_path / "r.json").exists()


def _real_load(name, task):
    from dager.zoo import load_model

    return load_model(name, task)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys, tiny_zoo):
    path = write(tmp_path, "hello\n")
    code, _, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 1, "--device", "cuda", "--output", tmp_path / "r.json"],
        capsys,
    )
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dager", "--model", "gpt2-small-random", "--input", str(tmp_path / "missing.txt"),
         "--batch-size", "4", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dager: error: Input file {str(tmp_path / 'missing.txt')!r} does not exist: check the path given to --input."
    ]


# ---------------------------------------------------------------------------
# Capacity


def test_far_over_capacity_is_refused_then_flagged_when_allowed(tmp_path, capsys, monkeypatch, tiny_zoo):
    # Tiny GPT-2 has d = 64: 12 distinct sentences of 10 words hold about 120 distinct
    # prefixes, over 1.5 x 64 = 96.
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [" ".join(words[i:] + words[:i])[:60] for i in range(12)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    engine = FakeEngine([lines[:3]], over_capacity=True)
    use_engine(monkeypatch, engine)
    out_path = tmp_path / "r.json"
    argv = ["--model", "tiny-gpt2", "--input", path, "--batch-size", 12, "--output", out_path]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and engine.calls == 0
    assert "far over what tiny-gpt2 (width d=64) can separate exactly" in err
    assert "use --batch-size" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli([*argv, "--allow-over-capacity"], capsys)
    assert code == 0, err
    report = json.loads(out_path.read_text())
    assert report["over_capacity"] is True and report["batches"][0]["over_capacity"] is True
    assert report["batches"][0]["distinct_prefixes"] > 96
    assert "exceed the model's capacity" in err and "over_capacity" in out
    assert report["exact_match"] == pytest.approx(3 / 12)


def test_defense_specs_reach_the_client_and_the_json(tmp_path, capsys, monkeypatch, tiny_zoo):
    path = write(tmp_path, "one two\n")
    seen = []
    engine = FakeEngine([["one two"]])
    original = engine.run_dager

    def run(bundle, update, *, config=None):
        seen.append(update.defenses)
        return original(bundle, update, config=config)

    monkeypatch.setattr(cli, "_engine", lambda: (run, engine.required_parameters))
    out_path = tmp_path / "r.json"
    code, _, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 1, "--output", out_path, "--defense", "fp16"], capsys
    )
    assert code == 0, err
    assert seen == [("fp16",)]  # the attacker received the defended update
    report = json.loads(out_path.read_text())
    assert report["defense"] == ["fp16"] and "fp16" in report["defense_description"]
    assert report["epsilon"] is None
    code, _, err = run_cli(
        ["--model", "tiny-gpt2", "--input", path, "--batch-size", 1, "--output", out_path, "--defense", "nois:1"], capsys
    )
    assert code == 2 and "Unknown defense 'nois'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# The real engine on tiny models, end to end

SHORT = ["the cat sat on the mat", "a dog ran home", "Hello private world", "Gradients leak data."]


@pytest.mark.parametrize(("family", "task"), [("gpt2", "classification"), ("llama", "next-token")])
def test_cli_real_engine_recovers_tiny_batches_exactly(family, task, tmp_path, capsys, tiny_zoo):
    path = write(tmp_path, "\n".join(SHORT) + "\n")
    out_path = tmp_path / "r.json"
    code, out, err = run_cli(
        ["--model", f"tiny-{family}", "--task", task, "--input", path, "--batch-size", 2, "--output", out_path],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out_path.read_text())
    assert CONTRACT_KEYS <= set(report) and report["task"] == task
    assert report["exact_match"] == 1.0 and report["rouge1"] == 1.0 and report["token_accuracy"] == 1.0
    assert [b["references"] for b in report["batches"]] == [SHORT[:2], SHORT[2:]]
    for b in report["batches"]:
        assert BATCH_KEYS <= set(b)
        assert b["predictions"] == b["references"] and b["exact"] == [True, True]
        assert b["verified"] == [True, True] and b["error"] is None
        assert 0 < b["rank"] <= 64 and b["seconds"] > 0
    if family == "gpt2":
        # Learned positions: the rank is the number of distinct (token, position) inputs.
        assert [b["rank"] for b in report["batches"]] == [b["total_tokens"] for b in report["batches"]]
    assert report["seconds"] > 0 and report["client_seconds"] > 0
    assert "4/4 exact" in out


def test_cli_real_engine_uncased_encoder_is_exact_up_to_its_normalisation(tmp_path, capsys, tiny_zoo):
    path = write(tmp_path, "Hello private world\n")
    out_path = tmp_path / "r.json"
    code, _, err = run_cli(
        ["--model", "tiny-bert", "--input", path, "--batch-size", 1, "--output", out_path], capsys
    )
    assert code == 0, err
    b = json.loads(out_path.read_text())["batches"][0]
    # The uncased WordPiece model cannot see case: its recovery is lowercase, and the
    # evaluation compares both through the tokenizer's normalisation.
    assert b["predictions"] == ["hello private world"] and b["exact"] == [True]


def test_cli_real_engine_over_capacity_best_effort_completes(tmp_path, capsys, tiny_zoo):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [" ".join(words[i:] + words[:i])[:60] for i in range(12)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    out_path = tmp_path / "r.json"
    argv = ["--model", "tiny-gpt2", "--input", path, "--batch-size", 12, "--output", out_path,
            "--allow-over-capacity", "--max-prefixes", 64]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads(out_path.read_text())
    b = report["batches"][0]
    assert b["error"] is None and b["capacity_exceeded"] is True and report["capacity_exceeded"] is True
    assert b["distinct_prefixes"] > 96 and b["rank"] <= 64
    assert len(b["predictions"]) == 12 and report["exact_match"] < 1.0
    assert "over_capacity" in out


# ---------------------------------------------------------------------------
# The benchmark script's grid and table (its runs are not timed in tests)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dager_bench", ROOT / "benchmarks" / "dager_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_grid_and_targets():
    bench = _bench()
    parse = bench.build_parser().parse_args
    assert bench._grid(parse([])) == list(bench.DEFAULT_GRID)
    assert ("gpt2-small-random", "classification", 32) in bench.DEFAULT_GRID
    grid = bench._grid(parse(["--models", "gpt2-small-random", "minilm-l6", "--tasks", "next-token"]))
    assert grid == [("gpt2-small-random", "next-token", 8)]  # the encoder has no next-token task
    row = {
        "model": "gpt2-small-random", "task": "classification", "batch_size": 8, "batches": 1,
        "exact_match": 1.0, "rouge1": 1.0, "rouge2": 1.0, "attack_s": 0.5, "client_s": 0.1,
        "peak_bytes": 2 * bench.GB, "cuda_peak_bytes": None,
    }
    slow = {**row, "attack_s": 0.9}
    cols, body = bench._table([row, slow], cuda=False)
    met = cols.index("met")
    assert [r[met] for r in body] == ["yes", "no"]
    assert body[0][cols.index("peak RSS")] == "2.00 GB"
