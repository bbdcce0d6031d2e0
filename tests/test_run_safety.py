"""No run is lost: the run directory's lock, pruning that removes only the run's own leftovers,
the final checkpoint written before the final evaluation, and every evaluation file read
before the first step."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import tiny_config, write_dataset
from vlp.cli import main
from vlp.errors import ConfigError, DataError
from vlp.run import train
from vlp.store import directory_lock, list_checkpoints
from vlp.store.files import LOCK_FILE
from vlp.store.layout import prune


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data"),
                         [("red", "circle"), ("blue", "square"), ("green", "triangle"),
                          ("yellow", "circle")] * 2)


HOLD = ("import sys, time\nfrom vlp.store import directory_lock\n"
        "with directory_lock(sys.argv[1], 'vlp train'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, pairs):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another vlp train \(pid {holder.pid}"):
            train(tiny_config(pairs, run, max_steps=1))
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            train(tiny_config(pairs, run, max_steps=1, resume="latest"))
        assert not (run / "log.jsonl").exists() and list_checkpoints(run) == []
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (-9): the operating system released its lock, the stale file
    # (still naming the dead pid) does not block
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
    assert train(tiny_config(pairs, run, max_steps=1))["step"] == 1


def test_the_lock_is_reentrant_and_released(tmp_path):
    with directory_lock(tmp_path / "run"), directory_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
    holder = _holder(tmp_path / "run")  # released: another process takes it
    holder.kill()
    holder.wait()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        with directory_lock(tmp_path / "file"):
            pass


def test_pruning_removes_only_the_runs_own_leftovers(tmp_path):
    hexa = "ab" * 16
    ours = [f".checkpoint-0000003.tmp-{hexa}", f".checkpoint-0000001.old-{hexa}",
            f".checkpoint-latest.tmp-{hexa}", f".train_config.json.tmp-{hexa}.json",
            f".log.jsonl.tmp-{hexa}.jsonl"]
    theirs = [f".notes.txt.tmp-{hexa}.txt", f".data.old-{hexa}", f".model.tmp-{hexa}",
              "checkpoint-notes", ".checkpoint-0000002.tmp-unfinished"]
    for name in ours + theirs:
        if name.endswith(hexa):  # directories being written or deleted
            (tmp_path / name).mkdir()
            (tmp_path / name / "payload").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    protected = tmp_path / "checkpoint-0000004"
    protected.mkdir()
    prune(tmp_path, keep_last=1, protected=protected)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs + [protected.name])


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, pairs):
    def failing_eval(model, tokenizer, step):
        raise DataError("held-out.csv: gone")

    with pytest.raises(DataError, match="gone"):
        train(tiny_config(pairs, tmp_path / "run", max_steps=2), eval_fn=failing_eval)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    # resuming the finished run evaluates again, trains nothing
    result = train(tiny_config(pairs, tmp_path / "run", max_steps=2, resume="latest"),
                   eval_fn=lambda model, tokenizer, step: {"evaluated_at": step})
    assert result["step"] == 2 and result["eval"] == {"evaluated_at": 2}


@pytest.mark.parametrize("flags, message", [
    (["--zeroshot-data", "nowhere"], "nowhere: image folder not found"),
    (["--retrieval-data", "nowhere.csv"], "nowhere.csv"),
    (["--caption-data", "nowhere.jsonl"], "nowhere.jsonl"),
    (["--vqa-data", "nowhere.jsonl"], "nowhere.jsonl: no such QA file"),
    (["--zeroshot-data", "{data}", "--eval-batch-size", "0"], "batch_size=0"),
    (["--vqa-data", "{qa}", "--vqa-mode", "rank"], "candidate answers"),
])
def test_evaluation_files_are_checked_before_the_first_step(tmp_path, pairs, capsys, flags,
                                                            message):
    data = Path(pairs).parent
    (tmp_path / "qa.jsonl").write_text('{"image": "i.png", "question": "q?", "answer": "a"}\n')
    flags = [f.format(data=data / "images", qa=tmp_path / "qa.jsonl") for f in flags]
    (data / "images" / "class").mkdir(exist_ok=True)  # an image folder with one class...
    (data / "images" / "class" / "a.png").write_bytes((data / "images" / "000.png").read_bytes())
    code = main(["train", "--train-data", pairs, "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "50", "--no-progress", "--num-workers", "0", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "run" / "log.jsonl").exists()  # no step was taken


# ---------------------------------------------------------------------------------------------
# resume checks what it resumes


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pairs):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(pairs, run, max_steps=2))
    return run


@pytest.mark.parametrize("changes, listed", [
    ({"model": "coca-tiny"}, "model: 'clip-tiny' -> 'coca-tiny'"),
    ({"weight_decay": 0.3}, "weight_decay: 0.1 -> 0.3"),
    ({"betas": (0.9, 0.95)}, "betas: [0.9, 0.98] -> [0.9, 0.95]"),
    ({"lr": 1e-4}, "lr: 0.002 -> 0.0001"),
    ({"tokenizer": "elsewhere"}, "tokenizer: None -> 'elsewhere'"),
    ({"grad_clip": 0.5, "batch_size": 2}, "grad_clip: 1.0 -> 0.5; global_batch_size: 4 -> 2"),
    ({"train_data": "same-length"}, "data_fingerprint: "),
])
def test_resume_refuses_a_changed_run_listing_the_differences(tmp_path, finished, pairs,
                                                              changes, listed):
    if changes.get("train_data") == "same-length":  # the same rows, captions swapped
        lines = Path(pairs).read_text().splitlines()
        swapped = [lines[0]] + [f"{a.split(',')[0]},{b.split(',')[1]}"
                                for a, b in zip(lines[1:], lines[2:] + lines[1:2], strict=True)]
        changes = {"train_data": str(Path(pairs).with_name("swapped.csv"))}
        Path(changes["train_data"]).write_text("\n".join(swapped) + "\n")
    before = sorted(os.listdir(finished)), (finished / "train_config.json").read_text()
    config = tiny_config(pairs, finished, max_steps=3, resume="latest")
    with pytest.raises(ConfigError, match="differ from the checkpoint's") as refused:
        train(dataclasses.replace(config, **changes))
    assert listed in str(refused.value) and "--resume-changes" in str(refused.value)
    assert (sorted(os.listdir(finished)), (finished / "train_config.json").read_text()) == before


def test_accepted_changes_are_recorded_as_what_ran(tmp_path, finished, pairs):
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    config = tiny_config(pairs, run, max_steps=3, resume="latest", weight_decay=0.3,
                         grad_clip=0.5, model="coca-tiny", resume_changes=True)
    assert train(config)["step"] == 3
    ran = json.loads((run / "train_config.json").read_text())
    # the checkpoint's model and optimizer settings continued; the new clipping applied
    assert (ran["model"], ran["weight_decay"], ran["grad_clip"]) == ("clip-tiny", 0.1, 0.5)
    # and the new checkpoint records them: resuming it again as it ran needs no flag
    again = dataclasses.replace(config, max_steps=4, resume_changes=False, model="clip-tiny",
                                weight_decay=0.1)
    assert train(again)["step"] == 4
