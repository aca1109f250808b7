"""Command line: DLG image attacks and the DLG text baseline.

Images::

    python -m dlg --image A.png [--image B.png ...] [--model lenet] [--method dlg|idlg|ig]
        [--iterations N] [--seed S] [--device cpu|cuda] [--defense SPEC ...] --output result.json
        [--gif out.gif]

writes JSON with ``method``, ``model``, ``batch_size``, ``psnr`` (mean, dB), ``ssim``,
``mse``, ``label_accuracy``, ``converged_iteration``, ``seconds`` and ``per_image``
(extra keys: ``labels``, ``recovered_labels``, ``stop_reason``, ``iterations_run``,
``client_seconds``, ``seed``, ``device``).

Text baseline::

    python -m dlg text --model NAME --input FILE --batch-size N [--defense SPEC ...] --output result.json

writes the keys of DAGER's CLI: ``model``, ``task``, ``batch_size``, ``rouge1``,
``rouge2``, ``rougeL``, ``exact_match``, ``token_accuracy``, ``seconds``,
``client_seconds`` and ``batches`` (each with ``references``, ``predictions``,
``exact``, ``seconds``).

Both modes take the client-side defenses of DAGER's CLI (``--defense SPEC``,
repeatable: ``noise:1e-3``, ``noise:var=1e-4`` (DLG labels noise by variance),
``dp:clip=1.0,noise=1.0``, ``prune:0.3``, ``mask:0.3``, ``fp16``, ``int8``,
``fedavg:steps=4,lr=0.01``, ``secagg:clients=4``) and record them in the JSON as
``defense`` (the specs as given), ``defense_description`` (one sentence) and
``epsilon`` (DP epsilon, or ``null``).

Defense sweep (images)::

    python -m dlg sweep --image A.png [--image B.png ...] [--method dlg|idlg|ig] [--iterations N]
        --grid noise|prune|mask|precision|dp [--values V1,V2,...] [--variance]
        --csv out.csv [--plot out.html]

attacks the same batch once per grid point and writes one CSV row per point
(``psnr``, ``ssim``, ``label_accuracy``, ``utility_cosine``, ``utility_norm_ratio``,
``epsilon`` for DP, ``stop_reason``, ``seconds``).

Bad input prints one line on stderr and exits with status 2, before torch loads when
it is an argument, an output path or the input file (issue 13). Outputs hold private
data and are created with mode 0600; when one cannot be written at the end, it goes to
a fallback file (named on stderr) and the exit status is 1. Ctrl-C or SIGTERM during
``dlg text`` writes the finished batches (``"interrupted": true``, exit 1); before
that, and in the image modes, it prints one line (exit 130, 143 for SIGTERM).

The text baseline's sequence length is not taken from the private batch: the attack
infers it from the shared update (:func:`dlg.text.infer_seq_len`) or marks it as the
attacker's guess (``seq_len_source`` in each batch record).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free imports only: torch loads after the arguments have been checked.
from fedclient.threads import configure_cpu_threads
from labcli.training import add_client_arguments, client_keys, dlg_training
from labcli.common import (  # DEFENSE_HELP and CliUsageError stay importable from here
    DEFENSE_HELP,  # noqa: F401
    CliUsageError,
    LabParser,
    add_defense_argument,
    check_defense_specs,
    check_device,
    defense_record,
    run_guarded,
    write_json,
)
from labcli.outputs import check_distinct, check_output_path, lost_sentence, save_results
from labcli.runtime import (
    EXIT_FAILED,
    class_label,
    positive_int,
)

if TYPE_CHECKING:
    import torch

    from dlg.attack import DlgConfig
    from fedclient.client import Defense

log = logging.getLogger(__name__)

IMAGE_METHODS = ("dlg", "idlg", "ig")
""":data:`dlg.attack.METHODS`, known without importing torch (a test keeps them in step)."""

IMAGE_MODELS = ("lenet", "resnet")
"""The names of :data:`dlg.models.MODELS`, known without importing torch (a test keeps them in step)."""


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], type=Path, help="a private image (repeat for a batch, 1 to 8)")
    p.add_argument("--label", action="append", default=None, type=class_label, help="class id of each image (default: random, seeded)")
    p.add_argument("--model", default="lenet", choices=IMAGE_MODELS, help="the attacked model")
    p.add_argument("--method", default="dlg", choices=IMAGE_METHODS, help="dlg, idlg or ig (Geiping et al.)")
    p.add_argument("--iterations", type=positive_int, default=300, help="optimiser steps per restart")
    p.add_argument("--optimizer", default=None, choices=("lbfgs", "adam"),
                   help="L-BFGS (default, every method) or Adam (Geiping et al.'s choice for ig; slow to converge on LeNet)")
    p.add_argument("--restarts", type=positive_int, default=None, help="random restarts, run only while the tolerance is not reached (default: 3 for dlg/idlg, 2 for ig)")
    p.add_argument("--seed", type=int, default=0, help="seeds labels, model init, the dummy data and the defenses")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")


def build_image_parser() -> argparse.ArgumentParser:
    p = LabParser(prog="dlg", description="Reconstruct images from a shared gradient (DLG, iDLG, gradient matching).")
    _add_image_options(p)
    add_defense_argument(p)
    add_client_arguments(p)  # --client, --precision, --dropout (issue 11)
    p.add_argument("--output", required=True, type=Path, help="where to write the result JSON")
    p.add_argument("--gif", type=Path, default=None, help="also write the reconstruction over iterations as a GIF")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


def build_text_parser() -> argparse.ArgumentParser:
    p = LabParser(prog="dlg text", description="DLG on text (baseline for DAGER): optimise input embeddings.")
    p.add_argument("--model", required=True, help="embedded model name (e.g. gpt2-small-random), hub id or folder")
    p.add_argument("--input", required=True, type=Path, help="UTF-8 text file, one sentence per line")
    p.add_argument("--batch-size", required=True, type=positive_int, help="sentences per client batch")
    p.add_argument("--task", default="classification", choices=("classification", "next-token"), help="client task")
    p.add_argument("--max-batches", type=positive_int, default=None, help="attack at most K batches")
    p.add_argument("--iterations", type=positive_int, default=100, help="optimiser steps per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of labels, the dummy data and the defenses")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")
    add_defense_argument(p)
    add_client_arguments(p)  # --client, --precision, --dropout (issue 11)
    p.add_argument("--output", required=True, type=Path, help="where to write the result JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dlg sweep`` (images)."""
    from labcli.sweep import add_sweep_arguments

    p = LabParser(
        prog="dlg sweep",
        description="DLG under a grid of client-side defenses: one attack per defense level, scored "
        "(PSNR, SSIM, label accuracy) with the update's utility cost; writes a CSV and a plot.",
    )
    _add_image_options(p)
    add_sweep_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _configure(verbose: bool, device: str) -> None:
    """Quiet transformers and set torch's threads: imports torch, so only after the checks."""
    if not verbose:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    if device == "cpu":
        # The attacked models are tiny: one thread avoids synchronisation costs that
        # dominate (measured 8 ms vs 143 ms per LeNet gradient-matching step on a busy
        # 2-core machine).
        import torch

        torch.set_num_threads(1)


