"""Matching and word diffs between recovered sentences and the originals.

The app is the demo's evaluator (it knows what the user typed); the attack never sees
these. The final scores and the pairing (:func:`dager.metrics.match_sentences`) come from
:mod:`dager.metrics`; this only lays out the display.
"""

from __future__ import annotations

import difflib
import html



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
