"""Runs that survive faults: ``kill -9`` at any step or mid-checkpoint, non-finite steps,
unreadable images and truncated shards, out-of-memory advice."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vlp.data.synthetic import write_dataset
from vlp.errors import VlpError
from vlp.run import train
from vlp.train import TrainConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 14


@pytest.fixture(scope="module")
def data(synthetic_train_csv) -> Path:
    return synthetic_train_csv(160)


def _command(data: Path, out: Path, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "vlp", "train", "--train-data", str(data),
               "--output-dir", str(out), "--batch-size", "16", "--max-steps", str(STEPS),
               "--lr", "1e-3", "--checkpoint-every", "1", "--keep", "2", "--num-workers", "1",
               "--no-progress", "--seed", "7"]
    return command + (["--resume", "latest"] if resume else [])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _staging(run_dir: Path) -> list[str]:
    try:
        return [name for name in os.listdir(run_dir) if name.startswith(".checkpoint-")]
    except FileNotFoundError:
        return []


def _kill_when(command: list[str], condition, timeout: float = 120) -> bool:
    """Start `command`, SIGKILL it as soon as `condition()` holds; False if it ended first."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if condition():
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.0005)
        assert process.poll() is not None, "training did not finish in time"
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_command(data, out, resume=False), env=ENV, check=True,
                   capture_output=True)
    losses = _losses(out)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return losses


