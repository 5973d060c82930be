"""UniMM Studio in a real browser: `python scripts/demo.py --run_dir RUNS` is started on the tiny trained stack of
conftest.py (a 4-step pretraining run) and driven in headless Chromium through Selenium and the system chromedriver
(Debian's `chromium` and `chromium-driver`; scripts/test.sh installs them as root). Each tab is used as a person
would: the prompt typed and Generate clicked, an image uploaded and a question asked twice (each answer streams in),
an image uploaded to the tokenizer tab, a run folder picked and shown; a bad option shows a message. Screenshots are saved under the test's
tmp folder (the path is printed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

_missing = [name for name, found in (("gradio", importlib.util.find_spec("gradio")),
                                     ("selenium", importlib.util.find_spec("selenium")),
                                     ("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
if _missing:
    pytest.skip(f"browser test needs {', '.join(_missing)}: run scripts/test.sh as root (it installs the [demo] extra "
                "and apt's chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
WAIT_S = 120  # generous: the 2-core CI machine is shared


@pytest.fixture(scope="module")
def demo_url(demo_runs, tmp_path_factory):
    from unimm.testing import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio_tmp"))}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "scripts/demo.py", "--run_dir", str(demo_runs), "--device", "cpu",
                                   "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if server.poll() is not None:
                raise AssertionError(f"the demo exited ({server.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the demo did not answer on {url} in {WAIT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo_screenshots")
    print(f"\ndemo screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser, demo_url):
    browser.get(demo_url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button[role='tab']"))
    return browser


def wait(driver, condition, timeout: float = WAIT_S):
    """`condition(driver)` once truthy; elements replaced while it looks at them (Gradio re-renders) retry it."""
    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def open_tab(driver, name: str) -> None:
    (tab,) = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if t.text == name]
    tab.click()
    wait(driver, lambda d: tab.get_attribute("aria-selected") == "true")


def type_into(driver, selector: str, text: str) -> None:
    field = css(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def loaded_images(driver, selector: str) -> list:
    """The images under `selector` that finished loading, as (natural width, natural height, src)."""
    return [(int(i.get_attribute("naturalWidth")), int(i.get_attribute("naturalHeight")), i.get_attribute("src"))
            for i in driver.find_elements(By.CSS_SELECTOR, selector)
            if i.get_attribute("complete") == "true" and int(i.get_attribute("naturalWidth") or 0) > 0]


def test_generate_shows_the_grid_and_a_bad_option_shows_a_message(page, screenshots, toy):
    type_into(page, "#gen-prompt textarea", "a red image")
    type_into(page, "#gen-count input", "3")
    type_into(page, "#gen-seed input", "4")
    css(page, "#gen-button").click()
    images = wait(page, lambda d: len(shown := loaded_images(d, "#gen-gallery img")) == 3 and shown)
    assert [(w, h) for w, h, _ in images] == [(16, 16)] * 3  # the toy tokenizer's 16 px images
    captions = css(page, "#gen-gallery").text
    assert "seed 4" in captions and "seed 6" in captions, captions
    assert css(page, "#gen-status").text == ""
    page.save_screenshot(str(screenshots / "generate.png"))

    # selecting a generated image makes it the chat image
    page.find_elements(By.CSS_SELECTOR, "#gen-gallery img")[0].click()
    open_tab(page, "Chat")
    wait(page, lambda d: loaded_images(d, "#chat-image img"))
    open_tab(page, "Generate")

    # a negative prompt without guidance: the inference layer's validation, shown as one line on the page
    type_into(page, "#gen-negative textarea", "a blue image")
    type_into(page, "#gen-cfg input", "0")
    css(page, "#gen-button").click()
    status = wait(page, lambda d: css(d, "#gen-status").text)
    assert status == "⚠️ negative_prompt is guidance's second branch: set cfg_scale > 0"
    assert "Traceback" not in page.find_element(By.TAG_NAME, "body").text
    type_into(page, "#gen-cfg input", "2")
    type_into(page, "#gen-count input", "40")
    css(page, "#gen-button").click()
    wait(page, lambda d: "number of images must be between 1 and 16, got 40" in css(d, "#gen-status").text)
    page.save_screenshot(str(screenshots / "generate_error.png"))


def test_chat_answers_over_two_turns(page, screenshots, toy, demo_runs):
    from unimm.data.tasks import ChatFormatConfig
    from unimm.demo.backend import Chat, DemoBackend

    image = str(toy["images"] / "red_0.png")
    questions = ["what colour is it?", "and the next one?"]
    reference, chat = DemoBackend.load(None, None, str(demo_runs), ChatFormatConfig(), device="cpu"), Chat(image)
    answers = [reference.ask(chat, q, max_new_tokens=8) for q in questions]

    open_tab(page, "Chat")
    css(page, "#chat-image input[type=file]").send_keys(image)
    wait(page, lambda d: loaded_images(d, "#chat-image img"))
    type_into(page, "#chat-max-tokens input", "8")
    for turn, question in enumerate(questions, 1):
        type_into(page, "#chat-question textarea", question)
        css(page, "#chat-ask").click()
        # the answer streams in: wait for the whole of it (the second is conditioned on the first turn, as the
        # backend builds it)
        wait(page, lambda d, turn=turn: bot_texts(d) == answers[:turn])
    assert bot_texts(page) == answers
    assert [m.text for m in page.find_elements(By.CSS_SELECTOR, "#chat-log [data-testid='user']")] == questions
    page.save_screenshot(str(screenshots / "chat.png"))


def bot_texts(driver) -> list[str]:
    return [m.text for m in driver.find_elements(By.CSS_SELECTOR, "#chat-log [data-testid='bot']")]


def test_tokenizer_tab_shows_reconstruction_metrics_and_code_maps(page, screenshots, toy):
    open_tab(page, "Tokenizer")
    css(page, "#tok-upload input[type=file]").send_keys(str(toy["images"] / "blue_0.png"))
    wait(page, lambda d: all(loaded_images(d, f"{s} img") for s in ("#tok-recon", "#tok-map-pixel",
                                                                      "#tok-map-semantic")))
    assert [(w, h) for w, h, _ in loaded_images(page, "#tok-recon img")] == [(16, 16)]
    metrics = css(page, "#tok-metrics").text
    assert "PSNR" in metrics and "SSIM" in metrics and "16 positions" in metrics, metrics
    (pixel_map,) = loaded_images(page, "#tok-map-pixel img")
    assert pixel_map[:2] == (96, 96)  # 4 x 4 positions, 24 px each
    page.find_element(By.XPATH, "//*[@id='tok-depth']//label[normalize-space(.)='1']").click()
    wait(page, lambda d: (shown := loaded_images(d, "#tok-map-pixel img")) and shown[0][2] != pixel_map[2])
    # depth 1's map replaced depth 0's
    page.save_screenshot(str(screenshots / "tokenizer.png"))


def test_runs_tab_plots_the_losses_and_lists_checkpoints(page, screenshots, demo_runs):
    open_tab(page, "Runs")
    css(page, "#runs-folder input").click()
    options = wait(page, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "ul[role='listbox'] li") if o.text])
    assert [o.text for o in options] == [str(demo_runs / "pretrain")]
    options[0].click()
    css(page, "#runs-show").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-losses svg .mark-line path"))
    legend = css(page, "#runs-losses").text
    for series in ("text_loss", "visual_loss/pixel", "visual_loss/semantic"):
        assert series in legend, legend
    for plot in ("#runs-lr", "#runs-speed", "#runs-grad"):
        assert page.find_elements(By.CSS_SELECTOR, f"{plot} svg .mark-line path"), plot
    assert "checkpoint-4" in css(page, "#runs-checkpoints").text
    page.save_screenshot(str(screenshots / "runs.png"))

    type_into(page, "#runs-folder input", str(demo_runs / "missing"))
    css(page, "#runs-folder input").send_keys(Keys.ENTER)
    css(page, "#runs-show").click()
    wait(page, lambda d: "no training log there" in css(d, "#runs-status").text)
