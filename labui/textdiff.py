"""Matching and word diffs between recovered sentences and the originals.

The app is the demo's evaluator (it knows what the user typed); the attack never sees
these. The final scores come from :mod:`dager.metrics`; this only lays out the display.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio)."""
    return difflib.SequenceMatcher(a=a.split(), b=b.split(), autojunk=False).ratio()


def match(predictions: Sequence[str], references: Sequence[str]) -> list[int | None]:
    """For each prediction, the index of its reference under a best one-to-one matching.

    Predictions left over (more predictions than references) map to None.
    """
    if not predictions or not references:
        return [None] * len(predictions)
    sim = np.array([[similarity(p, r) for r in references] for p in predictions])  # (P, R)
    rows, cols = linear_sum_assignment(-sim)
    out: list[int | None] = [None] * len(predictions)
    for r, c in zip(rows, cols):
        out[int(r)] = int(c)
    return out


def diff_html(reference: str, prediction: str) -> str:
    """HTML word diff: missing words struck through in red, wrong words in green.

    Equal words are plain; the result reads as the prediction with the reference's
    missing words shown inline.
    """
    ref, pred = reference.split(), prediction.split()
    parts: list[str] = []
    sm = difflib.SequenceMatcher(a=ref, b=pred, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            parts.append(html.escape(" ".join(pred[j1:j2])))
            continue
        if i2 > i1:
            parts.append(f'<del class="gll-del">{html.escape(" ".join(ref[i1:i2]))}</del>')
        if j2 > j1:
            parts.append(f'<ins class="gll-ins">{html.escape(" ".join(pred[j1:j2]))}</ins>')
    return " ".join(parts)
