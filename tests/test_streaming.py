"""Shards read as streams (``pipe:``, http on loopback, fsspec ``file://`` and ``memory://``):
the same samples in the same order as the local files, exact resume, resampled and weighted
shard draws, counting from ``_stats.json``, and the warning when steps wait for data."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from test_faults import _logged_step, _losses
from test_loader import (
    EVAL,
    TRAIN,
    CharTokenizer,
    assert_same_batches,
    caption,
    image_bytes,
    loader_for,
    resume_matches,
    run_epochs,
    write_shards,
)
from test_trainer import TINY_MODEL, tiny_config
from vlp.data import WebDatasetSource, make_loader
from vlp.data.stream import resampled_shards
from vlp.errors import ConfigError, DataError
from vlp.run import train
from vlp.train.runlog import DATA_WARN_SHARE, DATA_WINDOW, data_wait_warning

SIZES = [7, 5, 6, 4]  # 22 samples
PATTERN = "shard-{000000..000003}.tar"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines on stderr
        pass


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, SIZES)
    return root


@pytest.fixture(scope="module")
def http_root(shard_dir: Path):
    """A real HTTP server on 127.0.0.1 serving `shard_dir`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def memory_root(shard_dir: Path) -> str:
    fs = fsspec.filesystem("memory")
    for shard in sorted(shard_dir.glob("*.tar")):
        fs.pipe(f"/vlp-test/{shard.name}", shard.read_bytes())
    return "memory://vlp-test"


def _urls(kind: str, shard_dir: Path, http_root: str, memory_root: str) -> str:
    return {"local": str(shard_dir / PATTERN),
            "file": f"file://{shard_dir}/{PATTERN}",
            "memory": f"{memory_root}/{PATTERN}",
            "http": f"{http_root}/{PATTERN}",
            "pipe": f"pipe:cat {shard_dir}/{PATTERN}"}[kind]


@pytest.fixture(scope="module")
def sources(shard_dir: Path, http_root: str, memory_root: str):
    def make(kind: str, **options) -> WebDatasetSource:
        num_samples = None if kind == "local" else sum(SIZES)
        return WebDatasetSource(_urls(kind, shard_dir, http_root, memory_root),
                                **{"num_samples": num_samples, **options})
    return make


# -- the same samples in the same order ------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "memory", "http", "pipe"])
def test_streamed_shards_give_the_local_batches(sources, kind: str) -> None:
    local = run_epochs(loader_for(sources("local"), shuffle_buffer=5), 2)
    streamed = run_epochs(loader_for(sources(kind), shuffle_buffer=5), 2)
    assert_same_batches(streamed, local)
    # in order too, as an evaluation reads them: every sample once, same captions
    plain = lambda source: [(r.key, r.text, r.image) for r in source]
    assert plain(sources(kind)) == plain(sources("local"))
    assert [r.text for r in sources(kind)] == [caption(i) for i in range(sum(SIZES))]


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_streamed_shards_in_worker_processes_give_the_local_batches(sources, kind: str
                                                                     ) -> None:
    local = run_epochs(loader_for(sources("local"), shuffle_buffer=5, num_workers=2), 1)
    streamed = run_epochs(loader_for(sources(kind), shuffle_buffer=5, num_workers=2), 1)
    assert_same_batches(streamed, local)


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_streamed_resume_is_exact(sources, kind: str) -> None:
    make = lambda: loader_for(sources(kind), num_workers=2, shuffle_buffer=5)
    resume_matches(make, epochs=2, stop_after=[3, 6])


# -- counting ------------------------------------------------------------------------------


