"""`imer demo`: the page, its API, and (slow) a real headless Chromium using it against a real model."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.demo import HOST, PAGE, make_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a fake microphone for Record


def test_api_contract_with_a_plain_predict_function():
    from fastapi.testclient import TestClient

    seen = []

    def predict(payload):
        seen.append(dict(payload))
        return {"label": "sad", "probabilities": {"sad": 0.7, "happy": 0.3}, "combination": "t",
                "used_prior": False, "modalities": {}}

    client = TestClient(make_app(predict))
    page = client.get("/")
    assert page.status_code == 200 and 'id="predict"' in page.text and 'type="file"' in page.text
    assert client.post("/api/predict", json={"text": "hello"}).json()["label"] == "sad"
    assert seen == [{"text": "hello"}]
    bad = client.post("/api/predict", json={"audio": "x"})
    assert bad.status_code == 400 and "unknown fields" in bad.json()["detail"]
    assert len(seen) == 1
    assert "fetch(\"api/predict\"" in PAGE  # the page posts to the API it is served with


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"imer demo exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"imer demo not up after {timeout_s}s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.serving_factory import shared_tiny_model

    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_url(tiny, tmp_path_factory):
    """A real `imer demo` process on a free 127.0.0.1 port, stopped by its pid."""
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--model", str(tiny["model"]),
                                 "--features-dir", str(tiny["features"]), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}/"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium + chromium-driver not installed (make install installs them via apt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _use_page(driver, url: str, files: dict[str, Path], text: str | None) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    for family, path in files.items():
        driver.find_element(By.ID, family).send_keys(str(path))
    if text is not None:
        driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "predict").click()
    WebDriverWait(driver, 240).until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    probs = {row.get_attribute("data-cls"): float(row.find_elements(By.TAG_NAME, "td")[1].text)
             for row in driver.find_elements(By.CSS_SELECTOR, "#probs tr.prob")}
    mods = {f: driver.find_element(By.ID, f"mod-{f}") for f in ("audio", "video", "text")}
    return {"emotion": driver.find_element(By.ID, "emotion").text, "probs": probs,
            "combination": driver.find_element(By.ID, "combination").text,
            "modalities": {f: (li.get_attribute("class"), li.text) for f, li in mods.items()}}


@pytest.mark.slow
def test_headless_browser_gets_the_emotion_of_uploaded_clips(tiny, demo_url, browser):
    """Upload a wav and an mp4 and type the transcript: the page shows what `imer predict` computes."""
    from flows.predict import main as imer_predict  # noqa: F401  (the same Predictor behind both)
    from pipeline.methods.checkpoint import load_model
    from pipeline.methods.routing import serving_info
    from pipeline.serving.media import MediaItem
    from pipeline.serving.predict import Predictor
    from pipeline.serving.recipes import model_recipes
    from tests.serving_factory import clip_files

    clip = clip_files(tiny, 0)
    shown = _use_page(browser, demo_url, {"audio": clip["audio"], "video": clip["video"]}, clip["text"].read_text())

    model, extra = load_model(tiny["model"])
    predictor = Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]),
                          model_recipes(extra, tiny["features"]), extra.get("feature_config_hashes"))
    direct = predictor.predict_items([MediaItem("x", dict(clip))]).iloc[0]
    assert shown["emotion"] == direct["label"] and set(shown["probs"]) == set(extra["classes"])
    for cls, p in shown["probs"].items():
        assert p == pytest.approx(float(direct[f"prob_{cls}"]), abs=2e-3)  # the page shows 3 decimals
    assert shown["combination"] == f"modalities used: {direct['combination']}"
    assert all(state == "used" for state, _ in shown["modalities"].values())

    text_only = _use_page(browser, demo_url, {}, "I am so happy today")
    assert text_only["combination"] == "modalities used: t" and text_only["emotion"] in extra["classes"]
    assert text_only["modalities"]["text"][0] == "used"
    for family in ("audio", "video"):
        state, line = text_only["modalities"][family]
        assert state == "missing" and line.startswith(f"{family}: not used (")


@pytest.mark.slow
def test_recorded_audio_is_used(tiny, demo_url, browser):
    """Record (Chromium's fake microphone, encoded to WAV in the page) and predict: the audio is used."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_url)
    browser.find_element(By.ID, "record").click()
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "recstate"), "recorded"))
    browser.find_element(By.ID, "predict").click()
    WebDriverWait(browser, 240).until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    audio = browser.find_element(By.ID, "mod-audio")
    assert audio.get_attribute("class") == "used", audio.text
    assert browser.find_element(By.ID, "combination").text == "modalities used: a"