def _check_output(path: Path) -> None:
    check_output_path("--output", path)


def _check_image_paths(paths: list[Path]) -> None:
    """Missing image files, found before torch loads (the loader checks the rest)."""
    for path in paths:
        if not path.exists():
            raise CliUsageError(f"Image file {str(path)!r} does not exist: check the path given to --image.")


def _image_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, DlgConfig]:
    """``(images, labels, model, config)`` of the image options (shared by run and sweep).

    Raises:
        CliUsageError: too many images, or labels that do not fit.
    """
    import torch

    from dlg.attack import DlgConfig
    from dlg.images import MAX_IMAGES, load_images
    from dlg.models import NUM_CLASSES, build_model

    if len(args.image) > MAX_IMAGES:
        raise CliUsageError(f"{len(args.image)} images were given; the attack handles at most {MAX_IMAGES}.")
    images = load_images(args.image)  # (B, 3, 32, 32); raises for bad files
    batch_size = images.shape[0]
    if args.label is not None:
        if len(args.label) != batch_size:
            raise CliUsageError(f"{len(args.label)} --label values for {batch_size} images: give one per image.")
        if any(v >= NUM_CLASSES for v in args.label):
            raise CliUsageError(f"labels are class ids from 0 to {NUM_CLASSES - 1}.")
        labels = torch.tensor(args.label, dtype=torch.long)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    restarts = args.restarts or (2 if args.method == "ig" else 3)
    config = DlgConfig(
        method=args.method, iterations=args.iterations, restarts=restarts, seed=args.seed, device=args.device,
        optimizer=args.optimizer,
    )
    model = build_model(args.model, seed=args.seed).to(args.device)
    return images, labels, model, config


