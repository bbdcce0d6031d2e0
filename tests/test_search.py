"""`vlp embed` (parts, resume, Ray, torchrun) → `vlp index` (faiss) → `vlp search` and
`/v1/search`, on the synthetic world's test split with a tiny saved CLIP."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlp
from vlp.cli import main
from vlp.data import build_source
from vlp.data.synthetic import write_dataset
from vlp.errors import ConfigError
from vlp.eval import embed_images, embed_texts
from vlp.eval.retrieval import retrieval_groups
from vlp.tokenizers import train_tokenizer

faiss = pytest.importorskip("faiss", reason="vlp index needs the faiss extra")
pytest.importorskip("pyarrow", reason="vlp embed's parts need pyarrow (the faiss extra)")

from vlp.search import Index  # noqa: E402
from vlp.search.embed import EmbedConfig, embed_collection, write_vectors  # noqa: E402
from vlp.search.index import recall_at  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHARDS = 10  # 40 test images, 4 a shard
EMBED = ["--batch-size", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search_world")
    write_dataset(root, formats=["csv", "wds"], n_train=4, n_val=4, n_test=40, image_size=32,
                  captions_per_image=1, shard_size=4, progress=False)
    return root


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory) -> Path:
    with open(world / "test.csv") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    tokenizer = train_tokenizer(captions * 4, vocab_size=300, context_length=32)
    torch.manual_seed(0)
    return vlp.save(vlp.create_model("clip-tiny"), tmp_path_factory.mktemp("m") / "clip",
                    tokenizer=tokenizer)


def run_cli(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded(world, model_dir, tmp_path_factory) -> Path:
    """The test split's shards embedded in one uninterrupted run."""
    out = tmp_path_factory.mktemp("emb") / "uninterrupted"
    threads = torch.get_num_threads()
    try:
        assert main(["embed", str(model_dir), "--data", str(world / "wds" / "test"), "--out",
                     str(out), *EMBED]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- embed → flat index → search equals exact retrieval -----------------------------------------

def test_flat_search_top1_is_vlp_evals_exact_retrieval(world, model_dir, embedded, tmp_path,
                                                       capsys):
    summary = json.loads((embedded / "summary.json").read_text())
    assert summary["count"] == 40 and summary["parts"] == SHARDS and not summary["unreadable"]
    record = run_cli(capsys, "index", embedded, "--out", tmp_path / "idx", "--kind", "flat")
    assert record["kind"] == "flat" and record["count"] == 40
    assert record["model"] == str(model_dir.resolve())

    # exact retrieval as vlp eval computes it: the same groups, embeddings and similarity
    model, tokenizer = vlp.load(model_dir), vlp.load_tokenizer(model_dir)
    groups = retrieval_groups(build_source("wds", str(world / "wds" / "test")))
    images = embed_images(model, groups.images, ids=groups.ids, progress=False)
    texts = embed_texts(model, tokenizer, groups.texts, progress=False)
    best = model.similarity(images.embeddings, texts).argmax(dim=0).tolist()
    expected = [images.ids[i] for i in best]

    index = Index(tmp_path / "idx")
    found = [results[0]["key"] for results in index.search_texts(groups.texts, k=1)]
    assert found == expected

    # vlp eval's text->image R@1 is the share of captions whose search top-1 is their image
    metrics = run_cli(capsys, "eval", model_dir, "--retrieval-data", world / "wds" / "test",
                      "--no-progress")
    own = [groups.ids[i] for i in groups.text_to_image]
    assert metrics["t2i_r1"] == pytest.approx(np.mean([f == o for f, o in zip(found, own)]))

    # vlp search: one JSON object per query, best first, with the metadata
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(groups.texts[:3]) + "\n")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--texts-file", str(queries), "-k", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["results"][0]["key"] for line in lines] == expected[:3]
    for line in lines:
        scores = [r["score"] for r in line["results"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert {"id", "score", "path", "caption", "key"} <= set(line["results"][0])
    # an image finds itself first (the synthetic shards hold the CSV's image files' bytes)
    answer = run_cli(capsys, "search", tmp_path / "idx", "--image",
                     world / "images" / "test" / "000007.jpg", "-k", "3")
    assert answer["results"][0]["key"].endswith("07")
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


# -- resume, backends ----------------------------------------------------------------------------

def test_killed_embed_resumes_without_recomputing_and_ends_byte_identical(world, model_dir,
                                                                          embedded, tmp_path,
                                                                          capsys):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlp", "embed", str(model_dir), "--data",
                                str(world / "wds" / "test"), "--out", str(out), *EMBED],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("part-*.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.json")}
    assert 1 <= len(done) < SHARDS, "the run must be killed between its first and last part"
    assert not (out / "summary.json").exists()

    result = run_cli(capsys, "embed", model_dir, "--data", world / "wds" / "test", "--out",
                     out, *EMBED)
    assert result["already_done"] == len(done)
    assert result["embedded"] == SHARDS - len(done)
    assert {p: (out / "parts" / p).stat().st_mtime_ns for p in done} == done  # not recomputed
    assert files_of(out) == files_of(embedded)  # no temporary file left, every byte equal

    again = run_cli(capsys, "embed", model_dir, "--data", world / "wds" / "test", "--out", out,
                    *EMBED)
    assert again["embedded"] == 0 and again["already_done"] == SHARDS
    with pytest.raises(ConfigError, match="other settings.*dtype"):
        embed_collection(EmbedConfig(str(model_dir), str(out), str(world / "wds" / "test"),
                                     dtype="float16", progress=False))


