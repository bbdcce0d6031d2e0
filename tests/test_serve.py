"""`vlp serve` end to end: a real server process per family on a free loopback port, real tiny
models saved to disk, results compared with the library's own inference on the same input."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import vlp
from vlp.caption import caption as caption_images
from vlp.data.images import read_images
from vlp.data.qa import QARecord
from vlp.eval.vqa import answer_questions
from vlp.eval.zeroshot import zero_shot_classifier
from vlp.tokenizers import train_tokenizer

pytest.importorskip("fastapi", reason="vlp serve needs the serve extra: pip install 'vlp[serve]'")
pytest.importorskip("uvicorn", reason="vlp serve needs the serve extra")
pytest.importorskip("multipart", reason="vlp serve needs the serve extra")

from photos import photo_jpeg  # noqa: E402  (tests/photos.py)
from serve_client import Server, multipart  # noqa: E402  (tests/serve_client.py)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {"clip": "clip-tiny", "coca": "coca-tiny", "blip": "blip-tiny",
            "blip2": "blip2-tiny", "simvlm": "simvlm-tiny"}
SERVES = {"embed": ["clip", "coca", "blip", "blip2"], "caption": ["coca", "blip", "simvlm"],
          "vqa": ["blip", "simvlm"], "itm": ["blip", "blip2"]}
TEXTS = ["a red circle", "a blue square", "a green star left of a red circle",
         "what colour is the circle? red", "what shape is it? square", "yes", "no"]
KEY = "test-key-123"
# per family: extra flags (the CLIP server also carries the limits and the API key)
FLAGS = {"clip": ["--max-body-bytes", "400000", "--max-pixels", "4000000", "--max-labels",
                  "8", "--max-text-chars", "200", "--max-batch", "16", "--max-wait-ms", "20"],
         "simvlm": ["--cors-origin", "http://allowed.test"],
         "coca-slow": ["--timeout", "0.01"],  # a second CoCa server, for the request timeout
         "clip-fast": ["--fast-decode"]}  # a second CLIP server, reduced-scale JPEG decoding


def png(colour, size=(90, 70), shape: str = "circle") -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (10, 10, size[0] - 10, size[1] - 10)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


RED, BLUE = png("red"), png("blue", shape="square")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-init model per family, saved with one BPE tokenizer."""
    root = tmp_path_factory.mktemp("serve_models")
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300, context_length=32)
    dirs = {}
    for family, preset in FAMILIES.items():
        torch.manual_seed(0)
        dirs[family] = vlp.save(vlp.create_model(preset), root / preset, tokenizer=tokenizer)
    return dirs


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    """``servers[family]``: a running `vlp serve` of that family's model, started on first use
    and stopped after the module."""
    logs = tmp_path_factory.mktemp("serve_logs")
    started: dict[str, Server] = {}

    class Servers(dict):
        def __missing__(self, family: str) -> Server:
            server = Server(model_dirs[family.split("-")[0]], *FLAGS.get(family, []),
                            api_key=KEY if family == "clip" else None,
                            log=logs / f"{family}.log")
            started[family] = self[family] = server
            return server

    yield Servers()
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def library(model_dirs):
    """``library(family)``: (model, tokenizer, eval transform) loaded through the public API."""
    loaded = {}

    def get(family):
        if family not in loaded:
            directory = model_dirs[family]
            model = vlp.load(directory).eval()
            loaded[family] = (model, vlp.load_tokenizer(directory),
                              vlp.image_transform(model, train=False))
        return loaded[family]

    return get


def pixels_of(data: bytes, transform) -> torch.Tensor:
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))[None]


# -- what each family serves ----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_models_health_and_docs(servers, library, family):
    server = servers[family]
    model = library(family)[0]
    status, body, _ = server.request("GET", "/v1/models")
    assert status == 200
    [described] = body["models"]
    assert described["family"] == model.config.family == family
    assert described["tasks"] == sorted(model.tasks())
    status, body, _ = server.request("GET", "/v1/health", key=None)
    assert status == 200 and body["status"] == "ok"
    status, spec, _ = server.request("GET", "/openapi.json")
    assert status == 200
    assert {"/v1/embed/image", "/v1/caption", "/v1/zeroshot", "/v1/vqa", "/v1/itm",
            "/v1/health", "/v1/models"} <= set(spec["paths"])
    status, page, headers = server.request("GET", "/docs")
    assert status == 200 and "swagger" in page.lower()


