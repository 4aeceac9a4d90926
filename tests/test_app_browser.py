"""The app as a person uses it: a real headless Chromium, driven by Playwright, against the page on localhost.

Press Protect with no image (a clear error must show), upload an example image into the
editor, paint over one object with the mouse, set few steps, press Protect, and wait for the
protected image, its download and both edits. Uses Debian's ``chromium`` (Playwright never
downloads a browser here); ``.ci/run`` installs it and Playwright's Python package.

To regenerate the screenshot in the README's results (``benchmarks/results/app.png``) with
the shipped model instead of random weights::

    DIFFALIGN_APP_SCREENSHOT=benchmarks/results/app.png DIFFALIGN_APP_MODEL=shapes-inpaint \\
    DIFFALIGN_APP_STEPS=200 python -m pytest -q tests/test_app_browser.py
"""

import io
import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urljoin

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app needs the app extra: pip install 'diffalign[app]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed: pip install playwright"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (CI's .ci/run does)"
)

# Headless as root, on a machine whose only network is loopback: no sandbox (root), and no
# background connections, which would be refused by the dozen and slow the start.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = os.environ.get("DIFFALIGN_APP_MODEL", "tiny-random-inpaint")
STEPS = int(os.environ.get("DIFFALIGN_APP_STEPS", "3"))
SCREENSHOT = os.environ.get("DIFFALIGN_APP_SCREENSHOT")  # also keep the final screenshot at this path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def served():
    """(URL, native side) of the app, served from a background thread on a free localhost port."""
    from diffalign.app import create_app, launch

    from diffalign import protection_io
    from diffalign.inpainting import load_inpainting

    pipe = load_inpainting(MODEL)
    app = create_app(pipe)
    port = free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", protection_io.native_side(pipe)
    finally:
        app.close()


def test_protect_and_compare_edits_in_chromium(served, tmp_path):
    from diffalign.app import example_images

    url, side = served
    image_path, _ = example_images.paths(example_images.EXAMPLES[0])  # red circle left, blue square right
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.set_default_timeout(30_000)
            page.goto(url)
            # The editor takes files once its canvas exists.
            page.wait_for_selector("#editor canvas")

            page.locator("#protect").click()
            sync_api.expect(page.get_by_test_id("toast-text")).to_contain_text("Upload an image first")
            page.get_by_test_id("toast-close").click()

            page.locator("#editor input[type=file]").set_input_files(image_path)
            # Once the image is on the canvas the editor switches to the brush.
            page.wait_for_selector("#editor button[aria-label=Brush].highlight")
            # The image is shown zoomed to the canvas element's height, centred; the red circle
            # is left of the centre. Zigzag over it with the mouse button held down.
            box = page.locator("#editor canvas").first.bounding_box()
            shown = min(box["width"], box["height"])
            x, y = box["x"] + box["width"] / 2 - 0.23 * shown, box["y"] + box["height"] / 2 - 0.06 * shown
            page.mouse.move(x - 0.1 * shown, y - 0.1 * shown)
            page.mouse.down()
            for dy in (-0.1, -0.05, 0, 0.05, 0.1):
                page.mouse.move(x - 0.1 * shown, y + dy * shown, steps=4)
                page.mouse.move(x + 0.1 * shown, y + dy * shown, steps=4)
            page.mouse.up()

            steps = page.locator("#steps input[type=number]")
            steps.fill(str(STEPS))
            steps.press("Enter")
            page.locator("#prompt textarea").fill("a red circle left of a green triangle")
            page.locator("#protect").click()

            page.wait_for_selector("#edit-protected img", timeout=45_000 + 500 * STEPS)
            summary = page.locator("#summary").inner_text()
            for element in ("#protected", "#edit-original", "#edit-protected"):
                size = page.locator(f"{element} img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
                assert size == [side, side], element
            href = page.locator("#download a").first.get_attribute("href")
            downloaded = page.request.get(urljoin(url, href))
            assert href.endswith("protected.png") and downloaded.ok
            assert Image.open(io.BytesIO(downloaded.body())).size == (side, side)
            page.wait_for_timeout(300)  # let the last images paint before the screenshot
            screenshot = tmp_path / "app.png"
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()

    assert f"diffusionguard, {STEPS} steps" in summary
    # What was painted became the mask: part of the image, not nothing and not all of it.
    area = int(re.search(rf"on (\d+)% of the {side}×{side} px image", summary).group(1))
    assert 3 <= area <= 60, summary
    assert screenshot.stat().st_size > 10_000
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)
