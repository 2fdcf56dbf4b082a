"""The web demo: its helpers (masks, overlays, the chat -> request mapping), and a real browser
(Debian's headless chromium driven by playwright, nothing downloaded) that uploads the shared test
video, draws a box, asks and sees a streamed answer from a tiny model; the screenshot is saved under
the test's tmp folder (and `$VREFER_TEST_ARTIFACTS` when set)."""

import os
import shutil

import numpy as np
import pytest

from serve_helpers import LiveServer, shared_video, tiny_world
from vrefer_jax.inference.request_files import request_to_sample
from vrefer_jax.serving import demo

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)


def test_masks_overlay_and_request():
    """Two objects (a box, then a second mask on another frame in multi-frame mode), overlaid on
    their frames only, become a request whose sample has one <region> per object and the history."""
    state = demo.new_state()
    state["media"] = {"path": "/x.mp4", "modality": "video", "num_frames": 10}
    box = demo.box_mask((20, 30), (25, 15), (5, 2))  # corners in any order, inclusive
    assert box.sum() == 21 * 14 and box[2, 5] and box[15, 25] and not box[16, 25]
    state = demo.add_mask(state, 3, box, multi_frame=False)
    second = np.zeros((20, 30), bool)
    second[0:4, 0:4] = True
    state = demo.add_mask(state, 3, second, multi_frame=False)
    state = demo.add_mask(state, 7, second, multi_frame=True)  # joins <object1>
    assert [sorted(o) for o in state["objects"]] == [[3], [3, 7]]
    with pytest.raises(ValueError, match="empty"):
        demo.add_mask(state, 1, np.zeros((20, 30), bool), False)
    frame = np.full((20, 30, 3), 100, np.uint8)
    shown = demo.overlay(frame, state, 3)
    assert (shown[10, 10] != 100).any() and (shown[19, 29] == 100).all()
    assert (demo.overlay(frame, state, 5) == 100).all()  # no mask on frame 5
    history = [{"role": "user", "content": "Describe <object0>."}, {"role": "assistant", "content": "A box."}]
    req = demo.build_request(state, history, "Compare <object0> with <object1>.")
    assert req["history"] == [{"question": "Describe <object0>.", "answer": "A box."}]
    s = request_to_sample(req, 0, "", media_file="/x.mp4")
    assert [o.frames for o in s.objects] == [(3,), (3, 7)]
    assert [t["value"] for t in s.conversations] == [
        "<video>\nDescribe <object0> [<region>].", "A box.", "Compare <object0> with <object1> [<region>].", ""]
    editor = {"layers": [np.zeros((10, 15, 4), np.uint8)]}
    editor["layers"][0][2:4, 3:6, 3] = 255
    m = demo.brushed_mask(editor, (20, 30))  # painted at half size: scaled to the frame
    assert m.shape == (20, 30) and m[5, 8] and not m[0, 0]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium "
                                             "chromium-driver; see .ci/install_browser)")
def test_browser_upload_box_ask(tmp_path_factory):
    pytest.importorskip("playwright", reason="the playwright package (test extra) is not installed")
    pytest.importorskip("gradio", reason="gradio is not installed")
    from playwright.sync_api import sync_playwright

    from vrefer_jax.serving.app import create_app
    from vrefer_jax.serving.config import ServeConfig

    video = shared_video()
    if video is None:
        pytest.skip("the shared test video (shared/data/videos/dog_h264_1280x720.mp4) is absent")
    world = tiny_world(tmp_path_factory.mktemp("demo"), max_new_tokens=8)
    cfg = ServeConfig(media_root=world["root"], batch_window_ms=10.0, stream_chunk=2, max_new_tokens=16,
                      default_max_new_tokens=8)
    app = create_app(world["pred"], cfg, model_name="tiny")
    demo.mount(app, app.state.service)
    server = LiveServer(app)
    shot = tmp_path_factory.mktemp("artifacts") / "demo.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server.url + "/demo/")
            try:
                status, chat = _drive(page, video)
            except Exception:
                page.screenshot(path=str(shot.with_name("failure.png")), full_page=True)
                print(f"\nfailure screenshot {shot.with_name('failure.png')}; status "
                      f"{page.locator('#status').inner_text()!r}")
                raise
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        assert server.stop()
    out = os.environ.get("VREFER_TEST_ARTIFACTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(shot, os.path.join(out, "demo.png"))
    print(f"\nstatus: {status!r}; screenshot {shot}")
    n_tokens = int(status.split("answered: ")[1].split(" tokens")[0])
    assert n_tokens > 0 and "What is <object0> doing?" in chat
    assert shot.stat().st_size > 10_000


def _status_has(page, text: str, timeout: float = 60_000) -> None:
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({text!r})", timeout=timeout)


def _click_until(page, box: dict, at: tuple[float, float], status: str, tries: int = 5) -> None:
    """Click the frame until the status says `status`: a click that lands while the frame image is
    still being replaced (after the previous click) is dropped by the page."""
    for _ in range(tries):
        page.wait_for_timeout(500)
        page.mouse.click(box["x"] + at[0] * box["width"], box["y"] + at[1] * box["height"])
        try:
            _status_has(page, status, timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: click again
            continue
    _status_has(page, status, timeout=1_000)


def _drive(page, video: str) -> tuple[str, str]:
    """Upload, two clicks for a box, ask; -> (status line, chat text)."""
    page.locator("#media-upload input[type=file]").set_input_files(video)
    _status_has(page, "150 frame(s)")
    img = page.locator("#frame-view img")
    img.wait_for()
    b = img.bounding_box()
    _click_until(page, b, (0.35, 0.30), "first corner")
    _click_until(page, b, (0.70, 0.85), "box added")
    assert "<object0>" in page.locator("#objects").inner_text()
    page.locator("#question textarea").fill("What is <object0> doing?")
    page.locator("#ask").click()
    _status_has(page, "answered", timeout=180_000)
    return page.locator("#status").inner_text(), page.locator("#chat").inner_text()
