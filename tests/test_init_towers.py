"""`vlp train --init-vision / --init-text`: a tower of a fresh model starts from a transformers,
open_clip or vlp checkpoint on disk (the papers' initialisations), every tensor exact, the
vision features equal to the source model's."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import vlp  # noqa: E402
from vlp.cli import main  # noqa: E402
from vlp.config import get_preset  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop.towers import init_text_, init_vision_  # noqa: E402
from vlp.models import build_model  # noqa: E402
from vlp.run import init_towers, model_and_tokenizer  # noqa: E402
from vlp.train import TrainConfig  # noqa: E402
from vlp.train.distributed import DistEnv  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)


def _perturbed(model):
    """Every tensor non-trivial (HF inits LayerNorms to 1/0 and biases to 0), so each key
    that is not loaded, or loaded into the wrong place, shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _save_vit(directory, **overrides):
    config = transformers.ViTConfig(image_size=64, patch_size=16, layer_norm_eps=1e-6,
                                    **{**TINY, **overrides})
    model = _perturbed(transformers.ViTModel(config))
    model.save_pretrained(directory)
    return model


def _save_bert(directory, layers=4, masked_lm=False):
    config = transformers.BertConfig(vocab_size=1000, max_position_embeddings=64,
                                     **{**TINY, "num_hidden_layers": layers})
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    model = _perturbed(cls(config))
    model.save_pretrained(directory)
    return model


def _start(tmp_path, csv, **fields):
    """The model (and reports) a fresh run starts from, as `vlp.run.train` makes them."""
    cfg = TrainConfig(train_data=str(csv), output_dir=str(tmp_path / "run"), max_steps=1,
                      num_workers=0, progress=False, **fields)
    model, _ = model_and_tokenizer(cfg, tmp_path / "run", DistEnv())
    return model, init_towers(cfg, model)


def _pixels(size=64):
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size)


def _qkv(attention, *names):
    return torch.cat([getattr(attention, n).weight for n in names])


# -- vision -------------------------------------------------------------------------------------

