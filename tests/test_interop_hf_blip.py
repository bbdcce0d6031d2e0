"""Parity of vlp's BLIP with HF transformers' BLIP task models: import, export, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

import vlp  # noqa: E402
from vlp.config import get_preset  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop.hf_blip import load_hf_blip, save_hf_blip  # noqa: E402

ATOL = 1e-5
VOCAB, CLS, SEP, PAD, DEC = 120, 101, 102, 0, 117
IMAGE, CONTEXT = 30, 24


def tiny_hf_config(layers: int = 3) -> BlipConfig:
    # the HF tester's widths (hidden 32, intermediate 37, 4 heads); vocab holds BERT's [CLS]/[SEP]
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=DEC,
                sep_token_id=SEP, pad_token_id=PAD)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=IMAGE, patch_size=6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def reference(cls: type, seed: int = 0, std: float = 0.1,
              nudge: float = 1.2) -> nn.Module:
    """A random HF model: its own init leaves the vision tower at std 1e-10 and every bias and
    LayerNorm at 0/1, so draw every tensor instead; a nudge on [SEP] ends some generations.
    The draws come from their own generator: transformers 4 and 5 construct the model with
    different amounts of global randomness, and the weights must not depend on the version."""
    generator = torch.Generator().manual_seed(seed)
    model = cls(tiny_hf_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
        if hasattr(model, "text_decoder"):
            model.text_decoder.cls.predictions.bias[SEP] += nudge
    return model


def texts(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[CLS] words [SEP] [PAD]...`` rows and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, 100, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = CLS, SEP
        mask[row, :length] = 1
    return ids, mask


def pixels(batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def until_eos(row: torch.Tensor) -> list[int]:
    tokens = row.tolist()
    return tokens[: tokens.index(SEP) + 1] if SEP in tokens else tokens


def assert_close(a: torch.Tensor, b: torch.Tensor, label: str) -> None:
    diff = (a - b).abs().max().item()
    print(f"max abs diff {label}: {diff:.3g}")  # shown with -s; collected for the closing note
    assert diff <= ATOL, (label, diff)


def assert_same_tokens(hf_rows: torch.Tensor, ours: torch.Tensor, skip: int, label: str) -> None:
    """HF returns prompt + new tokens (padded with eos or pad); vlp only the new ones."""
    expected = [until_eos(row[skip:]) for row in hf_rows]
    assert [until_eos(row) for row in ours] == expected, label
    assert any(SEP in row for row in expected), "no row finished; the test would be weak"


# -- retrieval ------------------------------------------------------------------------------------

def retrieval_outputs(model, pix, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, BlipForImageTextRetrieval):
            return {"itm": model(input_ids=ids, pixel_values=pix, attention_mask=mask).itm_score,
                    "itc": model(input_ids=ids, pixel_values=pix, attention_mask=mask,
                                 use_itm_head=False).itm_score}
        return {"itm": model.itm_logits(pix, ids, mask),
                "itc": model.itc_similarity(pix, ids, mask)}


def test_retrieval_import_and_export_match_hf(tmp_path):
    hf = reference(BlipForImageTextRetrieval)
    hf.save_pretrained(tmp_path / "hf")
    pix, (ids, mask) = pixels(), texts([9, 5, 12])
    model, _ = load_hf_blip(tmp_path / "hf")
    config = model.config
    assert (config.text_encoder, config.text_decoder, config.retrieval_heads) == (True, False,
                                                                                  True)
    expected = retrieval_outputs(hf, pix, ids, mask)
    ours = retrieval_outputs(model, pix, ids, mask)
    assert expected["itc"].shape == (3, 3)
    for key in ("itm", "itc"):
        assert_close(expected[key], ours[key], f"hf->vlp retrieval {key}")

    save_hf_blip(model, tmp_path / "back")
    reloaded = BlipForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    back = retrieval_outputs(reloaded, pix, ids, mask)
    for key in ("itm", "itc"):
        assert_close(expected[key], back[key], f"vlp->hf retrieval {key}")


# -- captioning -----------------------------------------------------------------------------------

def test_captioning_logits_and_generation_match_hf(tmp_path):
    hf = reference(BlipForConditionalGeneration, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    pix, (ids, mask) = pixels(seed=4), texts([9, 5, 12], seed=5)
    model, _ = load_hf_blip(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
    assert_close(expected, model.caption_logits(pix, ids, mask), "hf->vlp caption logits")

    prompt = ids[:, :4]  # "[CLS] w w w": HF swaps [CLS] for [DEC] and drops the last id
    hf_prompt = torch.cat([prompt, torch.full((3, 1), SEP)], dim=1)
    for beams in (1, 3):
        with torch.no_grad():
            hf_rows = hf.generate(pix, input_ids=hf_prompt.clone(), max_new_tokens=10,
                                  num_beams=beams)
        ours = model.generate(pix, prompt, max_new_tokens=10, num_beams=beams,
                              early_stopping=False)
        assert_same_tokens(hf_rows, ours, prompt.shape[1], f"captions, beams={beams}")

    save_hf_blip(model, tmp_path / "back")
    reloaded = BlipForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        back = reloaded(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
        again = reloaded.generate(pix, input_ids=hf_prompt.clone(), max_new_tokens=10,
                                  num_beams=3)
    assert_close(expected, back, "vlp->hf caption logits")
    assert_same_tokens(again, model.generate(pix, prompt, max_new_tokens=10, num_beams=3,
                                             early_stopping=False), 4, "exported, beams=3")


# -- VQA ------------------------------------------------------------------------------------------

def hf_answer_logits(hf, pix, question, question_mask, answer, answer_mask) -> torch.Tensor:
    """What ``BlipForQuestionAnswering.forward`` computes before its loss (it returns no
    logits): the question encoder over the image, then the answer decoder over its states."""
    with torch.no_grad():
        image = hf.vision_model(pixel_values=pix).last_hidden_state
        states = hf.text_encoder(input_ids=question, attention_mask=question_mask,
                                 encoder_hidden_states=image).last_hidden_state
        return hf.text_decoder(input_ids=answer, attention_mask=answer_mask,
                               encoder_hidden_states=states,
                               encoder_attention_mask=question_mask).logits


def test_vqa_answer_logits_and_generation_match_hf(tmp_path):
    hf = reference(BlipForQuestionAnswering, seed=6)
    hf.save_pretrained(tmp_path / "hf")
    pix, (question, question_mask) = pixels(seed=7), texts([8, 5, 11], seed=8)
    answer, answer_mask = texts([4, 6, 3], seed=9)
    answer[:, 0] = DEC
    model, _ = load_hf_blip(tmp_path / "hf")
    assert model.config.share == "none" and model.config.mask_question_padding == "never"
    expected = hf_answer_logits(hf, pix, question, question_mask, answer, answer_mask)
    with torch.no_grad():
        ours = model.vqa_answer_logits(pix, question, answer, question_mask, answer_mask)
    assert_close(expected, ours, "hf->vlp VQA answer logits")

    for beams in (1, 3):
        with torch.no_grad():
            hf_rows = hf.generate(input_ids=question, pixel_values=pix,
                                  attention_mask=question_mask, max_new_tokens=8,
                                  num_beams=beams)
        answers = model.answer(pix, question, question_mask, max_new_tokens=8,
                               num_beams=beams, early_stopping=False)
        assert_same_tokens(hf_rows, answers, 1, f"answers, beams={beams}")

    save_hf_blip(model, tmp_path / "back")
    reloaded = BlipForQuestionAnswering.from_pretrained(tmp_path / "back").eval()
    assert_close(expected, hf_answer_logits(reloaded, pix, question, question_mask, answer,
                                            answer_mask), "vlp->hf VQA answer logits")


def test_vlp_native_model_matches_hf_when_ids_carry_enc_token(tmp_path):
    """A vlp BLIP (paper behaviour: [ENC] replaces the first id) exports as an HF retrieval model
    that agrees once its inputs start with [ENC] themselves."""
    config = get_preset("blip-tiny")
    config.text_decoder, config.queue_size = False, 0
    torch.manual_seed(10)
    model = vlp.models.build_model(config).eval()
    save_hf_blip(model, tmp_path / "hf")
    hf = BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 1000, (2, 12))
    ids[:, 0], ids[:, 8:] = config.text.bos_id, config.text.pad_id
    mask = (ids != config.text.pad_id).long()
    pix = torch.randn(2, 3, 64, 64)
    enc_ids = ids.clone()
    enc_ids[:, 0] = config.enc_id
    with torch.no_grad():
        expected = hf(input_ids=enc_ids, pixel_values=pix, attention_mask=mask).itm_score
        assert_close(expected, model.itm_logits(pix, ids, mask), "vlp-native -> hf ITM")


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BlipForImageTextRetrieval, BlipForConditionalGeneration,
                                 BlipForQuestionAnswering])
def test_full_vit_b_16_shape(cls, large_tmp_path):
    """HF's default BLIP config: ViT-B/16 at 384 px, BERT-base text (8 heads in HF)."""
    torch.manual_seed(11)
    hf = cls(BlipConfig()).eval()
    with torch.no_grad():  # HF's 1e-10 vision init would make every image alike
        for name, param in hf.named_parameters():
            if name.startswith("vision_model.") and "norm" not in name:
                param.normal_(std=0.02)
    hf.save_pretrained(large_tmp_path / "hf")
    pix = torch.randn(2, 3, 384, 384)
    ids = torch.tensor([[101, 1037, 3861, 1997, 1037, 4937, 102, 0],
                        [101, 2048, 6077, 2006, 1037, 2795, 2006, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        if cls is BlipForImageTextRetrieval:
            expected = {"itm": hf(input_ids=ids, pixel_values=pix, attention_mask=mask).itm_score,
                        "itc": hf(input_ids=ids, pixel_values=pix, attention_mask=mask,
                                  use_itm_head=False).itm_score}
        elif cls is BlipForConditionalGeneration:
            expected = {"caption": hf(pixel_values=pix, input_ids=ids,
                                      attention_mask=mask).logits}
        else:
            answer = torch.tensor([[30522, 2048, 102], [30522, 2748, 102]])
            expected = {"vqa": hf_answer_logits(hf, pix, ids, mask, answer, None)}
    del hf
    model, _ = load_hf_blip(large_tmp_path / "hf")
    with torch.no_grad():
        if "itm" in expected:
            ours = retrieval_outputs(model, pix, ids, mask)
        elif "caption" in expected:
            ours = {"caption": model.caption_logits(pix, ids, mask)}
        else:
            ours = {"vqa": model.vqa_answer_logits(pix, ids, answer, mask)}
    for key, value in expected.items():
        assert_close(value, ours[key], f"hf->vlp ViT-B/16 {key}")


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture()
def saved_captioner(tmp_path):
    reference(BlipForConditionalGeneration).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_key_and_bad_shapes_are_named(saved_captioner):
    weights_path = saved_captioner / "model.safetensors"
    weights = load_file(weights_path)
    key = "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"
    del weights[key]
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape "
                                              r"\(32, 32\)\)"):
        load_hf_blip(saved_captioner)
    weights[key] = torch.zeros(32, 32)
    weights["vision_model.embeddings.class_embedding"] = torch.zeros(1, 32)
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match=r"class_embedding' has shape \(1, 32\), expected "
                                              r"\(1, 1, 32\)"):
        load_hf_blip(saved_captioner)


def test_untied_lm_decoder_is_refused(saved_captioner):
    weights_path = saved_captioner / "model.safetensors"
    weights = load_file(weights_path)
    embeddings = weights["text_decoder.bert.embeddings.word_embeddings.weight"]
    weights["text_decoder.cls.predictions.decoder.weight"] = embeddings.clone()
    save_file(weights, weights_path)
    load_hf_blip(saved_captioner)  # a stored copy of the tied matrix is fine
    weights["text_decoder.cls.predictions.decoder.weight"] = embeddings + 1
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match="ties the LM decoder"):
        load_hf_blip(saved_captioner)


def test_unknown_architecture(saved_captioner):
    config = json.loads((saved_captioner / "config.json").read_text())
    config["architectures"] = ["BlipModel"]
    (saved_captioner / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture.*BlipModel"):
        load_hf_blip(saved_captioner)


def test_models_hf_cannot_express_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no HF BLIP class"):
        save_hf_blip(vlp.create_model("blip-tiny"), tmp_path / "pretrain")
    config = get_preset("blip-tiny")
    config.retrieval_heads, config.queue_size = False, 0  # encoder + decoder, shared
    with pytest.raises(ConfigError, match="share='all_but_sa'"):
        save_hf_blip(vlp.models.build_model(config), tmp_path / "shared")
    assert not (tmp_path / "pretrain").exists() and not (tmp_path / "shared").exists()
