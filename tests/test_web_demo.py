"""The web demo (``tools/web_demo.py``, issue #25), served for real: one server process on a free local port with the
bundled model, its API endpoint ``/generate`` called through ``gradio_client``, and the page driven by a real browser
(Debian's ``chromium`` through ``chromium-driver`` and Selenium; ``.ci/run`` installs both). A browser that cannot
start fails the test with the reason.

The bundled model's training size and size multiple are read, not assumed (it is retrained from time to time). The
browser test saves its screenshot in its tmp folder; ``WEB_DEMO_SCREENSHOT=docs/web-demo.png`` also writes it there
(the README's)."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import load_tool
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a large red circle in the center on a blue background"  # the canonical caption template: followed reliably
START_SECONDS = 300  # the server: imports, model loading and Gradio's start, with other jobs on the machine


def _read(*parts) -> dict:
    with open(os.path.join(DEFAULT_MODEL, *parts)) as f:
        return json.load(f)


TRAIN_SIZE = _read("mindone_lumina.json")["train_size"]
MULTIPLE = _read("transformer", "config.json")["patch_size"] * 2 ** (
    len(_read("vae", "config.json")["block_out_channels"]) - 1
)


@pytest.fixture(scope="module")
def web_demo():
    return load_tool("web_demo")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of ``tools/web_demo.py`` serving the bundled model on a free local port, stopped after the module."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "web_demo.py"), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with status {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {START_SECONDS} s:\n{log.read_text()}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server closes and exits with status 143 (cli.run)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, log.read_text()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("api")))


def _png_info(path) -> tuple:
    """(RGB array, text metadata) of a PNG file; fails unless it is one."""
    with Image.open(path) as im:
        assert im.format == "PNG", (path, im.format)
        return np.asarray(im.convert("RGB")), dict(im.text)


# ------------------------------------------------------------------------------------------------------------------
# What the page offers, without a server
# ------------------------------------------------------------------------------------------------------------------
def test_resolutions_are_the_original_demos_scaled(web_demo):
    full = [v for _, v in web_demo.resolutions(1024, 16, 4 * 1024**2)]
    assert full == ["1024x1024", "1536x1536", "2048x2048", "2048x1024", "1024x2048", "4096x1024", "1024x4096"]
    capped = [v for _, v in web_demo.resolutions(1024, 16, 1536**2)]  # 2048x1024 is 2.1 Mpx, under 1536^2 = 2.4 Mpx
    assert capped == ["1024x1024", "1536x1536", "2048x1024", "1024x2048"]
    small = web_demo.resolutions(TRAIN_SIZE, MULTIPLE, 4 * TRAIN_SIZE**2)
    assert small[0] == (f"{TRAIN_SIZE}x{TRAIN_SIZE} (training size)", f"{TRAIN_SIZE}x{TRAIN_SIZE}")
    for _, value in small:
        width, height = map(int, value.split("x"))
        assert width % MULTIPLE == 0 and height % MULTIPLE == 0 and width * height <= 4 * TRAIN_SIZE**2


@pytest.mark.parametrize(
    "form, message",
    [
        ({"resolution": "big"}, "is not WIDTHxHEIGHT"),
        ({"resolution": "4096x4096"}, "more than this server allows"),
        ({"resolution": "33x32"}, "multiples of 16"),
        ({"steps": 1}, "steps (time-grid points) must be a whole number in 2..100, got 1"),
        ({"steps": 2.5}, "whole number"),
        ({"steps": "many"}, "got 'many'"),
        ({"shift": 0}, "time shift must be a number"),
        ({"guidance_scale": float("nan")}, "guidance scale must be a number >= 0"),
        ({"watershed": 1.5}, "watershed must be a number in 0..1"),
        ({"solver": "heun"}, "unknown solver 'heun'"),
        ({"context_drop": 0}, "Context Drop merge factor must be a whole number in 1..8, got 0"),
        ({"context_drop": 1.5}, "Context Drop merge factor must be a whole number"),
        ({"context_drop_until": 2}, "Context Drop window must be a number in 0..1, got 2"),
        ({"context_drop_layers": "1-x"}, "context_drop_layers: expected 'all' or layer indices"),
    ],
)
def test_a_bad_form_is_a_clear_value_error(web_demo, form, message):
    from mindone_lumina.sampling import SampleSettings

    good = {"resolution": "1024x1024", "steps": 30, "solver": "midpoint", "schedule": "shift", "shift": 4,
            "guidance_scale": 4, "scaling": "original", "watershed": 0.3, "smooth_rope": False,
            "proportional_attn": True, "context_drop": 2, "context_drop_until": 0.5,
            "context_drop_layers": "0-2"}  # fmt: skip
    with pytest.raises(ValueError) as error:
        web_demo.request_settings(SampleSettings(), 16, 4 * 1024**2, **(good | form))
    assert message in str(error.value)


def test_the_command_line_asks_for_the_same_settings(web_demo):
    """Every setting of a request reaches ``tools/sample.py`` through the printed command."""
    from mindone_lumina.sampling import SampleSettings

    settings = SampleSettings(height=48, width=96, num_steps=7, solver="rk4", schedule="sigmoid", shift=2.5,
                              guidance_scale=0.0, scaling="always", smooth_rope=True, scale_watershed=0.45,
                              proportional_attn=False, context_drop=3, context_drop_until=0.65,
                              context_drop_layers="1,3-4")  # fmt: skip
    info = {"prompt": "a 'quoted' red circle", "negative_prompt": "-blurry", "seed": 99, "model": "some/folder",
            "dtype": "fp16", "settings": vars(settings)}  # fmt: skip
    argv = shlex.split(web_demo.sample_command(info, mode="pynative"))
    assert argv[:2] == ["python", "tools/sample.py"]
    args = load_tool("sample").parser().parse_args(argv[2:])
    assert (args.prompt, args.negative_prompt, args.seed, args.model, args.dtype, args.mode) == (
        ["a 'quoted' red circle"], "-blurry", 99, "some/folder", "fp16", "pynative")  # fmt: skip
    assert (args.resolution, args.steps, args.solver, args.schedule, args.shift, args.cfg, args.scaling,
            args.watershed, args.smooth_rope, args.no_proportional_attn, args.context_drop, args.context_drop_until,
            args.context_drop_layers) == (
        (96, 48), 7, "rk4", "sigmoid", 2.5, 0.0, "always", 0.45, True, True, 3, 0.65, "1,3-4")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The server, through its API
# ------------------------------------------------------------------------------------------------------------------
def test_a_prompt_alone_gives_the_image_it_names(client):
    image, seed, status, info, command, png, gallery = client.predict(PROMPT, api_name="/generate")
    pixels, text = _png_info(image)
    assert pixels.shape == (TRAIN_SIZE, TRAIN_SIZE, 3)
    got, want = shapes.detect(pixels), shapes.parse_prompt(PROMPT)
    assert {k: got[k] for k in ("colour", "background", "shape")} == {
        k: want[k] for k in ("colour", "background", "shape")
    }, (got, seed)
    assert seed == info["seed"] != 0  # seed 0 (the default) draws one, and the page shows which
    assert text["prompt"] == PROMPT and json.loads(text["seed"]) == seed
    assert json.loads(text["settings"]) == info["settings"] and info["settings"]["height"] == TRAIN_SIZE
    assert f"--seed {seed}" in command and f"--resolution {TRAIN_SIZE}x{TRAIN_SIZE}" in command
    assert _png_info(png)[1] == text and len(gallery) >= 1 and status.startswith(f"seed {seed}, ")


def test_bad_requests_get_a_message_and_the_server_goes_on(client):
    cases = [
        ({"prompt": " "}, "the prompt is empty"),
        ({"resolution": "100000x100000"}, "more than this server allows"),
        ({"steps": 1000}, "1000"),
    ]
    for form, message in cases:
        with pytest.raises(AppError) as error:
            client.predict(**({"prompt": PROMPT} | form), api_name="/generate")
        assert message in str(error.value), (form, str(error.value))
    image, seed, *_ = client.predict(PROMPT, steps=4, seed=7, solver="euler", api_name="/generate")
    assert seed == 7 and _png_info(image)[0].shape == (TRAIN_SIZE, TRAIN_SIZE, 3)


def test_two_visitors_never_generate_at_once(server):
    """Two visitors ask at the same moment: the queue (``--concurrency`` 1) runs one image, then the other."""
    clients = [Client(server, verbose=False, analytics_enabled=False, download_files=False) for _ in range(2)]
    jobs = [c.submit(PROMPT, steps=60, seed=1 + i, api_name="/generate") for i, c in enumerate(clients)]
    spans = [[None, None], [None, None]]  # (first seen generating, seen done) per job, as this process sees them
    deadline = time.monotonic() + 300
    while not all(span[1] for span in spans) and time.monotonic() < deadline:
        now = time.monotonic()
        for job, span in zip(jobs, spans):
            if span[0] is None and job.status().code in (Status.PROCESSING, Status.PROGRESS):
                span[0] = now
            if span[1] is None and job.done():
                span[1] = now
        time.sleep(0.01)
    assert all(start and end for start, end in spans), spans
    for job in jobs:
        job.result()  # both succeeded
    first, second = sorted(spans)
    assert second[0] >= first[1] - 0.25 * (first[1] - first[0]), spans  # no overlap but what polling lags by


def test_the_command_line_makes_the_same_image(client, tmp_path):
    """The printed ``tools/sample.py`` command, run, writes the image the page showed (an extrapolated size, with
    Context Drop)."""
    wide = f"{2 * TRAIN_SIZE}x{TRAIN_SIZE}"
    image, seed, _, info, command, *_ = client.predict(PROMPT, resolution=wide, steps=5, seed=11, context_drop=2,
                                                       context_drop_until=0.5, api_name="/generate")  # fmt: skip
    argv = shlex.split(command)
    assert argv[:2] == ["python", "tools/sample.py"] and f"--resolution {wide}" in command
    assert "--context-drop 2 --context-drop-until 0.5" in command
    out = tmp_path / "again.png"
    done = subprocess.run([sys.executable, *argv[1:], "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    again, text = _png_info(out)
    assert np.array_equal(again, _png_info(image)[0])
    assert json.loads(text["settings"]) == info["settings"]


# ------------------------------------------------------------------------------------------------------------------
# A real browser
# ------------------------------------------------------------------------------------------------------------------
def _browser():
    """Headless Debian chromium driven through its chromium-driver; a failure names what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"Selenium is missing ({e}): pip install -e '.[test]'")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium "
                    f"chromium-driver (found chromium: {binary}, chromedriver: {driver})")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400"):  # fmt: skip
        options.add_argument(flag)
    try:
        return webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except Exception as e:  # any WebDriver failure: the test fails with its reason, it is not skipped
        pytest.fail(f"chromium could not start: {type(e).__name__}: {' '.join(str(e).split())}")


def test_a_visitor_types_a_prompt_and_gets_an_image(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server + "?__theme=light")
        wait = WebDriverWait(browser, 120)
        prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys(shapes.caption(shapes.Scene("square", "yellow", "black", "small", "top left")))
        browser.find_element(By.CSS_SELECTOR, "button#generate").click()
        shown = "const i = document.querySelector('#image img'); return i && i.complete ? i.naturalWidth : 0"
        width = wait.until(lambda b: b.execute_script(shown))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img"))
        seed = browser.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, max(1400, height))
        shot = tmp_path / "web-demo.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert width == TRAIN_SIZE and int(seed) != 0
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and np.asarray(im).std() > 0
    if os.environ.get("WEB_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["WEB_DEMO_SCREENSHOT"])
