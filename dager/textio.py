"""Reading and validating sentence files for the DAGER command line and benchmark.

A sentence file is UTF-8 text with one private sentence per line. The rules:

* Surrounding whitespace of each line is dropped; a byte-order mark is ignored.
* Blank (or whitespace-only) lines are skipped; their line numbers are reported so the
  caller can say so.
* A file with no sentence at all is an error.
* A sentence must survive the model's tokenizer: decoding its tokens must give back the
  text, up to the tokenizer's own normalisation (an uncased model lowercases and strips
  accents; WordPiece spaces punctuation). Characters that become an unknown token, or a
  special-token string typed in the text, fail; they are reported by line number and
  named (:func:`unrepresentable`). The app applies the same rule (:func:`check_text`).
* A sentence must fit the model's context window.

Batches are consecutive runs of ``batch_size`` sentences; the last one may be shorter.
Nothing here logs or prints the sentences themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedclient.errors import LabInputError


class InputFileError(LabInputError):
    """The sentence file cannot be used; the message says what to change."""


class UntokenizableTextError(LabInputError):
    """Some sentences do not survive the model's tokenizer."""


@dataclass(frozen=True)
class Sentence:
    """One sentence of a file.

    Attributes:
        line: 1-based line number in the file.
        text: the sentence, stripped of surrounding whitespace.
    """

    line: int
    text: str


@dataclass(frozen=True)
class SentenceFile:
    """The sentences of a file, with what was skipped.

    Attributes:
        path: the file read.
        sentences: the non-blank lines, in file order.
        blank_lines: 1-based numbers of the blank lines skipped.
    """

    path: Path
    sentences: tuple[Sentence, ...]
    blank_lines: tuple[int, ...]


def read_sentences(path: str | os.PathLike[str]) -> SentenceFile:
    """Read a sentence file (one sentence per line).

    Args:
        path: the file.

    Returns:
        Its sentences and the blank lines skipped.

    Raises:
        InputFileError: the file is missing, a directory, unreadable, not UTF-8 text,
            or holds no sentence.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"Input file {str(p)!r} does not exist: check the path given to --input.")
    if p.is_dir():
        raise InputFileError(f"{str(p)!r} is a folder: give --input a text file with one sentence per line.")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputFileError(f"Cannot read {str(p)!r} ({exc.strerror}): check its permissions.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputFileError(
            f"{str(p)!r} is not UTF-8 text (line {line}): save it as UTF-8 with one sentence per line."
        ) from None
    if "\x00" in text:
        raise InputFileError(f"{str(p)!r} looks like a binary file: give a text file with one sentence per line.")
    sentences: list[Sentence] = []
    blanks: list[int] = []
    # splitlines() would also split on form feeds and Unicode separators; only newlines
    # separate sentences here.
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        stripped = line.strip()
        if stripped:
            sentences.append(Sentence(number, stripped))
        else:
            blanks.append(number)
    # A final newline leaves one empty piece at the end: it is not a blank line.
    if text.endswith(("\n", "\r")) and blanks and blanks[-1] == number:
        blanks.pop()
    if not sentences:
        raise InputFileError(f"{str(p)!r} holds no sentence: write one sentence per line.")
    return SentenceFile(path=p, sentences=tuple(sentences), blank_lines=tuple(blanks))


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _normalizer(tokenizer: object):  # noqa: ANN202 - tokenizers.normalizers.Normalizer | None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return getattr(backend, "normalizer", None) if backend is not None else None


def round_trips(bundle: object, text: str) -> bool:
    """Whether ``text`` survives the bundle's tokenizer.

    Decoding the tokens (special tokens skipped) must give back the text up to the
    tokenizer's normaliser (case, accents) and whitespace.

    Args:
        bundle: a :class:`dager.zoo.ModelBundle` (tokenizer and decode).
        text: one sentence.
    """
    tokenizer = bundle.tokenizer  # type: ignore[attr-defined]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    decoded = bundle.decode(ids)  # type: ignore[attr-defined]
    normalizer = _normalizer(tokenizer)
    expected = normalizer.normalize_str(text) if normalizer is not None else text
    return _squeeze(decoded) == _squeeze(expected)


def unrepresentable(bundle: object, text: str) -> tuple[str, ...]:
    """What in ``text`` the bundle's tokenizer cannot represent (empty when it round-trips).

    The one rule the CLIs and the app share (issue 14): a text must survive the
    tokenizer (:func:`round_trips`). When it does not, this names the culprits: typed
    special-token strings (e.g. ``<|endoftext|>``, ``[SEP]``) and each character that
    does not survive alone (an emoji that an uncased WordPiece vocabulary reads as
    ``[UNK]``). GPT-2's byte-level vocabulary represents every character, so there it
    only ever finds special-token strings.

    Args:
        bundle: a :class:`dager.zoo.ModelBundle` (tokenizer and decode).
        text: one sentence.

    Returns:
        The offending strings, in order of first appearance, without repeats; a text
        that fails only as a whole (rare) gives ``(text,)``.
    """
    if round_trips(bundle, text):
        return ()
    tokenizer = bundle.tokenizer  # type: ignore[attr-defined]
    specials = [t for t in getattr(tokenizer, "all_special_tokens", ()) if t and t in text]
    found: list[str] = sorted(specials, key=text.index)
    rest = text
    for special in specials:
        rest = rest.replace(special, " ")
    for ch in dict.fromkeys(rest):
        if not ch.isspace() and not round_trips(bundle, ch):
            found.append(ch)
    return tuple(found) if found else (text,)


def describe_unrepresentable(items: Sequence[str], bundle: object, *, shown: int = 5) -> str:
    """A readable list of :func:`unrepresentable`'s findings, e.g. ``'😀' (U+1F600)``."""
    tokenizer = bundle.tokenizer  # type: ignore[attr-defined]
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    parts: list[str] = []
    for item in items[:shown]:
        if item in specials:
            parts.append(f"{item!r} (a special-token string)")
        elif len(item) == 1:
            parts.append(f"{item!r} (U+{ord(item):04X})")
        else:
            parts.append("the text as a whole")
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(parts) + more


