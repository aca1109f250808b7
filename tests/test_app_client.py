"""The app launched on 127.0.0.1 and driven through its API with ``gradio_client``.

The real attack engines run; a tiny seeded GPT-2 (with GPT-2's real tokenizer) stands
in for the embedded model so the text run takes about a second.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

DEFENSES_OFF = (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1)
SENTENCES = ["The nurse said my blood test was fine.", "Transfer the money before Friday."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import app
    from conftest import tiny_bundle
    from labui import engines

    with pytest.MonkeyPatch.context() as mp:
        bundle = tiny_bundle("gpt2")
        mp.setattr(engines, "load_model", lambda name, task="classification", device="cpu": bundle)
        demo = app.build_app()
        port = _free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **app.launch_options())
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False,
                        download_files=str(tmp_path_factory.mktemp("downloads")))
        try:
            yield engines, client, mp  # engines: where a test swaps an attack
        finally:
            demo.close()


@pytest.fixture(scope="module")
def private_png(tmp_path_factory) -> str:
    """A smooth colourful 64x64 image (DLG recovers such images well)."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    rgb = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)], axis=-1)
    path = tmp_path_factory.mktemp("img") / "private.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return str(path)


def test_text_endpoint_streams_and_recovers_typed_sentences(served):
    _, client, _ = served
    job = client.submit("\n".join(SENTENCES), "gpt2-small-random", "", "classification", False, *DEFENSES_OFF,
                        api_name="/dager")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 3  # it streamed: a first frame, progress, the final result
    result = final[-1]
    assert result["done"] is True
    assert sorted(result["recovered"]) == sorted(SENTENCES)
    assert result["exact_match"] == 1.0 and result["rouge1"] == 1.0
    assert "matches original" in final[4] and "Done" in final[0]


def test_text_endpoint_reports_bad_input_as_a_message(served):
    from gradio_client.exceptions import AppError

    _, client, _ = served
    with pytest.raises(AppError, match="at least one sentence"):
        client.predict("  \n ", "gpt2-small-random", "", "classification", False, *DEFENSES_OFF, api_name="/dager")


def test_image_endpoint_returns_a_reconstruction(served, private_png):
    from gradio_client import handle_file

    _, client, _ = served
    # A few L-BFGS steps keep the test short; they already lift the PSNR far above the
    # ~8 dB of the random initialisation (a full run reaches 30+ dB).
    status, preview, _loss, psnr_plot, comparison, gif = client.predict(
        "upload", handle_file(private_png), None, None, 7, "lenet", "idlg", 8, *DEFENSES_OFF, api_name="/dlg"
    )
    psnr = float(re.search(r"PSNR \*\*([\d.]+) dB", status).group(1))
    assert psnr > 15.0, status
    assert "✓ (correct)" in status  # iDLG read the label 7 from the gradient
    recon = np.asarray(Image.open(preview))
    assert recon.shape == (128, 128, 3)
    assert os.path.getsize(gif) > 0 and os.path.getsize(comparison) > 0


def test_image_endpoint_attacks_a_batch_of_files(served, private_png):
    from gradio_client import handle_file

    _, client, _ = served
    from labui.inputs import sample_images

    files = [handle_file(private_png), handle_file(sample_images()[0])]
    status, preview, _loss, _psnr, comparison, _gif = client.predict(
        "batch", None, None, files, 98, "lenet", "idlg", 3, *DEFENSES_OFF, api_name="/dlg"
    )
    assert "[98, 99] ✓ (correct)" in status, status  # iDLG read both labels from the gradient
    assert np.asarray(Image.open(preview)).shape == (128, 2 * 128 + 2, 3)
    assert np.asarray(Image.open(comparison)).shape == (2 * 128 + 8, 2 * 128 + 2, 3)


def test_cancelling_a_job_stops_the_attack(served, private_png):
    from gradio_client import handle_file
    from gradio_client.utils import Status

    engines, client, mp = served
    closed = threading.Event()
    real = engines.dlg_events

    def recording(*args, **kwargs):
        try:
            yield from real(*args, **kwargs)
        finally:
            closed.set()

    mp.setattr(engines, "dlg_events", recording)
    job = client.submit("upload", handle_file(private_png), None, None, 3, "lenet", "ig", 500, *DEFENSES_OFF,
                        api_name="/dlg")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(job.outputs()) >= 2, "the attack never started streaming"
    job.cancel()
    assert closed.wait(15), "the attack kept running after Stop"
    deadline = time.monotonic() + 15
    while job.status().code != Status.CANCELLED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.status().code == Status.CANCELLED
    # The server is free again: a new text job runs to the end.
    final = client.predict(SENTENCES[0], "gpt2-small-random", "", "classification", False, *DEFENSES_OFF,
                           api_name="/dager")
    assert final[-1]["recovered"] == [SENTENCES[0]]


def test_a_text_file_named_png_gets_the_batch_tabs_message(served, tmp_path):
    """Gradio used to decode the single upload itself and fail with a bare "Error"."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client, _ = served
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(AppError, match=r"Image 1 \(.*\.png\) is not an image PIL can read"):
        client.predict("upload", handle_file(str(fake)), None, None, 7, "lenet", "idlg", 3, *DEFENSES_OFF,
                       api_name="/dlg")


def test_an_animated_gif_says_it_used_the_first_frame(served, tmp_path):
    from gradio_client import handle_file

    _, client, _ = served
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    status = client.predict("upload", handle_file(str(path)), None, None, 7, "lenet", "idlg", 2, *DEFENSES_OFF,
                            api_name="/dlg")[0]
    assert "animated: the attack used its first frame" in status


def test_two_visitors_a_short_text_run_is_not_stuck_behind_a_long_image_run(served, private_png):
    """Separate lanes: visitor B's DAGER run finishes while visitor A's DLG run is still going."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    _, client_a, _ = served
    client_b = Client(client_a.src, analytics_enabled=False, verbose=False)
    long_job = client_a.submit("upload", handle_file(private_png), None, None, 3, "lenet", "ig", 500,
                               *DEFENSES_OFF, api_name="/dlg")
    deadline = time.monotonic() + 60
    while len(long_job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(long_job.outputs()) >= 2, "the image run never started"
    final = client_b.predict(SENTENCES[0], "gpt2-small-random", "", "classification", False, *DEFENSES_OFF,
                             api_name="/dager")
    assert final[-1]["recovered"] == [SENTENCES[0]]
    assert not long_job.done(), "the short run waited for the long one"
    long_job.cancel()
    deadline = time.monotonic() + 15
    while long_job.status().code != Status.CANCELLED and time.monotonic() < deadline:
        time.sleep(0.1)
