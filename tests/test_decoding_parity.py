"""Decoding equals transformers' token for token on many random tiny BLIPs, with the settings
BLIP and LAVIS evaluate with (beam 3, a minimum length, repetition penalty), for beam search
and greedy, captions and VQA answers. Beam search normalises the logits first and then applies
the penalty and the minimum length, as transformers does; with the penalty on raw logits a third
to a half of such captions differed."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering  # noqa: E402

from test_interop_hf_blip import SEP, pixels, reference, texts, until_eos  # noqa: E402
from vlp.interop.hf_blip import load_hf_blip  # noqa: E402

MODELS = 30
SETTINGS = [
    {"num_beams": 3, "min_new_tokens": 5, "repetition_penalty": 1.15},  # BLIP's captioning
    {"num_beams": 3, "min_new_tokens": 2, "repetition_penalty": 1.5, "length_penalty": 0.6},
    {"num_beams": 1, "min_new_tokens": 5, "repetition_penalty": 1.15},
]


def _compare(hf_rows, ours, skip) -> tuple[int, int]:
    """(rows equal, rows finished by eos) of one batch."""
    expected = [until_eos(row[skip:]) for row in hf_rows]
    got = [until_eos(row) for row in ours]
    return (sum(e == g for e, g in zip(expected, got)),
            sum(SEP in row for row in expected))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in
                                                                     s.items()))
def test_captions_equal_transformers_on_many_random_blips(tmp_path, settings, one_thread):
    equal = finished = rows = 0
    for seed in range(MODELS):
        hf = reference(BlipForConditionalGeneration, seed=100 + seed)
        hf.save_pretrained(tmp_path / f"hf{seed}")
        model, _ = load_hf_blip(tmp_path / f"hf{seed}")
        pix, (ids, _) = pixels(seed=seed), texts([9, 5, 12], seed=seed)
        prompt = ids[:, :3]
        hf_prompt = torch.cat([prompt, torch.full((3, 1), SEP)], dim=1)  # HF drops the last id
        with torch.no_grad():
            hf_rows = hf.generate(pix, input_ids=hf_prompt, max_new_tokens=10, **settings)
        ours = model.generate(pix, prompt, max_new_tokens=10, **settings)
        same, done = _compare(hf_rows, ours, prompt.shape[1])
        equal, finished, rows = equal + same, finished + done, rows + 3
    assert equal == rows, f"{rows - equal} of {rows} captions differ from transformers"
    assert finished >= rows // 4, "too few rows ended with eos; the comparison would be weak"


@pytest.mark.parametrize("settings", SETTINGS[::2], ids=["beam3", "greedy"])
def test_vqa_answers_equal_transformers_on_many_random_blips(tmp_path, settings, one_thread):
    settings = {**settings, "min_new_tokens": 2}
    equal = rows = 0
    for seed in range(MODELS):
        hf = reference(BlipForQuestionAnswering, seed=200 + seed)
        hf.save_pretrained(tmp_path / f"hf{seed}")
        model, _ = load_hf_blip(tmp_path / f"hf{seed}")
        pix, (question, mask) = pixels(seed=seed), texts([8, 5, 11], seed=seed)
        with torch.no_grad():
            hf_rows = hf.generate(input_ids=question, pixel_values=pix, attention_mask=mask,
                                  max_new_tokens=8, **settings)
        ours = model.answer(pix, question, mask, max_new_tokens=8, **settings)
        same, _ = _compare(hf_rows, ours, 1)
        equal, rows = equal + same, rows + 3
    assert equal == rows, f"{rows - equal} of {rows} answers differ from transformers"


# BLIP's nucleus sampling (CapFilt): top-p 0.9 after transformers' default top-k 50, repetition
# penalty 1.1, a minimum length; and the same processors at other strengths.
SAMPLING = [
    {"top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, "min_new_tokens": 4},
    {"top_k": 5, "top_p": 0.6, "repetition_penalty": 1.5, "min_new_tokens": 6,
     "temperature": 0.7},
]


SAMPLED_MODELS = 15


@pytest.mark.parametrize("settings", SAMPLING, ids=["blip", "strong"])
def test_nucleus_samples_equal_transformers_under_one_seed(tmp_path, settings, one_thread):
    """vlp applies transformers' processors in its order (repetition penalty, minimum length,
    temperature, top-k, top-p) and draws with one torch.multinomial per step over the same
    probabilities, so the same seed gives the same tokens."""
    equal = finished = rows = 0
    for seed in range(SAMPLED_MODELS):
        hf = reference(BlipForConditionalGeneration, seed=300 + seed)
        hf.save_pretrained(tmp_path / f"hf{seed}")
        model, _ = load_hf_blip(tmp_path / f"hf{seed}")
        pix, (ids, _) = pixels(seed=seed), texts([9, 5, 12], seed=seed)
        prompt = ids[:, :3]
        hf_prompt = torch.cat([prompt, torch.full((3, 1), SEP)], dim=1)  # HF drops the last id
        torch.manual_seed(seed)
        with torch.no_grad():
            hf_rows = hf.generate(pix, input_ids=hf_prompt, max_new_tokens=10, do_sample=True,
                                  **settings)
        torch.manual_seed(seed)
        ours = model.generate(pix, prompt, max_new_tokens=10, do_sample=True, **settings)
        same, done = _compare(hf_rows, ours, prompt.shape[1])
        equal, finished, rows = equal + same, finished + done, rows + 3
    assert equal == rows, f"{rows - equal} of {rows} samples differ from transformers"
    assert finished >= rows // 8, "too few rows ended with eos; the comparison would be weak"


def test_sampling_draws_differ_between_seeds(tmp_path, one_thread):
    """The parity above is not two greedy decodes: other seeds draw other captions."""
    hf = reference(BlipForConditionalGeneration, seed=300)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_hf_blip(tmp_path / "hf")
    pix, (ids, _) = pixels(seed=0), texts([9, 5, 12], seed=0)
    draws = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = model.generate(pix, ids[:, :3], max_new_tokens=10, do_sample=True, **SAMPLING[0])
        draws.add(tuple(out.flatten().tolist()))
    assert len(draws) > 1
