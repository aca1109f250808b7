"""Shared pieces of the command-line tests (test_cli_robust.py, test_cli_input.py).

Imported by those modules, fixtures included (pytest finds a fixture bound in a test module's
namespace); not a test module itself.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

import dager
import dager.cli as dager_cli
from dager.events import DagerResult
from fedclient.errors import UnknownModelError
from tests.conftest import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
SMILEY = ROOT / "assets" / "images" / "smiley.png"
SENTENCES = ["the cat sat on the mat", "gradients leak data", "hello world", "my password is hunter2"]
PARAM = "transformer.h.0.attn.c_attn.weight"


@pytest.fixture(autouse=True)
def _restore_threads():
    # dlg's CLI sets one torch thread for the process; keep that from leaking into other tests.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_zoo(monkeypatch):
    """dager.load_model serves tiny seeded models under the name 'tiny-<family>'."""

    def load(name: str, task: str = "classification", *, device: str = "cpu"):
        if not name.startswith("tiny-"):
            raise UnknownModelError(f"{name!r} is not a test model.")
        return tiny_bundle(name.removeprefix("tiny-"), task)

    monkeypatch.setattr(dager, "load_model", load)


class Engine:
    """A scripted DAGER: echoes nothing useful, but can act during batch ``when``."""

    def __init__(self, action=None, when: int = 2):
        self.calls = 0
        self.action = action
        self.when = when

    def required_parameters(self, bundle, dropout=False):
        return [PARAM]

    def run_dager(self, bundle, update, *, config=None):
        self.calls += 1
        if self.action is not None and self.calls == self.when:
            self.action()
        return DagerResult(
            sentences=("recovered",), token_ids=((),), exact=(False,), rank=3,
            hidden_size=bundle.hidden_size, over_capacity=False, budget_exhausted=False, seconds=0.0,
        )


def use(monkeypatch, engine: Engine) -> None:
    monkeypatch.setattr(dager_cli, "_engine", lambda: (engine.run_dager, engine.required_parameters))


def sentences(tmp_path: Path, lines=SENTENCES) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
