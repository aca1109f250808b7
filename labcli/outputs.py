"""Output files of the lab's CLIs: checked before any work, written privately, never lost.

Results hold private data (recovered and reference sentences, reconstructed images), so:

* :func:`check_output_path` runs before anything is loaded or attacked: a path into a
  missing folder, under a file, into a read-only place (``/proc``, a read-only mount) or
  naming a folder or a device is refused with one sentence (exit 2), instead of a
  traceback after the whole attack ran (issue 13). The check creates and removes a probe
  file, because permission bits do not tell the truth for root or for special file
  systems.
* :func:`write_private` creates every file with mode 0600 (``os.open`` with ``O_CREAT``
  and ``0o600`` for what we write ourselves, a 0077 umask for files a library writes,
  e.g. a GIF or a plotly page), in a private scratch folder next to the target, then
  moves it into place atomically: no window where the data is world-readable, and no
  half-written result under the final name.
* :func:`save_results` keeps the results when the chosen path fails at the end (disk
  full, folder removed during the run): it writes them to a fallback file in the
  current folder or the temp folder and says where.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedclient.errors import LabInputError

PRIVATE_MODE = 0o600


class OutputPathError(LabInputError):
    """An output path cannot be written; the message says what to change."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_output_path(option: str, path: Path, *, example: str = "result.json") -> None:
    """Refuse an output path that cannot be written, before any work starts.

    Args:
        option: the option's name for the message, e.g. ``"--output"``.
        path: the path given.
        example: a file name to suggest when ``path`` is a folder.

    Raises:
        OutputPathError: the path names a folder or a non-regular file, or its folder is
            missing, is not a folder, or refuses a new file.
    """
    shown = str(path)
    if not shown or shown.endswith(os.sep):
        raise OutputPathError(f"{option} {shown!r} is not a file name: give one such as {example}.")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise OutputPathError(
            f"{option} {shown!r} lies under {str(blocker)!r}, which is a file, not a folder: pick another place."
        ) from None
    except OSError as exc:
        raise OutputPathError(f"Cannot use {option} {shown!r} ({_reason(exc)}): pick another place.") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{option} {shown!r} is a folder: give a file name such as {example}.")
        if not stat.S_ISREG(st.st_mode):
            raise OutputPathError(
                f"{option} {shown!r} is not a regular file (a device or pipe): give a file name such as {example}."
            )
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(
            f"{option} {shown!r} lies under {str(parent)!r}, which is a file, not a folder: pick another place."
        )
    if not parent.exists():
        # is_dir()/exists() swallow "not a directory" further up: say the simple thing.
        raise OutputPathError(f"The folder of {option} ({str(parent)!r}) does not exist: create it first.")
    probe = parent / f".{path.name[:40]}.probe{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except OSError as exc:
        raise OutputPathError(
            f"Cannot write to the folder {str(parent)!r} of {option} ({_reason(exc)}): pick another place."
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Refuse two options naming the same file (one would overwrite the other).

    Raises:
        OutputPathError: two of the given paths resolve to the same file.
    """
    seen: dict[str, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise OutputPathError(f"{seen[key]} and {option} name the same file {str(path)!r}: give each its own name.")
        seen[key] = option


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files created inside the block get at most mode 0600 (folders 0700)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_private(path: Path, write: Callable[[Path], object]) -> list[Path]:
    """Write ``path`` privately and atomically, with a writer that takes a file name.

    ``write(scratch)`` writes into a fresh 0700 scratch folder next to ``path`` (the
    same file system, so the move is a rename); every file it leaves there (a plot may
    add a PNG next to its HTML) is moved next to ``path``, keeping its name.

    Returns:
        The files put in place.

    Raises:
        OSError: the scratch folder or a move failed (nothing is left behind).
    """
    parent = path.parent if str(path.parent) else Path(".")
    with private_umask():
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name[:40]}.", dir=parent))
        try:
            write(scratch / path.name)
            placed: list[Path] = []
            for name in sorted(os.listdir(scratch)):
                target = parent / name
                os.replace(scratch / name, target)
                placed.append(target)
            return placed
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def write_private_text(path: Path, text: str) -> None:
    """Create (``O_CREAT | O_EXCL``, mode 0600) and write a UTF-8 text file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)


@dataclass(frozen=True)
class Saved:
    """Where results went.

    Attributes:
        paths: the files written (empty when they went to stdout).
        error: why the requested path failed, or ``None`` when it worked.
        to_stdout: the text was printed to stdout as the last resort.
    """

    paths: tuple[Path, ...]
    error: str | None = None
    to_stdout: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def where(self) -> str:
        """Where the results are, for a sentence."""
        if self.to_stdout:
            return "standard output"
        return ", ".join(str(p) for p in self.paths)


def fallback_candidates(path: Path, prog: str) -> list[Path]:
    """Fallback files for ``path``: the current folder, then the temp folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{prog}-{stamp}-{os.getpid()}-{path.name}"
    places = [Path.cwd(), Path(tempfile.gettempdir())]
    out: list[Path] = []
    for place in places:
        candidate = place / name
        if candidate not in out:
            out.append(candidate)
    return out


def save_results(
    path: Path,
    write: Callable[[Path], object],
    *,
    prog: str,
    text: str | None = None,
    stdout: Callable[[str], object] | None = None,
) -> Saved:
    """Write results to ``path``; when that fails, keep them somewhere and say where.

    Args:
        path: the requested file.
        write: writes the results to the file name it is given (see :func:`write_private`).
        prog: the program name, the prefix of fallback file names.
        text: the results as text, printed to ``stdout`` when no file can be written.
        stdout: where to print ``text`` (default: ``print``).

    Returns:
        Where the results went; ``error`` says why ``path`` failed.
    """
    try:
        return Saved(tuple(write_private(path, write)))
    except OSError as exc:
        error = f"{_reason(exc)}"
    for candidate in fallback_candidates(path, prog):
        try:
            return Saved(tuple(write_private(candidate, write)), error=error)
        except OSError:
            continue
    if text is not None:
        (stdout or print)(text)
        return Saved((), error=error, to_stdout=True)
    return Saved((), error=error)


def save_json(path: Path, text: str, *, prog: str) -> Saved:
    """:func:`save_results` for a JSON document (0600, printed to stdout as the last resort)."""
    return save_results(path, lambda p: write_private_text(p, text), prog=prog, text=text)


def lost_sentence(option: str, path: Path, saved: Saved) -> str:
    """The one sentence a CLI prints when ``path`` could not be written."""
    if saved.ok:
        raise ValueError("nothing was lost")
    head = f"could not write {option} {str(path)!r} ({saved.error})"
    if saved.to_stdout:
        return f"{head}; no other place could be written either, so the results were printed to standard output."
    if saved.paths:
        return f"{head}; the results were written to {saved.where()} instead."
    return f"{head}, nor any fallback file in the current or temp folder: the results are lost."


__all__ = [
    "OutputPathError",
    "PRIVATE_MODE",
    "Saved",
    "check_distinct",
    "check_output_path",
    "lost_sentence",
    "private_umask",
    "save_json",
    "save_results",
    "write_private",
    "write_private_text",
]
