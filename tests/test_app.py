"""`pokesprite serve` in a real browser, the REST model's params under `mlflow models serve`, and
`pokesprite generate`'s files, all against a tiny pipeline with random weights.

The browser is the Debian ``chromium`` (apt-get install -y chromium), driven by Playwright; no
browser is downloaded. Every request the page makes outside 127.0.0.1 is blocked and counted.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pokesprite.app import MAX_SPRITES, ServeError, check_request, load_studio
from pokesprite.images import key_background
from pokesprite.pipeline import MAX_PROMPT_CHARS, SpritePipeline

from flows.server import free_port

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "serve.png"  # rewritten when POKESPRITE_UPDATE_SCREENSHOT=1
NAME = "sprites"
PROMPT = "a small green creature with a bulb on its back"


def build_tiny_pipeline(directory: Path) -> Path:
    """A saved pipeline with random weights: 1-layer 16-d BERT (the bundled tokenizer), 8-channel VAE and U-Net."""
    from transformers import BertConfig, BertModel

    from pokesprite.config import SampleConfig, ScheduleConfig, UNetConfig, VAEConfig
    from pokesprite.diffusion.schedule import NoiseSchedule
    from pokesprite.models.text import TextEncoder, load_tokenizer
    from pokesprite.models.unet import UNet
    from pokesprite.models.vae import VAE

    torch.manual_seed(0)
    tokenizer = load_tokenizer("bundled")
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    text = TextEncoder(bert, tokenizer, dim=16, max_tokens=16)
    vae = VAE(VAEConfig(channels=(8, 8, 8, 8), latent_channels=4, groups=4))
    unet = UNet(UNetConfig(latent_channels=4, channels=(8, 8, 8), heads=2, groups=4), context_dim=16)
    pipe = SpritePipeline(vae, unet, text, NoiseSchedule(ScheduleConfig()), latent_scale=1.0,
                          sample=SampleConfig(sampler="ddim", steps=2, guidance_scale=2.0))
    return pipe.save(directory)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "model")


@pytest.fixture(scope="module")
def registry(pipeline_dir, tmp_path_factory):
    """The tiny pipeline logged and registered as ``sprites`` version 1 (alias champion) in a fresh
    sqlite store; ``MLFLOW_TRACKING_URI`` points at it for this module (and its subprocesses)."""
    import mlflow

    from pokesprite.registry import log_model

    store = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        exp = mlflow.create_experiment("serve-test", artifact_location=(store / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = log_model(pipeline_dir, registered_model_name=NAME)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
        yield uri
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


class Server:
    """A command serving on 127.0.0.1:port in its own process group, stopped with the group."""

    def __init__(self, cmd: list[str], port: int, log: Path, ready_path: str = "/", extra_env: dict | None = None):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**env(), **(extra_env or {})}, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{' '.join(cmd)} exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.stop()
        raise AssertionError(f"{' '.join(cmd)} did not answer within 240 s:\n{log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # a worker still busy with a request outlives its server's SIGTERM
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def decode_png(text: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(text)))
    assert im.format == "PNG"
    return im


# --- the page's input checks -------------------------------------------------------------------

def test_check_request_accepts_good_inputs_and_names_the_bad_field():
    req = check_request(" a red lizard ", 7, 50.0, 3, 4, "ddim", False, max_steps=1000)
    assert (req.prompt, req.seed, req.steps, req.guidance, req.count, req.sampler, req.rgb) == \
        ("a red lizard", 7, 50, 3.0, 4, "ddim", False)
    bad = {"Prompt is empty": dict(prompt="  "),
           "Sampling steps must be a whole number from 1 to 1000, got 0": dict(steps=0),
           "Sampling steps must be a whole number from 1 to 1000, got 1001": dict(steps=1001),
           "Sampling steps must be a whole number from 1 to 1000, got 2.5": dict(steps=2.5),
           "Seed must be a whole number": dict(seed=-1),
           f"Number of sprites must be a whole number from 1 to {MAX_SPRITES}": dict(count=MAX_SPRITES + 1),
           "Guidance scale must be between 0 and 20": dict(guidance=None),
           "Sampler must be one of ddpm, ddim": dict(sampler="euler"),
           f"Prompt is {MAX_PROMPT_CHARS + 1} characters long": dict(prompt="x" * (MAX_PROMPT_CHARS + 1))}
    good = dict(prompt="x", seed=0, steps=10, guidance=3.0, count=1, sampler="ddpm", rgb=True)
    for message, change in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            check_request(**{**good, **change}, max_steps=1000)


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    with pytest.raises(ServeError, match=r"not a saved pokesprite pipeline.*SpritePipeline.save"):
        load_studio(str(tmp_path), device="cpu")
    with pytest.raises(ServeError, match=r"--model .*/missing: no such folder; give a pipeline folder"):
        load_studio(str(tmp_path / "missing"), device="cpu")  # not asked of MLflow as an artifact "missing"


def test_serve_refuses_a_port_out_of_range(capsys):
    from pokesprite.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "99999"])
    assert exit_.value.code == 2 and "argument --port: '99999' is not a port (1-65535)" in capsys.readouterr().err


# --- the REST model -----------------------------------------------------------------------------

def test_predict_returns_arrays_or_pngs_and_rejects_unknown_params(registry, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    prompts = [PROMPT, "a blue turtle"]
    with caplog.at_level("WARNING", logger="pokesprite.registry"):
        arrays = model.predict(prompts, params={"seed": 3})
        assert not caplog.messages
        model.predict(["word " * 30], params={"num_steps": 1})  # past the 16 tokens its encoder reads
    assert caplog.messages == ["prompt 0 is 32 tokens long; only its first 16 are read (text.max_tokens), "
                               "the rest is ignored"]
    assert arrays.shape == (2, 215, 215, 3) and arrays.dtype == np.uint8
    pngs = model.predict(prompts, params={"seed": 3, "format": "png"})
    assert isinstance(pngs, list) and len(pngs) == 2
    for png, rgb in zip(pngs, arrays):
        im = decode_png(png)
        assert im.mode == "RGBA" and im.size == (215, 215)
        assert np.array_equal(np.asarray(im), key_background(rgb))  # the same sprite, keyed
    # the same prompts (batch) and seed give the same sprites; a different batch may differ by rounding
    flat = decode_png(model.predict(prompts, params={"seed": 3, "format": "png", "rgb": True})[1])
    assert flat.mode == "RGB" and np.array_equal(np.asarray(flat), arrays[1])
    on_black = decode_png(model.predict(prompts, params={"seed": 3, "format": "png", "background": "0,0,0"})[1])
    assert np.array_equal(np.asarray(on_black), key_background(arrays[1], (0, 0, 0)))

    for params, words in (({"seeds": 1, "formt": "png"}, "unknown request param(s) formt, seeds"),
                          ({"format": "jpeg"}, "unknown format 'jpeg'"),
                          ({"background": "white"}, "background must be a colour"),
                          ({"num_steps": 0}, "num_steps must be a whole number in 1..1000"),
                          ({"num_steps": -1}, "got -1"), ({"sampler": "euler"}, "sampler must be one of ddpm, ddim"),
                          ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number")):
        with pytest.raises(MlflowException, match=re.escape(words)) as e:
            model.predict(prompts[:1], params=params)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    # Numbers and nulls are refused, by the model's input schema before the model sees them.
    with pytest.raises(MlflowException, match="Incompatible input types"):
        model.predict([1, 2.5, None], params={"seed": 3})
    with pytest.raises(MlflowException, match="65 prompts: this model draws at most 64 sprites per request") as e:
        model.predict(["a"] * 65, params={"seed": 3})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_load_model_honours_the_device_it_is_given(registry, caplog):
    """MLflow drops a model_config that the model was not logged with (a warning only): the device
    must reach the model, so a device this machine lacks is an error, not a quiet CPU."""
    import mlflow

    with caplog.at_level("WARNING"):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={"device": "cpu"})
    assert not [m for m in caplog.messages if "ignored" in m]
    assert model.unwrap_python_model().pipeline.device == torch.device("cpu")
    with pytest.raises(Exception, match="(?i)cuda|device|nvidia"):  # the message depends on the machine
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={"device": "cuda:97"})


def test_the_model_class_loads_without_mlflows_type_hint_advice():
    """MLflow advises type hints on every import of a PythonModel without them; predict has them."""
    out = subprocess.run([sys.executable, "-c", "import pokesprite.registry"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "type hint" not in out.stderr, out.stderr


def test_mlflow_models_serve_answers_pngs_and_400_for_bad_params(registry, pipeline_dir, tmp_path):
    """Also: a request that runs past the server's timeout gets 504, and its drawing stops soon after
    (the server alone would leave it computing for nobody)."""
    port, timeout = free_port(), 8
    server = Server([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                     "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], port,
                    tmp_path / "rest.log", ready_path="/ping",
                    extra_env={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout)})
    try:
        url = server.url + "/invocations"
        status, body = post(url, {"inputs": [PROMPT, PROMPT], "params": {"seed": 0, "format": "png"}})
        assert status == 200 and len(body["predictions"]) == 2
        images = [decode_png(p) for p in body["predictions"]]
        assert all(im.mode == "RGBA" and im.size == (215, 215) for im in images)
        local = SpritePipeline.load(pipeline_dir)([PROMPT, PROMPT], seed=0)
        assert np.array_equal(np.asarray(images[0]), key_background(local[0]))  # same weights and seed

        status, body = post(url, {"inputs": [PROMPT], "params": {"seed": 0, "sed": 1}})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "unknown request param(s) sed;" in body["message"]
        status, body = post(url, {"inputs": [PROMPT], "params": {"format": "gif"}})
        assert status == 400 and "unknown format 'gif'" in body["message"]
        for bad in ([1, 2.5, None], [PROMPT, None]):  # before MLflow makes them "1", "2.5", "None"
            status, body = post(url, {"inputs": bad})
            assert status == 400 and "not text" in body["message"], body
        status, body = post(url, {"instances": [PROMPT, 7]})
        assert status == 400 and "prompt 1 is int 7, not text" in body["message"], body

        # Concurrent requests (each in its own thread in the server) draw what each would alone.
        from concurrent.futures import ThreadPoolExecutor

        requests = [{"inputs": [f"{PROMPT} {i}" + " and more" * (i % 3 * 4)], "params": {"seed": i}} for i in range(10)]
        alone = [post(url, r) for r in requests]
        with ThreadPoolExecutor(10) as pool:
            together = list(pool.map(lambda r: post(url, r), requests * 3))
        assert all(status == 200 for status, _ in alone + together), [b for s, b in together if s != 200][:1]
        assert [body for _, body in together] == [body for _, body in alone] * 3

        start = time.monotonic()  # 64 sprites x 1000 steps: minutes on the CPU
        req = urllib.request.Request(url, json.dumps({"inputs": [PROMPT] * 64, "params": {
            "num_steps": 1000, "sampler": "ddpm"}}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=120)
        assert e.value.code == 504 and time.monotonic() - start < timeout + 5
        while "drawing stopped" not in server.log.read_text() and time.monotonic() - start < timeout + 20:
            time.sleep(0.5)
        assert re.search(r"the request's time ran out at step \d+ of 1000; drawing stopped after 8 s",
                         server.log.read_text()), server.log.read_text()[-3000:]
    finally:
        server.stop()


def test_reading_commands_outside_a_project_say_where_to_run_and_create_nothing(tmp_path, monkeypatch, capsys):
    from pokesprite.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for argv in (["models", "list"], ["generate", PROMPT, "-o", "out"], ["serve"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"no MLflow store at {tmp_path / 'mlruns' / 'mlflow.db'}: run this in the project folder" in err, argv
    assert not (tmp_path / "mlruns").exists()


def test_generate_writes_rgba_pngs_with_normal_permissions_or_rgb(registry, tmp_path):
    from pokesprite.cli import main

    old = os.umask(0o022)
    try:
        assert main(["generate", PROMPT, "-n", "2", "--seed", "1", "--model", f"models:/{NAME}@champion",
                     "-o", str(tmp_path / "rgba")]) == 0
        assert main(["generate", PROMPT, "-n", "2", "--seed", "1", "--model", f"models:/{NAME}@champion",
                     "-o", str(tmp_path / "rgb"), "--rgb"]) == 0
        assert main(["generate", PROMPT, "--background", "white", "-o", str(tmp_path / "x")]) == 2
    finally:
        os.umask(old)
    files = sorted((tmp_path / "rgba").iterdir())
    stem = "a-small-green-creature-with-a-bulb-on"  # the prompt's first words, at most 40 characters
    assert [p.name for p in files] == [f"{stem}_1.png", f"{stem}_2.png"]  # sprite i has seed 1 + i
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    rgba, rgb = Image.open(files[0]), Image.open(tmp_path / "rgb" / f"{stem}_1.png")
    assert rgba.mode == "RGBA" and rgb.mode == "RGB" and rgba.size == rgb.size == (215, 215)
    assert np.array_equal(np.asarray(rgba), key_background(np.asarray(rgb)))
    # what drew each sprite is in its PNG (the registered test pipeline's sampling settings)
    assert Image.open(files[1]).text == {"prompt": PROMPT, "seed": "2", "model": f"{NAME} version 1 (alias champion)",
                                         "sampler": "ddim", "steps": "2", "guidance": "2", "Software": "pokesprite"}


def test_generate_never_overwrites_and_redraws_one_sprite_by_its_seed(registry, tmp_path, capsys):
    from pokesprite.cli import main

    out, model = tmp_path / "out", f"models:/{NAME}@champion"
    stem = "a-small-green-creature-with-a-bulb-on"
    assert main(["generate", PROMPT, "-n", "3", "--seed", "4", "--model", model, "-o", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == [f"{stem}_4.png", f"{stem}_5.png", f"{stem}_6.png"]
    capsys.readouterr()
    assert main(["generate", PROMPT, "-n", "1", "--seed", "5", "--steps", "3", "--model", model, "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / f"{stem}_5-2.png")]  # the same name taken: a new one
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in first} == first  # nothing overwritten
    assert Image.open(out / f"{stem}_5-2.png").text["steps"] == "3"
    assert main(["generate", PROMPT, "-n", "1", "--seed", "5", "--model", model, "-o", str(out)]) == 0
    redrawn, original = (np.asarray(Image.open(out / n)).astype(int) for n in (f"{stem}_5-3.png", f"{stem}_5.png"))
    assert np.abs(redrawn - original).max() <= 1  # sprite 1 of seed 4 is seed 5's sprite, alone


def test_generate_is_not_stopped_by_a_broken_params_yaml_and_keeps_to_the_models_limits(
        registry, tmp_path, monkeypatch, capsys):
    import yaml

    from pokesprite.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("diffusion: {sample: {stepz: 5}}\n")  # half-edited: not generate's
    assert main(["generate", PROMPT, "--model", f"models:/{NAME}@champion", "-o", "a"]) == 0
    assert len(list((tmp_path / "a").iterdir())) == 4  # -n defaults to 4
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["diffusion"]["sample"]["max_sprites"] = 100  # more than the registered model allows (64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", f"models:/{NAME}@champion", "-n", "70", "-o", "b"]) == 2
    assert f"-n 70: {NAME} version 1 (alias champion) draws at most 64 sprites per request" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any folder was made


def test_long_prompts_are_refused_or_noted_and_a_deadline_stops_the_drawing(pipeline_dir):
    from pokesprite.pipeline import DrawingTimeout

    pipe = SpritePipeline.load(pipeline_dir)  # its encoder reads 16 tokens
    assert pipe.truncation_notes([PROMPT[:20], "word " * 30, "word " * 30, "word " * 20]) == [
        f"prompt {i} is {n} tokens long; only its first 16 are read (text.max_tokens), the rest is ignored"
        for i, n in ((1, 32), (3, 22))]
    with pytest.raises(ValueError, match=f"prompt 0 is {MAX_PROMPT_CHARS + 1} characters long"):
        pipe(["x" * (MAX_PROMPT_CHARS + 1)])
    with pytest.raises(DrawingTimeout, match="ran out at step 1 of 2"):
        pipe([PROMPT], deadline=time.monotonic())


# --- the page in a browser ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("the browser test needs Debian's chromium: apt-get install -y chromium (as root)")
    return path


def serve_page(model: str, tmp_path: Path) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "pokesprite.cli", "serve", "--model", model, "--port", str(port),
                   "--device", "cpu"], port, tmp_path / "serve.log")


def open_page(browser, url: str, blocked: list[str]):
    """A page on which every request outside the server is aborted and recorded in ``blocked``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def only_local(route):
        if route.request.url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url, wait_until="networkidle")
    return page


