"""DLG / iDLG / gradient matching: recovery, label inference, loss, metrics, inputs, CLI."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedclient
from dlg.attack import DlgConfig, gradient_distance, infer_labels, iter_dlg, run_dlg
from dlg.cli import main
from dlg.events import DlgFinished, DlgStarted, DlgStep, LabelsInferred
from dlg.images import (
    ImageTooLargeError,
    NoImagesError,
    NotAnImageError,
    TooManyImagesError,
    TruncatedImageError,
    load_images,
)
from dlg.metrics import evaluate_images, label_accuracy, psnr_from_mse, ssim
from dlg.models import MODELS, UnknownVisionModelError, build_model
from fedclient.errors import InvalidConfigError, LabInputError

SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "images"


@pytest.fixture(autouse=True)
def _one_thread():
    # The attacked models are tiny: a single thread is fastest on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _client(model, images, labels):
    return fedclient.compute_update(model, fedclient.ImageBatch(images, torch.tensor(labels)))


def _psnr(a, b):
    return psnr_from_mse(float(((a - b) ** 2).mean()))


# --- models ---------------------------------------------------------------------------


def test_lenet_matches_the_paper_and_is_seeded():
    model = build_model("lenet")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    for p in model.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
    again = build_model("lenet")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownVisionModelError) as err:
        build_model("vgg")
    assert isinstance(err.value, LabInputError)
    for name in MODELS:
        assert name in str(err.value)


# --- the matching loss ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "cosine", "l2_layer", "cosine_layer"])
def test_gradient_distance_is_zero_at_the_ground_truth(kind):
    model = build_model("lenet")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    update = _client(model, images, [4, 9])
    same = _client(model, images, [4, 9])
    assert float(gradient_distance(same, update, kind)) == pytest.approx(0.0, abs=1e-6)
    other = _client(model, images.flip(-1), [4, 9])
    assert float(gradient_distance(other, update, kind)) > 1e-3
    with pytest.raises(ValueError):
        gradient_distance(same, update, "l1")


# --- label inference (iDLG) --------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["lenet", "resnet"])
@pytest.mark.parametrize("label", [0, 17, 99])
def test_idlg_label_is_exact_for_one_image(model_name, label):
    model = build_model(model_name)
    images = load_images([SAMPLES / "house.png"])
    labels, counts = infer_labels(model, _client(model, images, [label]), batch_size=1)
    assert labels.tolist() == [label]
    assert int(counts.sum()) == 1


@pytest.mark.parametrize("labels", [[3, 3, 17, 50], [5, 5, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8], [99, 0, 99, 0]])
def test_label_counts_for_a_batch(labels):
    model = build_model("lenet")
    files = sorted(SAMPLES.glob("*.png"))
    images = load_images((files * 2)[: len(labels)])
    inferred, counts = infer_labels(model, _client(model, images, labels), batch_size=len(labels))
    assert inferred.tolist() == sorted(labels)
    assert counts[3 if 3 in labels else labels[0]] == labels.count(3 if 3 in labels else labels[0])


# --- recovery -------------------------------------------------------------------------


def test_dlg_recovers_a_seeded_image_on_lenet():
    model = build_model("lenet")
    images = load_images([SAMPLES / "smiley.png"])
    update = _client(model, images, [42])
    result = run_dlg(model, update, config=DlgConfig(method="dlg", iterations=30, seed=0))
    assert _psnr(result.images, images) > 18.0  # about 20 dB after 30 L-BFGS steps
    assert result.labels.tolist() == [42]
    assert result.losses[-1] < result.losses[0] * 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smiley", "house", "landscape"])
def test_dlg_reaches_30db_with_early_stopping(name):
    model = build_model("lenet")
    images = load_images([SAMPLES / f"{name}.png"])
    result = run_dlg(model, _client(model, images, [7]), config=DlgConfig(method="idlg", iterations=300))
    assert _psnr(result.images, images) >= 30.0
    assert result.stop_reason == "tolerance" and result.converged_iteration < 300


def test_event_contract_and_prompt_cancel():
    model = build_model("lenet")
    images = load_images([SAMPLES / "glyph.png", SAMPLES / "house.png"])
    update = _client(model, images, [1, 2])
    config = DlgConfig(method="ig", iterations=6, restarts=1, preview_every=2, preview_seconds=0.0)
    events = list(iter_dlg(model, update, config=config))
    assert isinstance(events[0], DlgStarted) and events[0].batch_size == 2
    assert isinstance(events[1], LabelsInferred) and events[1].labels.tolist() == [1, 2]
    assert isinstance(events[-1], DlgFinished)
    steps = [e for e in events if isinstance(e, DlgStep)]
    assert [s.iteration for s in steps] == list(range(1, 7))
    assert all(s.preview is None or s.preview.shape == (2, 3, 32, 32) for s in steps)
    assert sum(s.preview is not None for s in steps) == 3
    result = events[-1].result
    assert result.images.shape == (2, 3, 32, 32) and 0 <= result.images.min() and result.images.max() <= 1
    assert [it for it, _ in result.frames] == [0, 2, 4, 6]
    # Closing the generator stops it: no further work, no finish event.
    gen = iter_dlg(model, update, config=DlgConfig(method="dlg", iterations=1000))
    next(gen)
    next(gen)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)


def test_gradient_matching_recovers_an_image_on_lenet():
    """ig: cosine distance + smooth TV under L-BFGS, labels read as in iDLG."""
    model = build_model("lenet")
    images = load_images([SAMPLES / "smiley.png"])
    update = _client(model, images, [3])
    result = run_dlg(model, update, config=DlgConfig(method="ig", iterations=120, restarts=1))
    scores = evaluate_images(images, result.images, torch.tensor([3]), result.labels)
    assert scores.label_accuracy == 1.0
    assert scores.psnr > 25.0  # measured 34 dB within 113 steps on this image (seed 0)


def test_gradient_matching_with_geipings_adam_lowers_the_distance():
    model = build_model("lenet")
    images = load_images([SAMPLES / "house.png"])
    update = _client(model, images, [9])
    config = DlgConfig(method="ig", optimizer="adam", iterations=150, restarts=1, patience=0)
    result = run_dlg(model, update, config=config)
    assert len(result.losses) == 150  # patience 0: the whole budget
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.labels.tolist() == [9]


def test_gradient_matching_runs_on_the_resnet():
    model = build_model("resnet")
    images = load_images([SAMPLES / "landscape.png"])
    update = _client(model, images, [5])
    result = run_dlg(model, update, config=DlgConfig(method="ig", iterations=4, restarts=2))
    assert result.labels.tolist() == [5]
    assert all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] < 1.0  # cosine distance below that of orthogonal gradients


def test_attack_runs_when_the_caller_disabled_autograd():
    model = build_model("lenet")
    update = _client(model, load_images([SAMPLES / "smiley.png"]), [2])
    with torch.no_grad():
        stream = iter_dlg(model, update, config=DlgConfig(method="idlg", iterations=3, restarts=1))
        events = list(stream)
        assert not torch.is_grad_enabled()  # the caller's mode is restored
    result = events[-1].result
    assert result.labels.tolist() == [2] and len(result.losses) == 3
    assert result.losses[-1] < result.losses[0]


def test_config_validation():
    with pytest.raises(InvalidConfigError):
        DlgConfig(method="magic")
    with pytest.raises(InvalidConfigError):
        DlgConfig(iterations=0)
    with pytest.raises(InvalidConfigError):
        DlgConfig(lr=-1.0)
    assert DlgConfig().effective_lr == 1.0 and DlgConfig(method="ig").effective_lr == 1.0
    assert DlgConfig(method="ig", optimizer="adam").effective_lr == 0.1


# --- metrics --------------------------------------------------------------------------


def test_metrics_known_values():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(1e-3) == pytest.approx(30.0)
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, 1 - img) < 0.1
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 5])) == pytest.approx(2 / 3)


def test_best_match_assignment_across_a_batch():
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(3, 3, 32, 32, generator=gen)
    rec = ref[[2, 0, 1]] + 0.1  # shuffled and shifted by 0.1: MSE 0.01 each
    scores = evaluate_images(ref, rec.clamp(0, 1), torch.tensor([4, 5, 6]), torch.tensor([6, 4, 5]))
    assert [s.matched for s in scores.per_image] == [1, 2, 0]
    assert all(s.label_correct for s in scores.per_image)
    assert scores.label_accuracy == 1.0
    assert 19.0 < scores.psnr < 22.0  # clamping lowers MSE a little below 0.01


# --- image inputs ------------------------------------------------------------------------


def test_modes_sizes_and_arrays_are_converted(tmp_path):
    gray = tmp_path / "gray.jpg"
    Image.new("L", (50, 80), 128).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(rgba)  # fully transparent -> white
    palette = tmp_path / "pal.gif"
    Image.new("RGB", (40, 40), (0, 0, 255)).convert("P").save(palette)
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    batch = load_images([gray, rgba, palette, array, Image.new("RGB", (33, 33), (0, 255, 0))])
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.allclose(batch[0], torch.full((3, 32, 32), 128 / 255), atol=1 / 255)
    assert torch.allclose(batch[1], torch.ones(3, 32, 32))
    assert batch[2, 2].mean() > 0.9 and batch[2, 0].mean() < 0.1
    assert float(batch[3].max()) == 0.0
    assert batch[4, 1].mean() > 0.99


def test_bad_images_give_specific_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(NotAnImageError, match="not an image"):
        load_images([text])
    good = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 30)).save(good, format="PNG", compress_level=0)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(TruncatedImageError, match="truncated"):
        load_images([cut])
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # 100 megapixels, a small file
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        load_images([huge])
    with pytest.raises(NoImagesError):
        load_images([])
    with pytest.raises(TooManyImagesError, match="at most 8"):
        load_images([np.zeros((4, 4, 3), dtype=np.uint8)] * 9)
    with pytest.raises(NotAnImageError, match="does not exist"):
        load_images([tmp_path / "missing.png"])


# --- CLI ---------------------------------------------------------------------------------

IMAGE_KEYS = {
    "method", "model", "batch_size", "psnr", "ssim", "mse", "label_accuracy",
    "converged_iteration", "seconds", "per_image",
}


def test_cli_writes_json_and_gif(tmp_path, capsys):
    out, gif = tmp_path / "result.json", tmp_path / "out.gif"
    code = main([
        "--image", str(SAMPLES / "smiley.png"), "--image", str(SAMPLES / "house.png"),
        "--method", "idlg", "--iterations", "3", "--label", "3", "--label", "8",
        "--output", str(out), "--gif", str(gif),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert IMAGE_KEYS <= set(report)
    assert report["method"] == "idlg" and report["model"] == "lenet" and report["batch_size"] == 2
    assert report["label_accuracy"] == 1.0
    assert len(report["per_image"]) == 2 and {"psnr", "ssim", "mse"} <= set(report["per_image"][0])
    with Image.open(gif) as anim:
        assert anim.n_frames >= 2 and anim.size[0] >= 128


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "does not exist"),
        ([], "No image"),
        (["--image", str(SAMPLES / "house.png"), "--model", "vgg"], "invalid choice"),
        (["--image", str(SAMPLES / "house.png"), "--label", "1", "--label", "2"], "one per image"),
        (["--image", str(SAMPLES / "house.png"), "--iterations", "0"], "at least 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    code = main([*args, "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_idlg_with_batch_prior_reaches_20db_at_batch_4():
    # LeNet's gradient of 4 images has fewer equations than unknown pixels; the smooth
    # TV prior (DlgConfig.batch_tv) picks the right solution (about 31 dB measured).
    model = build_model("lenet")
    files = sorted(SAMPLES.glob("*.png"))[:4]
    images = load_images(files)
    update = _client(model, images, [3, 10, 17, 24])
    result = run_dlg(model, update, config=DlgConfig(method="idlg", iterations=300, restarts=1))
    assert result.labels.tolist() == [3, 10, 17, 24]
    from dlg.metrics import evaluate_images

    assert evaluate_images(images, result.images, torch.tensor([3, 10, 17, 24]), result.labels).psnr >= 20.0


def test_attack_runs_single_threaded_on_cpu_and_restores_the_setting():
    import torch

    from dlg.attack import DlgConfig, iter_dlg
    from dlg.models import build_model
    from fedclient import ImageBatch, compute_update

    model = build_model("lenet", seed=0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    update = compute_update(model, ImageBatch(images, torch.tensor([3])))
    before = torch.get_num_threads()
    stream = iter_dlg(model, update, config=DlgConfig(method="idlg", iterations=2, restarts=1))
    next(stream)
    assert torch.get_num_threads() == 1
    stream.close()
    assert torch.get_num_threads() == before


# --- heartbeats, the shared model, the app's settings ----------------------------------


def test_heartbeats_come_between_evaluations_and_change_nothing(monkeypatch):
    import dlg.attack
    from dlg.events import DlgProgress

    model = build_model("lenet")
    images = load_images([SAMPLES / "glyph.png", SAMPLES / "house.png"])
    update = _client(model, images, [1, 2])
    config = DlgConfig(method="idlg", iterations=3, restarts=1)
    quiet = run_dlg(model, update, config=config)
    monkeypatch.setattr(dlg.attack, "HEARTBEAT_SECONDS", 0.0)  # a heartbeat after every evaluation
    events = list(iter_dlg(model, update, config=config))
    beats = [e for e in events if isinstance(e, DlgProgress)]
    steps = [e for e in events if isinstance(e, DlgStep)]
    assert [s.iteration for s in steps] == [1, 2, 3]
    # Each L-BFGS step evaluates many times; every evaluation got its heartbeat, and the
    # counts restart with each iteration.
    assert len(beats) > 3 * len(steps)
    assert {b.iteration for b in beats} == {1, 2, 3} and all(b.evaluations >= 1 for b in beats)
    first = [b.evaluations for b in beats if b.iteration == 1]
    assert first == list(range(1, len(first) + 1))
    # The iterates are the same with or without heartbeats.
    assert torch.equal(events[-1].result.images, quiet.images)
    assert events[-1].result.losses == quiet.losses


@pytest.mark.parametrize("method", ["dlg", "ig"])
def test_the_attack_leaves_the_shared_models_gradients_alone(method):
    # The app caches one model for every visitor: an attack must not write its .grad.
    model = build_model("lenet")
    images = load_images([SAMPLES / "smiley.png"])
    update = _client(model, images, [3])
    model.zero_grad(set_to_none=True)
    run_dlg(model, update, config=DlgConfig(method=method, iterations=2, restarts=1))
    assert all(p.grad is None for p in model.parameters())


def test_lesson_config_restarts_only_where_a_plateau_can_be_a_stall():
    from dlg.presets import LESSON_PATIENCE, has_floor, lesson_config

    def config(method, b):
        return lesson_config(method=method, batch_size=b, iterations=100, time_budget_s=60.0,
                             image_shape=(3, 32, 32))

    # Plain matching (B = 1) can reach zero: a plateau there is a stall, worth a restart.
    assert config("idlg", 1).restarts == DlgConfig().restarts == config("dlg", 1).restarts
    # With a prior the plateau is the prior's floor: one restart.
    assert config("ig", 1).restarts == 1 and config("idlg", 4).restarts == 1
    assert config("idlg", 4).patience == LESSON_PATIENCE and config("ig", 1).time_budget_s == 60.0
    assert has_floor("dlg", 2) and not has_floor("dlg", 1)
    with pytest.raises(ValueError):
        has_floor("zzz", 1)


def test_gradient_matching_with_the_apps_settings_recovers_an_image():
    from dlg.presets import lesson_config

    model = build_model("lenet")
    images = load_images([SAMPLES / "smiley.png"])
    update = _client(model, images, [7])
    config = lesson_config(method="ig", batch_size=1, iterations=100, time_budget_s=None, image_shape=(3, 32, 32))
    result = run_dlg(model, update, config=config)
    # Measured 33.4 dB, stopping on the plateau after about 31 iterations (seed 0).
    assert _psnr(result.images, images) >= 28.0
    assert result.stop_reason == "plateau" and len(result.losses) < 60


def test_settings_modules_import_without_torch():
    # A face can check settings (and the CLI its arguments) before torch loads.
    import subprocess
    import sys

    code = "import sys, dlg.config, dlg.presets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
