"""Model directories and training checkpoints: round trips, strict loading, atomic writes."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlp.config import get_preset, load_config
from vlp.errors import CheckpointError
from vlp.factory import load as load_pretrained
from vlp.factory import save as save_pretrained
from vlp.models import build_model
from vlp.store import find_checkpoint, list_checkpoints, load_weights
from vlp.tokenizers import load_tokenizer, train_tokenizer
from vlp.train.checkpoint import load_checkpoint, save_checkpoint
from vlp.train.optim import WarmupCosine, build_optimizer, param_groups

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two red squares"]


def tiny_config():
    config = get_preset("clip-tiny")
    config.embed_dim = 16
    for tower in (config.vision, config.text):
        tower.width, tower.layers, tower.heads = 16, 1, 2
    config.vision.image_size = 16
    config.text.context_length = 12
    return config


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 4, vocab_size=300, context_length=12)


def inputs(tokenizer):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=generator), tokenizer(CAPTIONS[:2])


def train_steps(model, optimizer, scheduler, tokenizer, steps: int) -> None:
    pixels, input_ids = inputs(tokenizer)
    for _ in range(steps):
        model({"pixels": pixels, "input_ids": input_ids})["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def hidden_entries(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# -- model directories ---------------------------------------------------------------------------


def test_pretrained_round_trip(tmp_path, tokenizer):
    model = tiny_model().eval()
    directory = save_pretrained(model, tmp_path / "model", tokenizer=tokenizer)
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    loaded = load_pretrained(directory).eval()
    assert load_config(directory / "config.json") == model.config
    pixels, input_ids = inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(input_ids), model.encode_text(input_ids))
    assert load_tokenizer(directory)(CAPTIONS).tolist() == tokenizer(CAPTIONS).tolist()
    assert hidden_entries(tmp_path) == []


def test_compiled_model_is_saved_without_prefixes(tmp_path):
    model = tiny_model()
    save_pretrained(torch.compile(model), tmp_path / "model")  # never called: no compile cost
    keys = load_file(tmp_path / "model" / "model.safetensors").keys()
    assert set(keys) == set(model.state_dict())


def test_save_replaces_an_existing_model_directory(tmp_path):
    save_pretrained(tiny_model(seed=0), tmp_path / "model")
    (tmp_path / "model" / "stale.txt").write_text("from the first save")
    second = tiny_model(seed=1)
    save_pretrained(second, tmp_path / "model")
    assert not (tmp_path / "model" / "stale.txt").exists()
    loaded = load_pretrained(tmp_path / "model")
    assert torch.equal(loaded.logit_scale, second.logit_scale)
    assert torch.equal(loaded.visual.pos_embed, second.visual.pos_embed)
    assert hidden_entries(tmp_path) == []


def test_save_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        save_pretrained(tiny_model(), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["text"]["context_length"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'text\.pos_embed' has shape \(12, 16\), "
                                              r"expected \(8, 16\)"):
        load_pretrained(tmp_path / "model")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "model")
    weights_path = tmp_path / "model" / "model.safetensors"
    tensors = load_file(weights_path)
    del tensors["visual.class_token"]
    tensors["visual.extra_head.weight"] = torch.zeros(3, 4)
    save_file(tensors, weights_path)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "model")
    message = str(error.value)
    assert "missing key 'visual.class_token' (expected shape (16,))" in message
    assert "unexpected key 'visual.extra_head.weight' (found shape (3, 4))" in message


def test_mismatch_leaves_the_model_untouched(tmp_path):
    save_pretrained(tiny_model(seed=0), tmp_path / "model")
    weights_path = tmp_path / "model" / "model.safetensors"
    tensors = load_file(weights_path)
    tensors["logit_scale"] = torch.zeros(2)  # one bad tensor among many good ones
    save_file(tensors, weights_path)
    model = tiny_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="logit_scale"):
        load_weights(model, weights_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_family_and_missing_files(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["family"] = "flamingo"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*unknown model family 'flamingo'"):
        load_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not safetensors")
    config["family"] = "clip"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable"):
        load_pretrained(tmp_path / "model")


# -- training checkpoints ------------------------------------------------------------------------


def training_objects(seed: int = 0):
    model = tiny_model(seed)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler = WarmupCosine(optimizer, warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler


def test_checkpoint_round_trip_continues_identically(tmp_path, tokenizer):
    model, optimizer, scheduler = training_objects()
    train_steps(model, optimizer, scheduler, tokenizer, 3)
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=tokenizer, optimizer=optimizer,
                           scheduler=scheduler, data_state={"epoch": 1, "batches_done": 2},
                           epoch=1, extra={"note": "x"})
    assert path == tmp_path / "checkpoint-0000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "train_state.json"]
    assert os.readlink(tmp_path / "checkpoint-latest") == "checkpoint-0000003"
    draws = (torch.rand(3), random.random(), np.random.rand(2))

    resumed, resumed_optimizer, resumed_scheduler = training_objects(seed=5)
    state = load_checkpoint(tmp_path, resumed, resumed_optimizer, resumed_scheduler)
    assert (state["step"], state["epoch"], state["data"], state["extra"]) == (
        3, 1, {"epoch": 1, "batches_done": 2}, {"note": "x"})
    # global RNG streams continue from the moment of saving
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    assert np.array_equal(np.random.rand(2), draws[2])
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert resumed_optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    # two more steps on each: bit-identical weights
    train_steps(model, optimizer, scheduler, tokenizer, 2)
    train_steps(resumed, resumed_optimizer, resumed_scheduler, tokenizer, 2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_optimizer_state_must_match_parameters(tmp_path, tokenizer):
    model, optimizer, scheduler = training_objects()
    train_steps(model, optimizer, scheduler, tokenizer, 1)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    other, _, _ = training_objects()
    other_optimizer = torch.optim.AdamW(
        [{"params": list(other.parameters())}], lr=1e-3)  # one group, not two
    with pytest.raises(CheckpointError, match="param groups"):
        load_checkpoint(tmp_path, other, other_optimizer)


def test_optimizer_implementation_is_not_restored(tmp_path, tokenizer):
    model, optimizer, scheduler = training_objects()  # fused AdamW on CPU
    train_steps(model, optimizer, scheduler, tokenizer, 1)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    other = tiny_model(seed=2)
    plain = torch.optim.AdamW(param_groups(other, 0.1), lr=1e-3, foreach=False)
    load_checkpoint(tmp_path, other, plain)
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["foreach"] is False
    assert plain.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    saved = optimizer.state_dict()["state"]
    assert all(torch.equal(plain.state_dict()["state"][i]["exp_avg"], saved[i]["exp_avg"])
               for i in saved)
    train_steps(other, plain, WarmupCosine(plain, 0, 10), tokenizer, 1)  # and it can step


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, optimizer, scheduler = training_objects()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler,
                        keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert find_checkpoint(tmp_path) == (tmp_path / "checkpoint-0000004").resolve()
    assert find_checkpoint(tmp_path, 3) == (tmp_path / "checkpoint-0000003").resolve()
    with pytest.raises(CheckpointError, match="no checkpoint 1"):
        find_checkpoint(tmp_path, 1)
    assert hidden_entries(tmp_path) == []


def test_stray_temp_dir_from_a_crash_is_ignored_then_cleaned(tmp_path):
    model, optimizer, scheduler = training_objects()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    # what a crash half way through writing step 3 leaves behind
    stray = tmp_path / f".checkpoint-0000003.tmp-{'ab' * 16}"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\x00" * 10)
    assert find_checkpoint(tmp_path).name == "checkpoint-0000002"
    fresh, fresh_optimizer, fresh_scheduler = training_objects(seed=3)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler)["step"] == 2
    # the latest link lost (crash between rename and link update): the newest complete one
    (tmp_path / "checkpoint-latest").unlink()
    assert find_checkpoint(tmp_path).name == "checkpoint-0000002"
    save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not stray.exists()
    assert find_checkpoint(tmp_path).name == "checkpoint-0000003"


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    model, optimizer, scheduler = training_objects()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    stranger_optimizer = build_optimizer(tiny_model(seed=9), lr=1e-3, weight_decay=0.1)
    with pytest.raises(CheckpointError, match="not in the model"):  # fails after model files
        save_checkpoint(tmp_path, 2, model=model, optimizer=stranger_optimizer)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "checkpoint-0000002").exists()
    assert os.readlink(tmp_path / "checkpoint-latest") == "checkpoint-0000001"
    assert hidden_entries(tmp_path) == []
    fresh, fresh_optimizer, fresh_scheduler = training_objects(seed=3)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler)["step"] == 1


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        find_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="complete checkpoints: none"):
        find_checkpoint(tmp_path)
    save_pretrained(tiny_model(), tmp_path / "model")
    with pytest.raises(CheckpointError, match="without train_state.json"):
        find_checkpoint(tmp_path / "model")
