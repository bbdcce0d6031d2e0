"""Original BLIP / LAVIS checkpoints -> vlp BLIP (and on to HF): the files are written by hand
here, key by key in the layout of REFERENCE_NOTES §3.5 (BLIP's ``med.py`` BERT, timm ViT), not
by vlp's exporter, then imported and compared tensor by tensor and output by output."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import vlp
from vlp.cli import main
from vlp.config import get_preset, save_config
from vlp.errors import CheckpointError, ConfigError
from vlp.interop import convert
from vlp.interop.lavis_blip import load_lavis_blip, save_lavis_blip
from vlp.models import build_model
from vlp.models.blip import BLIP

EXACT = 1e-6
HF_ATOL = 1e-5
PAD, BOS, EOS = 0, 2, 1  # blip-tiny's text ids; [DEC] 1024, [ENC] 1025
PARTS = {  # (text_encoder, text_decoder, retrieval_heads, share, queue_size)
    "pretrain": (True, True, True, "all_but_sa", 1024),  # BLIP_Pretrain: tied, momentum, queues
    "retrieval": (True, False, True, "all_but_sa", 64),  # BLIP_Retrieval (+ idx_queue)
    "caption": (False, True, False, "all_but_sa", 0),  # BLIP_Decoder
    "vqa": (True, True, False, "none", 0),  # BLIP_VQA: fine-tuned, untied
}


def source_model(kind: str = "pretrain", seed: int = 0) -> BLIP:
    """A blip-tiny with every tensor drawn at random (no init value left to hide a swap)."""
    config = get_preset("blip-tiny")
    (config.text_encoder, config.text_decoder, config.retrieval_heads, config.share,
     config.queue_size) = PARTS[kind]
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.1)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
        if model.queue is not None:
            model.queue.ptr.fill_(5)
    return model


# -- the independent writer: BLIP's names, from REFERENCE_NOTES §3.5 -------------------------------

def put(out: dict, name: str, module: nn.Module) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = module.weight, module.bias


def write_vit(out: dict, prefix: str, vit: nn.Module) -> None:
    out[prefix + "cls_token"] = vit.class_token.reshape(1, 1, -1)
    out[prefix + "pos_embed"] = vit.pos_embed[None]
    put(out, prefix + "patch_embed.proj", vit.patch_embed)
    for i, block in enumerate(vit.transformer.blocks):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            put(out, f"{prefix}blocks.{i}.{part}", block.get_submodule(part))
    put(out, prefix + "norm", vit.norm)


def write_bert(out: dict, prefix: str, tower: nn.Module) -> None:
    out[prefix + "embeddings.word_embeddings.weight"] = tower.token_embed.weight
    out[prefix + "embeddings.position_embeddings.weight"] = tower.pos_embed
    out[prefix + "embeddings.position_ids"] = torch.arange(tower.pos_embed.shape[0])[None]
    put(out, prefix + "embeddings.LayerNorm", tower.embed_norm)
    for i, block in enumerate(tower.blocks):
        layer = f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = getattr(block.attn.qkv, p).chunk(3)
            out.update({f"{layer}attention.self.query.{p}": q, f"{layer}attention.self.key.{p}": k,
                        f"{layer}attention.self.value.{p}": v})
            out[f"{layer}crossattention.self.query.{p}"] = getattr(block.cross_attn.q, p)
            k, v = getattr(block.cross_attn.kv, p).chunk(2)
            out[f"{layer}crossattention.self.key.{p}"] = k
            out[f"{layer}crossattention.self.value.{p}"] = v
        put(out, layer + "attention.output.dense", block.attn.proj)
        put(out, layer + "attention.output.LayerNorm", block.norm1)
        put(out, layer + "crossattention.output.dense", block.cross_attn.proj)
        put(out, layer + "crossattention.output.LayerNorm", block.norm_cross)
        put(out, layer + "intermediate.dense", block.mlp.fc1)
        put(out, layer + "output.dense", block.mlp.fc2)
        put(out, layer + "output.LayerNorm", block.norm2)


def original_state(model: BLIP, momentum: bool = True) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    write_vit(out, "visual_encoder.", model.visual)
    if model.text_encoder is not None:
        write_bert(out, "text_encoder.", model.text_encoder)
    if model.text_decoder is not None:
        write_bert(out, "text_decoder.bert.", model.text_decoder)
        lm = "text_decoder.cls.predictions."
        put(out, lm + "transform.dense", model.lm_head.dense)
        put(out, lm + "transform.LayerNorm", model.lm_head.norm)
        out[lm + "bias"] = out[lm + "decoder.bias"] = model.lm_head.bias
        out[lm + "decoder.weight"] = model.text_decoder.token_embed.weight
    if model.itm_head is not None:
        for name in ("vision_proj", "text_proj", "itm_head"):
            put(out, name, getattr(model, name))
        out["temp"] = model.temp
    if model.momentum_encoders is not None:
        twins = model.momentum_encoders
        if momentum:
            write_vit(out, "visual_encoder_m.", twins["visual"])
            write_bert(out, "text_encoder_m.", twins["text_encoder"])
            put(out, "vision_proj_m", twins["vision_proj"])
            put(out, "text_proj_m", twins["text_proj"])
        out["image_queue"], out["text_queue"] = model.queue.image.T, model.queue.text.T
        out["queue_ptr"] = model.queue.ptr.reshape(1)
        out["idx_queue"] = torch.full((1, model.config.queue_size), -100)
        out["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def write_checkpoint(path, state: dict) -> str:
    torch.save({"model": state, "optimizer": {}, "config": {"queue_size": 57600}, "epoch": 19},
               path)
    return str(path)


# -- inputs and comparisons -----------------------------------------------------------------------

def inputs(batch: int = 3, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (batch, 10), generator=generator)
    ids[:, 0] = BOS
    for row, length in enumerate([10, 6, 8][:batch]):
        ids[row, length - 1], ids[row, length:] = EOS, PAD
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return pixels, ids, (ids != PAD).long()


@torch.no_grad()
def outputs(model: BLIP, size: int = 64) -> dict[str, torch.Tensor]:
    pixels, ids, mask = inputs(size=size)
    out = {}
    if model.itm_head is not None:
        out["itm"] = model.itm_logits(pixels, ids, mask)
        out["itc"] = model.itc_similarity(pixels, ids, mask)
    if model.text_decoder is not None:
        out["caption"] = model.caption_logits(pixels, ids, mask)
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, label: str, atol: float = EXACT) -> None:
    diff = (a - b).abs().max().item()
    print(f"max abs diff {label}: {diff:.3g}")
    assert diff <= atol, (label, diff)


def assert_same_state(source: BLIP, model: BLIP) -> None:
    expected, got = source.state_dict(), model.state_dict()
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


# -- import ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(PARTS))
def test_every_tensor_lands_in_place(kind, tmp_path):
    source = source_model(kind)
    path = write_checkpoint(tmp_path / f"model_{kind}.pth", original_state(source))
    model, tokenizer = load_lavis_blip(path, config="blip-tiny")
    config = model.config
    assert tokenizer is None
    assert (config.text_encoder, config.text_decoder, config.retrieval_heads, config.share,
            config.queue_size) == PARTS[kind]
    assert_same_state(source, model)
    if kind == "pretrain":  # the tied copies are one tensor again, as in the source
        encoder, decoder = model.text_encoder.blocks[1], model.text_decoder.blocks[1]
        assert decoder.mlp is encoder.mlp and decoder.attn is not encoder.attn
        assert int(model.queue.ptr) == 5
    expected, got = outputs(source), outputs(model)
    assert sorted(expected) == sorted(got) and expected
    for key in expected:
        assert_close(expected[key], got[key], f"{kind} {key}")


def test_safetensors_file_and_preset_by_width(tmp_path):
    source = source_model("caption")
    state = original_state(source)
    save_file(state, tmp_path / "model.safetensors")
    model, _ = load_lavis_blip(tmp_path / "model.safetensors", config="blip-tiny")
    assert_same_state(source, model)
    with pytest.raises(ConfigError, match=r"vision width 128 matches no BLIP preset.*config="):
        load_lavis_blip(tmp_path / "model.safetensors")


def test_image_size_interpolates_both_vision_towers(tmp_path):
    source = source_model()
    path = write_checkpoint(tmp_path / "model.pth", original_state(source))
    model, _ = load_lavis_blip(path, config="blip-tiny", image_size=96)
    assert model.config.vision.image_size == 96
    for ours, theirs in ((model.visual, source.visual),
                         (model.momentum_encoders["visual"], source.momentum_encoders["visual"])):
        grid = theirs.pos_embed[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        expected = torch.cat([theirs.pos_embed[:1], grid.permute(0, 2, 3, 1).reshape(36, -1)])
        assert torch.allclose(ours.pos_embed, expected, atol=EXACT)
    assert dict(model.named_parameters()).keys() == dict(source.named_parameters()).keys()
    assert outputs(model, size=96)["itm"].shape == (3, 2)


def test_queue_dropped_when_the_config_has_none(tmp_path, caplog):
    source = source_model()
    path = write_checkpoint(tmp_path / "model.pth", original_state(source))
    config = get_preset("blip-tiny")
    config.queue_size = 0
    save_config(config, tmp_path / "config.json")
    with caplog.at_level(logging.WARNING, logger="vlp.interop.lavis_blip"):
        model, _ = load_lavis_blip(path, config=tmp_path / "config.json")
    assert model.momentum_encoders is None and model.queue is None
    assert "left out" in caplog.text and "image_queue" in caplog.text
    for key, value in outputs(source).items():
        assert_close(value, outputs(model)[key], f"no queue {key}")


def test_lavis_file_without_momentum_weights(tmp_path, caplog):
    """LAVIS drops frozen parameters when saving: the momentum encoders start as copies."""
    source = source_model()
    path = write_checkpoint(tmp_path / "model.pth", original_state(source, momentum=False))
    with caplog.at_level(logging.WARNING, logger="vlp.interop.lavis_blip"):
        model, _ = load_lavis_blip(path, config="blip-tiny")
    assert "no momentum weights" in caplog.text
    twin = model.momentum_encoders["text_encoder"]
    assert torch.equal(twin.blocks[0].mlp.fc1.weight, model.text_encoder.blocks[0].mlp.fc1.weight)
    assert torch.equal(model.queue.image, source.queue.image)


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture()
def pretrain_state():
    return original_state(source_model())


def test_missing_key_is_named(pretrain_state, tmp_path):
    key = "text_encoder.encoder.layer.1.crossattention.self.value.weight"
    del pretrain_state[key]
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(CheckpointError, match=rf"model.pth: missing key '{key}' \(expected shape "
                                              r"\(128, 128\)\)"):
        load_lavis_blip(path, config="blip-tiny")


def test_wrong_shapes_are_named(pretrain_state, tmp_path):
    pretrain_state["itm_head.weight"] = torch.zeros(3, 128)
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(CheckpointError, match=r"'itm_head.weight' has shape \(3, 128\), expected "
                                              r"\(2, 128\)"):
        load_lavis_blip(path, config="blip-tiny")
    pretrain_state["itm_head.weight"] = torch.zeros(2, 128)
    pretrain_state["visual_encoder_m.pos_embed"] = torch.zeros(1, 10, 128)
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(CheckpointError, match=r"'visual_encoder_m.pos_embed' has shape "
                                              r"\(1, 10, 128\), expected \(1, 17, 128\)"):
        load_lavis_blip(path, config="blip-tiny")


def test_tied_copies_must_agree(pretrain_state, tmp_path):
    key = "text_decoder.bert.encoder.layer.2.intermediate.dense.weight"
    pretrain_state[key] = pretrain_state[key] + 1
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(CheckpointError, match=rf"'{key}' differs from "
                                              r"'text_encoder.encoder.layer.2.intermediate"):
        load_lavis_blip(path, config="blip-tiny")
    lm = "text_decoder.cls.predictions.decoder.weight"
    pretrain_state[key] = pretrain_state[key] - 1
    pretrain_state[lm] = pretrain_state[lm] + 1
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(CheckpointError, match=f"'{lm}' differs.*ties the LM decoder"):
        load_lavis_blip(path, config="blip-tiny")


def test_bad_configs_are_refused(pretrain_state, tmp_path):
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    with pytest.raises(ConfigError, match="expected a BLIP config"):
        load_lavis_blip(path, config="clip-tiny")
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_lavis_blip(path, config="blip-huge")
    config = get_preset("blip-tiny")
    config.text.heads = 3
    with pytest.raises(ConfigError, match="text width 128 is not divisible by the config's 3 "):
        load_lavis_blip(path, config=config)


# -- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_writes_the_same_layout(suffix, tmp_path):
    source = source_model()
    path = save_lavis_blip(source, tmp_path / f"out{suffix}")
    written = (torch.load(path, weights_only=True)["model"] if suffix == ".pth"
               else vlp.store.read_state_dict(path))
    expected = {k: v for k, v in original_state(source).items()
                if not k.endswith("position_ids") and k not in ("idx_queue", "ptr_queue")}
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert_same_state(source, load_lavis_blip(path, config="blip-tiny").model)


# -- through HF and the CLI -----------------------------------------------------------------------

def with_first(ids: torch.Tensor, token: int) -> torch.Tensor:
    ids = ids.clone()
    ids[:, 0] = token
    return ids


def test_lavis_file_to_hf_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = source_model()
    path = write_checkpoint(tmp_path / "model.pth", original_state(source))
    pixels, ids, mask = inputs()
    expected = outputs(source)
    convert(path, tmp_path / "retrieval", "lavis", "hf", config="blip-tiny",
            architecture="BlipForImageTextRetrieval")
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "retrieval").eval()
    with torch.no_grad():  # HF takes ids as given: BLIP's [ENC] goes in by hand
        itm = hf(input_ids=with_first(ids, 1025), pixel_values=pixels, attention_mask=mask)
        itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
    assert_close(expected["itm"], itm.itm_score, "lavis->hf ITM", HF_ATOL)
    assert_close(expected["itc"], itc.itm_score, "lavis->hf ITC", HF_ATOL)

    convert(path, tmp_path / "captioner", "lavis", "hf", config="blip-tiny",
            architecture="BlipForConditionalGeneration")
    hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "captioner").eval()
    with torch.no_grad():
        logits = hf(pixel_values=pixels, input_ids=with_first(ids, 1024),
                    attention_mask=mask).logits
    assert_close(expected["caption"], logits, "lavis->hf caption logits", HF_ATOL)
    with pytest.raises(ConfigError, match="no HF BLIP class"):  # all parts: no single HF class
        convert(path, tmp_path / "all", "lavis", "hf", config="blip-tiny")


def test_cli_round_trip(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    source = source_model("vqa")
    path = write_checkpoint(tmp_path / "model_vqa.pth", original_state(source))
    pixels, ids, mask = inputs()
    assert main(["convert", "--from", "lavis", "--to", "vlp", "--config", "blip-tiny", path,
                 str(tmp_path / "vlp")]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == "lavis"
    assert_same_state(source, vlp.load(tmp_path / "vlp"))

    assert main(["convert", "--from", "vlp", "--to", "hf", str(tmp_path / "vlp"),
                 str(tmp_path / "hf")]) == 0
    hf = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    # unpadded questions: HF's answer decoder never masks question padding, BLIP does in training
    question, question_mask = ids.masked_fill(mask == 0, 7), torch.ones_like(mask)
    answer = with_first(ids, 1024)
    with torch.no_grad():
        expected = source.vqa_answer_logits(pixels, question, answer, question_mask, mask)
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        states = hf.text_encoder(input_ids=with_first(question, 1025),
                                 attention_mask=question_mask,
                                 encoder_hidden_states=image).last_hidden_state
        logits = hf.text_decoder(input_ids=answer, attention_mask=mask,
                                 encoder_hidden_states=states).logits
    assert_close(expected, logits, "lavis->vlp->hf VQA answer logits", HF_ATOL)

    assert main(["convert", "--from", "hf", "--to", "vlp", str(tmp_path / "hf"),
                 str(tmp_path / "back")]) == 0
    back = vlp.load(tmp_path / "back")
    with torch.no_grad():  # HF's own behaviour: the ids as given
        again = back.vqa_answer_logits(pixels, with_first(question, 1025), answer,
                                       question_mask, mask)
    assert_close(logits, again, "hf->vlp VQA answer logits", HF_ATOL)

    assert main(["convert", "--from", "vlp", "--to", "lavis", str(tmp_path / "back"),
                 str(tmp_path / "again.pth")]) == 0
    assert torch.load(tmp_path / "again.pth", weights_only=True)["model"].keys() == {
        k for k in original_state(source) if not k.endswith("position_ids")}


def test_cli_names_the_bad_key(pretrain_state, tmp_path, capsys):
    del pretrain_state["text_proj.bias"]
    path = write_checkpoint(tmp_path / "model.pth", pretrain_state)
    code = main(["convert", "--from", "lavis", "--to", "vlp", "--config", "blip-tiny", path,
                 str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pth" in err[0] and "'text_proj.bias'" in err[0]
    assert not (tmp_path / "out").exists()
