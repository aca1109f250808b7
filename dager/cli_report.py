"""The result of ``python -m dager``: the JSON report and the summary table.

Split from :mod:`dager.cli_batches` (which attacks the file batch by batch). The JSON's
contract keys are documented in :mod:`dager.cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dager.cli_batches import _BatchOutcome
    from dager.metrics import PairScore
    from dager.textio import Sentence
    from dager.zoo import ModelBundle

Json = dict[str, Any]
"""A JSON object of the report (values of mixed types, as written)."""


def _line_span(sentences: Sequence[Sentence]) -> str:
    first, last = sentences[0].line, sentences[-1].line
    return f"{first}" if first == last else f"{first}-{last}"


def _report(
    args: argparse.Namespace,
    bundle: ModelBundle,
    outcomes: list[_BatchOutcome],
    *,
    defenses: list[str],
    interrupted: bool,
    num_sentences_in_file: int,
) -> Json:
    """The result JSON.

    Contract keys: see the module docstring. Scores are over all attacked sentences
    (failed batches count as unrecovered). Extra keys: ``num_sentences``,
    ``num_exact``, ``num_batches``, ``failed_batches`` (1-based indices),
    ``interrupted``, ``over_capacity``/``capacity_exceeded``/``budget_exhausted`` (any batch),
    ``hidden_size``, ``device``, ``seed``, ``max_batches``, ``defense`` (the
    ``--defense`` specs as given), ``defense_description`` (one sentence),
    ``epsilon`` (DP epsilon, or ``null``), ``sentences_in_file``.
    """
    from dager.metrics import evaluate_text, pooled_scores

    pairs: list[PairScore] = []
    for o in outcomes:
        if o.failed:
            refs = [s.text for s in o.sentences]
            pairs.extend(evaluate_text(refs, []).pairs)
        else:
            pairs.extend(o.pairs)

    return {
        "model": args.model,
        "task": args.task,
        "batch_size": args.batch_size,
        **pooled_scores(pairs),
        "seconds": sum(o.seconds for o in outcomes),
        "client_seconds": sum(o.client_seconds for o in outcomes),
        "batches": [o.record for o in outcomes],
        "num_sentences": len(pairs),
        "num_exact": sum(p.exact for p in pairs),
        "num_batches": len(outcomes),
        "failed_batches": [o.index for o in outcomes if o.failed],
        "interrupted": interrupted,
        "over_capacity": any(bool(o.record.get("over_capacity")) for o in outcomes),
        "capacity_exceeded": any(bool(o.record.get("capacity_exceeded")) for o in outcomes),
        "budget_exhausted": any(bool(o.record.get("budget_exhausted")) for o in outcomes),
        "hidden_size": bundle.hidden_size,
        "device": args.device,
        "seed": args.seed,
        "max_batches": args.max_batches,
        "defense": defenses,
        "sentences_in_file": num_sentences_in_file,
    }


def _print_summary(args: argparse.Namespace, report: Json, outcomes: list[_BatchOutcome]) -> None:
    """The summary table on stdout (sentences only with ``--show-text``)."""
    head = (
        f"DAGER on {report['model']} ({report['task']}), batch size {report['batch_size']}, "
        f"{report['num_batches']} batch(es), {report['num_sentences']} sentence(s)"
    )
    if report["defense"]:
        head += f", defense: {' + '.join(report['defense'])}"
    print(head)
    cols = ("batch", "lines", "sent", "tokens", "rank", "exact", "ROUGE-1", "ROUGE-2", "attack s", "client s", "flags")
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        r = o.record
        n = len(o.sentences)
        if o.failed:
            rows.append((str(o.index), _line_span(o.sentences), str(n), str(r["total_tokens"]), "-", "failed",
                         "-", "-", "-", "-", "error"))
            continue
        rows.append((
            str(o.index),
            _line_span(o.sentences),
            str(n),
            str(r["total_tokens"]),
            str(r["rank"]),
            f"{sum(r['exact'])}/{n}",
            f"{r['rouge1']:.3f}",
            f"{r['rouge2']:.3f}",
            f"{o.seconds:.2f}",
            f"{o.client_seconds:.2f}",
            ",".join(o.warnings),
        ))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(
        f"total: {report['num_exact']}/{report['num_sentences']} exact ({100 * report['exact_match']:.1f}%), "
        f"ROUGE-1 {report['rouge1']:.3f}, ROUGE-2 {report['rouge2']:.3f}, ROUGE-L {report['rougeL']:.3f}, "
        f"token accuracy {report['token_accuracy']:.3f}; attack {report['seconds']:.2f} s, "
        f"client {report['client_seconds']:.2f} s"
    )
    if args.show_text:
        for o in outcomes:
            for s, pred, ok in zip(o.sentences, o.record["predictions"], o.record["exact"]):
                mark = "=" if ok else "x"
                print(f"  line {s.line} {mark} {s.text}")
                print(f"  {'':>{len(str(s.line)) + 5}}-> {pred}")
