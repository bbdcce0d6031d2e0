import math

import pytest
import torch

import vlp
from vlp.config import (
    ClipConfig,
    TextConfig,
    VisionConfig,
    config_from_dict,
    config_to_dict,
    get_preset,
)
from vlp.errors import ConfigError
from vlp.models import build_model

# expected parameter counts of the open_clip architectures with the same shapes
OPEN_CLIP_PARAMS = {"clip-vit-b-32": 151_277_313, "clip-vit-b-16": 149_620_737,
                    "clip-vit-l-14": 427_616_513}
TINY = [name for name in vlp.list_models() if name.endswith("-tiny")]


def _batch(config, batch=3):
    t = config.text
    ids = torch.randint(3, t.vocab_size, (batch, min(t.context_length, 12)))
    ids[:, 0], ids[:, ids.shape[1] // 2] = t.bos_id, t.eos_id
    if config.family == "lm":  # text alone
        return {"input_ids": ids}
    v = config.vision
    return {"pixels": torch.randn(batch, 3, v.image_size, v.image_size), "input_ids": ids}


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = vlp.create_model(name)
    out = model(_batch(model.config))
    assert set(out) >= {"loss", "losses"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # frozen parts (BLIP-2's image encoder)
            continue
        assert p.grad is not None, pname
        assert p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_PARAMS))
def test_full_size_presets_have_open_clip_shapes(name):
    with torch.device("meta"):
        model = vlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OPEN_CLIP_PARAMS[name]


def test_every_preset_round_trips_through_json():
    for name in vlp.list_models():
        config = get_preset(name)
        assert config_from_dict(config_to_dict(config)) == config


def test_unknown_preset_and_bad_config_fields():
    with pytest.raises(ConfigError, match="clip-huge"):
        vlp.create_model("clip-huge")
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict({"family": "clip", "bogus": 1})
    with pytest.raises(ConfigError, match="family"):
        config_from_dict({"family": "nope"})


def test_encoders_are_normalised_and_logit_scale_clamped_after_a_step():
    model = vlp.create_model("clip-tiny").eval()
    batch = _batch(model.config)
    img = model.encode_image(batch["pixels"])
    txt = model.encode_text(batch["input_ids"])
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_optimizer_step()  # the trainer clamps the parameter after each update
    assert math.isclose(model.scale().item(), 100.0, rel_tol=1e-4)
    per_image, per_text = model.logits(batch["pixels"], batch["input_ids"])
    torch.testing.assert_close(per_image, 100.0 * img @ txt.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_text, per_image.T)


def test_constant_init_gives_hand_computed_loss():
    config = ClipConfig(
        embed_dim=8,
        vision=VisionConfig(image_size=16, patch_size=8, width=8, layers=1, heads=2),
        text=TextConfig(vocab_size=20, context_length=6, width=8, layers=1, heads=2),
    )
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    out = model(_batch(config, batch=4))
    # every embedding is the same unit vector -> uniform logits over 4 -> loss ln 4
    assert math.isclose(out["loss"].item(), math.log(4), rel_tol=1e-5)


def test_no_weight_decay_names_exist():
    model = vlp.create_model("clip-tiny")
    names = dict(model.named_parameters())
    for name in model.no_weight_decay():
        if name == "logit_bias" and model.logit_bias is None:
            continue
        assert name in names, name


def test_siglip_preset_has_bias_and_sigmoid_loss():
    model = vlp.create_model("siglip-tiny")
    assert model.logit_bias is not None and math.isclose(model.logit_bias.item(), -10.0)
    out = model(_batch(model.config, batch=4))
    assert torch.isfinite(out["loss"])


def test_blip_presets_use_the_references_text_dropout():
    """BLIP's BERT (med_config) and BLIP-2's Q-Former drop hidden states and attention
    probabilities with p=0.1; the CPU-sized blip-tiny recipe trains without."""
    from vlp.config import get_preset

    for name in ("blip-vit-b-16", "blip-vit-l-16", "blip2-qformer", "blip2-opt-2.7b"):
        assert get_preset(name).text.dropout == 0.1, name
    assert get_preset("blip-tiny").text.dropout == 0.0
