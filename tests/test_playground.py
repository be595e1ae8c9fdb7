"""The playground page of `lcmtrt serve` in a real headless chromium (Debian's chromium and chromium-driver): it asks
for the API key, generates an image whose pixels equal the API's for the same request, inpaints with a mask painted
by brush and eraser as the API does with the same mask, shows a 503 and a 400 as readable messages, and fits a
phone-width screen. Screenshots are kept in $LCMTRT_TEST_ARTIFACTS (default
artifacts/tests/)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from test_serve import KEY, Server, _http_head, decoded, multipart, png_bytes, start_server, stop

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")

CHROMIUM = os.environ.get("LCMTRT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LCMTRT_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("LCMTRT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts" / "tests"))
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(tiny_sd15_bundle: Path, tiny_sd15_canny_bundle: Path, tmp_path_factory) -> Server:
    """--max-queue 2 and a long wait for company: with one image held in the queue (see queue_held), a request for
    2 images is refused with 503 at once, deterministically (never admitted). Requests one at a time never wait."""
    running = start_server(tmp_path_factory.mktemp("playground"), "--engines", f"tiny={tiny_sd15_bundle}",
                           "--engines", f"canny={tiny_sd15_canny_bundle}", "--max-queue", "2", "--max-n", "2",
                           "--max-batch-wait-ms", "60000")
    yield running
    stop(running)


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def set_field(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def result_pixels(driver, index: int = 0) -> np.ndarray:
    src = driver.find_elements("css selector", "#results li img.result-image")[index].get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def open_with_key(driver, server: Server, first_model: str = "tiny") -> None:
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(f"http://127.0.0.1:{server.port}/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    wait(driver, ec.visibility_of_element_located(("id", "key-panel")), "the page did not ask for the API key")
    set_field(driver, "api-key", KEY)
    driver.find_element("id", "save-key").click()
    wait(driver, lambda d: d.find_element("id", "model").get_attribute("value") == first_model, "no model listed")
    assert driver.execute_script("return sessionStorage.getItem('lcmtrt-api-key')") == KEY
    assert not driver.find_element("id", "key-panel").is_displayed()


@contextlib.contextmanager
def queue_held(server: Server) -> Iterator[None]:
    """One image queued for model tiny until the block ends: it waits for company, a request still uploading."""
    uploading = socket.create_connection(("127.0.0.1", server.port))
    uploading.sendall(_http_head(1000) + b'{"prompt": ')
    queued = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": "tiny", "prompt": "holds the queue", "n": 1, "seed": 5}).encode()
    queued.sendall(_http_head(len(body)) + body)
    try:
        for _ in range(WAIT_S * 50):
            if server.metric("lcmtrt_queue_images", model="tiny") == 1:
                break
            time.sleep(0.02)
        assert server.metric("lcmtrt_queue_images", model="tiny") == 1
        yield
    finally:
        uploading.close()  # no company on its way any more: the held request runs and is answered
        queued.settimeout(WAIT_S)
        with contextlib.suppress(OSError):
            queued.recv(1)
        queued.close()


def test_page_generates_the_apis_pixels_and_shows_errors(browser, page_server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    status, headers, html = page_server.request("GET", "/", key=None)  # open: the page asks for the key itself
    assert status == 200 and "lcmtrt playground" in html and "default-src 'none'" in headers["content-security-policy"]
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    open_with_key(browser, page_server)
    card = page_server.request("GET", "/v1/models")[2]["data"][0]
    assert browser.find_element("id", "steps").get_attribute("value") == str(card["default_steps"])

    set_field(browser, "prompt", "a lighthouse on a cliff")
    set_field(browser, "seed", "1234")
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: d.find_elements("css selector", "#results li img.result-image"), "no image appeared")
    shown = result_pixels(browser)
    status, _, body = page_server.post_json({"model": "tiny", "prompt": "a lighthouse on a cliff", "seed": 1234,
                                             "num_inference_steps": card["default_steps"],
                                             "guidance_scale": card["default_guidance_scale"]})
    assert status == 200
    expected = decoded(body["data"][0])
    assert shown.shape == (64, 64, 3)
    np.testing.assert_array_equal(shown, expected)
    meta = browser.find_element("css selector", "#results li").text
    assert "seed 1234" in meta and "a lighthouse on a cliff" in meta and "Last seed used: 1234" in \
        browser.find_element("id", "seed-hint").text

    # Ctrl+Enter with a random seed: a second result, newest first, with its seed shown back
    browser.find_element("id", "random-seed").click()
    seed = int(browser.find_element("id", "seed").get_attribute("value"))
    browser.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements("css selector", "#results li")) == 2, "Ctrl+Enter did not generate")
    assert f"seed {seed}" in browser.find_elements("css selector", "#results li")[0].text

    # 503: two images do not fit beside the one held in a queue of two; the message and its Retry-After are shown
    set_field(browser, "n", "2")
    with queue_held(page_server):
        browser.find_element("id", "generate").click()
        wait(browser, lambda d: "503" in d.find_element("id", "error").text, "no message for the 503")
    error = browser.find_element("id", "error").text
    assert "Server busy (503)" in error and "1 images queued" in error and "adds 2 (limit 2" in error, error
    assert "waiting 1 s" in error, error
    assert browser.find_element("id", "generate").is_enabled()
    assert len(browser.find_elements("css selector", "#results li")) == 2
    screenshot(browser, tmp_path, "playground.png")

    # 400: the server's message for a bad field
    set_field(browser, "n", "1")
    set_field(browser, "steps", "51")
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: "(400)" in d.find_element("id", "error").text, "no message for the 400")
    assert "num_inference_steps" in browser.find_element("id", "error").text
    set_field(browser, "steps", str(card["default_steps"]))

    # "Reuse settings" puts a result's seed back into the form
    browser.find_elements("css selector", "#results li .actions button")[1].click()
    assert browser.find_element("id", "seed").get_attribute("value") == "1234"

    # image to image: a picked file goes to /v1/images/edits as multipart; the pixels equal the API's edit
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes(shown))
    browser.find_element("id", "init-image").send_keys(str(source))
    wait(browser, lambda d: d.find_element("id", "init-preview").is_displayed(), "no preview of the input image")
    set_field(browser, "prompt", "a blue lighthouse")
    set_field(browser, "seed", "77")
    set_field(browser, "strength", "0.5")
    Select(browser.find_element("id", "img2img-mode")).select_by_value("lcm")
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: "img2img lcm 0.5" in d.find_element("css selector", "#results li").text, "no edit shown")
    fields = {"model": "tiny", "prompt": "a blue lighthouse", "seed": "77", "strength": "0.5", "img2img_mode": "lcm",
              "num_inference_steps": str(card["default_steps"]), "guidance_scale": str(card["default_guidance_scale"])}
    body, kind = multipart(fields, {"image": ("source.png", source.read_bytes())})
    status, _, answer = page_server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})
    assert status == 200, answer
    np.testing.assert_array_equal(result_pixels(browser), decoded(answer["data"][0]))


def test_controlnet_map_is_sent_and_shown_beside_the_result(browser, page_server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    open_with_key(browser, page_server)
    assert not browser.find_element("id", "control").is_displayed()
    Select(browser.find_element("id", "model")).select_by_value("canny")
    assert browser.find_element("id", "control").is_displayed()
    control = np.zeros((80, 96, 3), np.uint8)
    control[20:60, 30:70] = 255
    (tmp_path / "control.png").write_bytes(png_bytes(control))
    browser.find_element("id", "control-image").send_keys(str(tmp_path / "control.png"))
    wait(browser, lambda d: d.find_element("id", "control-preview").is_displayed(), "no preview of the control map")
    set_field(browser, "prompt", "a house")
    set_field(browser, "seed", "2")
    set_field(browser, "control-scale", "0.7")
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: d.find_elements("css selector", "#results li img.control-map"), "no control map shown")
    card = next(m for m in page_server.request("GET", "/v1/models")[2]["data"] if m["id"] == "canny")
    status, _, body = page_server.post_json({
        "model": "canny", "prompt": "a house", "seed": 2, "control_scale": 0.7,
        "control_image": base64.b64encode(png_bytes(control)).decode(), "num_inference_steps": card["default_steps"],
        "guidance_scale": card["default_guidance_scale"]})
    assert status == 200, body
    np.testing.assert_array_equal(result_pixels(browser), decoded(body["data"][0]))
    screenshot(browser, tmp_path, "playground-controlnet.png")


def test_page_fits_a_phone(browser, page_server: Server, tmp_path: Path) -> None:
    browser.set_window_size(390, 844)
    try:
        open_with_key(browser, page_server)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone"
        for element_id in ("prompt", "seed", "generate"):
            element = browser.find_element("id", element_id)
            assert element.is_displayed() and element.rect["x"] + element.rect["width"] <= 390
        unlabeled = browser.execute_script("""
            return [...document.querySelectorAll('input, select, textarea')]
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
        assert unlabeled == []
        screenshot(browser, tmp_path, "playground-phone.png")
    finally:
        browser.set_window_size(1280, 900)


