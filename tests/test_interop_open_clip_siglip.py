"""Parity of vlp's CLIP with SigLIP's towers and open_clip SigLIP models, whose image tower is a
timm ViT named in the config: import, export through ``open_clip.create_model("local-dir:")``,
the CLI, a hub name, the real configs' shapes and the refused trunks.

open_clip builds a timm tower from its registered name alone, so the tests register one tiny
timm SigLIP ViT (timm's own ``VisionTransformer`` with SigLIP's settings) under a name of
timm's SigLIP pattern and let open_clip build it from the config, as it builds
``vit_base_patch16_siglip_224``."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from timm.models import register_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vlp  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop import convert, load_any  # noqa: E402
from vlp.interop.keymap import expected_ref_shapes  # noqa: E402
from vlp.interop.open_clip_siglip import (  # noqa: E402
    save_open_clip_siglip,
    siglip_config_from_open_clip,
    siglip_open_clip_key_map,
    timm_name_for,
)
from vlp.models import build_model  # noqa: E402
from vlp.tokenizers import train_tokenizer  # noqa: E402

ATOL = 1e-5
IMAGE, CONTEXT, VOCAB = 32, 12, 99
TINY = "vit_vlptest_patch8_siglip_32"
SQUASH = {"size": IMAGE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
          "resize_mode": "squash"}


def _tiny_trunk(pretrained=False, **kwargs):
    kwargs = {k: v for k, v in kwargs.items()
              if not k.startswith("pretrained_cfg") and k != "cache_dir"}
    return VisionTransformer(**{"img_size": IMAGE, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                "num_heads": 4, "mlp_ratio": 37 / 32, "class_token": False,
                                "global_pool": "map", **kwargs})


_tiny_trunk.__name__ = TINY
if not timm.is_model(TINY):
    register_model(_tiny_trunk)


def tiny_config(**text_cfg) -> dict:
    return {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": IMAGE, "timm_model_name": TINY,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4,
                     "layers": 2, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                     "norm_kwargs": {"eps": 1e-6}, **text_cfg},
    }


def reference_model(model_cfg: dict, seed: int = 0):
    """open_clip's model, every tensor drawn (timm and open_clip leave biases at 0)."""
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and
                                                         name.endswith("weight") else 0.0))
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    return model.eval()


