"""vlm_webui.py: the answering and command-building parts (no gradio needed), and the real page in a headless
Chromium answering a question. The browser test needs gradio and selenium (pinned) and Debian's chromium +
chromium-driver (.ci/run installs them); it is skipped without them, except where REQUIRE_BROWSER_TEST=1 (CI) makes
that a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from tests.vlm_helpers import shapes_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import vlm_train
    from library.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("webui")
    model = save_tiny_vlm(root / "model", "qwen2_5_vl")
    data = shapes_dataset(root / "data")
    adapter = vlm_train.main(["--model_local_path", str(model), "--data_path", str(data["train"]), "--image_folder",
                              str(data["folder"]), "--output_dir", str(root / "out"), "--max_train_steps", "20",
                              "--learning_rate", "1e-2", "--train_batch_size", "4", "--lora_dropout", "0",
                              "--seed", "0"])
    return {"model": model, "adapter": adapter, **data}


def _expected_answer(trained, image: Path) -> str:
    from library.vlm.data import Sample, Turn
    from library.vlm.inference import load_predictor

    predictor = load_predictor(str(trained["model"]), str(trained["adapter"]), torch.device("cpu"))
    sample = Sample([image], [Turn("user", "<image>\nWhat is this?")], None, "test")
    return predictor.generate([sample], max_new_tokens=12)[0]


def test_answerer_answers_an_uploaded_image_like_inference(trained):
    from library.vlm.webui import Answerer

    answerer = Answerer(torch.device("cpu"), max_new_tokens=12)
    image_path = trained["folder"] / "red_circle.png"
    with Image.open(image_path) as img:
        answer = answerer.answer(str(trained["model"]), str(trained["adapter"]), img.copy(), "What is this?")
    assert answer and answer == _expected_answer(trained, image_path)
    with pytest.raises(UserError, match="upload an image"):
        answerer.answer(str(trained["model"]), "", None, "q")


def test_train_page_command_runs_with_a_live_log(trained, tmp_path):
    from library.vlm.webui import stream_command, training_command

    values = {"model_local_path": str(trained["model"]), "data_path": str(trained["train"]),
              "eval_data_path": "", "image_folder": str(trained["folder"]), "output_dir": str(tmp_path / "out"),
              "max_train_epochs": 1.0, "learning_rate": 1e-3, "train_batch_size": 4.0, "lora_r": 4.0,
              "save_every_n_steps": 0, "gradient_checkpointing": True, "q_lora": False}
    command = training_command(values)
    assert command[1].endswith("vlm_train.py") and "--eval_data_path" not in command
    assert command[command.index("--lora_r") + 1] == "4" and command[command.index("--learning_rate") + 1] == "0.001"
    assert "--gradient_checkpointing" in command and "--q_lora" not in command
    logs = list(stream_command(command))
    assert len(logs) > 3 and "[exit status 0]" in logs[-1] and "saved" in logs[-1]
    assert (tmp_path / "out" / "last" / "adapter_config.json").is_file()
    multi = training_command(values, num_processes=2)
    assert multi[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]


def test_web_ui_without_gradio_says_how_to_install_it(hide_module):
    import vlm_webui

    hide_module("gradio")
    with pytest.raises(UserError, match="pip install gradio==6.31.0"):
        vlm_webui.main(["--port", "0"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str) -> None:
    if os.environ.get("REQUIRE_BROWSER_TEST") == "1":
        pytest.fail(f"REQUIRE_BROWSER_TEST=1 but {reason}")
    pytest.skip(reason)


def _browser():
    try:
        import gradio  # noqa: F401
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        _missing(f"{err.name} is not installed (pip install -r requirements.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_web_ui_answers_a_question_in_a_headless_browser(trained, tmp_path):
    browser = _browser()
    from selenium.webdriver.common.by import By

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "no_proxy": "127.0.0.1,localhost"}
    server = subprocess.Popen([sys.executable, str(REPO / "vlm_webui.py"), "--base_model", str(trained["model"]),
                               "--lora_path", str(trained["adapter"]), "--port", str(port), "--max_new_tokens", "12"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.5)
        browser.get(f"http://127.0.0.1:{port}/")
        image = trained["folder"] / "blue_square.png"
        _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
        _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload is shown
        question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        question.clear()
        question.send_keys("What is this?")
        browser.find_element(By.CSS_SELECTOR, "#ask").click()
        answer = _wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#answer textarea")
                       .get_attribute("value"), timeout=120)
        assert answer == _expected_answer(trained, image)
        # the Train page assembles the command from its form
        next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Train").click()
        field = _wait(browser, lambda: [e for e in browser.find_elements(
            By.CSS_SELECTOR, "#train_model_local_path textarea, #train_model_local_path input") if e.is_displayed()])
        field[0].send_keys(str(trained["model"]))
        browser.find_element(By.CSS_SELECTOR, "#train_show").click()
        command = _wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#train_command textarea")
                        .get_attribute("value"))
        assert "vlm_train.py" in command and f"--model_local_path {trained['model']}" in command
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)


def _wait(browser, condition, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out; page: {browser.page_source[:2000]}")
