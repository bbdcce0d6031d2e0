"""Exports used through the clients people already have: transformers' processors with
``generate`` for a BLIP captioner that vlp trained, compared with vlp's own decoding."""

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import vlp  # noqa: E402
from vlp.tokenizers import train_tokenizer  # noqa: E402


def test_blip_captioner_export_runs_with_blip_processor_and_generate(tmp_path):
    captions = ["a picture of a red circle", "a picture of two blue squares",
                "a green star on the left"] * 10
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=32)
    torch.manual_seed(0)
    model = vlp.create_model("blip-tiny").eval()
    with torch.no_grad():  # a nudge on eos so that some captions end before the limit
        model.lm_head.bias[model.config.text.eos_id] += 4.0
    vlp.save(model, tmp_path / "v", tokenizer=tokenizer)
    vlp.convert(tmp_path / "v", tmp_path / "hf", src_format="vlp", dst_format="hf",
                architecture="BlipForConditionalGeneration")

    processor = transformers.BlipProcessor.from_pretrained(tmp_path / "hf")
    hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
              for _ in range(3)]
    prompt = "a picture of"
    inputs = processor(images=images, text=[prompt] * 3, return_tensors="pt")
    pixels = torch.stack([vlp.image_transform(model)(image) for image in images])
    assert (inputs.pixel_values - pixels).abs().max().item() <= 1e-5

    prompt_ids = tokenizer([prompt] * 3)
    prompt_ids = prompt_ids[:, :int((prompt_ids[0] != tokenizer.pad_id).sum()) - 1]  # no eos
    assert torch.equal(inputs.input_ids[:, :-1], prompt_ids)
    eos, ended = model.config.text.eos_id, 0
    for beams in (1, 3):
        with torch.no_grad():
            theirs = hf.generate(**inputs, max_new_tokens=12, num_beams=beams)
            ours = model.generate(pixels, prompt_ids, max_new_tokens=12, num_beams=beams,
                                  early_stopping=False)
        # HF returns the prompt ([DEC] + words) then the new tokens; vlp the new tokens
        new = theirs[:, prompt_ids.shape[1]:]
        assert [until_eos(row, eos) for row in new] == [until_eos(row, eos) for row in ours]
        texts = processor.batch_decode(new, skip_special_tokens=True)
        assert [t.strip() for t in texts] == [t.strip() for t in tokenizer.batch_decode(ours)]
        ended += sum(eos in row.tolist() for row in ours)
    assert ended, "no caption ended with eos; the test would be weak"


def until_eos(row: torch.Tensor, eos: int) -> list[int]:
    ids = row.tolist()
    return ids[:ids.index(eos) + 1] if eos in ids else ids