def test_ray_and_local_backends_write_the_same_files(world, model_dir, embedded, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = embed_collection(EmbedConfig(
            str(model_dir), str(tmp_path / "ray"), str(world / "wds" / "test"), batch_size=2,
            threads=1, backend="ray", ray_actors=2, progress=False))
    finally:
        ray.shutdown()
    assert result["embedded"] == SHARDS and result["count"] == 40
    assert files_of(tmp_path / "ray") == files_of(embedded)


def test_torchrun_ranks_split_the_parts(world, model_dir, embedded, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                               "vlp", "embed", str(model_dir), "--data",
                               str(world / "wds" / "test"), "--out", str(out), *EMBED],
                              env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    answers = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert sorted(a["rank"] for a in answers) == [0, 1]
    assert sum(a["embedded"] for a in answers) == SHARDS
    assert files_of(out) == files_of(embedded)


def test_unreadable_images_are_counted_and_named_never_fatal(world, model_dir, tmp_path,
                                                             capsys):
    images = world / "images" / "test"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [(images / f"{i:06d}.jpg", f"caption {i}") for i in range(5)]
    rows[1] = (tmp_path / "broken.jpg", "a broken image")
    rows[3] = (tmp_path / "missing.jpg", "an image that is not there")
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    result = run_cli(capsys, "embed", model_dir, "--data", tmp_path / "data.csv", "--out",
                     tmp_path / "emb", "--part-size", "2", *EMBED)
    assert result["parts"] == 3 and result["count"] == 3 and result["unreadable"] == 2
    assert result["unreadable_first"] == [
        {"id": str(tmp_path / "broken.jpg"), "reason": "corrupt_image"},
        {"id": str(tmp_path / "missing.jpg"), "reason": "missing_image"}]

    # a shard cut short: the samples before the cut are embedded, the lost ones named
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy(world / "wds" / "test" / name, shards / name)
    data = (shards / "shard-000001.tar").read_bytes()
    (shards / "shard-000001.tar").write_bytes(data[:len(data) // 2])
    result = run_cli(capsys, "embed", model_dir, "--data", shards, "--out", tmp_path / "wds",
                     *EMBED)
    assert 4 < result["count"] < 8 and result["unreadable"] >= 1
    assert result["unreadable_first"][0]["reason"] == "truncated_shard"
    assert result["unreadable_first"][0]["id"].startswith("shard-000001.tar")
    index = run_cli(capsys, "index", tmp_path / "wds", "--out", tmp_path / "idx")
    assert index["count"] == result["count"]


# -- approximate indexes -------------------------------------------------------------------------

def clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """Unit vectors around cluster centres, as embeddings of a real collection are."""
    picks = centres[rng.integers(0, len(centres), count)]
    vectors = picks + 0.4 * rng.standard_normal(picks.shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_approximate_index_meets_its_recall_target_on_held_out_queries(kind, tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 32)).astype(np.float32)
    vectors = clustered(rng, centres, 6000)
    write_vectors(tmp_path / "emb", [vectors[i:i + 2000] for i in range(0, 6000, 2000)])
    record = run_cli(capsys, "index", tmp_path / "emb", "--out", tmp_path / "idx", "--kind",
                     kind, "--recall", "0.9", "--queries", "500")
    assert "MiB in memory" in capsys.readouterr().err or record["memory_estimate_bytes"] > 0
    assert record["kind"] == kind and record["recall_at_10"] >= 0.9
    assert record["params"]  # tuned: nprobe and k_factor, or efSearch
    held_out = clustered(rng, centres, 300)  # never in the collection nor the tuning
    truth = np.argsort(-(held_out @ vectors.T), axis=1)[:, :10]
    index = Index(tmp_path / "idx")
    found = np.array([[int(r["id"]) for r in results] + [-1] * (10 - len(results))
                      for results in index.search(held_out, 10)])
    assert recall_at(found, truth) >= 0.9
    if kind == "ivf-pq":  # compressed: smaller than the float32 vectors
        assert record["index_file_bytes"] < vectors.nbytes


# -- /v1/search over a real server ---------------------------------------------------------------

def test_v1_search_over_the_real_server_and_on_the_page(world, model_dir, embedded, tmp_path,
                                                        capsys):
    pytest.importorskip("fastapi", reason="vlp serve needs the serve extra")
    from serve_client import Server, multipart  # tests/serve_client.py

    run_cli(capsys, "index", embedded, "--out", tmp_path / "idx")
    index = Index(tmp_path / "idx")
    query = "a small red circle"
    expected = index.search_texts([query], k=5)[0]
    image = (world / "images" / "test" / "000012.jpg").read_bytes()
    server = Server(model_dir, "--index", str(tmp_path / "idx"), log=tmp_path / "serve.log")
    try:
        status, body = server.post("/v1/search", {"text": query, "k": 5})
        assert status == 200
        assert [r["id"] for r in body["results"]] == [r["id"] for r in expected]
        for got, want in zip(body["results"], expected):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        raw, kind = multipart({"k": "2"}, {"image": ("q.jpg", image, "image/jpeg")})
        status, body, _ = server.request("POST", "/v1/search", raw=raw, content_type=kind)
        assert status == 200 and body["results"][0]["key"].endswith("12")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", body["results"][0]["thumbnail"])
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type") == "image/jpeg"
        with Image.open(io.BytesIO(response.read())) as thumb:
            assert thumb.size == Image.open(io.BytesIO(image)).size  # 32 px: not enlarged
        connection.close()
        for bad, code in [({"k": 3}, 400), ({"text": "x", "image": "AAAA"}, 400),
                          ({"text": "x", "k": 10_000}, 400)]:
            status, body = server.post("/v1/search", bad)
            assert status == code and "error" in body
        status, body, _ = server.request("GET", "/v1/search/thumbnail/40")
        assert status == 404 and "not in the index" in body["error"]
        _page_shows_results(server, query, expected, tmp_path)
        assert server.alive()
    finally:
        server.stop()


def _page_shows_results(server, query, expected, tmp_path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        return  # the page in a browser: tests/test_serve.py says how chromium is installed
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            page.fill("#query", query)
            page.click("#search-form button")
            page.wait_for_selector("#results[data-done=true]", timeout=60_000)
            shown = page.eval_on_selector_all(
                "#results li", "items => items.map(li => [li.dataset.id, "
                               "li.querySelector('img').naturalWidth])")
            assert page.is_hidden("#error")
        finally:
            browser.close()
    assert [id_ for id_, _ in shown][:5] == [r["id"] for r in expected]
    assert all(width > 0 for _, width in shown)


def test_an_index_is_served_only_with_its_own_model(embedded, tmp_path, capsys):
    pytest.importorskip("fastapi", reason="vlp serve needs the serve extra")
    from vlp.serve.engine import ServedModel

    run_cli(capsys, "index", embedded, "--out", tmp_path / "idx")
    other = vlp.save(vlp.create_model("clip-tiny"), tmp_path / "other")
    with pytest.raises(ConfigError, match="built with model"):
        ServedModel(other, index=tmp_path / "idx")
