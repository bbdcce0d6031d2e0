"""Memory levers of the trainer: gradient accumulation with cached features (the contrastive
loss over the whole accumulated batch) and fp16 with loss scaling."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlp.run import train
from vlp.train import TrainConfig


@pytest.fixture(scope="module")
def data(synthetic_train_csv) -> Path:
    return synthetic_train_csv(64)


def _one_step(data: Path, out: Path, model: str, **options) -> dict:
    # a large AdamW eps makes the first step proportional to the gradient (see
    # test_distributed), so weight differences measure gradient differences
    cfg = TrainConfig(model=model, train_data=str(data), max_steps=1, lr=1e-3, eps=1e-3,
                      num_workers=0, output_dir=str(out), progress=False, seed=1, **options)
    result = train(cfg)
    return load_file(Path(result["checkpoint"]) / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.mark.parametrize("model", ["clip-tiny", "coca-tiny"])
def test_accumulated_features_equal_one_big_batch(model: str, data: Path, tmp_path: Path
                                                  ) -> None:
    big = _one_step(data, tmp_path / "big", model, batch_size=16)
    accumulated = _one_step(data, tmp_path / "acc", model, batch_size=4, grad_accum=4)
    assert _max_diff(big, accumulated) <= 1e-6
    if model == "clip-tiny":  # without the cache, four small contrastive losses: another step
        independent = _one_step(data, tmp_path / "ind", model, batch_size=4, grad_accum=4,
                                accum_features=False)
        assert _max_diff(big, independent) > 1e-4


def test_fp16_with_loss_scaling_trains_and_resumes_exactly(data: Path, tmp_path: Path) -> None:
    options = dict(model="clip-tiny", train_data=str(data), batch_size=4, max_steps=4,
                   lr=1e-3, num_workers=0, progress=False, precision="fp16")
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **options))
    state = json.loads((Path(whole["checkpoint"]) / "train_state.json").read_text())
    scale = state["extra"]["grad_scaler"]["scale"]  # the scaler ran and is checkpointed
    # an overflow (inf gradients at too high a scale) skips its step and halves the scale
    assert scale == 65536.0 / 2 ** whole["nonfinite_steps"]
    assert math.isfinite(whole["loss"])
    # the same run, checkpointed at step 2, with steps 3-4 thrown away and redone on resume
    split = tmp_path / "split"
    train(TrainConfig(output_dir=str(split), checkpoint_every=2, keep_last=0, **options))
    shutil.rmtree(split / "checkpoint-0000004")
    resumed = train(TrainConfig(output_dir=str(split), resume="latest", **options))
    assert resumed["step"] == 4
    log = lambda run: [json.loads(line)["loss"] for line in
                       (tmp_path / run / "log.jsonl").read_text().splitlines()
                       if '"loss"' in line]
    assert log("split") == log("whole")
