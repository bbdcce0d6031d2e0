"""Parity of vlp's CLIP with SigLIP's towers and transformers ``SiglipModel``: import, export, the
sigmoid head's scale and bias, preprocessing, the tokenizer and the zero-shot pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel  # noqa: E402

import vlp  # noqa: E402
from vlp.errors import ConfigError  # noqa: E402
from vlp.interop import convert, load_any  # noqa: E402
from vlp.interop.hf_siglip import save_hf_siglip  # noqa: E402
from vlp.tokenizers import train_tokenizer  # noqa: E402

ATOL = 1e-5
IMAGE, CONTEXT = 30, 16


def tiny_config(vocab: int = 99, context: int = CONTEXT) -> SiglipConfig:
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=context, pad_token_id=0,
                bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=IMAGE, patch_size=6)
    return SiglipConfig(text_config=text, vision_config=vision)


def reference(config: SiglipConfig, seed: int = 0) -> SiglipModel:
    """Every tensor drawn (HF's init leaves biases and norms at 0/1), norms near 1."""
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and
                                                         name.endswith("weight") else 0.0))
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    return model


def texts(lengths: list[int], vocab: int = 99, seed: int = 1):
    """Rows of words, eos, then padding to the context (as SigLIP's processor pads), and their
    mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, vocab, (length,), generator=generator)
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    return ids, mask


def outputs_hf(model, pixels, ids, mask=None) -> dict:
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    return {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image}


def outputs_vlp(model, pixels, ids, mask=None) -> dict:
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, attention_mask=mask)
        logits = model.scale() * image @ text.T + model.logit_bias
    return {"image": image, "text": text, "logits": logits}


def assert_close(a: dict, b: dict, label: str) -> None:
    diffs = {key: (a[key] - b[key]).abs().max().item() for key in a}
    print(f"max abs diff {label}: {diffs}")
    assert max(diffs.values()) <= ATOL, (label, diffs)


def test_import_and_export_match_siglip_with_and_without_a_mask(tmp_path):
    hf = reference(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    model = load_any(tmp_path / "hf", "hf").model
    config = model.config
    assert (config.loss, config.vision.pool, config.text.pool) == ("siglip", "map", "last")
    pixels, (ids, mask) = torch.randn(3, 3, IMAGE, IMAGE), texts([4, 9, CONTEXT])
    for given in (None, mask):  # SigLIP's processor gives no mask: padding is attended
        assert_close(outputs_hf(hf, pixels, ids, given), outputs_vlp(model, pixels, ids, given),
                     f"hf->vlp, mask={given is not None}")
    assert abs(float(model.logit_bias) + 1.5) < 1e-7 and abs(float(model.logit_scale) - 2) < 1e-7

    convert(tmp_path / "hf", tmp_path / "back", "hf", "hf")
    back = SiglipModel.from_pretrained(tmp_path / "back").eval()
    assert_close(outputs_hf(hf, pixels, ids), outputs_hf(back, pixels, ids), "vlp->hf")
    reread = SiglipImageProcessor.from_pretrained(tmp_path / "back")
    assert reread.size == {"height": IMAGE, "width": IMAGE} and reread.resample == 2


def test_vlp_trained_siglip_goes_to_transformers_pipeline_with_its_tokenizer(tmp_path):
    captions = ["a red circle", "a blue square", "two green stars", "This is a photo of"] * 5
    # the pipeline pads SigLIP's prompts to 64 tokens, SigLIP's context
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=64)
    hf = reference(tiny_config(vocab=tokenizer.vocab_size, context=64), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    model = load_any(tmp_path / "hf", "hf").model
    vlp.save(model, tmp_path / "v", tokenizer=tokenizer)
    convert(tmp_path / "v", tmp_path / "export", "vlp", "hf")

    # the processor's pixels are vlp's (squash, bilinear, mean = std = 0.5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (47, 61, 3),
                                                              dtype=np.uint8))
    # on PIL: 4.57's SiglipImageProcessor is the PIL one; transformers 5 made a torchvision
    # backend that class's default (its resize differs from PIL's by up to 2/255 here) and kept
    # PIL as SiglipImageProcessorPil
    processor = getattr(transformers, "SiglipImageProcessorPil",
                        SiglipImageProcessor).from_pretrained(tmp_path / "export")
    theirs = torch.from_numpy(processor(image, return_tensors="np").pixel_values)
    ours = vlp.image_transform(model, train=False)(image)[None]
    assert (theirs - ours).abs().max().item() <= 1e-5

    labels = ["red circle", "blue square", "green star"]
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "export"))
    square = image.resize((IMAGE, IMAGE))
    scores = {row["label"]: row["score"] for row in pipe(square, candidate_labels=labels)}
    prompts = [f"This is a photo of {label}." for label in labels]
    with torch.no_grad():
        pixels = vlp.image_transform(model, train=False)(square)[None]
        logits = (model.scale() * model.encode_image(pixels) @ model.encode_text(
            tokenizer(prompts)).T + model.logit_bias)
    for label, probability in zip(labels, torch.sigmoid(logits)[0].tolist(), strict=True):
        assert abs(scores[label] - probability) <= ATOL, (label, scores)


def test_plain_clip_is_not_written_as_siglip(tmp_path):
    with pytest.raises(ConfigError, match="cannot be written as HF SiglipModel"):
        save_hf_siglip(vlp.create_model("siglip-tiny"), tmp_path / "out")