def check_text(bundle: object, text: str, *, where: str = "the text") -> None:
    """Refuse one text the tokenizer cannot represent, naming the characters (for the app).

    Args:
        bundle: a :class:`dager.zoo.ModelBundle`.
        text: one sentence.
        where: how to refer to it in the message, e.g. ``"sentence 2"``.

    Raises:
        UntokenizableTextError: the text does not round-trip; the message names what
            to edit.
    """
    bad = unrepresentable(bundle, text)
    if bad:
        name = bundle.name  # type: ignore[attr-defined]
        raise UntokenizableTextError(
            f"{name}'s tokenizer cannot represent {where}: {describe_unrepresentable(bad, bundle)} "
            "would be read as an unknown or special token; edit or remove it."
        )


def canonical_text(bundle: object, text: str) -> str:
    """The text as the model can see it: tokenised, decoded, whitespace collapsed.

    Idempotent for texts that round-trip, so applying it to a reference and to a
    recovered sentence makes them comparable (e.g. an uncased model's lowercase output
    equals the canonical form of a capitalised reference).
    """
    tokenizer = bundle.tokenizer  # type: ignore[attr-defined]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return " ".join(bundle.decode(ids).split())  # type: ignore[attr-defined]


def check_sentences(bundle: object, sentences: Sequence[Sentence]) -> None:
    """Check every sentence against the bundle's tokenizer and context window.

    Raises:
        UntokenizableTextError: some lines do not round-trip; all are listed by number.
        fedclient.errors.SequenceTooLongError: some lines do not fit the context window.
    """
    from fedclient.errors import SequenceTooLongError

    bad: list[int] = []
    culprits: dict[str, None] = {}
    for s in sentences:
        found = unrepresentable(bundle, s.text)
        if found:
            bad.append(s.line)
            culprits.update(dict.fromkeys(found))
    if bad:
        name = bundle.name  # type: ignore[attr-defined]
        raise UntokenizableTextError(
            f"{name}'s tokenizer cannot represent {_lines(bad)}: "
            f"{describe_unrepresentable(list(culprits), bundle)} would be read as an unknown or "
            f"special token; edit or remove {'it' if len(culprits) == 1 else 'them'}."
        )
    limit = bundle.context_length  # type: ignore[attr-defined]
    long = [s.line for s in sentences if len(bundle.tokenize(s.text)) > limit]  # type: ignore[attr-defined]
    if long:
        raise SequenceTooLongError(
            f"{_lines(long)} of the input {'is' if len(long) == 1 else 'are'} longer than the "
            f"{limit} tokens {bundle.name} reads: shorten or split {'it' if len(long) == 1 else 'them'}."  # type: ignore[attr-defined]
        )


def _lines(numbers: Sequence[int], shown: int = 10) -> str:
    head = ", ".join(str(n) for n in numbers[:shown])
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' if len(numbers) > 1 else ''} {head}{more}"


def split_batches(
    sentences: Sequence[Sentence], batch_size: int, max_batches: int | None = None
) -> list[tuple[Sentence, ...]]:
    """Consecutive batches of ``batch_size`` sentences; the last may be shorter.

    Args:
        sentences: the sentences, in file order.
        batch_size: sentences per batch (at least 1).
        max_batches: keep at most this many batches (``None``: all).

    Raises:
        ValueError: for a batch size or batch count below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    batches = [tuple(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]
    return batches if max_batches is None else batches[:max_batches]


def distinct_prefixes(rows: Sequence[Sequence[int]]) -> int:
    """Number of distinct token prefixes in a batch (what the layer-2 span must hold).

    DAGER separates the batch's distinct prefixes in the second layer's span, which
    holds at most d vectors: exact recovery holds up to about d distinct prefixes.
    """
    seen: set[tuple[int, ...]] = set()
    for row in rows:
        for end in range(1, len(row) + 1):
            seen.add(tuple(row[:end]))
    return len(seen)
