"""The dashboard in a real headless Chromium (Debian chromium + chromium-driver, driven by Selenium):
sign in with a token, filter the study list, open a study with its Grad-CAM thumbnails, upload an image."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from fracwatch.daemon import Daemon, RunningDaemon
from fracwatch.service.queries import create_token
from fracwatch.synth.phantom import render_phantom
from tests import dicomgen
from tests.conftest import FakeClock, send_files
from tests.integration.test_scoring import complete

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium") or CHROMIUM, shutil.which("chromedriver") or CHROMEDRIVER
    assert Path(chromium).exists() and Path(driver).exists(), (
        "headless Chromium not found: install the Debian packages chromium and chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def send_study(daemon: Daemon, directory: Path, accession: str, fractured: bool, seed: int) -> str:
    ids = dicomgen.StudyIds(accession=accession)
    directory.mkdir(parents=True, exist_ok=True)
    path = dicomgen.save(dicomgen.phantom_image(ids, seed, fractured, str(generate_uid())), directory / "1.dcm")
    assert send_files(daemon.scp.address[1], [path]) == [0]
    return ids.study_uid


def test_sign_in_filter_open_study_and_upload(
    start_daemon: Callable[..., RunningDaemon], browser: webdriver.Chrome, tmp_path: Path, clock: FakeClock
) -> None:
    daemon = start_daemon()
    positive_uid = send_study(daemon, tmp_path / "a", "ACC-POS", True, 901)
    send_study(daemon, tmp_path / "b", "ACC-NEG", False, 902)
    complete(daemon, clock)
    token = create_token(daemon.settings, "dr-browser", "viewer")
    base = f"http://127.0.0.1:{daemon.settings.http_port}"
    # The page replaces parts of itself (feedback list, polling); chromedriver then reports a node it was reading as
    # "not belonging to the document" — a generic WebDriverException, not a stale element: the wait retries it.
    wait = WebDriverWait(browser, 30, ignored_exceptions=[WebDriverException])

    browser.get(f"{base}/")  # not signed in: sent to the sign-in page
    wait.until(expected_conditions.presence_of_element_located((By.ID, "token")))
    browser.find_element(By.ID, "token").send_keys("fw_wrong")
    browser.find_element(By.ID, "sign-in").click()
    assert "not valid" in wait.until(expected_conditions.presence_of_element_located((By.ID, "login-error"))).text
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "studies")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.study-row")) == 2

    Select(browser.find_element(By.ID, "f-category")).select_by_value("positive")
    browser.find_element(By.ID, "apply-filters").click()
    wait.until(expected_conditions.url_contains("category=positive"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.study-row")
    assert [r.get_attribute("data-category") for r in rows] == ["positive"]
    assert "ACC-POS" in rows[0].text and "⚑" in rows[0].text  # flagged for the worklist

    rows[0].find_element(By.CSS_SELECTOR, "a.study-link").click()
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "study-uid"), positive_uid))
    assert "positive" in browser.find_element(By.ID, "latest-category").text
    cam = browser.find_element(By.CSS_SELECTOR, "img.cam")
    browser.execute_script("arguments[0].scrollIntoView();", cam)
    wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam))
    assert browser.execute_script("return arguments[0].naturalWidth", cam) > 32

    browser.find_element(By.ID, "verdict").send_keys("agree")
    browser.find_element(By.ID, "send-feedback").click()
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "feedback"), "dr-browser"))

    picture = tmp_path / "upload.png"
    image = render_phantom(903, True).image
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(picture)
    browser.get(f"{base}/upload")
    browser.find_element(By.ID, "upload-file").send_keys(str(picture))
    browser.find_element(By.ID, "upload-submit").click()
    result = wait.until(expected_conditions.presence_of_element_located((By.ID, "upload-result")))
    assert browser.find_element(By.ID, "upload-category").text in ("positive", "doubt", "negative")
    assert float(browser.find_element(By.ID, "upload-probability").text) > 0.5  # a fractured phantom
    assert "upload.png" in result.text
    uploaded_cam = browser.find_element(By.ID, "upload-cam")
    assert uploaded_cam.get_attribute("src").startswith("data:image/png;base64,")

    browser.get(f"{base}/outbox")  # a viewer may not see the outbox
    assert "403" in browser.page_source or "admin role is required" in browser.page_source

    # /docs renders with no network beyond this server (this machine reaches no CDN): Swagger UI's own assets
    browser.get(f"{base}/docs")
    operations = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock"))
    assert len(operations) > 5 and "fracwatch" in browser.find_element(By.CSS_SELECTOR, "#swagger-ui .title").text