@pytest.fixture(scope="module")
def inpaint_page_server(build_tiny, tmp_path_factory) -> Server:
    running = start_server(tmp_path_factory.mktemp("playground-inpaint"), "--engines",
                           f"blend={build_tiny('tiny-sd15-blend')}", "--engines",
                           f"unet9={build_tiny('tiny-sd15-inpaint')}")
    yield running
    stop(running)


def stroke(driver, points: list[tuple[int, int]]) -> None:
    """Pointer events (down, moves, up) over the mask canvas at the centres of these image pixels."""
    driver.execute_script("""
        const canvas = document.getElementById("mask-canvas"), box = canvas.getBoundingClientRect();
        const at = ([x, y]) => ({clientX: box.left + (x + 0.5) * box.width / canvas.width,
                                 clientY: box.top + (y + 0.5) * box.height / canvas.height,
                                 pointerId: 1, isPrimary: true, bubbles: true, button: 0, buttons: 1});
        const points = arguments[0];
        canvas.dispatchEvent(new PointerEvent("pointerdown", at(points[0])));
        for (const point of points.slice(1)) canvas.dispatchEvent(new PointerEvent("pointermove", at(point)));
        canvas.dispatchEvent(new PointerEvent("pointerup", at(points[points.length - 1])));""", points)