def test_shard_urls_are_counted_from_stats_files_or_need_an_epoch_size(
        sources, shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--train-num-samples"):
        len(loader_for(sources("http", num_samples=None)))
    # a run says so before it reads any shard (not after training a tokenizer on them)
    urls = f"pipe:cat {shard_dir}/{PATTERN}"
    with pytest.raises(DataError, match="cannot count the samples of 4 shard URL"):
        train(tiny_config(urls, tmp_path / "run"))
    with pytest.raises(ConfigError, match="--train-num-samples, --dataset-resampled: for "
                                          "WebDataset shards"):
        train(tiny_config(str(tmp_path / "data.csv"), tmp_path / "run", train_num_samples=8,
                          dataset_resampled=True))
    for shard, size in zip(sorted(shard_dir.glob("*.tar")), SIZES):
        shutil.copy(shard, tmp_path / shard.name)
        (tmp_path / f"{shard.stem}_stats.json").write_text(json.dumps({"successes": size}))
    source = WebDatasetSource(f"file://{tmp_path}/{PATTERN}")
    assert source.shard_sizes == SIZES  # from the stats files: no shard was read
    evaluation = make_loader(source, transform=EVAL, tokenizer=CharTokenizer(), batch_size=4,
                             train=False)
    assert sorted(i for batch in evaluation for i in batch["index"].tolist()) == sorted(
        (shard << 32) | position for shard, size in enumerate(SIZES)
        for position in range(size))


def test_a_failing_shard_url_is_one_line(sources, shard_dir: Path, http_root: str) -> None:
    with pytest.raises(DataError, match=r"shard-9\.tar: cannot read the shard .*404"):
        list(WebDatasetSource(f"{http_root}/shard-9.tar", num_samples=1))
    with pytest.raises(DataError, match=r"pipe:exit 3: .*exited with status 3"):
        list(WebDatasetSource("pipe:exit 3", num_samples=1))
    with pytest.raises(ConfigError, match="nosuchscheme:// shards: fsspec cannot read"):
        WebDatasetSource("nosuchscheme://bucket/a-{0..3}.tar", num_samples=1)
    # met mid-run, a missing shard is skipped and listed, not a crash
    urls = f"{http_root}/{{shard-000000,gone}}.tar"
    loader = make_loader(WebDatasetSource(urls, num_samples=8), transform=TRAIN,
                         tokenizer=CharTokenizer(), batch_size=2, train=True, seed=1)
    list(loader)
    assert loader.skipped_report() == {"truncated_shard": 1}
    assert any("gone.tar" in item for item in loader.skipped_items())


def test_fsspec_urls_without_fsspec_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'vlp\[fsspec\]'"):
        WebDatasetSource("s3://bucket/shard-{0..3}.tar", num_samples=4)
    WebDatasetSource("pipe:cat shard-{0..3}.tar::https://host/{0..3}.tar", num_samples=4)


# -- resampled and weighted shards ---------------------------------------------------------


def test_resampled_draws_are_seeded_with_replacement_and_resume_exactly(sources) -> None:
    draws = lambda seed, epoch, slot: list(itertools.islice(
        resampled_shards(None, 4, seed=seed, epoch=epoch, slot=slot), 400))
    first = draws(7, 0, 0)
    assert first == draws(7, 0, 0)  # reproducible from the seed
    assert first != draws(8, 0, 0) and first != draws(7, 1, 0) and first != draws(7, 0, 1)
    assert min(Counter(first).values()) > 70  # uniform: 100 each expected
    assert any(len(set(first[i:i + 4])) < 4 for i in range(0, 400, 4))  # with replacement
    make = lambda seed=7, kind="local": loader_for(
        sources(kind, resampled=True, num_samples=40), shuffle_buffer=5, seed=seed)
    batches = run_epochs(make(), 2)
    assert_same_batches(run_epochs(make(), 2), batches)
    other = run_epochs(make(seed=8), 2)
    assert any(not a["index"].equal(b["index"]) for a, b in zip(batches, other))
    assert_same_batches(run_epochs(make(kind="pipe"), 2), batches)
    resume_matches(lambda: make(kind="http"), epochs=2, stop_after=[4, 13])


def test_weights_set_the_mixing_proportions_and_resume_exactly(tmp_path: Path) -> None:
    """Two sources of 4 shards x 10 samples, weights 3::1: about 3/4 of the samples come from
    the first, whatever its size next to the second."""
    roots = []
    for name, shards in (("a", 4), ("b", 8)):
        root = tmp_path / name
        root.mkdir()
        write_shards(root, [10] * shards)
        roots.append(f"{root}/shard-{{000000..{shards - 1:06d}}}.tar")
    urls = "::".join(roots)
    source = WebDatasetSource(urls, num_samples=1200, resampled=True, weights=[3, 1])
    assert source.shard_weights == [3 / 4] * 4 + [1 / 8] * 8
    draws = itertools.islice(resampled_shards(source.shard_weights, 12, seed=3, epoch=0,
                                              slot=0), 20000)
    share = sum(shard < 4 for shard in draws) / 20000
    assert abs(share - 0.75) < 0.01, share  # sd ~0.003
    make = lambda: make_loader(source, transform=TRAIN, tokenizer=CharTokenizer(),
                               batch_size=40, train=True, seed=3, shuffle_buffer=50)
    counts: Counter[str] = Counter()
    for batch in make():
        for index in batch["index"].tolist():
            counts[source.shards[index >> 32].split("/")[-2]] += 1
    share = counts["a"] / sum(counts.values())
    assert abs(share - 0.75) < 0.1, counts  # 120 shard draws: sd ~0.04
    resume_matches(make, epochs=1, stop_after=[17])
    with pytest.raises(ConfigError, match="--dataset-resampled"):
        WebDatasetSource(urls, weights=[3, 1])
    with pytest.raises(ConfigError, match="one per '::'-joined"):
        WebDatasetSource(urls, resampled=True, weights=[3])


# -- whole runs: the same losses from HTTP and pipe shards, killed and resumed --------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 8


@pytest.fixture(scope="module")
def run_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 12 captioned 40 px images."""
    root = tmp_path_factory.mktemp("run_shards")
    key = 0
    for shard in range(4):
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w") as tar:
            for _ in range(12):
                for ext, data in (("png", image_bytes(key, size=40)),
                                  ("txt", f"a photo of thing {key % 7}".encode())):
                    info = tarfile.TarInfo(f"{key:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                key += 1
    return root


def _command(data: str, out: Path, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "vlp", "train", "--train-data", data,
               "--train-num-samples", "48", "--model-overrides", json.dumps(TINY_MODEL),
               "--output-dir", str(out), "--batch-size", "8", "--max-steps", str(STEPS),
               "--lr", "1e-3", "--checkpoint-every", "1", "--keep", "2", "--num-workers", "1",
               "--no-progress", "--seed", "7"]
    return command + (["--resume", "latest"] if resume else [])



def _kill_at(command: list[str], out: Path, step: int, timeout: float = 120) -> None:
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if _logged_step(out) >= step:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return
            time.sleep(0.002)
        raise AssertionError(f"the run ended before step {step}: "
                             f"{process.stderr.read().decode()[-2000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def run_shards_url(run_shards: Path):
    """`run_shards` served over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(run_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def local_losses(run_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    out = tmp_path_factory.mktemp("local") / "run"
    subprocess.run(_command(str(run_shards / PATTERN), out, False), env=ENV, check=True,
                   capture_output=True)
    losses = _losses(out)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_runs_on_streamed_shards_killed_and_resumed_repeat_the_local_run(
        kind: str, run_shards: Path, run_shards_url: str, local_losses: list,
        tmp_path: Path) -> None:
    data = (f"{run_shards_url}/{PATTERN}" if kind == "http"
            else f"pipe:cat {run_shards}/{PATTERN}")
    out = tmp_path / kind
    _kill_at(_command(data, out, False), out, step=5 if kind == "http" else 3)
    assert _logged_step(out) < STEPS
    subprocess.run(_command(data, out, True), env=ENV, check=True, capture_output=True)
    assert _losses(out) == local_losses  # bit for bit, every step


# -- data time ----------------------------------------------------------------------------


def test_a_slow_source_gets_the_data_wait_warning(run_shards: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    # two seconds before each shard: far more than a tiny model's step even on a busy machine
    slow = f"pipe:sleep 2; cat {run_shards}/{PATTERN}"
    config = tiny_config(slow, tmp_path / "slow", train_num_samples=48, batch_size=8,
                         max_steps=12, log_every=4)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "slow" / "log.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    assert all(r["data_s"] >= 0 and r["compute_s"] > 0 for r in steps)
    assert sum(r["data_s"] for r in steps) > 4 * 2 * 2  # two epochs of four slow shards
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "waiting for data" in line]
    assert len(warnings) == 1, err  # once a run
    assert "--num-workers" in warnings[0] and "pre-resized" in warnings[0]


def test_the_data_wait_rule() -> None:
    """The warning's rule on logged (data_s, compute_s) pairs: only a full window whose
    waiting share passes DATA_WARN_SHARE earns it (a local source's share depends on the
    machine's load, so the rule is checked on fixed numbers rather than on a timed run)."""
    window = [(0.1, 0.9)] * DATA_WINDOW
    assert data_wait_warning(window, DATA_WINDOW, 0) is None
    assert data_wait_warning([(0.5, 0.5)] * (DATA_WINDOW - 1), DATA_WINDOW - 1, 0) is None
    share = DATA_WARN_SHARE
    assert data_wait_warning([(share, 1 - share)] * DATA_WINDOW, DATA_WINDOW, 2) is None
    line = data_wait_warning([(0.6, 0.4)] * DATA_WINDOW, 40, 2)
    assert line is not None and "steps 31-40" in line and "60%" in line
    assert "now 2" in line and "now 0" in data_wait_warning([(0.6, 0.4)] * DATA_WINDOW, 40, 0)
