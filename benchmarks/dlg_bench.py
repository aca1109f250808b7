"""DLG benchmark: image reconstruction quality and speed, plus DLG-text's ROUGE.

Prints a table for batch sizes 1, 2, 4, 8 x method (dlg, idlg, ig) on LeNet with the
sample images in ``assets/images`` (PSNR, SSIM, label accuracy, converged iteration,
seconds), a per-image B=1 check against the targets, and one line for the DLG text
baseline on a sentence set.

Targets (issue 4): B=1 PSNR >= 30 dB on every sample image within 300 iterations and
under 8 s with early stopping; B=4 mean PSNR >= 20 dB with iDLG labels or gradient
matching.

Usage::

    python benchmarks/dlg_bench.py [--quick] [--markdown] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fedclient  # noqa: E402
from dlg.attack import DlgConfig, run_dlg  # noqa: E402
from dlg.images import load_images  # noqa: E402
from dlg.metrics import evaluate_images  # noqa: E402
from dlg.models import NUM_CLASSES, build_model  # noqa: E402

IMAGES = sorted((ROOT / "assets" / "images").glob("*.png"))
FALLBACK_SENTENCES = [
    "The patient was discharged on Monday.",
    "My password is written on a sticky note.",
    "We meet at the old bridge at noon.",
    "Transfer the money before Friday.",
]


def _batch(b: int, offset: int = 0) -> list[Path]:
    return [IMAGES[(offset + i) % len(IMAGES)] for i in range(b)]


def image_row(method: str, b: int, *, iterations: int, device: str, seed: int = 0,
              **overrides: object) -> dict[str, object]:
    model = build_model("lenet").to(device)
    images = load_images(_batch(b, offset=seed))
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed))
    update = fedclient.compute_update(model, fedclient.ImageBatch(images.to(device), labels.to(device)))
    restarts = 2 if method == "ig" else 3
    config = DlgConfig(method=method, iterations=iterations, restarts=restarts, seed=seed, device=device,
                       **overrides)  # type: ignore[arg-type]
    result = run_dlg(model, update, config=config)
    scores = evaluate_images(images, result.images, labels, result.labels)
    return {
        "method": method,
        "B": b,
        "psnr": scores.psnr,
        "ssim": scores.ssim,
        "label_acc": scores.label_accuracy,
        "converged": result.converged_iteration,
        "stop": result.stop_reason,
        "iters": len(result.losses),
        "seconds": result.seconds,
    }


def text_row(*, iterations: int, device: str, batch_size: int, limit: int) -> dict[str, object]:
    import dager
    from dager.metrics import evaluate_text
    from dlg.text import TextDlgConfig, run_dlg_text

    folder = ROOT / "assets" / "sentences"
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if files:
        sentences = [s.strip() for s in files[0].read_text(encoding="utf-8").splitlines() if s.strip()]
        source = f"assets/sentences/{files[0].name}"
    else:
        sentences, source = FALLBACK_SENTENCES, "built-in sentences"
    sentences = sentences[:limit]
    bundle = dager.load_model("gpt2-small-random", "classification", device=device)
    refs, preds, seconds = [], [], 0.0
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i : i + batch_size]
        batch = bundle.encode(chunk, seed=0)
        update = fedclient.compute_update(bundle.model, batch)
        config = TextDlgConfig(iterations=iterations, seq_len=int(batch.input_ids.shape[1]), device=device)
        result = run_dlg_text(bundle, update, config=config)
        refs.extend(chunk)
        preds.extend(result.sentences)
        seconds += result.seconds
    scores = evaluate_text(refs, preds)
    return {
        "source": source,
        "n": len(refs),
        "rouge1": scores.rouge1,
        "rouge2": scores.rouge2,
        "rougeL": scores.rougeL,
        "exact": scores.exact_match,
        "seconds": seconds,
    }


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def print_table(rows: list[dict[str, object]], markdown: bool) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    if markdown:
        print("| " + " | ".join(keys) + " |")
        print("|" + "|".join("---" for _ in keys) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
        for c in cells:
            print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B in (1, 4), fewer iterations, short text run")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-text", action="store_true", help="skip the DLG-text line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread is fastest, see dlg/cli.py
    iterations = 300
    sizes = (1, 4) if args.quick else (1, 2, 4, 8)

    print(f"## DLG on LeNet, sample images, {iterations} iterations max (early stopping)\n")
    rows = []
    for b in sizes:
        for method in ("dlg", "idlg", "ig"):
            t = time.perf_counter()
            rows.append(image_row(method, b, iterations=iterations, device=args.device))
            logging.getLogger("dlg_bench").info("%s B=%d in %.1f s", method, b, time.perf_counter() - t)
    if 4 in sizes:  # what the batch prior buys: plain DLG matching alone at B=4
        row = image_row("dlg", 4, iterations=iterations, device=args.device, batch_tv=0.0)
        rows.append({**row, "method": "dlg, no prior"})
    print_table(rows, args.markdown)

    print("## Target: B=1 PSNR >= 30 dB on every sample image, < 8 s (dlg)\n")
    per_image = []
    for i, path in enumerate(IMAGES if not args.quick else IMAGES[:2]):
        r = image_row("dlg", 1, iterations=iterations, device=args.device, seed=i)
        r = {"image": path.name, **{k: r[k] for k in ("psnr", "ssim", "converged", "stop", "seconds")}}
        r["target"] = "ok" if r["psnr"] >= 30 and r["seconds"] < 8 else "MISSED"
        per_image.append(r)
    print_table(per_image, args.markdown)
    b4 = [r for r in rows if r["B"] == 4 and r["method"] in ("idlg", "ig")]
    best4 = max(float(r["psnr"]) for r in b4) if b4 else float("nan")
    print(f"B=4 best mean PSNR (idlg/ig): {best4:.1f} dB (target >= 20 dB)\n")

    if not args.no_text:
        print("## DLG-text baseline (gpt2-small-random, classification)\n")
        text = text_row(
            iterations=30 if args.quick else 100, device=args.device, batch_size=1, limit=2 if args.quick else 4
        )
        print_table([text], args.markdown)
        print("DAGER recovers these sentences exactly (ROUGE-1 = 1.0); see benchmarks/dager_bench.py.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
