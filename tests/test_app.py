"""The browser page ``prato-app``: its logic alone, and the page end to end in a real headless browser.

The browser test serves the page on a free localhost port and drives Debian's ``chromium`` with
playwright (``executable_path``; playwright's own browser download is not used). It skips, saying
what to install, when gradio, gradio_image_annotation, playwright or chromium is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket

import numpy as np
import pytest
from PIL import Image
from test_predict import GRID, KEPT_Q25, phantom, tiny_checkpoint

from prato_exp.inference import Segmenter

INSTALL = (
    'pip install -e ".[dev]" (gradio, gradio_image_annotation, playwright) and apt-get install -y chromium'
)


def find_chromium() -> str | None:
    """``$PRATO_CHROMIUM``, else the first of Debian's and other usual chromium executables on PATH."""
    if os.environ.get("PRATO_CHROMIUM"):
        return shutil.which(os.environ["PRATO_CHROMIUM"])
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module in ("gradio", "gradio_image_annotation", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: {INSTALL}"
    if find_chromium() is None:
        return f"no chromium executable found (set PRATO_CHROMIUM=/path/to/chromium): {INSTALL}"
    return None


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Segmenter:
    return Segmenter.from_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp() / "prato_predict_ckpt"))


def test_page_model_runs_a_sample_with_pruned_and_unpruned_figures(segmenter):
    from prato_exp.app.server import PageModel

    model = PageModel(segmenter, repeats=1)
    assert len(model.samples) == 3 and model.has_q
    sample = model.samples[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape == (160, 160, 3)
    result = model.run(sample.image, sample.box, q=25, label=sample.label)
    assert result.tokens_text == f"{KEPT_Q25} / {GRID} tokens kept (75.0 %)"
    assert result.overlay.size == result.retention.size == (320, 320)  # 160 px enlarged to >= 256
    for row in ("| tokens kept |", "| GFLOPs |", "| time, median of 1", "Dice vs phantom ground truth"):
        assert row in result.stats_markdown
    assert model.run(sample.image, sample.box, q=50).tokens_text.startswith(f"{GRID - GRID // 2} / {GRID}")


@pytest.fixture(scope="module")
def served_page(segmenter):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from prato_exp.app.server import OFFLINE_ENV, PageModel, build_app, launch

    app = build_app(PageModel(segmenter, repeats=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {key: os.environ.get(key) for key in OFFLINE_ENV}
    url = launch(app, port=port, block=False)  # sets OFFLINE_ENV in this process
    yield url
    app.close()
    for key, value in saved.items():  # later tests see the environment they would have seen
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_page_in_a_headless_browser(served_page, tmp_path):
    from playwright.sync_api import sync_playwright

    height, width = 120, 144
    gray = (phantom(96) * 255).round().astype(np.uint8)
    upload = tmp_path / "upload.png"
    Image.fromarray(gray).resize((width, height)).save(upload)
    from gradio import analytics

    assert served_page.startswith("http://127.0.0.1:") and not analytics.analytics_enabled()
    elsewhere: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(served_page.rstrip("/")):
            route.continue_()
        else:  # the page must work offline: record and refuse anything not served by the app
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.route("**/*", local_only)
            page.goto(served_page, wait_until="load")
            page.wait_for_selector("#segment", timeout=60_000)

            page.locator("#annotator input[type=file]").set_input_files(upload)
            canvas = page.locator("#annotator canvas")
            canvas.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            # draw the box (30, 25) - (110, 100) on the image, which the canvas shows centred and scaled
            bb = canvas.bounding_box()
            scale = min(bb["width"] / width, bb["height"] / height)
            left = bb["x"] + (bb["width"] - width * scale) / 2
            top = bb["y"] + (bb["height"] - height * scale) / 2
            page.mouse.move(left + 30 * scale, top + 25 * scale)
            page.mouse.down()
            page.mouse.move(left + 110 * scale, top + 100 * scale, steps=10)
            page.mouse.up()
            # the annotator reports the box while it is drawn; wait for the finished one
            finished = "Number(document.querySelector('#box-x1 input').value) > 100"
            page.wait_for_function(finished, timeout=30_000)
            page.wait_for_timeout(300)
            drawn = [float(page.locator(f"#box-{k} input").input_value()) for k in ("x0", "y0", "x1", "y1")]
            np.testing.assert_allclose(drawn, [30, 25, 110, 100], atol=3)

            page.locator("#segment").click()
            tokens = page.locator("#tokens-kept textarea")
            page.wait_for_function(
                "document.querySelector('#tokens-kept textarea').value !== ''", timeout=60_000
            )
            assert tokens.input_value() == f"{KEPT_Q25} / {GRID} tokens kept (75.0 %)"
            mask = page.locator("#mask-overlay img")
            assert mask.get_attribute("src")
            page.wait_for_function(
                "document.querySelector('#mask-overlay img').naturalWidth > 0", timeout=30_000
            )
            assert page.eval_on_selector("#mask-overlay img", "e => e.naturalWidth") == 2 * width
            assert "unpruned" in page.locator("#stats").inner_text()

            # moving q re-runs the image with the new budget
            page.locator("#q input[type=range]").fill("50")
            page.locator("#q input[type=range]").dispatch_event("pointerup")
            expected = f"{GRID - GRID // 2} / {GRID} tokens kept (50.0 %)"
            page.wait_for_function(
                f"document.querySelector('#tokens-kept textarea').value === {expected!r}", timeout=60_000
            )
        finally:
            browser.close()
    assert elsewhere == [], f"the page asked for resources outside the app: {elsewhere}"


def test_app_refuses_a_missing_checkpoint(tmp_path, capsys):
    if (
        importlib.util.find_spec("gradio") is None
        or importlib.util.find_spec("gradio_image_annotation") is None
    ):
        pytest.skip(f"gradio is not installed: {INSTALL}")
    from prato_exp.app.server import main

    assert main(["--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_the_page_listens_on_localhost_by_default():
    from prato_exp.app.server import build_parser

    assert build_parser().parse_args(["--ckpt", "x"]).host == "127.0.0.1"
