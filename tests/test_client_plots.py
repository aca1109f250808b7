"""The spectrum plot's capacity line on LoRA runs (issue 11): the adapters' cap, not d."""

from __future__ import annotations

import torch

from dager.events import AttackStarted, SpectrumComputed
from labui.plots import spectrum_figure
from labui.text_view import DagerView


def _labels(fig) -> set[str]:
    return {a.text for a in fig.layout.annotations}


def test_spectrum_capacity_line_is_the_lora_capacity_when_given():
    values = [10.0 ** -i for i in range(64)]
    lora = spectrum_figure({1: (values, 16)}, 64, 16)
    assert "LoRA capacity 16" in _labels(lora) and "capacity d=64" not in _labels(lora)
    assert [s.x0 for s in lora.layout.shapes if s.line.dash == "dot"] == [16]
    plain = spectrum_figure({1: (values, 30)}, 64)
    assert "capacity d=64" in _labels(plain)


def test_text_view_draws_the_capacity_of_the_started_event():
    view = DagerView()
    for event in (
        AttackStarted("tiny", "classification", 2, 64, 16, True, (), capacity=16),
        SpectrumComputed(layer=1, singular_values=torch.logspace(0, -8, 64, dtype=torch.float64), rank=16,
                         tolerance=1e-6),
    ):
        view.apply(event)
    assert "LoRA capacity 16" in _labels(view.render(["spectrum"])["spectrum"])
