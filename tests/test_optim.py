"""Optimizer groups and the warmup + cosine schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlp.config import get_preset
from vlp.errors import ConfigError
from vlp.models import build_model
from vlp.train.optim import LrSchedule, WarmupCosine, build_optimizer, param_groups


def tiny_clip():
    config = get_preset("clip-tiny")
    config.embed_dim = 16
    for tower in (config.vision, config.text):
        tower.width, tower.layers, tower.heads = 16, 1, 2
    config.vision.image_size = 16
    return build_model(config)


def test_groups_split_decay_by_ndim_and_no_weight_decay_names():
    model = tiny_clip()
    groups = param_groups(model, weight_decay=0.2)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    # every trainable parameter exactly once, names matching tensors
    all_names = decay["param_names"] + no_decay["param_names"]
    assert sorted(all_names) == sorted(named)
    for group in groups:
        assert all(p is named[n] for n, p in zip(group["param_names"], group["params"]))
    # named exclusions (some are matrices, so only the names keep them out of decay)
    for name in ("logit_scale", "visual.class_token", "visual.pos_embed", "text.pos_embed"):
        assert name in no_decay["param_names"]
    assert named["visual.pos_embed"].ndim == 2
    assert all(named[n].ndim >= 2 for n in decay["param_names"])
    assert "visual.patch_embed.weight" in decay["param_names"]
    assert not any(n.endswith(".bias") for n in decay["param_names"])


def test_frozen_parameters_are_left_out():
    model = tiny_clip()
    model.logit_scale.requires_grad_(False)
    names = [n for g in param_groups(model, 0.1) for n in g["param_names"]]
    assert "logit_scale" not in names


def test_adamw_decays_only_the_decay_group():
    model = tiny_clip()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["fused"]  # all parameters are float CPU tensors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a weight
    optimizer.step()
    after = dict(model.named_parameters())
    weight = "visual.patch_embed.weight"
    assert torch.allclose(after[weight], before[weight] * (1 - 0.1 * 0.5))
    for name in ("logit_scale", "visual.pos_embed", "text.norm.weight"):
        assert torch.equal(after[name], before[name])


def test_build_optimizer_rejects_bad_values():
    with pytest.raises(ConfigError, match="lr"):
        build_optimizer(tiny_clip(), lr=0.0, weight_decay=0.1)
    with pytest.raises(ConfigError, match="weight_decay"):
        build_optimizer(tiny_clip(), lr=1e-3, weight_decay=-1)


def lrs_over(scheduler: WarmupCosine, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_values():
    model = tiny_clip()
    optimizer = build_optimizer(model, lr=2.0, weight_decay=0.1)
    scheduler = WarmupCosine(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = lrs_over(scheduler, optimizer, 15)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear, peak at warmup - 1
    assert lrs[4] == pytest.approx(2.0)  # cosine starts at the peak
    assert lrs[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: mid of the cosine
    assert lrs[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lrs[12] == pytest.approx(0.2) and lrs[14] == pytest.approx(0.2)  # floor after total
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # never rises after warmup
    # every group follows the same schedule
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])


def test_no_warmup_starts_at_peak():
    model = tiny_clip()
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.1)
    scheduler = WarmupCosine(optimizer, warmup_steps=0, total_steps=10)
    assert lrs_over(scheduler, optimizer, 11)[::5] == pytest.approx([1.0, 0.5, 0.0])


def test_state_is_plain_json_and_restores_position():
    model = tiny_clip()
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.1)
    scheduler = WarmupCosine(optimizer, warmup_steps=3, total_steps=20, min_lr_ratio=0.0)
    lrs_over(scheduler, optimizer, 7)
    state = json.loads(json.dumps(scheduler.state_dict()))
    expected_next = lrs_over(scheduler, optimizer, 3)

    fresh_optimizer = build_optimizer(tiny_clip(), lr=1.0, weight_decay=0.1)
    fresh = WarmupCosine(fresh_optimizer, warmup_steps=3, total_steps=20, min_lr_ratio=0.0)
    fresh.load_state_dict(state)
    assert lrs_over(fresh, fresh_optimizer, 3) == expected_next
    with pytest.raises(ConfigError, match="step_count"):
        fresh.load_state_dict({"step_count": -1})


def test_schedule_rejects_bad_shape():
    optimizer = build_optimizer(tiny_clip(), lr=1.0, weight_decay=0.1)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        WarmupCosine(optimizer, 1, 10, min_lr_ratio=2.0)


@pytest.mark.parametrize("kind", ["cosine", "constant", "linear", "constant-cooldown"])
def test_every_schedule_gives_its_formula_per_step(kind):
    """lr per update, written out by hand for each kind: warmup 2, 10 updates, floor 0.1 of
    the peak 2.0, a cooldown over the last 4 updates with power 2."""
    model = tiny_clip()
    optimizer = build_optimizer(model, lr=2.0, weight_decay=0.1)
    scheduler = LrSchedule(optimizer, 2, 10, 0.1, kind, cooldown_steps=4, cooldown_power=2.0)
    lrs = lrs_over(scheduler, optimizer, 12)
    warmup = [1.0, 2.0]
    if kind == "cosine":
        after = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / 8))))
                 for i in range(10)]
    elif kind == "constant":
        after = [2.0] * 10
    elif kind == "linear":
        after = [2.0 * (1 - 0.9 * min(1.0, i / 8)) for i in range(10)]
    else:  # constant until update 6, then 0.1 + 0.9 (1 - (i - 6) / 4)^2 of the peak
        after = [2.0] * 4 + [2.0 * (0.1 + 0.9 * (1 - min(1.0, i / 4)) ** 2) for i in range(6)]
    assert lrs == pytest.approx(warmup + after, abs=1e-12)
    assert lrs[10] == pytest.approx(2.0 if kind == "constant" else 0.2)
    assert scheduler.state_dict()["kind"] == kind


def test_cooldown_needs_room_after_warmup():
    optimizer = build_optimizer(tiny_clip(), lr=1.0, weight_decay=0.1)
    with pytest.raises(ConfigError, match="cooldown_steps=9"):
        LrSchedule(optimizer, 2, 10, kind="constant-cooldown", cooldown_steps=9)
    with pytest.raises(ConfigError, match="cooldown_steps=0"):
        LrSchedule(optimizer, 2, 10, kind="constant-cooldown")
    with pytest.raises(ConfigError, match="schedule='step'"):
        LrSchedule(optimizer, 2, 10, kind="step")