@pytest.mark.parametrize("family", SERVES["embed"])
def test_embed_image_is_the_models_encode_image(servers, library, family):
    server = servers[family]
    model, _, transform = library(family)
    status, body = server.post("/v1/embed/image", {"image": b64(RED)})
    assert status == 200, body
    with torch.no_grad():
        expected = model.encode_image(pixels_of(RED, transform))[0]
    torch.testing.assert_close(torch.tensor(body["embedding"]), expected, atol=1e-5, rtol=0)
    # the same image as multipart
    data, kind = multipart({}, {"image": ("red.png", RED, "image/png")})
    status, body = server.post("/v1/embed/image", raw=data, content_type=kind)
    assert status == 200, body
    torch.testing.assert_close(torch.tensor(body["embedding"]), expected, atol=1e-5, rtol=0)


def test_fast_decode_serves_the_python_apis_fast_decode_embedding(servers, library):
    """A large JPEG: --fast-decode serves ``image_transform(model, train=False,
    fast_decode=True)`` + ``encode_image``, which differs from the exact path; without the
    flag the server stays exact."""
    model, _, exact = library("clip")
    fast = vlp.image_transform(model, train=False, fast_decode=True)
    photo = photo_jpeg(7)  # 1024 x 768
    with torch.no_grad():
        expected = {name: model.encode_image(read_images([photo], transform).pixels)[0]
                    for name, transform in (("clip", exact), ("clip-fast", fast))}
    assert (expected["clip"] - expected["clip-fast"]).abs().max() > 1e-4
    for name in ("clip", "clip-fast"):
        status, body = servers[name].post("/v1/embed/image", {"image": b64(photo)})
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body["embedding"]), expected[name],
                                   atol=1e-5, rtol=0)
        status, body, _ = servers[name].request("GET", "/v1/models")
        assert body["models"][0]["fast_decode"] is (name == "clip-fast")