def save_local_dir(model, model_cfg: dict, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": SQUASH}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "open_clip_model.safetensors")


def inputs(seed: int = 1):
    """Images and rows of words then padding to the context (SigLIP pools the last position)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.ones(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((4, CONTEXT, 7)):
        ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
    return torch.randn(3, 3, IMAGE, IMAGE, generator=generator), ids


def ref_outputs(reference, pixels, ids) -> dict:
    with torch.no_grad():
        image = reference.encode_image(pixels, normalize=True)
        text = reference.encode_text(ids, normalize=True)
        logits, _ = reference.get_logits(pixels, ids)
    return {"image": image, "text": text, "logits": logits}


def vlp_outputs(model, pixels, ids) -> dict:
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        return {"image": image, "text": text,
                "logits": model.scale() * image @ text.T + model.logit_bias}


def assert_close(a: dict, b: dict, label: str) -> None:
    found = {key: (a[key] - b[key]).abs().max().item() for key in a}
    print(f"max abs diff {label}: {found}")  # shown with -s
    assert max(found.values()) <= ATOL, (label, found)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"], ids=["siglip", "siglip2"])
def test_import_and_export_match_open_clip(act, tmp_path):
    model_cfg = tiny_config(**({"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh"
                               else {}))
    reference = reference_model(model_cfg)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    pixels, ids = inputs()
    expected = ref_outputs(reference, pixels, ids)

    model = load_any(tmp_path / "oc", "open_clip").model
    config = model.config
    assert (config.vision.class_token, config.vision.pool, config.image_proj) == (False, "map",
                                                                                 False)
    assert (config.text.pool, config.text.padding, config.text.act) == ("last", "none", act)
    assert (config.vision.act, config.vision.norm_eps, config.vision.heads) == ("gelu", 1e-6, 4)
    assert (config.vision.resize_mode, config.vision.mean) == ("squash", (0.5, 0.5, 0.5))
    assert_close(expected, vlp_outputs(model, pixels, ids), f"open_clip->vlp {act}")

    save_open_clip_siglip(model, tmp_path / "back")  # the timm name found by its shape
    written = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    assert written["model_cfg"]["vision_cfg"]["timm_model_name"] == TINY
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert_close(expected, ref_outputs(reloaded, pixels, ids), f"vlp->open_clip {act}")


def test_cli_round_trip_and_hub_name(tmp_path, monkeypatch):
    from vlp.cli import main

    model_cfg = tiny_config()
    reference = reference_model(model_cfg, seed=3)
    pixels, ids = inputs(seed=4)
    expected = ref_outputs(reference, pixels, ids)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    assert main(["convert", "--from", "open_clip", "--to", "vlp", str(tmp_path / "oc"),
                 str(tmp_path / "vlp")]) == 0
    assert_close(expected, vlp_outputs(vlp.load(tmp_path / "vlp").eval(), pixels, ids), "cli in")
    assert main(["convert", "--from", "vlp", "--to", "open_clip", "--architecture", TINY,
                 str(tmp_path / "vlp"), str(tmp_path / "back")]) == 0
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert_close(expected, ref_outputs(reloaded, pixels, ids), "cli out")
    with pytest.raises(ConfigError, match="architecture='vit_base_patch16_siglip_224' does not "
                                          "build this vision tower: image_size 224"):
        convert(tmp_path / "vlp", tmp_path / "nope", "vlp", "open_clip",
                architecture="vit_base_patch16_siglip_224")
    assert not (tmp_path / "nope").exists()

    # open_clip's pretrained name -> its hub repo -> this snapshot, converted through the hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "vlp-cache"))
    repo = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")["hf_hub"].strip("/")
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    save_local_dir(reference, model_cfg, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    named = vlp.load("open_clip:ViT-B-16-SigLIP/webli").eval()
    assert_close(expected, vlp_outputs(named, pixels, ids), "open_clip: name")


def test_export_with_tokenizer_runs_in_open_clip_transforms_and_tokenizer(tmp_path):
    captions = ["a red circle", "a blue square", "two green stars", "This is a photo of"] * 5
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=CONTEXT)
    model_cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    save_local_dir(reference_model(model_cfg, seed=5), model_cfg, tmp_path / "oc")
    model = load_any(tmp_path / "oc", "open_clip").model
    vlp.save(model, tmp_path / "vlp", tokenizer=tokenizer)
    convert(tmp_path / "vlp", tmp_path / "export", "vlp", "open_clip")

    name = f"local-dir:{tmp_path / 'export'}"
    reference, _, preprocess = open_clip.create_model_and_transforms(name)
    their_tokenizer = open_clip.get_tokenizer(name)
    prompts = ["a red circle", "two green stars and a blue square"]
    assert torch.equal(their_tokenizer(prompts), tokenizer(prompts))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (47, 61, 3),
                                                              dtype=np.uint8))
    pixels = vlp.image_transform(model, train=False)(image)[None]
    assert (preprocess(image)[None] - pixels).abs().max().item() <= ATOL
    assert_close(ref_outputs(reference.eval(), pixels, their_tokenizer(prompts)),
                 vlp_outputs(model, pixels, tokenizer(prompts)), "open_clip client")


def test_exports_open_clip_cannot_build_are_refused(tmp_path):
    siglip_shaped = vlp.create_model(
        "siglip-tiny", vision={"class_token": False, "pool": "map", "pre_norm": False,
                               "patch_bias": True},
        text={"causal": False, "pool": "last", "padding": "none"}, image_proj=False,
        init_logit_bias=-10.0, proj_bias=True)
    with pytest.raises(ConfigError, match="no timm SigLIP architecture builds this vision tower "
                                          r"\(image_size 64, patch_size 16, width 128"):
        save_open_clip_siglip(siglip_shaped, tmp_path / "out")
    with pytest.raises(ConfigError, match="architecture='convnext_tiny' is a timm ConvNeXt"):
        save_open_clip_siglip(siglip_shaped, tmp_path / "out", timm_model_name="convnext_tiny")
    vlp.save(vlp.create_model("clip-tiny"), tmp_path / "clip")
    with pytest.raises(ConfigError, match="this model is not SigLIP-shaped"):
        convert(tmp_path / "clip", tmp_path / "out", "vlp", "open_clip", architecture=TINY)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP", "ViT-B-16-SigLIP2"])
def test_real_configs_map_every_tensor_and_name_their_timm_tower(name):
    """On the meta device: vlp's model for the real config, through the key map, has exactly
    open_clip's tensor names and shapes, and export finds the config's own timm tower."""
    model_cfg = open_clip.get_model_config(name)
    config = siglip_config_from_open_clip(model_cfg, name)
    with torch.device("meta"):
        model = build_model(config)
        reference = open_clip.create_model(name, device="meta")
    ours = expected_ref_shapes(siglip_open_clip_key_map(config),
                               {k: tuple(v.shape) for k, v in model.state_dict().items()})
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == {k: v for k, v in theirs.items() if k not in ("logit_scale", "logit_bias")} \
        | {"logit_scale": (), "logit_bias": ()}
    assert timm_name_for(config.vision) == model_cfg["vision_cfg"]["timm_model_name"]


@pytest.mark.parametrize(("change", "message"), [
    ({"timm_model_name": "convnext_tiny"}, "timm_model_name='convnext_tiny' is a timm ConvNeXt, "
                                           "not a plain ViT"),
    ({"timm_model_name": "vit_base_patch16_224"}, "timm_model_name='vit_base_patch16_224' has a "
                                                  "class token"),
    ({"timm_model_name": "vit_base_patch16_reg4_gap_256"}, "has register tokens"),
    ({"timm_model_name": "no_such_vit"}, "'no_such_vit' is not a timm architecture"),
    ({"timm_pool": "avg"}, "vision_cfg.timm_pool='avg' is not supported"),
    ({"timm_proj": "linear"}, "vision_cfg.timm_proj='linear' is not supported"),
    ({"image_size": 64}, "vision_cfg.image_size=64 differs from the 32"),
])
def test_trunks_that_are_not_plain_vits_are_refused(change, message, tmp_path):
    model_cfg = tiny_config()
    reference = reference_model(model_cfg)
    model_cfg["vision_cfg"].update(change)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    with pytest.raises(CheckpointError, match=message) as error:
        convert(tmp_path / "oc", tmp_path / "out", "open_clip", "vlp")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
