"""The training loop end to end: logs, checkpoints, exact mid-epoch resume, learning."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from PIL import Image, ImageDraw

from vlp.data import image_transform
from vlp.errors import ConfigError, DataError
from vlp.factory import load as load_pretrained
from vlp.run import train
from vlp.tokenizers import train_tokenizer
from vlp.train import TrainConfig, find_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")
TINY_MODEL = {
    "embed_dim": 32,
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {"vocab_size": 320, "context_length": 12, "width": 32, "layers": 2, "heads": 2},
}


def draw(colour: str, shape: str, size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, 6), (size - 6, size - 6), (6, size - 6)], fill=COLOURS[colour])
    return image


def write_dataset(directory, pairs) -> str:
    """images/*.png and a CSV of (filepath, caption) with paths relative to the CSV."""
    (directory / "images").mkdir(parents=True)
    rows = ["filepath,caption"]
    for index, (colour, shape) in enumerate(pairs):
        draw(colour, shape).save(directory / "images" / f"{index:03d}.png")
        rows.append(f"images/{index:03d}.png,a {colour} {shape}")
    (directory / "train.csv").write_text("\n".join(rows) + "\n")
    return str(directory / "train.csv")


@pytest.fixture(scope="module")
def twelve_pairs(tmp_path_factory) -> str:
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    return write_dataset(tmp_path_factory.mktemp("data"), pairs)


def tiny_config(data: str, output_dir, **changes) -> TrainConfig:
    overrides = json.loads(json.dumps(TINY_MODEL))
    overrides["vision"]["patch_dropout"] = 0.25  # draws from the global torch RNG each step
    fields = dict(model="clip-tiny", model_overrides=overrides, train_data=data,
                  output_dir=str(output_dir), batch_size=4, lr=2e-3, warmup_steps=2,
                  weight_decay=0.1, max_steps=7, log_every=3, num_workers=0, seed=3,
                  progress=False, keep_last=2)
    fields.update(changes)
    return TrainConfig(**fields)


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def step_losses(records) -> dict[int, float]:
    steps = [r for r in records if "loss" in r]
    assert len({r["step"] for r in steps}) == len(steps), "a step was logged twice"
    return {r["step"]: r["loss"] for r in steps}


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, twelve_pairs):
    # 12 samples / batch 4 = 3 batches per epoch; checkpoints at 2 (epoch 0), 4 (epoch 1, one
    # batch in), 6 (an epoch's end); the interrupted run dies in step 5's evaluation
    common = dict(checkpoint_every=2, eval_every=1)
    whole = train(tiny_config(twelve_pairs, tmp_path / "whole", **common),
                  eval_fn=lambda model, tokenizer, step: {"seen": step})
    assert whole["step"] == 7 and whole["eval"] == {"seen": 7}

    def crash_at_5(model, tokenizer, step):
        if step == 5:
            raise Crash
        return {"seen": step}

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(tiny_config(twelve_pairs, cut, **common), eval_fn=crash_at_5)
    assert find_checkpoint(cut).name == "checkpoint-0000004"
    assert max(r["step"] for r in read_log(cut)) == 5  # step 5 was logged before the crash

    resumed = train(tiny_config(twelve_pairs, cut, resume="latest", **common),
                    eval_fn=lambda model, tokenizer, step: {"seen": step})
    assert resumed["step"] == 7 and resumed["loss"] == whole["loss"]

    whole_log, cut_log = read_log(tmp_path / "whole"), read_log(cut)
    assert step_losses(cut_log) == step_losses(whole_log)  # exact, every step 1..7
    assert list(step_losses(whole_log)) == list(range(1, 8))
    for key in ("lr", "grad_norm", "loss_contrastive", "epoch"):
        assert [r[key] for r in cut_log if "loss" in r] == [r[key] for r in whole_log
                                                            if "loss" in r]
    epoch_ends = [(r["step"], r["epoch"]) for r in cut_log if r.get("end_of_epoch")]
    assert epoch_ends == [(3, 0), (6, 1)]
    assert [r["step"] for r in cut_log if "eval" in r] == list(range(1, 8))
    # and the final weights agree bit for bit
    final_whole = load_pretrained(whole["checkpoint"]).state_dict()
    final_cut = load_pretrained(resumed["checkpoint"]).state_dict()
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)
    # keep_last=2 after pruning; checkpoint-latest names the final step
    assert sorted(p.name for p in cut.glob("checkpoint-0*")) == [
        "checkpoint-0000006", "checkpoint-0000007"]
    assert os.readlink(cut / "checkpoint-latest") == "checkpoint-0000007"


def test_run_layout_and_records(tmp_path, twelve_pairs):
    output_dir = tmp_path / "run"
    result = train(tiny_config(twelve_pairs, output_dir, max_steps=3, grad_accum=2,
                               val_data=twelve_pairs, keep_last=0))
    assert result["step"] == 3 and result["epoch"] == 2  # 6 batches = 2 whole epochs
    assert set(result["eval"]) == {"val_loss"} and result["eval"]["val_loss"] > 0
    checkpoint = output_dir / "checkpoint-0000003"
    assert result["checkpoint"] == str(checkpoint.resolve())
    saved = json.loads((output_dir / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved) == tiny_config(twelve_pairs, output_dir, max_steps=3,
                                                       grad_accum=2, val_data=twelve_pairs,
                                                       keep_last=0)
    records = read_log(output_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"step", "epoch", "loss", "loss_contrastive", "lr", "samples_per_s",
            "grad_norm"} <= set(steps[0])
    assert steps[0]["lr"] == pytest.approx(1e-3)  # warmup: (0 + 1) / 2 of the peak
    assert all(r["samples_per_s"] > 0 for r in steps)
    # each step's wall time split into the wait for data and the work on it
    assert all(r["data_s"] >= 0 and r["compute_s"] > 0 for r in steps)
    ends = [r for r in records if r.get("end_of_epoch")]
    assert [(r["epoch"], r["skipped"]) for r in ends] == [(0, {}), (1, {})]
    # the model's config carries the trained tokenizer's special ids
    model = load_pretrained(checkpoint)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<eos>"
    assert (model.config.text.pad_id, model.config.text.eos_id, model.config.text.bos_id) == (
        0, 1, 2)
    assert model.config.vision.image_size == 32


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, twelve_pairs):
    config = tiny_config(twelve_pairs, tmp_path / "run", max_steps=1)
    first = train(config)
    with pytest.raises(ConfigError, match="resume='latest'"):
        train(config)
    # resuming a finished run changes nothing and reports where it ended
    again = train(dataclasses.replace(config, resume="latest"))
    assert (again["step"], again["loss"]) == (1, first["loss"])
    assert len(read_log(tmp_path / "run")) == 1


def test_skipped_samples_are_reported_per_epoch(tmp_path):
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES][:12]
    data = write_dataset(tmp_path / "data", pairs)
    (tmp_path / "data" / "images" / "003.png").write_bytes(b"not a png")
    (tmp_path / "data" / "images" / "007.png").unlink()
    train(tiny_config(data, tmp_path / "run", max_steps=3))
    ends = [r for r in read_log(tmp_path / "run") if r.get("end_of_epoch")]
    assert [(r["step"], r["skipped"]) for r in ends] == [
        (3, {"corrupt_image": 1, "missing_image": 1})]


def test_an_epoch_of_only_unreadable_images_is_an_error(tmp_path):
    data = write_dataset(tmp_path / "data", [("red", "circle")] * 4)
    for image in (tmp_path / "data" / "images").iterdir():
        image.write_bytes(b"")
    with pytest.raises(DataError, match="every sample was skipped"):
        train(tiny_config(data, tmp_path / "run", max_steps=2))


def test_config_errors_name_the_field(tmp_path, twelve_pairs):
    with pytest.raises(ConfigError, match="max_steps or epochs"):
        train(tiny_config(twelve_pairs, tmp_path, max_steps=None))
    with pytest.raises(ConfigError, match="precision"):
        train(tiny_config(twelve_pairs, tmp_path, precision="fp8"))
    with pytest.raises(ConfigError, match="grad_accum"):
        train(tiny_config(twelve_pairs, tmp_path, grad_accum=4))  # 3 batches per epoch
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def retrieval_accuracy(model, pixels, input_ids) -> float:
    image = model.encode_image(pixels)
    text = model.encode_text(input_ids)
    predicted = (image @ text.T).argmax(dim=1)
    return (predicted == torch.arange(len(predicted))).float().mean().item()


def test_loss_falls_and_pairs_are_learned(tmp_path):
    pairs = [("red", "circle"), ("green", "square"), ("blue", "triangle"),
             ("yellow", "circle"), ("red", "square"), ("blue", "circle")]
    data = write_dataset(tmp_path / "data", pairs)
    captions = [f"a {colour} {shape}" for colour, shape in pairs]
    tokenizer = train_tokenizer(captions, vocab_size=320, context_length=12)
    tokenizer.save(tmp_path / "tokenizer")  # given to the run, so eval can use it too
    accuracy = {}

    def eval_fn(model, tokenizer, step):
        transform = image_transform(model, train=False)
        pixels = torch.stack([transform(draw(colour, shape)) for colour, shape in pairs])
        accuracy[step] = retrieval_accuracy(model, pixels, tokenizer(captions))
        return {"accuracy": accuracy[step]}

    result = train(tiny_config(data, tmp_path / "run", batch_size=6, max_steps=30,
                               eval_every=10, warmup_steps=3, lr=3e-3,
                               tokenizer=str(tmp_path / "tokenizer"),
                               model_overrides=TINY_MODEL), eval_fn=eval_fn)
    losses = list(step_losses(read_log(tmp_path / "run")).values())
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert sorted(accuracy) == [10, 20, 30]
    assert result["eval"]["accuracy"] >= 5 / 6  # chance is 1/6
