"""Parity of vlp's BLIP-2 with HF transformers' BLIP-2 classes: import, export, generation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    OPTConfig,
    T5Config,
)

import vlp  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop.hf_blip2 import load_hf_blip2, save_hf_blip2  # noqa: E402

ATOL = 1e-5
IMAGE, QUERIES, IMAGE_TOKEN = 30, 6, 4
LLM_VOCAB, EOS, PAD, BOS = 99, 2, 1, 0


def tiny_hf_config(llm: str | None, qformer_width: int = 32, qformer_layers: int = 3,
                   queries: int = QUERIES) -> Blip2Config:
    """The HF tester's widths (hidden 32, intermediate 37, 4 heads) for vision and Q-Former;
    a tiny OPT or T5 (vocab 99, eos 2)."""
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=IMAGE, patch_size=6)
    qformer = dict(vocab_size=99, hidden_size=qformer_width, num_hidden_layers=qformer_layers,
                   num_attention_heads=4 if qformer_width == 32 else 12,
                   intermediate_size=37 if qformer_width == 32 else 3072,
                   max_position_embeddings=40, encoder_hidden_size=32,
                   use_qformer_text_input=llm is None)
    text = None
    if llm == "opt":
        text = OPTConfig(vocab_size=LLM_VOCAB, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=24, eos_token_id=EOS, pad_token_id=PAD,
                         bos_token_id=BOS, max_position_embeddings=64).to_dict()
    elif llm == "t5":
        text = T5Config(vocab_size=LLM_VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                        num_decoder_layers=2, num_heads=4, eos_token_id=EOS, pad_token_id=PAD,
                        decoder_start_token_id=PAD, dense_act_fn="gelu",
                        feed_forward_proj="gated-gelu").to_dict()
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=queries, image_text_hidden_size=16,
                       image_token_index=IMAGE_TOKEN if llm else None)


def reference(cls: type, config: Blip2Config, seed: int = 0, std: float = 0.1,
              eos_scale: float = 1.0) -> nn.Module:
    """A random HF model with every tensor drawn (HF's own init leaves the vision tower at
    1e-10 and every bias at 0, which would hide mapping mistakes); ``eos_scale`` stretches the
    LLM's eos output row so that some generations end."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * std)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
        if eos_scale != 1.0:
            model.language_model.get_output_embeddings().weight[EOS] *= eos_scale
    return model


def llm_texts(lengths: list[int], seed: int = 1, bos: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded LLM token rows (``BOS words`` for OPT) and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, LLM_VOCAB, (length,), generator=generator)
        if bos:
            ids[row, 0] = BOS
        mask[row, :length] = 1
    return ids, mask


