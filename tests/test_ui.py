"""The feature-map inspector in a real headless Chromium, against the real service."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from testkit.images import shape_png
from testkit.server import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps)")
# Chromium on a machine with no network: nothing in the background may try to reach out.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def open_ui(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"{url}/ui/")
    return page, problems


def test_ui_is_static_and_offline():
    from service.http.introspection import UI_DIR

    for path in UI_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, f"{path.name} fetches from outside"


def test_ui_is_linked_from_the_api_docs(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    assert "(/ui/)" in spec["info"]["description"]
    assert httpx.get(f"{server.url}/ui", timeout=30, follow_redirects=True).status_code == 200


@needs_chromium
def test_upload_shows_predictions_feature_maps_and_kernels(browser, server, tmp_path):
    layers = [row["name"] for row in httpx.get(f"{server.url}/model", timeout=30).json()["layers"][1:]]
    image = tmp_path / "cross.png"
    image.write_bytes(shape_png(4, size=96))
    page, problems = open_ui(browser, server.url)
    page.set_input_files("#file-input", str(image))

    page.wait_for_selector(".prediction", timeout=30_000)
    assert page.locator(".prediction").count() == 5
    for layer in ("conv1", "conv5"):
        page.wait_for_function(
            f"() => {{ const i = document.querySelector('img.grid[data-layer={layer}]'); return i && i.complete && i.naturalWidth > 0; }}",
            timeout=30_000,
        )
    rendered = page.eval_on_selector_all("img.grid", "imgs => imgs.map(i => [i.dataset.layer, i.naturalWidth])")
    assert [name for name, _ in rendered] == layers  # every layer, in network order
    assert all(width > 0 for _, width in rendered)
    page.wait_for_function("() => document.getElementById('kernels').naturalWidth > 0", timeout=30_000)
    info = page.locator(".layer[data-layer=conv1] dl").inner_text()
    assert "receptive field" in info and "5×5 px" in info  # the small preset's conv1: 5x5 kernels

    # a channel of conv2: its map over the input, and beside it the atlas -- what it looks for in the data
    page.click("img.grid[data-layer=conv2]", position={"x": 3, "y": 3})
    page.wait_for_selector("#overlay:not([hidden])", timeout=30_000)
    caption = page.locator("#overlay-caption").inner_text()
    assert "conv2, channel" in caption
    channel = int(caption.split("channel ")[1].split(":")[0])
    page.wait_for_function("() => { const g = document.getElementById('atlas-grid'); "
                           "return !g.hidden && g.complete && g.naturalWidth > 0; }", timeout=30_000)
    assert page.get_attribute("#atlas-grid", "data-channel") == str(channel)
    assert f"conv2, channel {channel}: its 9 strongest patches" in page.locator("#atlas-caption").inner_text()
    served = httpx.get(f"{server.url}/atlas", params={"layer": "conv2", "channel": channel}, timeout=30).json()
    assert page.get_attribute("#atlas-grid", "src").endswith(served["grid_png"])

    # every attribution method, laid over the input
    for method, words in (("occlusion", "gray square"), ("guided_backprop", "positive gradients"),
                          ("deconvolution", "transposed network"), ("integrated_gradients", "from a gray image"),
                          ("gradcam", "maps weighted by their gradient")):
        page.select_option("#method-select", method)
        page.click("#explain-button")
        page.wait_for_function(f"() => {{ const c = document.getElementById('cam'); return !c.hidden && "
                               f"c.dataset.method === '{method}' && c.complete && c.naturalWidth > 0; }}",
                               timeout=60_000)
        assert words in page.locator("#overlay-caption").inner_text(), method

    page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)
    assert (tmp_path / "inspector.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT"):  # the README's picture (the top of the page): UPDATE_SCREENSHOT=1
        page.screenshot(path=str(ROOT / "docs" / "inspector.png"))
    assert problems == []
    page.close()


@needs_chromium
def test_api_errors_are_shown_as_readable_messages(browser, server, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are not pixels")
    page, _ = open_ui(browser, server.url)
    page.set_input_files("#file-input", str(not_an_image))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "not a supported image" in page.locator("#error").inner_text()
    page.close()


@needs_chromium
def test_the_card_says_what_the_default_model_knows_and_its_samples_fit_it(browser, server):
    """The default model's card: synthetic shapes, not photos; its samples are its own classes, drawn by
    the generator of its training data (GET /samples)."""
    classes = httpx.get(f"{server.url}/model", timeout=30).json()["classes"]
    page, problems = open_ui(browser, server.url)
    page.wait_for_selector("#card-panel:not([hidden])", timeout=30_000)
    assert "does not know photos" in page.locator("#card-purpose").inner_text()
    assert "shapes" in page.locator("[data-fact=dataset]").inner_text()
    assert page.locator("button[data-sample]").evaluate_all("(buttons) => buttons.map((b) => b.dataset.sample)") \
        == classes
    page.click("button[data-sample=checker]")
    page.wait_for_selector(".prediction", timeout=30_000)
    page.wait_for_selector("img.grid[data-layer=conv1]", timeout=30_000)
    assert problems == []
    page.close()


@needs_chromium
def test_with_an_api_key_the_page_asks_for_it(browser, secured_server, tmp_path):
    from testkit.server import API_KEY

    image = tmp_path / "circle.png"
    image.write_bytes(shape_png(5, size=64))
    page, _ = open_ui(browser, secured_server.url)
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#api-key-box:not([hidden])", timeout=30_000)
    assert "API key" in page.locator("#error").inner_text()

    page.fill("#api-key-input", API_KEY)
    page.click("#api-key-save")
    page.wait_for_selector(".prediction", timeout=30_000)
    page.wait_for_selector("img.grid[data-layer=conv5]", timeout=30_000)
    page.wait_for_function("() => document.getElementById('kernels').naturalWidth > 0", timeout=30_000)
    assert page.locator("#error").is_hidden()
    page.close()