def test_vit_starts_blips_vision_tower_exactly(tmp_path, synthetic_train_csv):
    vit = _save_vit(tmp_path / "vit")
    model, [report] = _start(tmp_path, synthetic_train_csv(32), model="blip-tiny",
                             init_vision=str(tmp_path / "vit"))
    visual = model.visual
    assert report["tower"] == "vision" and report["fresh"] == []
    assert len(report["loaded"]) == len(visual.state_dict())
    embeddings = vit.embeddings
    assert torch.equal(visual.class_token, embeddings.cls_token[0, 0])
    assert torch.equal(visual.pos_embed, embeddings.position_embeddings[0])
    assert torch.equal(visual.patch_embed.bias, embeddings.patch_embeddings.projection.bias)
    for block, layer in zip(visual.transformer.blocks, vit.encoder.layer, strict=True):
        attention = layer.attention.attention
        assert torch.equal(block.attn.qkv.weight, _qkv(attention, "query", "key", "value"))
        assert torch.equal(block.mlp.fc2.bias, layer.output.dense.bias)
        assert torch.equal(block.norm2.weight, layer.layernorm_after.weight)
    assert torch.equal(visual.norm.bias, vit.layernorm.bias)
    # BLIP's momentum encoder starts as a copy of the loaded tower
    momentum = model.momentum_encoders["visual"].state_dict()
    assert all(torch.equal(momentum[k], v) for k, v in visual.state_dict().items())
    pixels = _pixels()
    with torch.no_grad():
        ours = model.eval().visual.forward_features(pixels)
        theirs = vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_clip_vision_model_starts_clips_vision_tower(tmp_path, synthetic_train_csv):
    config = transformers.CLIPVisionConfig(image_size=64, patch_size=16, hidden_act="gelu",
                                           **TINY)
    reference = _perturbed(transformers.CLIPVisionModel(config))
    reference.save_pretrained(tmp_path / "clip")
    model, [report] = _start(tmp_path, synthetic_train_csv(32), model="clip-tiny",
                             init_vision=str(tmp_path / "clip"))
    assert report["fresh"] == ["visual.head.weight"]  # the projection is not the tower
    tower = reference.vision_model
    assert torch.equal(model.visual.norm_pre.weight, tower.pre_layrnorm.weight)
    assert torch.equal(model.visual.transformer.blocks[3].attn.qkv.bias, torch.cat(
        [getattr(tower.encoder.layers[3].self_attn, f"{x}_proj").bias for x in "qkv"]))
    pixels = _pixels()
    with torch.no_grad():
        ours = model.eval().visual.forward_features(pixels)[:, 0]
        theirs = reference(pixel_values=pixels).pooler_output  # post_layernorm(class token)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_open_clip_visual_starts_clips_vision_tower(tmp_path, synthetic_train_csv):
    open_clip = pytest.importorskip("open_clip")
    model_cfg = {"embed_dim": 64,
                 "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 4,
                                "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32,
                              "heads": 4, "layers": 1}}
    reference = _perturbed(open_clip.CLIP(**model_cfg))
    directory = tmp_path / "oc"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              directory / "open_clip_model.safetensors")
    model, [report] = _start(tmp_path, synthetic_train_csv(32), model="clip-tiny",
                             init_vision=str(directory))
    assert report["fresh"] == ["visual.head.weight"]
    assert torch.equal(model.visual.transformer.blocks[0].attn.qkv.weight,
                       reference.visual.transformer.resblocks[0].attn.in_proj_weight)
    reference.visual.proj = None  # open_clip's pooled features before its projection
    pixels = _pixels()
    with torch.no_grad():
        ours = model.eval().visual.forward_features(pixels)[:, 0]
        theirs = reference.visual(pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# -- text ---------------------------------------------------------------------------------------

def test_bert_starts_blips_text_towers_and_lm_head(tmp_path, synthetic_train_csv):
    bert = _save_bert(tmp_path / "bert", masked_lm=True)
    model, [report] = _start(tmp_path, synthetic_train_csv(32), model="blip-tiny",
                             init_text=str(tmp_path / "bert"))
    encoder, decoder = model.text_encoder, model.text_decoder
    assert all(".cross_attn." in n or ".norm_cross." in n for n in report["fresh"])
    assert "text_decoder.blocks.0.attn.qkv.weight" in report["loaded"]
    assert any("token_embed rows 1000..1025" in note for note in report["notes"])
    for tower in (encoder, decoder):  # all_but_sa: the decoder's own self-attention too
        for block, layer in zip(tower.blocks, bert.bert.encoder.layer, strict=True):
            assert torch.equal(block.attn.qkv.weight,
                               _qkv(layer.attention.self, "query", "key", "value"))
            assert torch.equal(block.attn.proj.bias, layer.attention.output.dense.bias)
            assert torch.equal(block.mlp.fc1.weight, layer.intermediate.dense.weight)
            assert torch.equal(block.norm2.bias, layer.output.LayerNorm.bias)
    words = bert.bert.embeddings.word_embeddings.weight
    assert torch.equal(encoder.token_embed.weight[:1000], words)
    assert torch.equal(encoder.pos_embed, bert.bert.embeddings.position_embeddings.weight[:32])
    head = bert.cls.predictions
    assert torch.equal(model.lm_head.dense.weight, head.transform.dense.weight)
    assert torch.equal(model.lm_head.bias[:1000], head.bias)
    momentum = model.momentum_encoders["text_encoder"].state_dict()
    assert all(torch.equal(momentum[k], v) for k, v in encoder.state_dict().items())


def test_bert_starts_blip2s_qformer_with_fresh_cross_attention(tmp_path, synthetic_train_csv):
    bert = _save_bert(tmp_path / "bert", layers=2)
    torch.manual_seed(0)
    model, [report] = _start(tmp_path, synthetic_train_csv(32), model="blip2-tiny",
                             init_text=str(tmp_path / "bert"))
    torch.manual_seed(0)  # the same run without the flag: its random init
    fresh, _ = _start(tmp_path / "fresh", synthetic_train_csv(32), model="blip2-tiny")
    qformer = model.qformer
    for block, layer in zip(qformer.blocks, bert.encoder.layer, strict=True):
        assert torch.equal(block.attn.qkv.weight,
                           _qkv(layer.attention.self, "query", "key", "value"))
        for mlp in (block.mlp, block.mlp_query):  # text and query FFN both from BERT's
            assert torch.equal(mlp.fc2.weight, layer.output.dense.weight)
    assert "qformer.blocks.0.cross_attn.q.weight" in report["fresh"]
    assert "qformer.query_tokens" in report["fresh"]
    assert torch.equal(qformer.blocks[0].cross_attn.kv.weight,
                       fresh.qformer.blocks[0].cross_attn.kv.weight)


# -- through the command line -------------------------------------------------------------------

def test_vlp_train_starts_blip_from_vit_and_bert(tmp_path, synthetic_train_csv):
    vit = _save_vit(tmp_path / "vit")
    _save_bert(tmp_path / "bert")
    run = tmp_path / "run"
    assert main(["train", "--model", "blip-tiny", "--train-data", str(synthetic_train_csv(32)),
                 "--init-vision", str(tmp_path / "vit"), "--init-text", str(tmp_path / "bert"),
                 "--output-dir", str(run), "--max-steps", "2", "--batch-size", "8",
                 "--lr", "1e-4", "--num-workers", "0", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    inits = {r["init"]["tower"]: r["init"] for r in records if "init" in r}
    assert inits["vision"]["source"] == str(tmp_path / "vit") and not inits["vision"]["fresh"]
    assert "text_encoder.blocks.0.cross_attn.q.weight" in inits["text"]["fresh"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    trained = vlp.load(run).visual  # two AdamW steps of 1e-4 from the ViT's weights
    change = (trained.transformer.blocks[0].mlp.fc1.weight
              - vit.encoder.layer[0].intermediate.dense.weight).abs().max()
    assert 0 < change <= 3e-4


def test_vlp_train_starts_blip2_from_vit_and_bert(tmp_path, synthetic_train_csv):
    vit = _save_vit(tmp_path / "vit")
    _save_bert(tmp_path / "bert", layers=2)
    run = tmp_path / "run"
    assert main(["train", "--model", "blip2-tiny", "--train-data", str(synthetic_train_csv(32)),
                 "--init-vision", str(tmp_path / "vit"), "--init-text", str(tmp_path / "bert"),
                 "--output-dir", str(run), "--max-steps", "2", "--batch-size", "8",
                 "--num-workers", "0", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["init"]["tower"] for r in records if "init" in r] == ["vision", "text"]
    # blip2-tiny reads 3 of the ViT's 4 blocks: the last block and final norm go unused
    assert "18 checkpoint tensors past the blocks" in records[0]["init"]["notes"][0]
    assert all(r["step"] == 0 for r in records if "init" in r)
    # the frozen ViT is saved with the checkpoint and still holds the ViT's tensors exactly
    tower = vlp.load(run).visual.tower
    layer = vit.encoder.layer[2]
    assert torch.equal(tower.transformer.blocks[2].attn.qkv.weight,
                       _qkv(layer.attention.attention, "query", "key", "value"))
    assert torch.equal(tower.pos_embed, vit.embeddings.position_embeddings[0])


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flag,make,model,match", [
    ("--init-vision", lambda d: _save_vit(d, hidden_size=64, intermediate_size=256),
     "blip-tiny", r"'embeddings.cls_token' has shape \(1, 1, 64\), expected \(1, 1, 128\)"),
    ("--init-vision", lambda d: _save_vit(d), "simvlm-tiny", "no ViT image tower"),
    ("--init-text", lambda d: _save_bert(d), "clip-tiny", "no BERT-style text tower"),
    ("--init-text", lambda d: _save_vit(d), "blip-tiny", "model_type 'vit', expected 'bert'"),
])
def test_bad_init_checkpoints_are_one_line(tmp_path, synthetic_train_csv, capsys, flag, make,
                                           model, match):
    make(tmp_path / "ckpt")
    code = main(["train", "--model", model, "--train-data", str(synthetic_train_csv(32)), flag,
                 str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "run"), "--max-steps",
                 "1", "--num-workers", "0", "--no-progress"])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("vlp: error:") and re.search(match, line), line


def test_mismatches_name_the_problem_and_leave_the_model_untouched(tmp_path):
    blip = build_model(get_preset("blip-tiny"))
    before = blip.text_encoder.blocks[0].attn.qkv.weight.clone()
    config = transformers.BertConfig(vocab_size=1000, max_position_embeddings=64,
                                     **{**TINY, "intermediate_size": 256})
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=r"'blocks.0.mlp.fc1.weight' has shape "
                                              r"\(256, 128\), this model's text_encoder"):
        init_text_(blip, tmp_path / "bert")
    assert torch.equal(blip.text_encoder.blocks[0].attn.qkv.weight, before)  # untouched
    transformers.DeiTModel(transformers.DeiTConfig(image_size=64, patch_size=16, **TINY)
                           ).save_pretrained(tmp_path / "deit")
    with pytest.raises(CheckpointError, match="distillation token"):
        init_vision_(blip, tmp_path / "deit")
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_act="gelu", **TINY))
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="unexpected key 'pre_layrnorm"):
        init_vision_(blip, tmp_path / "clip")  # BLIP's ViT has no pre-norm
    with pytest.raises(ConfigError, match="vision.act"):
        init_vision_(build_model(get_preset("clip-tiny")), _quick(tmp_path))


def _quick(tmp_path):
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_act="quick_gelu", **TINY)
    ).save_pretrained(tmp_path / "quick")
    return tmp_path / "quick"