@pytest.mark.parametrize("family", SERVES["embed"])
def test_embed_text_is_the_models_encode_text(servers, library, family):
    model, tokenizer, _ = library(family)
    texts = ["a red circle", "a blue square left of a green star"]
    status, body = servers[family].post("/v1/embed/text", {"texts": texts})
    assert status == 200, body
    ids = tokenizer(texts, context_length=model.config.text.context_length)
    with torch.no_grad():
        expected = model.encode_text(ids)
    torch.testing.assert_close(torch.tensor(body["embeddings"]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", SERVES["embed"])
def test_zeroshot_scores_are_vlps_zero_shot(servers, library, family):
    model, tokenizer, transform = library(family)
    labels, templates = ["circle", "square", "star"], ["a photo of a {}.", "a {}."]
    status, body = servers[family].post("/v1/zeroshot", {"image": b64(BLUE), "labels": labels,
                                                         "templates": templates})
    assert status == 200, body
    assert list(body["scores"]) == labels
    with torch.no_grad():
        weights = zero_shot_classifier(model, tokenizer, labels, templates, progress=False)
        image = model.encode_image(pixels_of(BLUE, transform))
        cosines = model.similarity(image, weights.T)[0]
    torch.testing.assert_close(torch.tensor(list(body["similarities"].values())), cosines,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(list(body["scores"].values())),
                               torch.softmax(100 * cosines, -1), atol=1e-4, rtol=0)
    assert abs(sum(body["scores"].values()) - 1) < 1e-5
    # default templates are vlp's own (`zero_shot_classifier` without templates)
    status, body = servers[family].post("/v1/zeroshot", {"image": b64(BLUE), "labels": labels})
    with torch.no_grad():
        weights = zero_shot_classifier(model, tokenizer, labels, progress=False)
        cosines = model.similarity(image, weights.T)[0]
    torch.testing.assert_close(torch.tensor(list(body["similarities"].values())), cosines,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", SERVES["caption"])
def test_caption_is_vlps_caption(servers, model_dirs, family, tmp_path):
    (tmp_path / "red.png").write_bytes(RED)
    out = caption_images(model_dirs[family], [str(tmp_path / "red.png")], tmp_path / "c.jsonl",
                         max_new_tokens=8, num_beams=2, progress=False)
    expected = json.loads(out.read_text().splitlines()[0])["caption"]
    status, body = servers[family].post("/v1/caption", {"image": b64(RED), "max_new_tokens": 8,
                                                        "num_beams": 2})
    assert status == 200, body
    assert body["caption"] == expected
    data, kind = multipart({"max_new_tokens": "8", "num_beams": "2"},
                           {"image": ("red.png", RED, "image/png")})
    assert servers[family].post("/v1/caption", raw=data, content_type=kind) == (200, body)


@pytest.mark.parametrize("family", SERVES["vqa"])
def test_vqa_is_vlps_answer(servers, library, family, tmp_path):
    model, tokenizer, _ = library(family)
    (tmp_path / "blue.png").write_bytes(BLUE)
    question = "what shape is it?"
    [expected] = answer_questions(model, tokenizer, [QARecord(str(tmp_path / "blue.png"),
                                                               question, ("",))],
                                  num_beams=2, max_new_tokens=5, progress=False)
    status, body = servers[family].post("/v1/vqa", {"image": b64(BLUE), "question": question,
                                                    "num_beams": 2, "max_new_tokens": 5})
    assert status == 200, body
    assert body["answer"] == expected


@pytest.mark.parametrize("family", SERVES["itm"])
def test_itm_probabilities_are_the_match_heads(servers, library, family):
    model, tokenizer, transform = library(family)
    texts = ["a red circle", "a blue square", "yes"]
    status, body = servers[family].post("/v1/itm", {"image": b64(RED), "texts": texts})
    assert status == 200, body
    ids = tokenizer(texts, context_length=model.config.text.context_length)
    with torch.no_grad():
        logits = model.itm_logits(pixels_of(RED, transform).expand(3, -1, -1, -1), ids,
                                  ids != model.config.text.pad_id)
    expected = torch.softmax(logits, -1)[:, 1]
    torch.testing.assert_close(torch.tensor(body["probabilities"]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "path", "body"), [
    ("clip", "/v1/caption", {"image": b64(RED)}),
    ("clip", "/v1/vqa", {"image": b64(RED), "question": "what?"}),
    ("coca", "/v1/itm", {"image": b64(RED), "texts": ["a"]}),
    ("simvlm", "/v1/embed/image", {"image": b64(RED)}),
    ("simvlm", "/v1/zeroshot", {"image": b64(RED), "labels": ["a"]}),
    ("blip2", "/v1/caption", {"image": b64(RED)}),
])
def test_an_endpoint_the_family_cannot_serve_is_400_naming_what_it_can(servers, library,
                                                                        family, path, body):
    status, answer = servers[family].post(path, body)
    assert status == 400
    for task in library(family)[0].tasks():
        assert task in answer["error"]
    assert "cannot serve" in answer["error"]


# -- limits, bad input and security (the CLIP server carries the limits and the key) -----------

def test_bad_inputs_are_4xx_with_a_clear_message_and_the_server_lives_on(servers):
    server = servers["clip"]
    jpeg = io.BytesIO()
    Image.new("RGB", (120, 100), "green").save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    text_file = b"name,caption\nred.png,a red circle\n"
    cases = [
        ({"image": b64(text_file)}, 415, "not an image"),
        ({"image": b64(truncated)}, 422, "could not be decoded"),
        ({"image": b64(png_header(50000, 50000))}, 413, "pixels"),
        ({"image": b64(png_header(3000, 3000))}, 413, "at most 4000000"),
        ({"image": "/etc/passwd"}, 400, "base64"),
        ({"image": "file:///etc/hostname"}, 400, "base64"),
        ({"image": 12}, 400, "base64"),
        ({}, 400, "image"),
        ({"image": ""}, 400, "image"),
    ]
    for body, status, words in cases:
        got, answer = server.post("/v1/embed/image", body)
        assert (got, words in answer.get("error", "")) == (status, True), (body, answer)
        assert server.alive()
    # the same checks on multipart uploads
    for data, status in [(text_file, 415), (truncated, 422), (png_header(50000, 50000), 413)]:
        raw, kind = multipart({}, {"image": ("x.png", data, "image/png")})
        assert server.post("/v1/embed/image", raw=raw, content_type=kind)[0] == status
    assert server.post("/v1/embed/image", raw=b"--x\r\nbroken",
                       content_type="multipart/form-data; boundary=x")[0] == 400
    assert server.post("/v1/embed/image", raw=b"{not json")[0] == 400
    assert server.post("/v1/embed/image", raw=b"[1, 2]")[0] == 400
    assert server.post("/v1/embed/image", raw=RED, content_type="image/png")[0] == 415
    labels = {"image": b64(RED), "labels": [f"l{i}" for i in range(9)]}
    assert server.post("/v1/zeroshot", labels)[1]["error"].endswith("the limit is 8")
    assert server.post("/v1/zeroshot", {"image": b64(RED), "labels": ["a", "a"]})[0] == 400
    assert server.post("/v1/zeroshot", {"image": b64(RED), "labels": ["a"],
                                        "templates": ["no slot"]})[0] == 400
    status, answer = server.post("/v1/embed/text", {"texts": ["x" * 201]})
    assert status == 400 and "201 characters" in answer["error"]
    assert server.post("/v1/embed/text", {"texts": "not a list"})[0] == 400
    assert server.post("/v1/embed/text", {"texts": [3]})[0] == 400
    status, answer, _ = server.request("GET", "/v1/nowhere")
    assert status == 404 and "error" in answer
    assert server.request("GET", "/v1/embed/image")[0] == 405
    assert server.alive()


def test_inputs_the_library_refuses_are_400_on_a_generating_model(servers):
    server = servers["blip"]
    status, answer = server.post("/v1/caption", {"image": b64(RED), "prompt": "a red " * 100})
    assert status == 400 and "context_length" in answer["error"]
    tiff = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(tiff, "TIFF")
    assert server.post("/v1/caption", {"image": b64(tiff.getvalue())})[0] == 415
    status, answer = server.post("/v1/vqa", {"image": b64(RED), "question": "what " * 150})
    assert status == 200 and isinstance(answer["answer"], str)  # truncated to the context
    assert server.post("/v1/caption", {"image": b64(RED), "num_beams": 0})[0] == 400
    assert server.post("/v1/vqa", {"image": b64(RED), "question": ["x"]})[0] == 400
    assert server.alive()


def test_a_request_over_the_timeout_is_504_and_the_server_lives_on(servers):
    server = servers["coca-slow"]
    status, answer = server.post("/v1/caption", {"image": b64(RED), "num_beams": 8,
                                                 "max_new_tokens": 30})
    assert status == 504 and "0.01 s" in answer["error"]
    # a client that sends its body too slowly is answered 408
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/caption")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b'{"image": ')
    response = connection.getresponse()
    assert response.status == 408 and b"not received within" in response.read()
    connection.close()
    assert server.alive()


def test_oversize_body_is_413(servers):
    server = servers["clip"]
    big = b64(b"\0" * 400_000)
    status, answer = server.post("/v1/embed/image", {"image": big})
    assert status == 413 and "400000 bytes" in answer["error"]
    # without Content-Length (chunked), the body is counted as it arrives
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = (b"x" * 50_000 for _ in range(20))
    connection.request("POST", "/v1/embed/image", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "application/json",
                                "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 413 and b"over the limit" in response.read()
    connection.close()
    assert server.alive()


def test_api_key(servers):
    server = servers["clip"]
    for key in (None, "wrong", KEY + "x"):
        status, answer, headers = server.request("POST", "/v1/embed/image", {"image": b64(RED)},
                                                 key=key)
        assert status == 401 and "API key" in answer["error"]
        assert headers["www-authenticate"] == "Bearer"
    status, _, _ = server.request("GET", "/v1/models", key=None)
    assert status == 401
    status, _, _ = server.request("POST", "/v1/embed/image", {"image": b64(RED)}, key=None,
                                  headers={"Authorization": f"Basic {KEY}"})
    assert status == 401
    assert server.request("GET", "/v1/health", key=None)[0] == 200
    assert server.post("/v1/embed/image", {"image": b64(RED)})[0] == 200
    # a server without --api-key needs none
    assert servers["coca"].post("/v1/embed/image", {"image": b64(RED)}, key=None)[0] == 200


def test_cors_is_off_by_default_and_allows_only_the_origins_given(servers):
    origin = {"Origin": "http://allowed.test"}
    headers = servers["coca"].request("GET", "/v1/models", headers=origin)[2]
    assert "access-control-allow-origin" not in headers
    headers = servers["simvlm"].request("GET", "/v1/models", headers=origin)[2]
    assert headers["access-control-allow-origin"] == "http://allowed.test"
    other = {"Origin": "http://elsewhere.test"}
    headers = servers["simvlm"].request("GET", "/v1/models", headers=other)[2]
    assert "access-control-allow-origin" not in headers


def test_200_concurrent_requests_are_batched_and_each_gets_its_own_result(servers, library):
    server = servers["clip"]
    model, _, transform = library("clip")
    colours = [(r, g, 90) for r in range(0, 250, 50) for g in range(0, 250, 50)]  # 25 images
    images = [png(colour, shape="circle" if i % 2 else "square")
              for i, colour in enumerate(colours)]
    with torch.no_grad():
        expected = model.encode_image(torch.cat([pixels_of(im, transform) for im in images]))
    before = server.request("GET", "/v1/health")[1]["batching"]

    def one(i: int):
        return i, server.post("/v1/embed/image", {"image": b64(images[i % len(images)])})

    with ThreadPoolExecutor(max_workers=200) as pool:  # all 200 in flight at once
        results = list(pool.map(one, range(200)))
    errors = [(i, answer) for i, (status, answer) in results if status != 200]
    assert not errors, errors[:3]
    for i, (_, answer) in results:
        torch.testing.assert_close(torch.tensor(answer["embedding"]),
                                   expected[i % len(images)], atol=1e-5, rtol=0)
    after = server.request("GET", "/v1/health")[1]["batching"]
    assert after["items"] - before["items"] == 200
    assert after["batches"] - before["batches"] < 200  # requests shared batches
    assert 1 < after["largest_batch"] <= 16
    assert server.alive()


# -- the page, in a real browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]


def test_page_captions_an_uploaded_image_in_chromium(servers, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium at /usr/bin/chromium (make test installs the distribution's "
                    "package: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the browser test drives chromium with playwright")
    server = servers["blip"]
    (tmp_path / "red.png").write_bytes(RED)
    expected = server.post("/v1/caption", {"image": b64(RED)})[1]["caption"]
    labels = ["circle", "square", "star"]
    scores = server.post("/v1/zeroshot", {"image": b64(RED), "labels": labels})[1]["scores"]
    answer = server.post("/v1/vqa", {"image": b64(RED), "question": "what colour is it?"})[1]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            page.fill("#labels", ", ".join(labels))
            page.set_input_files("#file", str(tmp_path / "red.png"))
            for selector in ("#caption", "#answer", "#bars"):
                page.wait_for_selector(f"{selector}[data-done=true]", timeout=60_000)
            shown = page.text_content("#caption")
            bars = page.eval_on_selector_all(
                "#bars li", "items => items.map(li => [li.querySelector('.label').textContent,"
                            " parseFloat(li.querySelector('.bar').style.width)])")
            shown_answer = page.text_content("#answer")
            assert page.is_hidden("#error")
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert shown == expected
    assert shown_answer == answer["answer"]
    assert sorted(label for label, _ in bars) == sorted(labels)
    for label, width in bars:
        assert width == pytest.approx(100 * scores[label], abs=0.06)
    assert (tmp_path / "serve_page.png").stat().st_size > 1000


# -- without a server -----------------------------------------------------------------------------

def test_importing_vlp_imports_no_web_framework():
    import subprocess
    import sys

    code = ("import sys, vlp, vlp.cli, vlp.serve; "
            "vlp.cli.build_parser().parse_args(['serve', 'some/model']); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_serve_without_a_model_is_one_line_error(tmp_path, capsys, monkeypatch):
    from vlp.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "vlp"))
    for model in (str(tmp_path / "missing"), "hf-hub:nobody/no-such-model"):
        assert main(["serve", model, "--port", "1"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("vlp: error:") and len(error.strip().splitlines()) == 1


def test_batcher_groups_by_key_up_to_max_batch_and_fails_items_alone():
    import asyncio

    from vlp.serve.batching import Batcher

    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        return [ValueError(f"bad {item}") if item < 0 else (key, item * 2) for item in items]

    async def main():
        batcher = Batcher(run, max_batch=3, max_wait_s=0.05)
        jobs = [batcher.submit("a", 1), batcher.submit("b", 2), batcher.submit("a", -3),
                batcher.submit("a", 4), batcher.submit("a", 5)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        batcher.close()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert results[0] == ("a", 2) and results[1] == ("b", 4)
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad -3"
    assert results[3:] == [("a", 8), ("a", 10)]
    assert all(len(items) <= 3 and len({k}) == 1 for k, items in calls)
    assert sorted(item for _, items in calls for item in items) == [-3, 1, 2, 4, 5]
    assert stats.items == 5 and stats.batches == len(calls) < 5