def run_images(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if args.gif is not None:
        check_output_path("--gif", args.gif, example="out.gif")
        check_distinct({"--output": args.output, "--gif": args.gif})
    check_defense_specs(args.defense)
    _check_image_paths(args.image)
    _configure(args.verbose, args.device)  # torch from here on

    import fedclient
    from dlg.attack import run_dlg
    from dlg.metrics import evaluate_images

    check_device(args.device)
    defense, defense_keys = defense_record(args.defense)
    images, labels, model, config = _image_batch(args)
    training = dlg_training(args, model)
    batch_size = images.shape[0]
    t0 = time.perf_counter()
    update = fedclient.compute_update(
        model, fedclient.ImageBatch(images.to(args.device), labels.to(args.device)), defense=defense, seed=args.seed,
        training=training,
    )
    client_seconds = time.perf_counter() - t0
    result = run_dlg(model, update, config=config)  # no ground truth
    scores = evaluate_images(images, result.images, labels, result.labels)
    report: dict[str, object] = {
        "method": args.method,
        "model": args.model,
        "batch_size": batch_size,
        "psnr": scores.psnr,
        "ssim": scores.ssim,
        "mse": scores.mse,
        "label_accuracy": scores.label_accuracy,
        "converged_iteration": result.converged_iteration,
        "seconds": result.seconds,
        "per_image": [
            {
                "image": str(args.image[s.index]),
                "matched": s.matched,
                "psnr": s.psnr,
                "ssim": s.ssim,
                "mse": s.mse,
                "label": int(labels[s.index]),
                "recovered_label": int(result.labels[s.matched]),
                "label_correct": s.label_correct,
            }
            for s in scores.per_image
        ],
        "labels": [int(v) for v in labels],
        "recovered_labels": [int(v) for v in result.labels],
        "stop_reason": result.stop_reason,
        "iterations_run": len(result.losses),
        "client_seconds": client_seconds,
        "seed": args.seed,
        "device": args.device,
        **defense_keys,
        **client_keys(training),
    }
    ok = write_json(args.output, report, prog="dlg")
    if args.gif is not None:
        from dlg.gif import save_gif

        saved = save_results(args.gif, lambda p: save_gif(result.frames, p), prog="dlg")
        if not saved.ok:
            print(f"dlg: error: {lost_sentence('--gif', args.gif, saved)}", file=sys.stderr)
            ok = False
    print(
        f"{args.method} on {args.model}, batch {batch_size}: PSNR {scores.psnr:.1f} dB, SSIM {scores.ssim:.3f}, "
        f"labels {scores.label_accuracy:.0%}, stopped ({result.stop_reason}) after {len(result.losses)} "
        f"iterations in {result.seconds:.1f} s" + (f" -> {args.output}" if ok else "")
    )
    return 0 if ok else EXIT_FAILED


def run_text(args: argparse.Namespace) -> int:
    """``python -m dlg text`` (:func:`dlg.cli_text.run_text`)."""
    from dlg.cli_text import run_text as run

    return run(args)


def run_sweep_images(args: argparse.Namespace) -> int:
    """``python -m dlg sweep``: attack the same image batch once per grid point.

    Row metrics: ``psnr``, ``ssim``, ``label_accuracy`` (:func:`dlg.metrics.evaluate_images`),
    ``utility_cosine`` / ``utility_norm_ratio`` (:func:`fedclient.defenses.utility_cost`),
    ``stop_reason`` and ``iterations_run`` of the attack.
    """
    from labcli.sweep import OutputsNotWritten, check_grid_name, check_sweep_outputs, run_cli_sweep, sweep_points

    check_sweep_outputs(args)
    check_grid_name(args)
    _check_image_paths(args.image)
    _configure(args.verbose, args.device)  # torch from here on

    import fedclient
    from dlg.attack import run_dlg
    from dlg.metrics import evaluate_images
    from fedclient.defenses import utility_cost

    check_device(args.device)
    points = sweep_points(args)
    images, labels, model, config = _image_batch(args)
    batch = fedclient.ImageBatch(images.to(args.device), labels.to(args.device))

    def attack(defense: Defense | None) -> dict[str, object]:
        update = fedclient.compute_update(model, batch, defense=defense, seed=args.seed)
        cost = utility_cost(model, batch, update)
        result = run_dlg(model, update, config=config)  # no ground truth
        scores = evaluate_images(images, result.images, labels, result.labels)
        return {
            "psnr": scores.psnr,
            "ssim": scores.ssim,
            "label_accuracy": scores.label_accuracy,
            **cost,
            "stop_reason": result.stop_reason,
            "iterations_run": len(result.losses),
        }

    title = (
        f"{args.method} on {args.model}, batch {images.shape[0]}, {args.iterations} iterations x "
        f"{config.restarts} restart(s), {len(points)} point(s) of --grid {args.grid}"
    )
    try:
        run_cli_sweep(
            points, attack, metrics=("psnr", "ssim", "label_accuracy"), csv_path=args.csv, plot_path=args.plot,
            title=title,
        )
    except OutputsNotWritten as exc:
        print(f"dlg: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dlg`` / ``python -m dlg``; returns the exit status."""
    configure_cpu_threads()  # the console script's first act: before anything imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    text_mode = bool(argv) and argv[0] == "text"
    sweep_mode = bool(argv) and argv[0] == "sweep"

    def work() -> int:
        if sweep_mode:
            args = build_sweep_parser().parse_args(argv[1:])
            if not args.image:
                raise CliUsageError("No image was given: add --image FILE (repeat it for a batch of up to 8).")
            _configure_logging(args.verbose)
            return run_sweep_images(args)
        if text_mode:
            args = build_text_parser().parse_args(argv[1:])
            _configure_logging(args.verbose)
            return run_text(args)
        args = build_image_parser().parse_args(argv)
        if not args.image:
            raise CliUsageError("No image was given: add --image FILE (repeat it for a batch of up to 8).")
        _configure_logging(args.verbose)
        return run_images(args)

    return run_guarded("dlg", work, debug="--debug" in argv)
