"""Evaluation of recovered text against the client's private sentences.

This module is the only part of ``dager`` that sees the ground truth: the attacker
(:mod:`dager.attack`) never receives it. The attacker returns its sentences in its own
order (it cannot know the client's), so scoring first finds the best one-to-one
matching of predictions to references, then scores each matched pair.

Scores follow DAGER's evaluation (Petrov et al., NeurIPS 2024, Sec. 6): ROUGE-1/2/L F1
via the ``rouge-score`` package, averaged over references, plus the fraction of
sentences recovered exactly and a positional token accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

from dager.textio import canonical_text

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_TIE_BREAK = 1e-6
"""Weight of the secondary matching criteria (exactness, ROUGE-L) next to ROUGE-1.

ROUGE-1 F1 values of sentences under a few hundred words differ by far more than this,
so the secondary terms only decide between matchings with equal ROUGE-1 totals (for
example two predictions that are permutations of the same words).
"""


@dataclass(frozen=True)
class PairScore:
    """One reference and the prediction matched to it.

    Attributes:
        reference_index: index into the references.
        prediction_index: index into the predictions, or ``None`` when no prediction
            was left for this reference (it is then scored as an empty prediction).
        reference: the reference text, as given.
        prediction: the matched prediction, as given (``""`` when unmatched).
        exact: the normalised texts are identical.
        rouge1: ROUGE-1 F1 of this pair.
        rouge2: ROUGE-2 F1 of this pair.
        rougeL: ROUGE-L F1 of this pair.
        tokens_correct: reference tokens recovered in place (see :func:`evaluate_text`).
        tokens_total: tokens in the reference.
    """

    reference_index: int
    prediction_index: int | None
    reference: str
    prediction: str
    exact: bool
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - the metric's usual name
    tokens_correct: int
    tokens_total: int


@dataclass(frozen=True)
class TextScores:
    """Scores of a set of predictions against a set of references.

    Attributes:
        rouge1: mean ROUGE-1 F1 over references (unmatched references score 0).
        rouge2: mean ROUGE-2 F1 over references.
        rougeL: mean ROUGE-L F1 over references.
        exact_match: fraction of references recovered exactly.
        token_accuracy: fraction of reference tokens recovered in place.
        pairs: one :class:`PairScore` per reference, in reference order.
        unmatched_predictions: indices of predictions matched to no reference (when
            there are more predictions than references), ascending.
    """

    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - the metric's usual name
    exact_match: float
    token_accuracy: float
    pairs: tuple[PairScore, ...]
    unmatched_predictions: tuple[int, ...] = ()

    @property
    def num_exact(self) -> int:
        """How many references were recovered exactly."""
        return sum(p.exact for p in self.pairs)

    @property
    def matched_predictions(self) -> tuple[str, ...]:
        """The prediction matched to each reference, in reference order (``""`` if none)."""
        return tuple(p.prediction for p in self.pairs)


@dataclass(frozen=True)
class _Scored:
    exact: bool
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815
    tokens_correct: int
    tokens_total: int


def _identity(text: str) -> str:
    return text


def normalizer_for(bundle: object) -> Callable[[str], str]:
    """The text normalisation of every score and view: the text as the model sees it.

    Tokenised and decoded by the bundle, whitespace collapsed
    (:func:`dager.textio.canonical_text`), so an uncased model's lowercase output can
    equal a capitalised reference. Both CLIs and the app pass it as ``normalize``.
    """
    return functools.partial(canonical_text, bundle)


def _tokens(text: str) -> list[str]:
    """Whitespace tokens: the unit of exact match and token accuracy."""
    return text.split()


def _score_pair(scorer: rouge_scorer.RougeScorer, reference: str, prediction: str) -> _Scored:
    """Score one normalised pair."""
    ref_tokens, pred_tokens = _tokens(reference), _tokens(prediction)
    exact = ref_tokens == pred_tokens
    if exact:
        # rouge-score gives 0 to texts without bigrams (one-word sentences) or without
        # alphanumeric words; an exactly recovered sentence scores 1 on every metric.
        r1 = r2 = rl = 1.0
    else:
        s = scorer.score(reference, prediction)
        r1, r2, rl = (float(s[t].fmeasure) for t in ROUGE_TYPES)
    correct = sum(1 for r, p in zip(ref_tokens, pred_tokens) if r == p)
    return _Scored(exact, r1, r2, rl, correct, len(ref_tokens))


def _assign(
    scorer: rouge_scorer.RougeScorer, refs: Sequence[str], preds: Sequence[str]
) -> tuple[dict[int, int], dict[tuple[int, int], _Scored]]:
    """The one pairing of predictions with references (normalised texts), and every pair's scores.

    The Hungarian algorithm maximises the total ROUGE-1 F1; ties go to exact matches,
    then ROUGE-L (see :func:`evaluate_text`).

    Returns:
        ``({reference index: prediction index}, {(i, j): scores of the pair})``.
    """
    n, m = len(refs), len(preds)
    scored: dict[tuple[int, int], _Scored] = {}
    if not (n and m):
        return {}, scored
    weight = np.zeros((n, m), dtype=np.float64)  # (refs, preds)
    for i, ref in enumerate(refs):
        for j, pred in enumerate(preds):
            s = _score_pair(scorer, ref, pred)
            scored[(i, j)] = s
            weight[i, j] = s.rouge1 + _TIE_BREAK * (float(s.exact) + s.rougeL)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return {int(i): int(j) for i, j in zip(rows, cols)}, scored


def match_sentences(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    normalize: Callable[[str], str] | None = None,
) -> list[int | None]:
    """For each prediction, the index of its reference under the scorer's pairing.

    The same one-to-one matching as :func:`evaluate_text` (so a view that shows a diff
    against this reference shows the pair the scores used); predictions left over map
    to ``None``.
    """
    norm = normalize or _identity
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    assignment, _ = _assign(scorer, [norm(r) for r in references], [norm(p) for p in predictions])
    out: list[int | None] = [None] * len(predictions)
    for i, j in assignment.items():
        out[j] = i
    return out


def evaluate_text(
    references: Sequence[str],
    predictions: Sequence[str],
    *,
    normalize: Callable[[str], str] | None = None,
) -> TextScores:
    """Match predictions to references one-to-one and score the matching.

    Matching: the Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`)
    maximises the total ROUGE-1 F1 over matched pairs; ties are broken in favour of
    exact matches, then ROUGE-L. References left without a prediction (fewer
    predictions than references) are scored as empty predictions; predictions left
    without a reference are listed in ``unmatched_predictions`` and do not lower the
    scores (DAGER's protocol, which scores each client sentence).

    Scores, each averaged over the references:

    * ``rouge1``/``rouge2``/``rougeL``: F1 from ``rouge-score`` (its tokenizer
      lowercases and keeps alphanumeric words). A pair whose normalised texts are
      identical scores 1.0 on all three, even when ``rouge-score`` finds no n-grams.
    * ``exact_match``: fraction of references whose matched prediction has exactly the
      same whitespace tokens (so only whitespace runs may differ).
    * ``token_accuracy``: split reference and matched prediction on whitespace; a
      reference token at position i is recovered when the prediction's token at
      position i is identical (case and punctuation count). The score is the number of
      recovered tokens over all references divided by the number of reference tokens.
      A prediction that is right but shifted by one word scores low here while its
      ROUGE stays high: the two are complementary.

    Args:
        references: the client's sentences (ground truth).
        predictions: the attacker's sentences, in any order, any number.
        normalize: applied to both sides before scoring (for example the model's
            tokenizer normalisation, so that an uncased model's lowercase output can be
            exact); the pairs keep the original texts.

    Returns:
        The scores and the matching.
    """
    norm = normalize or _identity
    refs = [norm(r) for r in references]
    preds = [norm(p) for p in predictions]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    m = len(preds)
    assignment, scored = _assign(scorer, refs, preds)

    pairs: list[PairScore] = []
    for i, ref in enumerate(refs):
        j = assignment.get(i)
        s = scored[(i, j)] if j is not None else _score_pair(scorer, ref, "")
        pairs.append(
            PairScore(
                reference_index=i,
                prediction_index=j,
                reference=references[i],
                prediction=predictions[j] if j is not None else "",
                exact=s.exact,
                rouge1=s.rouge1,
                rouge2=s.rouge2,
                rougeL=s.rougeL,
                tokens_correct=s.tokens_correct,
                tokens_total=s.tokens_total,
            )
        )
    used = set(assignment.values())
    unmatched = tuple(j for j in range(m) if j not in used)

    return TextScores(**pooled_scores(pairs), pairs=tuple(pairs), unmatched_predictions=unmatched)


def pooled_scores(pairs: Sequence[PairScore]) -> dict[str, float]:
    """Corpus scores over matched pairs, e.g. the pairs of several batches together.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL`` and ``exact_match`` as means over the pairs
        (one per reference), and ``token_accuracy`` pooled over all reference tokens.
        Every value is 0.0 when there are no pairs.
    """

    def mean(values: list[float]) -> float:
        return float(sum(values) / len(values)) if values else 0.0

    total_tokens = sum(p.tokens_total for p in pairs)
    return {
        "rouge1": mean([p.rouge1 for p in pairs]),
        "rouge2": mean([p.rouge2 for p in pairs]),
        "rougeL": mean([p.rougeL for p in pairs]),
        "exact_match": mean([float(p.exact) for p in pairs]),
        "token_accuracy": (sum(p.tokens_correct for p in pairs) / total_tokens) if total_tokens else 0.0,
    }