def with_image_tokens(ids: torch.Tensor, mask: torch.Tensor, queries: int = QUERIES
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's input layout: ``queries`` ``<image>`` ids before the text."""
    image = torch.full((ids.shape[0], queries), IMAGE_TOKEN, dtype=torch.long)
    return torch.cat([image, ids], 1), torch.cat([torch.ones_like(image), mask], 1)


def pixels(batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor, label: str) -> None:
    diff = (a - b).abs().max().item()
    print(f"max abs diff {label}: {diff:.3g}")  # shown with -s; collected for the closing note
    assert diff <= ATOL, (label, diff)


def until_eos(row: torch.Tensor) -> list[int]:
    tokens = row.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


# -- OPT ------------------------------------------------------------------------------------------

def test_opt_logits_and_generation_match_hf(tmp_path):
    hf = reference(Blip2ForConditionalGeneration, tiny_hf_config("opt"), eos_scale=10)
    hf.save_pretrained(tmp_path / "hf")
    pix, (ids, mask) = pixels(), llm_texts([7, 4, 9])
    model, _ = load_hf_blip2(tmp_path / "hf")
    config = model.config
    assert (config.llm, config.text_parts, config.vision_layer) == ("causal", False, -1)
    hf_ids, hf_mask = with_image_tokens(ids, mask)
    with torch.no_grad():
        expected = hf(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask).logits
        ours = model.llm_logits(pix, ids, mask)
    assert_close(expected[:, QUERIES:], ours, "hf->vlp OPT logits")

    prompt, prompt_mask = llm_texts([3, 3, 3], seed=3)
    hf_prompt, hf_prompt_mask = with_image_tokens(prompt, prompt_mask)
    finished = 0
    for beams, penalty in ((1, 1.0), (3, -1.0)):
        with torch.no_grad():
            hf_rows = hf.generate(pix, input_ids=hf_prompt, attention_mask=hf_prompt_mask,
                                  max_new_tokens=12, num_beams=beams, length_penalty=penalty)
        rows = model.generate(pix, prompt, prompt_mask, max_new_tokens=12, num_beams=beams,
                              length_penalty=penalty)
        expected_rows = [until_eos(r) for r in hf_rows[:, hf_prompt.shape[1]:]]
        assert [until_eos(r) for r in rows] == expected_rows, f"OPT beams={beams}"
        finished += sum(EOS in r for r in expected_rows)
    assert finished, "no generation ended with eos; the test would be weak"

    save_hf_blip2(model, tmp_path / "back")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        back = reloaded(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask).logits
    assert_close(expected, back, "vlp->hf OPT logits")


# -- T5 -------------------------------------------------------------------------------------------

def test_t5_logits_and_generation_match_hf(tmp_path):
    hf = reference(Blip2ForConditionalGeneration, tiny_hf_config("t5"), seed=4, eos_scale=3)
    hf.save_pretrained(tmp_path / "hf")
    pix = pixels(seed=5)
    (ids, mask), (labels, _) = llm_texts([5, 3, 6], seed=6, bos=False), llm_texts([4, 6, 2],
                                                                                  seed=7)
    labels = labels.masked_fill(labels == PAD, -100)
    model, _ = load_hf_blip2(tmp_path / "hf")
    assert model.config.llm == "seq2seq"
    hf_ids, hf_mask = with_image_tokens(ids, mask)
    with torch.no_grad():
        expected = hf(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask,
                      labels=labels).logits
        ours = model.llm_logits(pix, ids, mask, decoder_labels=labels)
    assert_close(expected, ours, "hf->vlp T5 logits")

    finished = 0
    for beams, penalty in ((1, 1.0), (3, -1.0)):
        with torch.no_grad():
            hf_rows = hf.generate(pix, input_ids=hf_ids, attention_mask=hf_mask,
                                  max_new_tokens=10, num_beams=beams, length_penalty=penalty)
        rows = model.generate(pix, ids, mask, max_new_tokens=10, num_beams=beams,
                              length_penalty=penalty)
        expected_rows = [until_eos(r) for r in hf_rows[:, 1:]]
        assert [until_eos(r) for r in rows] == expected_rows, f"T5 beams={beams}"
        finished += sum(EOS in r for r in expected_rows)
    assert finished, "no generation ended with eos; the test would be weak"

    save_hf_blip2(model, tmp_path / "back")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        back = reloaded(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask,
                        labels=labels).logits
    assert_close(expected, back, "vlp->hf T5 logits")


# -- retrieval ------------------------------------------------------------------------------------

def qformer_texts(lengths: list[int], seed: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, 98, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def retrieval_outputs(model, pix, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, Blip2ForImageTextRetrieval):
            return {"itm": model(pixel_values=pix, input_ids=ids, attention_mask=mask,
                                 use_image_text_matching_head=True).logits_per_image,
                    "itc": model(pixel_values=pix, input_ids=ids, attention_mask=mask,
                                 use_image_text_matching_head=False).logits_per_image}
        return {"itm": model.itm_logits(pix, ids, mask),
                "itc": model.itc_similarity(pix, ids, mask)}


def test_retrieval_import_and_export_match_hf(tmp_path):
    hf = reference(Blip2ForImageTextRetrieval, tiny_hf_config(None), seed=9)
    hf.save_pretrained(tmp_path / "hf")
    pix, (ids, mask) = pixels(seed=10), qformer_texts([9, 5, 12])
    model, _ = load_hf_blip2(tmp_path / "hf")
    config = model.config
    assert (config.text_parts, config.retrieval_heads, config.lm_head) == (True, True, False)
    expected = retrieval_outputs(hf, pix, ids, mask)
    ours = retrieval_outputs(model, pix, ids, mask)
    assert expected["itc"].shape == (3, 3) and expected["itm"].shape == (3, 2)
    for key in ("itm", "itc"):
        assert_close(expected[key], ours[key], f"hf->vlp retrieval {key}")

    save_hf_blip2(model, tmp_path / "back")
    reloaded = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    back = retrieval_outputs(reloaded, pix, ids, mask)
    for key in ("itm", "itc"):
        assert_close(expected[key], back[key], f"vlp->hf retrieval {key}")


def test_imported_model_saves_and_loads_as_vlp(tmp_path):
    """An imported stage-2 model (LLM inline, no path to reference) round-trips through
    vlp.save / vlp.load with every weight stored."""
    hf = reference(Blip2ForConditionalGeneration, tiny_hf_config("opt"), seed=11)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_hf_blip2(tmp_path / "hf")
    vlp.save(model, tmp_path / "vlp")
    loaded = vlp.load(tmp_path / "vlp").eval()
    pix, (ids, mask) = pixels(seed=12), llm_texts([5, 6, 2], seed=13)
    with torch.no_grad():
        assert_close(model.llm_logits(pix, ids, mask), loaded.llm_logits(pix, ids, mask),
                     "vlp save/load OPT logits")


@pytest.mark.slow
@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_real_qformer_shape(llm, large_tmp_path):
    """The paper's Q-Former (BERT-base: width 768, 12 layers, 12 heads, 32 queries, cross-
    attention every 2nd layer) between a small vision tower and a tiny LLM."""
    hf = reference(Blip2ForConditionalGeneration, tiny_hf_config(llm, qformer_width=768,
                                                                 qformer_layers=12,
                                                                 queries=32), seed=14,
                   std=0.02)
    hf.save_pretrained(large_tmp_path / "hf")
    pix = pixels(batch=2, seed=15)
    ids, mask = llm_texts([6, 4], seed=16, bos=llm == "opt")
    hf_ids, hf_mask = with_image_tokens(ids, mask, queries=32)
    labels = llm_texts([4, 3], seed=17)[0] if llm == "t5" else None
    with torch.no_grad():
        expected = hf(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask,
                      labels=labels).logits
        hf_rows = hf.generate(pix, input_ids=hf_ids, attention_mask=hf_mask, max_new_tokens=8)
    del hf
    model, _ = load_hf_blip2(large_tmp_path / "hf")
    with torch.no_grad():
        ours = model.llm_logits(pix, ids, mask, decoder_labels=labels)
        rows = model.generate(pix, ids, mask, max_new_tokens=8)
    if llm == "opt":
        expected, hf_rows = expected[:, 32:], hf_rows[:, hf_ids.shape[1]:]
    else:
        hf_rows = hf_rows[:, 1:]
    assert_close(expected, ours, f"hf->vlp real Q-Former shape, {llm} logits")
    assert [until_eos(r) for r in rows] == [until_eos(r) for r in hf_rows]


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture()
def saved_retrieval(tmp_path):
    reference(Blip2ForImageTextRetrieval, tiny_hf_config(None)).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_key_and_bad_shape_are_named(saved_retrieval):
    weights_path = saved_retrieval / "model.safetensors"
    weights = load_file(weights_path)
    key = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    del weights[key]
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape "
                                              r"\(32, 32\)\)"):
        load_hf_blip2(saved_retrieval)
    weights[key] = torch.zeros(32, 32)
    weights["query_tokens"] = torch.zeros(1, QUERIES + 1, 32)
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match=r"query_tokens' has shape \(1, 7, 32\), "
                                              r"expected \(1, 6, 32\)"):
        load_hf_blip2(saved_retrieval)


def test_unknown_architecture_and_unexportable_models(saved_retrieval, tmp_path):
    config = json.loads((saved_retrieval / "config.json").read_text())
    config["architectures"] = ["Blip2Model"]
    (saved_retrieval / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture.*Blip2Model"):
        load_hf_blip2(saved_retrieval)
    model = vlp.create_model("blip2-tiny")
    model.config.ln_vision = False
    with pytest.raises(ConfigError, match="ln_vision=False"):
        save_hf_blip2(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vlp_convert_goes_both_ways(tmp_path):
    hf = reference(Blip2ForImageTextRetrieval, tiny_hf_config(None), seed=18)
    hf.save_pretrained(tmp_path / "hf")
    vlp.convert(tmp_path / "hf", tmp_path / "vlp", src_format="hf", dst_format="vlp")
    vlp.convert(tmp_path / "vlp", tmp_path / "back", src_format="vlp", dst_format="hf")
    reloaded = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    pix, (ids, mask) = pixels(seed=19), qformer_texts([4, 7, 3], seed=20)
    expected, back = (retrieval_outputs(m, pix, ids, mask) for m in (hf, reloaded))
    for key in ("itm", "itc"):
        assert_close(expected[key], back[key], f"vlp convert round trip {key}")