def brush_size(driver, size: int) -> None:
    driver.execute_script("""const range = document.getElementById("brush-size");
        range.value = arguments[0]; range.dispatchEvent(new Event("input"));""", size)


def test_painted_mask_inpaints_as_the_api(browser, inpaint_page_server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    open_with_key(browser, inpaint_page_server, "blend")
    source = tmp_path / "photo.png"
    source.write_bytes(png_bytes((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)))
    assert not browser.find_element("id", "mask-editor").is_displayed()  # no image yet
    browser.find_element("id", "init-image").send_keys(str(source))
    wait(browser, lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 96,
         "the mask canvas did not take the image's size")
    assert browser.find_element("id", "mask-editor").is_displayed()
    assert not browser.find_element("id", "init-preview").is_displayed()  # the editor shows the image

    brush_size(browser, 20)  # painted, then cleared: nothing of it is sent
    stroke(browser, [(5, 5), (50, 50)])
    browser.find_element("id", "mask-clear").click()
    brush_size(browser, 10)
    stroke(browser, [(20, 30), (40, 30), (60, 30)])  # rows 25..34, columns 15..64
    browser.find_element("id", "mask-eraser").click()
    brush_size(browser, 4)
    stroke(browser, [(40, 30)])  # rows 28..31, columns 38..41 kept again
    assert browser.find_element("id", "mask-eraser").get_attribute("aria-pressed") == "true"
    repaint = box_mask(25, 15, 35, 65)
    repaint[28:32, 38:42] = False

    set_field(browser, "prompt", "a red brick wall")
    set_field(browser, "seed", "42")
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: d.find_elements("css selector", "#results li img.mask-map"), "no inpainted result")
    shown_mask = browser.find_element("css selector", "#results li img.mask-map").get_attribute("src")
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(shown_mask.split(",", 1)[1]))).convert("L")) == 255,
        repaint)
    assert "inpaint default" in browser.find_element("css selector", "#results li").text
    assert browser.find_element("id", "mode-field").is_displayed()  # a blend model also does image to image
    rgba = np.zeros((80, 96, 4), np.uint8)
    rgba[..., 3] = np.where(repaint, 0, 255)  # OpenAI's mask: transparent where repainted
    np.testing.assert_array_equal(result_pixels(browser), api_edit(inpaint_page_server, "blend", source, rgba))
    screenshot(browser, tmp_path, "playground-inpaint.png")

    # a 9-channel model only inpaints: no mode, and nothing painted is a message, not a request
    Select(browser.find_element("id", "model")).select_by_value("unet9")
    assert browser.find_element("id", "img2img-legend").text == "Inpainting"
    assert not browser.find_element("id", "mode-field").is_displayed()
    browser.find_element("id", "mask-clear").click()
    browser.find_element("id", "generate").click()
    assert "only inpaints" in browser.find_element("id", "error").text
    browser.find_element("id", "mask-brush").click()
    brush_size(browser, 10)
    stroke(browser, [(20, 30), (60, 30)])
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: len(d.find_elements("css selector", "#results li")) == 2, "no 9-channel result")
    rgba[..., 3] = np.where(box_mask(25, 15, 35, 65), 0, 255)
    np.testing.assert_array_equal(result_pixels(browser), api_edit(inpaint_page_server, "unet9", source, rgba))


