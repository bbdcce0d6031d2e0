"""The learnable temperature keeps its gradient past its bound, and the trainer clamps the
parameter after each optimizer step (open_clip's rule for CLIP, CoCa and SigLIP; BLIP's bounds
for BLIP), never inside the loss."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.run import train
from vlp.train import TrainConfig

LN_100 = math.log(100)
TINY = {"vision": {"image_size": 32, "patch_size": 16, "layers": 1},
        "text": {"layers": 1, "context_length": 16}}


def _run(tmp_path, csv, preset, overrides, after_backward):
    cfg = TrainConfig(model=preset, model_overrides=overrides, train_data=str(csv),
                      output_dir=str(tmp_path / preset), batch_size=4, lr=0.5, max_steps=4,
                      weight_decay=0.0, num_workers=0, progress=False, grad_clip=None)
    train(cfg, after_backward=after_backward)


@pytest.mark.parametrize("preset,overrides", [
    ("clip-tiny", {}),
    ("siglip-tiny", {}),
    ("coca-tiny", {"decoder_layers": 1}),
])
def test_logit_scale_has_a_gradient_past_ln100_and_is_clamped_after_each_step(
        tmp_path, synthetic_train_csv, one_thread, preset, overrides):
    seen = []

    def check(model, step):
        if step == 1:  # push the parameter past its bound before the first update
            with torch.no_grad():
                model.logit_scale.fill_(LN_100 + 1.0)
        else:
            seen.append(model.logit_scale.item())
        assert model.logit_scale.grad is not None and float(model.logit_scale.grad) != 0.0

    _run(tmp_path, synthetic_train_csv(16), preset, {**TINY, **overrides}, check)
    assert len(seen) == 3
    assert all(0.0 <= value <= LN_100 + 1e-6 for value in seen), seen


def test_blip_temperature_is_clamped_to_its_bounds_after_each_step(
        tmp_path, synthetic_train_csv, one_thread):
    seen = []

    def check(model, step):
        if step == 1:  # below min_temp: the loss still has a gradient with respect to it
            with torch.no_grad():
                model.temp.fill_(model.config.min_temp / 2)
        else:
            seen.append(model.temp.item())
        assert model.temp.grad is not None and float(model.temp.grad) != 0.0

    overrides = {"vision": {"image_size": 32, "patch_size": 16, "layers": 1},
                 "text": {"layers": 1, "context_length": 16}}
    _run(tmp_path, synthetic_train_csv(16), "blip-tiny", overrides, check)
    from vlp.config import get_preset

    bounds = get_preset("blip-tiny")
    assert len(seen) == 3
    assert all(bounds.min_temp <= value <= bounds.max_temp for value in seen), seen


def test_scale_is_not_clamped_inside_the_forward_pass():
    import vlp

    model = vlp.create_model("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(LN_100 + 1.0)
    scale = model.scale()
    scale.backward()
    assert math.isclose(scale.item(), math.exp(LN_100 + 1.0), rel_tol=1e-5)
    assert model.logit_scale.grad.item() == pytest.approx(scale.item())
    model.after_optimizer_step()
    assert math.isclose(model.logit_scale.item(), LN_100, rel_tol=1e-6)
