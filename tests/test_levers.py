"""Fine-tuning levers: locked towers, layer-wise learning-rate decay, the weight average (EMA)
and LoRA adapters, each through real training runs and checkpoints on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlp
from vlp.config import get_preset
from vlp.errors import ConfigError
from vlp.models import build_model
from vlp.run import train
from vlp.train import TrainConfig, find_checkpoint
from vlp.train.ema import WeightEma
from vlp.train.levers import layer_lr_scales
from vlp.train.optim import build_optimizer, param_groups

TINY = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "heads": 2},
    "text": {"vocab_size": 300, "context_length": 12, "width": 16, "layers": 3, "heads": 2},
}


class Crash(Exception):
    pass


def tiny_clip():
    config = get_preset("clip-tiny")
    config.embed_dim = 16
    config.vision.image_size, config.vision.patch_size = 16, 8
    config.vision.width = config.text.width = 16
    config.vision.layers, config.text.layers = 2, 3
    config.vision.heads = config.text.heads = 2
    return build_model(config)


@pytest.fixture(scope="module")
def pairs(synthetic_train_csv) -> str:
    return str(synthetic_train_csv(16))


def config(data: str, output_dir, **changes) -> TrainConfig:
    fields = dict(model="clip-tiny", model_overrides=json.loads(json.dumps(TINY)),
                  train_data=data, output_dir=str(output_dir), batch_size=4, lr=5e-3,
                  warmup_steps=1, weight_decay=0.1, max_steps=5, num_workers=0, seed=1,
                  progress=False, keep_last=0)
    fields.update(changes)
    return TrainConfig(**fields)


def weights(run_dir, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(find_checkpoint(run_dir) / name)


def first_weights(store: dict):
    """An after_backward hook keeping the weights every step starts from, by step."""
    def keep(model, step):
        store[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return keep


# -- towers and locking ----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["clip-tiny", "coca-tiny", "blip-tiny"])
def test_tower_groups_are_the_towers_in_layer_order(preset):
    model = vlp.create_model(preset)
    names = dict(model.named_parameters())
    towers = model.tower_groups()
    assert set(towers) == {"image", "text"}
    seen: set[str] = set()
    for groups in towers.values():
        flat = [name for group in groups for name in group]
        assert len(flat) == len(set(flat)) and not seen & set(flat) and set(flat) <= set(names)
        seen |= set(flat)
        assert all(groups[1:-1])  # every block holds parameters
        for index, group in enumerate(groups[1:-1]):
            assert all(f"blocks.{index}." in name for name in group)
        assert any("pos_embed" in name for name in groups[0])
        assert not any("blocks." in name for name in groups[0] + groups[-1])
    image_layers = model.config.vision.layers
    assert len(towers["image"]) == image_layers + 2


def test_a_family_without_the_tower_is_refused(pairs, tmp_path):
    cfg = config(pairs, tmp_path, model="gpt2-tiny", model_overrides={}, train_kind="text",
                 lock_image=True)
    text = tmp_path / "docs.txt"
    text.write_text("one line of text\nanother line\n" * 8)
    cfg.train_data = str(text)
    with pytest.raises(ConfigError, match="no image tower to lock"):
        train(cfg)
    with pytest.raises(ConfigError, match="lock_image_unlocked_groups=5: the image tower has 4"):
        train(config(pairs, tmp_path / "b", lock_image=True, lock_image_unlocked_groups=5))


def test_locked_towers_are_bitwise_unchanged_by_training(pairs, tmp_path):
    start: dict = {}
    trainable: list[str] = []

    def hook(model, step):
        first_weights(start)(model, step)
        if step == 1:
            trainable.extend(n for n, p in model.named_parameters() if p.requires_grad)

    train(config(pairs, tmp_path, lock_image=True, lock_image_unlocked_groups=1,
                 lock_text=True), after_backward=hook)
    end = weights(tmp_path)
    model = vlp.load(tmp_path)
    towers = model.tower_groups()
    image_heads = set(towers["image"][-1])
    locked = {n for groups in towers.values() for group in groups for n in group} - image_heads
    assert sorted(trainable) == sorted(image_heads | {"logit_scale"})
    for name in locked:
        assert torch.equal(end[name], start[1][name]), name
    for name in image_heads | {"logit_scale"}:
        assert not torch.equal(end[name], start[1][name]), name


def test_layer_decay_gives_each_group_its_learning_rate():
    model = tiny_clip()
    scales = layer_lr_scales(model, 0.5)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, lr_scales=scales)
    lr_of = {name: group["lr"] for group in optimizer.param_groups
             for name in group["param_names"]}
    assert set(lr_of) == {name for name, _ in model.named_parameters()}
    # image tower: 2 blocks, groups 0..3; text tower: 3 blocks, groups 0..4
    expected = {
        "visual.patch_embed.weight": 1e-3 * 0.5**3, "visual.pos_embed": 1e-3 * 0.5**3,
        "visual.transformer.blocks.0.attn.qkv.weight": 1e-3 * 0.5**2,
        "visual.transformer.blocks.1.mlp.fc2.bias": 1e-3 * 0.5,
        "visual.norm.weight": 1e-3, "visual.head.weight": 1e-3,
        "text.token_embed.weight": 1e-3 * 0.5**4,
        "text.transformer.blocks.0.norm1.weight": 1e-3 * 0.5**3,
        "text.transformer.blocks.2.attn.proj.weight": 1e-3 * 0.5,
        "text.head.weight": 1e-3, "logit_scale": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[name] == pytest.approx(lr, rel=1e-12), name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the full learning rate comes first
    plain = {name: group["weight_decay"] for group in param_groups(model, 0.1)
             for name in group["param_names"]}
    assert {name: group["weight_decay"] for group in optimizer.param_groups  # decay kept
            for name in group["param_names"]} == plain


def test_layer_decay_runs_resumes_and_logs_the_peak(pairs, tmp_path):
    common = dict(layer_decay=0.7, checkpoint_every=2, warmup_steps=0, schedule="constant")
    whole = train(config(pairs, tmp_path / "whole", **common))
    cut = tmp_path / "cut"
    train(config(pairs, cut, **common, max_steps=2))
    resumed = train(config(pairs, cut, **common, resume="latest"))
    assert resumed["loss"] == whole["loss"]
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in log if "lr" in r} == {5e-3}
    with pytest.raises(ConfigError, match="layer_decay: 0.7 -> 0.5"):
        train(config(pairs, cut, **{**common, "layer_decay": 0.5}, resume="latest",
                     max_steps=6))


# -- the weight average ------------------------------------------------------------------------


def test_ema_equals_the_hand_computation():
    model = tiny_clip()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEma(model, 0.75)
    seen = []
    for step in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * (step + 1))
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    for name, average in ema.state_dict().items():
        hand = start[name].double()
        for weights_then in seen:
            hand = 0.75 * hand + 0.25 * weights_then[name].double()
        torch.testing.assert_close(average.double(), hand, rtol=1e-6, atol=1e-7)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())  # restored


def test_ema_is_what_is_evaluated_and_exported(pairs, tmp_path):
    start: dict = {}
    evaluated: dict = {}

    def evaluate(model, tokenizer, step):
        evaluated[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {}

    train(config(pairs, tmp_path, ema_decay=0.6, max_steps=4, eval_every=2),
          eval_fn=evaluate, after_backward=first_weights(start))
    raw, exported = weights(tmp_path, "train_weights.safetensors"), weights(tmp_path)
    after = [start[step] for step in (2, 3, 4)] + [raw]  # the weights after steps 1..4
    for name, tensor in exported.items():
        hand = start[1][name].double()
        for step_weights in after:
            hand = 0.6 * hand + 0.4 * step_weights[name].double()
        torch.testing.assert_close(tensor.double(), hand, rtol=1e-6, atol=1e-7)
        assert torch.equal(evaluated[4][name], tensor)
    assert not torch.equal(raw["visual.head.weight"], exported["visual.head.weight"])
    loaded = vlp.load(tmp_path)  # a run directory loads as its exported (averaged) model
    assert torch.equal(loaded.state_dict()["visual.head.weight"], exported["visual.head.weight"])
    # each evaluation swapped the average in and the raw weights back: the same run without
    # evaluations trains to the same bits
    train(config(pairs, tmp_path / "quiet", ema_decay=0.6, max_steps=4))
    quiet = weights(tmp_path / "quiet", "train_weights.safetensors")
    assert all(torch.equal(quiet[name], raw[name]) for name in raw)


@pytest.mark.parametrize("levers", [{"ema_decay": 0.8},
                                    {"ema_decay": 0.8, "lora_rank": 2, "lora_alpha": 4.0}])
def test_killed_and_resumed_run_repeats_loss_and_average(pairs, tmp_path, levers):
    common = dict(checkpoint_every=2, max_steps=6, eval_every=1, **levers)
    whole = train(config(pairs, tmp_path / "whole", **common), eval_fn=lambda m, t, s: {})

    def crash_at_5(model, tokenizer, step):
        if step == 5:
            raise Crash
        return {}

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(config(pairs, cut, **common), eval_fn=crash_at_5)
    assert find_checkpoint(cut).name == "checkpoint-0000004"
    resumed = train(config(pairs, cut, resume="latest", **common), eval_fn=lambda m, t, s: {})
    assert resumed["loss"] == whole["loss"]

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl")
                                                 .read_text().splitlines()) if "loss" in r}

    assert losses(cut) == losses(tmp_path / "whole")
    for name in ("model.safetensors", "train_weights.safetensors"):
        a, b = weights(tmp_path / "whole", name), weights(cut, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- LoRA ---------------------------------------------------------------------------------------


def test_merged_lora_model_equals_the_adapted_one():
    from vlp.train.lora import add_lora, merged_state

    torch.manual_seed(0)
    plain = tiny_clip()
    adapted = tiny_clip()
    adapted.load_state_dict(plain.state_dict())
    add_lora(adapted, rank=2, alpha=6.0, targets="qkv,proj,fc1")
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)
    assert all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    plain.load_state_dict(merged_state(adapted, adapted.state_dict()))  # strict: same names
    pixels, ids = torch.randn(3, 3, 16, 16), torch.randint(3, 290, (3, 12))
    adapted.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(pixels), adapted.encode_image(pixels),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain.encode_text(ids), adapted.encode_text(ids),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(plain.encode_image(pixels), tiny_clip().encode_image(pixels))


def test_lora_trains_only_adapters_and_saves_a_plain_model(pairs, tmp_path):
    from vlp.train.lora import add_lora

    start: dict = {}
    trainable: list[str] = []

    def hook(model, step):
        first_weights(start)(model, step)
        trainable.extend(n for n, p in model.named_parameters()
                         if p.requires_grad and step == 1)

    train(config(pairs, tmp_path, lora_rank=2, lora_alpha=4.0, lora_targets="qkv,fc2",
                 max_steps=3), after_backward=hook)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"qkv", "fc2"}
    raw = weights(tmp_path, "train_weights.safetensors")
    for name, tensor in raw.items():  # every weight but the adapters is bitwise unchanged
        assert torch.equal(tensor, start[1][name]) == (".lora_" not in name), name
    loaded = vlp.load(tmp_path)  # no PEFT needed: the plain family model, adapters merged
    assert not any("lora" in n for n in loaded.state_dict())
    adapted = build_model(loaded.config)
    add_lora(adapted, 2, 4.0, "qkv,fc2")
    adapted.load_state_dict(raw)
    adapted.eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), adapted.encode_image(pixels),
                                   rtol=1e-5, atol=1e-6)


def test_augment_preset_trains_and_is_part_of_the_run(pairs, tmp_path):
    result = train(config(pairs, tmp_path, augment="blip", hflip=True, max_steps=2))
    assert result["step"] == 2
    ran = json.loads((tmp_path / "train_config.json").read_text())
    assert (ran["augment"], ran["hflip"]) == ("blip", True)
    with pytest.raises(ConfigError, match="augment: 'blip' -> 'clip'"):
        train(config(pairs, tmp_path, hflip=True, max_steps=3, resume="latest"))
    with pytest.raises(ConfigError, match="hflip: augment 'none'"):
        train(config(pairs, tmp_path / "b", augment="none", hflip=True))


def test_lora_leaves_momentum_copies_alone():
    """BLIP's momentum encoders keep weights as buffers and follow the trained weights by EMA:
    they get no adapters, follow the base weights, and the merged state loads into a plain
    BLIP."""
    from vlp.train.lora import add_lora, merged_state

    model = vlp.create_model("blip-tiny")
    add_lora(model, 2, 4.0, "qkv,q,kv,proj")
    names = [name for name, _ in model.named_parameters()]
    assert any(".lora_A." in n for n in names)
    assert not any(n.startswith("momentum_encoders.") for n in names)
    assert not any("lora" in n for n in model.momentum_encoders.state_dict())
    size = model.config.vision.image_size
    batch = {"pixels": torch.randn(2, 3, size, size),
             "input_ids": torch.randint(5, 100, (2, 8)), "index": torch.arange(2)}
    model.train()
    assert torch.isfinite(model(batch)["loss"])  # the momentum update ran
    plain = build_model(model.config)
    plain.load_state_dict(merged_state(model, model.state_dict()))


def test_lora_targets_that_match_nothing_are_one_error():
    from vlp.train.lora import add_lora

    with pytest.raises(ConfigError, match="lora_targets='to_q'"):
        add_lora(tiny_clip(), 2, 4.0, "to_q")
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        add_lora(tiny_clip(), 2, 4.0, " , ")