def test_page_draws_transparent_sprites_from_a_pipeline_folder(pipeline_dir, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server = serve_page(str(pipeline_dir), tmp_path)
    blocked: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = open_page(browser, server.url, blocked)
            expect(page.locator("#model-info")).to_contain_text(f"pipeline folder {pipeline_dir}")
            status = page.locator("#status")

            page.locator("#draw").click()  # no prompt yet
            expect(status).to_contain_text("Cannot draw: Prompt is empty", timeout=30_000)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#steps input").fill("5000")
            page.locator("#draw").click()
            expect(status).to_contain_text("Sampling steps must be a whole number from 1 to 1000, got 5000",
                                           timeout=30_000)
            assert "Traceback" not in page.content()

            page.locator("#steps input").fill("2")
            page.locator("#seed input").fill("5")
            page.locator("#count input[type=number]").fill("3")
            page.locator("#count input[type=number]").press("Enter")
            page.locator("#draw").click()
            expect(status).to_contain_text("Drew 3 transparent (RGBA) sprite(s)", timeout=120_000)
            images = page.locator("#gallery img")
            expect(images).to_have_count(3)
            served = []
            for i in range(3):
                response = page.request.get(images.nth(i).get_attribute("src"))
                assert response.ok
                served.append(Image.open(io.BytesIO(response.body())))
            assert all(im.format == "PNG" and im.mode == "RGBA" and im.size == (215, 215) for im in served)
            links = page.locator("#downloads a")
            names = sorted(Path(links.nth(i).get_attribute("href")).name for i in range(links.count()))
            assert names == ["sprite_5.png", "sprite_6.png", "sprite_7.png", "sprites_5.zip"]  # named by seed
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            if os.environ.get("POKESPRITE_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(exist_ok=True)
                Image.open(tmp_path / "serve.png").convert("RGB").quantize(128).save(SCREENSHOT, optimize=True)
            page.locator("#prompt textarea").fill("word " * 30)  # past the 16 tokens this encoder reads
            page.locator("#draw").click()
            expect(status).to_contain_text("Note: the prompt is 32 tokens long; only its first 16 are read",
                                           timeout=120_000)
            browser.close()
    finally:
        server.stop()
    assert blocked == []  # nothing outside the server: no fonts, analytics or CDN
    pipe = SpritePipeline.load(pipeline_dir)
    expected = pipe([PROMPT] * 3, seed=5, num_steps=2, guidance_scale=2.0, sampler="ddim")
    for im, rgb in zip(served, expected):
        assert np.array_equal(np.asarray(im), key_background(rgb))  # the page's sprites are the model's, keyed


def test_page_serves_a_registered_model_by_alias(registry, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server = serve_page(f"models:/{NAME}@champion", tmp_path)
    blocked: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = open_page(browser, server.url, blocked)
            expect(page.locator("#model-info")).to_contain_text(f"Serving {NAME} version 1 (alias champion)")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#rgb input").check()
            page.locator("#count input[type=number]").fill("1")
            page.locator("#count input[type=number]").press("Enter")
            page.locator("#draw").click()
            expect(page.locator("#status")).to_contain_text("Drew 1 RGB sprite(s)", timeout=120_000)
            src = page.locator("#gallery img").first.get_attribute("src")
            image = Image.open(io.BytesIO(page.request.get(src).body()))
            assert image.mode == "RGB" and image.size == (215, 215)
            browser.close()
    finally:
        server.stop()
    assert blocked == []


def test_check_request_refuses_guidance_outside_its_range():
    good = dict(prompt="x", seed=0, steps=10, guidance=3.0, count=1, sampler="ddpm", rgb=True)
    for guidance in (-0.5, 20.5, "nan", "inf"):
        with pytest.raises(ValueError, match=re.escape("Guidance scale must be between 0 and 20")):
            check_request(**{**good, "guidance": guidance}, max_steps=1000)
    with pytest.raises(ValueError, match="Guidance scale must be between 0 and 20"):
        check_request(**{**good, "guidance": 10**400}, max_steps=1000)  # not an OverflowError
    with pytest.raises(ValueError, match="Number of sprites must be a whole number from 1 to 8, got True"):
        check_request(**{**good, "count": True}, max_steps=1000)
    assert check_request(**{**good, "guidance": 0}, max_steps=1000).guidance == 0.0
    assert check_request(**{**good, "guidance": 20}, max_steps=1000).guidance == 20.0