def test_kill_9_at_a_random_step_then_resume_repeats_the_run_exactly(
        data: Path, uninterrupted: list, tmp_path: Path) -> None:
    out = tmp_path / "run"
    at = random.Random(1234).randrange(3, STEPS - 2)
    assert _kill_when(_command(data, out, resume=False), lambda: _logged_step(out) >= at)
    assert _logged_step(out) < STEPS
    subprocess.run(_command(data, out, resume=True), env=ENV, check=True, capture_output=True)
    assert _losses(out) == uninterrupted  # bit for bit, every step once


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(
        data: Path, uninterrupted: list, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed_mid_write = 0
    resume = False
    for _ in range(8):  # each attempt kills the process as soon as a checkpoint write starts
        seen_before = set(_staging(out))
        stopped = _kill_when(_command(data, out, resume),
                             lambda seen=seen_before: bool(set(_staging(out)) - seen))
        resume = True
        if not stopped:
            break
        # the kill may land just after the rename; count the ones that left a staging dir
        killed_mid_write += bool(set(_staging(out)) - seen_before)
        if killed_mid_write == 2:
            break
    assert killed_mid_write >= 1
    subprocess.run(_command(data, out, resume=True), env=ENV, check=True, capture_output=True)
    assert _losses(out) == uninterrupted
    # the leftovers of interrupted writes are cleared by the next successful save
    assert [name for name in os.listdir(out) if name.startswith(".")] == []


def _pruning(run_dir: Path) -> bool:
    return any(".old-" in name for name in _staging(run_dir))


def test_kill_9_during_pruning_leaves_the_run_resumable(
        data: Path, uninterrupted: list, tmp_path: Path) -> None:
    import vlp

    out = tmp_path / "run"
    killed_mid_prune, resume = 0, False
    for _ in range(8):  # each attempt kills the process as soon as it starts deleting
        stopped = _kill_when(_command(data, out, resume), lambda: _pruning(out))
        resume = True
        if not stopped:
            break
        killed_mid_prune += _pruning(out)
        assert vlp.load(out) is not None  # the latest complete checkpoint loads
        if killed_mid_prune == 2:
            break
    assert killed_mid_prune >= 1
    subprocess.run(_command(data, out, resume=True), env=ENV, check=True, capture_output=True)
    assert _losses(out) == uninterrupted
    assert [name for name in os.listdir(out) if name.startswith(".")] == []


def test_a_second_trainer_on_a_live_run_directory_is_refused(
        data: Path, uninterrupted: list, tmp_path: Path, capsys) -> None:
    from vlp.cli import main

    out = tmp_path / "run"
    first = subprocess.Popen(_command(data, out, resume=False), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while _logged_step(out) < 2:  # training, holding the directory
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.01)
        for resume in (True, False):
            assert main(_command(data, out, resume)[3:]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1
            assert f"in use by another vlp train (pid {first.pid}" in err
        assert first.poll() is None  # the refusals happened while it trained
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert _losses(out) == uninterrupted  # its log untouched: every step once, in order


ENOSPC_RUN = """
import errno, sys
import vlp.train.checkpoint as checkpoint
from vlp.cli import main
real, calls = checkpoint.save_file, []
def disk_full(*args, **kwargs):  # the 5th checkpoint's write finds the disk full
    calls.append(1)
    if len(calls) == 5:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)
checkpoint.save_file = disk_full
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_the_run_resumable(
        data: Path, uninterrupted: list, tmp_path: Path) -> None:
    import vlp

    out = tmp_path / "run"
    failed = subprocess.run([sys.executable, "-c", ENOSPC_RUN,
                             *_command(data, out, resume=False)[3:]],
                            env=ENV, capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("vlp: error: ") and failed.stderr.count("\n") == 1
    assert "checkpoint-0000005: could not be written (No space left on device)" in failed.stderr
    assert [name for name in os.listdir(out) if name.startswith(".")] == []
    assert os.readlink(out / "checkpoint-latest") == "checkpoint-0000004"
    assert vlp.load(out) is not None
    subprocess.run(_command(data, out, resume=True), env=ENV, check=True, capture_output=True)
    assert _losses(out) == uninterrupted


# ---------------------------------------------------------------------------------------------
# damaged data and non-finite steps, in one run

SHARD_SIZE, CORRUPT, CUT_SHARD, CUT_AT = 40, {0: (5, 17, 33)}, 2, 30


def _damaged_shards(root: Path) -> tuple[str, set[int]]:
    """The synthetic world as 4 WebDataset shards (with img2dataset's stats files) where three
    JPEGs of shard 0 are garbage and shard 2 is cut inside sample 30's image; returns the
    shard pattern and the loader indices of the samples that should train."""
    write_dataset(root, formats=["wds"], n_train=4 * SHARD_SIZE, n_val=8, n_test=8,
                  image_size=64, captions_per_image=1, shard_size=SHARD_SIZE, progress=False)
    shards = sorted((root / "wds" / "train").glob("*.tar"))
    assert len(shards) == 4
    good = set()
    for number, shard in enumerate(shards):
        shard.with_name(shard.stem + "_stats.json").write_text(
            json.dumps({"successes": SHARD_SIZE}))
        with tarfile.open(shard) as tar:
            members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
        keys = sorted({member.name.split(".")[0] for member, _ in members})
        bad_keys = {keys[p] for p in CORRUPT.get(number, ())}
        with tarfile.open(shard, "w") as tar:
            for member, payload in members:
                if member.name.split(".")[0] in bad_keys and member.name.endswith(".jpg"):
                    payload = b"\xff\xd8 not really a jpeg"
                    member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
        if number == CUT_SHARD:
            with tarfile.open(shard) as tar:
                image = next(m for m in tar.getmembers()
                             if m.name.startswith(keys[CUT_AT]) and m.name.endswith(".jpg"))
            with open(shard, "r+b") as f:
                f.truncate(image.offset_data + 10)
        lost = set(CORRUPT.get(number, ())) | (set(range(CUT_AT, SHARD_SIZE))
                                               if number == CUT_SHARD else set())
        good |= {(number << 32) | p for p in range(SHARD_SIZE) if p not in lost}
    pattern = str(root / "wds" / "train" / "shard-{000000..000003}.tar")
    return pattern, good


def test_nonfinite_steps_corrupt_images_and_a_truncated_shard(tmp_path: Path) -> None:
    pattern, good = _damaged_shards(tmp_path / "data")
    poisoned = {3, 4}

    def poison(model: torch.nn.Module, step: int) -> None:
        if step in poisoned:
            next(model.parameters()).grad.fill_(float("nan"))

    cfg = TrainConfig(model="clip-tiny", train_data=pattern, train_kind="wds", batch_size=16,
                      epochs=1, lr=1e-3, num_workers=2, output_dir=str(tmp_path / "run"),
                      progress=False, seed=0)
    result = train(cfg, after_backward=poison)
    assert result["step"] == 4 * SHARD_SIZE // 16 and result["nonfinite_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps if r.get("skipped")] == sorted(poisoned)
    assert all(r["skipped"] == "nonfinite" for r in steps if r.get("skipped"))
    # every readable sample trained once: the count and the sum of their loader indices
    assert sum(r["samples"] for r in steps) == len(good)
    assert sum(r["index_sum"] for r in steps) == sum(good)
    ends = [r for r in records if r.get("end_of_epoch")]
    assert len(ends) == 1
    lost_to_cut = SHARD_SIZE - CUT_AT
    assert ends[0]["skipped"] == {"corrupt_image": 3, "truncated_shard": lost_to_cut}
    assert ends[0]["skipped_total"] == 3 + lost_to_cut
    items = ends[0]["skipped_items"]
    assert sum("corrupt_image" in item for item in items) == 3
    cut = [item for item in items if "truncated_shard" in item]
    shard = tmp_path / "data" / "wds" / "train" / "shard-000002.tar"
    assert len(cut) == 1
    assert re.fullmatch(rf"{re.escape(str(shard))}: truncated_shard \({lost_to_cut} samples "
                        rf"after byte \d+\)", cut[0])
    # the poisoned steps changed nothing: the run still learned
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_consecutive_nonfinite_steps_stop_the_run_with_advice(tmp_path: Path, data: Path
                                                              ) -> None:
    def poison(model: torch.nn.Module, step: int) -> None:
        next(model.parameters()).grad.fill_(float("inf"))

    cfg = TrainConfig(model="clip-tiny", train_data=str(data), batch_size=16, max_steps=8,
                      max_nonfinite=3, num_workers=0, output_dir=str(tmp_path / "run"),
                      progress=False)
    with pytest.raises(VlpError, match=r"3 consecutive steps \(1-3\) had a non-finite loss or "
                                       r"gradient.*--max-nonfinite"):
        train(cfg, after_backward=poison)


def test_out_of_memory_names_the_levers(tmp_path: Path, data: Path) -> None:
    def fail(model: torch.nn.Module, step: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = TrainConfig(model="clip-tiny", train_data=str(data), batch_size=16, max_steps=2,
                      num_workers=0, output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(VlpError) as caught:
        train(cfg, after_backward=fail)
    message = str(caught.value)
    assert "out of memory at batch_size 16" in message and "Tried to allocate" in message
    assert "--grad-checkpointing" in message and "--batch-size 8 --grad-accum 2" in message