def box_mask(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    repaint = np.zeros((80, 96), bool)
    repaint[top:bottom, left:right] = True
    return repaint


def api_edit(server: Server, model: str, source: Path, rgba: np.ndarray) -> np.ndarray:
    """The API's image for the playground's request (seed 42, the card's defaults) with this OpenAI mask."""
    card = next(m for m in server.request("GET", "/v1/models")[2]["data"] if m["id"] == model)
    fields = {"model": model, "prompt": "a red brick wall", "seed": "42", "n": "1",
              "num_inference_steps": str(card["default_steps"]), "guidance_scale": str(card["default_guidance_scale"])}
    body, kind = multipart(fields, {"image": ("photo.png", source.read_bytes()), "mask": ("mask.png", png_bytes(rgba))})
    status, _, answer = server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})
    assert status == 200, answer
    return decoded(answer["data"][0])


def test_chosen_sampler_gives_the_apis_image(browser, page_server: Server) -> None:
    """Sampler, eta and timesteps from the form go through the API: the shown pixels equal the API's for the same
    request, and differ from the default sampler's."""
    from selenium.webdriver.support.ui import Select

    open_with_key(browser, page_server)
    card = page_server.request("GET", "/v1/models")[2]["data"][0]
    options = [o.get_attribute("value") for o in Select(browser.find_element("id", "scheduler")).options]
    assert options == card["schedulers"] and "tcd" in options
    assert Select(browser.find_element("id", "scheduler")).first_selected_option.get_attribute("value") == \
        card["scheduler"]
    set_field(browser, "prompt", "a sailing boat")
    set_field(browser, "seed", "21")
    Select(browser.find_element("id", "scheduler")).select_by_value("tcd")
    set_field(browser, "eta", "0.3")
    set_field(browser, "timesteps", "999,499")
    before = len(browser.find_elements("css selector", "#results li"))
    browser.find_element("id", "generate").click()
    wait(browser, lambda d: len(d.find_elements("css selector", "#results li")) == before + 1, "no image appeared")
    assert "tcd eta 0.3" in browser.find_element("css selector", "#results li").text
    request = {"model": "tiny", "prompt": "a sailing boat", "seed": 21, "scheduler": "tcd", "eta": 0.3,
               "timesteps": [999, 499], "guidance_scale": card["default_guidance_scale"]}
    status, _, body = page_server.post_json(request)
    assert status == 200, body
    np.testing.assert_array_equal(result_pixels(browser), decoded(body["data"][0]))
    status, _, plain = page_server.post_json({k: v for k, v in request.items() if k not in ("scheduler", "eta")})
    assert status == 200 and not np.array_equal(decoded(plain["data"][0]), decoded(body["data"][0]))
