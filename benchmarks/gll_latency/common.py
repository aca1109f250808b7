"""What every latency measure shares: sample inputs, the server's memory, a port, the table."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

Row = tuple[str, str, str, str]
"""One table row: name, value, target, notes."""

DEFENSES_OFF = (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1)
"""The defense panel's eight values with every defense off (σ, DP, C, z, prune, precision,
local steps, clients)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sentences(n: int) -> list[str]:
    """The first ``n`` sentences of the app's sample sets."""
    from labui.inputs import sentence_sets

    pool: list[str] = []
    for text in sentence_sets().values():
        pool.extend(text.splitlines())
    if len(pool) < n:
        raise SystemExit(f"need {n} sample sentences, found {len(pool)}")
    return pool[:n]


def medium_sentences() -> list[str]:
    """The 8 medium-length sentences (``assets/sentences/medium.txt``, its first 8 lines)."""
    from labui.inputs import sentence_sets

    lines = sentence_sets()["medium"].splitlines()
    if len(lines) < 8:
        raise SystemExit("assets/sentences/medium.txt needs 8 sentences")
    return lines[:8]


def rss_mb() -> float:
    """This process's resident memory (it hosts the server), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample_png() -> str:
    """A 32x32 colour gradient written to a temporary PNG (the image tab's input)."""
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx)], axis=-1)
    path = Path(tempfile.mkdtemp(prefix="gll-bench-")) / "sample.png"
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return str(path)


def print_table(rows: list[Row], header: Row) -> None:
    width = max(len(r[0]) for r in [*rows, header])
    print(f"\n{header[0]:<{width}}  {header[1]:>9}  {header[2]:>8}  {header[3]}")
    for name, value, target, notes in rows:
        print(f"{name:<{width}}  {value:>9}  {target:>8}  {notes}")
