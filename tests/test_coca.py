import dataclasses
import math

import pytest
import torch

import vlp
from vlp.config import config_from_dict, config_to_dict, get_preset
from vlp.errors import ConfigError
from vlp.eval import zero_shot_classifier
from vlp.models import build_model
from vlp.models.coca import CaptionDecoder, CoCa

OPEN_CLIP_COCA_VIT_B_32_PARAMS = 253_560_065  # open_clip 3.3.0 CoCa("coca_ViT-B-32") on meta


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _config(**overrides):
    config = get_preset("coca-tiny")
    return dataclasses.replace(config, **overrides)


def _model(**overrides) -> CoCa:
    return build_model(_config(**overrides))


def _ids(config, batch=3, length=12, real=(5, 8, 12)):
    """bos + random tokens + eos, right-padded with pad_id to ``length``."""
    t = config.text
    ids = torch.full((batch, length), t.pad_id)
    for row, n in enumerate(real[:batch]):
        ids[row, :n] = torch.randint(3, t.vocab_size, (n,))
        ids[row, 0], ids[row, n - 1] = t.bos_id, t.eos_id
    return ids


def _batch(config, batch=3):
    size = config.vision.image_size
    return {"pixels": torch.randn(batch, 3, size, size), "input_ids": _ids(config, batch)}


@pytest.mark.parametrize("overrides", [
    {},
    {"pooler": "shared"},
    {"tie_lm_head": True, "label_smoothing": 0.1},
    {"text_mask": "pad_id_legacy", "pooler": "shared"},
])
def test_forward_backward_every_parameter_gets_a_gradient(overrides):
    model = _model(**overrides)
    out = model(_batch(model.config))
    assert set(out["losses"]) == {"contrastive", "caption"}
    expected = (model.config.contrastive_weight * out["losses"]["contrastive"]
                + model.config.caption_weight * out["losses"]["caption"])
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_constant_init_gives_hand_computed_losses():
    # every weight 1: each tower's output is a constant vector (LayerNorm of a constant row is
    # its bias), so all image / text embeddings coincide and the caption logits are uniform
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    batch = _batch(model.config, batch=4)
    out = model(batch)
    torch.testing.assert_close(out["losses"]["contrastive"], torch.tensor(math.log(4)))
    torch.testing.assert_close(out["losses"]["caption"], torch.tensor(math.log(1024)))
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(4) + 2 * math.log(1024)))
    embed_dim = model.config.embed_dim
    image = model.encode_image(batch["pixels"])
    torch.testing.assert_close(image, torch.full_like(image, embed_dim**-0.5))


def test_every_parameter_is_initialised_including_the_lm_head():
    model = _model()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    head = model.lm_head.weight
    width = model.config.text.width
    assert head.count_nonzero() == head.numel()
    assert abs(head.std().item() - width**-0.5) < 0.1 * width**-0.5  # open_clip's intended std
    tied = _model(tie_lm_head=True)
    assert tied.lm_head.weight.data_ptr() == tied.text.token_embed.weight.data_ptr()


def test_poolers_paper_and_open_clip_layouts():
    pixels = torch.randn(2, 3, 64, 64)
    separate, shared = _model(), _model(pooler="shared")
    assert separate.forward_image(pixels).tokens.shape == (2, 32, 128)  # 1 + 32 queries
    assert shared.forward_image(pixels).tokens.shape == (2, 31, 128)  # query 0 is contrastive
    assert shared.contrastive_pooler is None and separate.contrastive_pooler.query.shape == (1, 128)


def test_encoders_are_normalised_and_the_cls_ignores_padding():
    model = _model().eval()
    config = model.config
    batch = _batch(config)
    torch.testing.assert_close(model.encode_image(batch["pixels"]).norm(dim=-1), torch.ones(3))
    text = model.encode_text(batch["input_ids"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    junk = batch["input_ids"].clone()  # other tokens after each eos: still padding
    pad = ~model.real_tokens(junk)
    junk[pad] = torch.randint(3, config.text.vocab_size, (int(pad.sum()),))
    torch.testing.assert_close(model.encode_text(junk), text, atol=1e-5, rtol=1e-5)
    longer = torch.cat([batch["input_ids"], torch.zeros(3, 20, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.encode_text(longer), text, atol=1e-5, rtol=1e-5)
    real = ~pad
    real[:, -1] = False  # the last position predicts beyond the text
    logits, junk_logits = (model.caption_logits(batch["pixels"], ids)
                           for ids in (batch["input_ids"], junk))
    torch.testing.assert_close(junk_logits[real], logits[real], atol=1e-5, rtol=1e-5)


def test_zero_shot_eval_code_runs_unchanged():
    model = _model().eval()
    config = model.config

    def tokenizer(texts, context_length=None):
        return _ids(config, batch=len(texts), length=config.text.context_length,
                    real=[min(len(t), 30) for t in texts])

    weights = zero_shot_classifier(model, tokenizer, ["red circle", "blue square"],
                                   ["a photo of a {}."], progress=False)
    assert weights.shape == (config.embed_dim, 2)


@pytest.mark.parametrize("text_mask", ["cls", "pad_id", "pad_id_legacy"])
def test_step_decoder_matches_full_recompute(text_mask):
    # prefill a prefix, then step token by token: the logits equal prefilling the longer text,
    # including pad_id tokens inside the text (the open_clip masks hide them from later tokens)
    model = _model(text_mask=text_mask).eval()
    ids = _ids(model.config, batch=2, length=10, real=(6, 10))
    ids[0, 2] = model.config.text.pad_id
    with torch.no_grad():
        decoder = CaptionDecoder(model, model.forward_image(torch.randn(2, 3, 64, 64)).tokens)
        rows = torch.arange(2)
        logits, state = decoder.prefill(ids[:, :3], rows)
        for end in range(4, 11):
            logits, state = decoder.step(ids[:, end - 1 : end], state)
            full, _ = decoder.prefill(ids[:, :end], rows)
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        teacher = model.caption_logits(torch.randn(2, 3, 64, 64), ids)
    assert teacher.shape == (2, 10, model.config.text.vocab_size)


@pytest.mark.parametrize("overrides", [{}, {"text_mask": "pad_id_legacy", "pooler": "shared"}])
def test_generate_cache_equals_no_cache_and_one_beam_equals_greedy(overrides):
    model = _model(**overrides).eval()
    pixels = torch.randn(3, 3, 64, 64)
    greedy = model.generate(pixels, max_new_tokens=8)
    assert greedy.shape[0] == 3 and greedy.shape[1] <= 8
    assert torch.equal(greedy, model.generate(pixels, max_new_tokens=8, use_cache=False))
    assert torch.equal(greedy, model.generate(pixels, max_new_tokens=8, num_beams=1))
    beam = model.generate(pixels, max_new_tokens=8, num_beams=3, length_penalty=0.6)
    assert torch.equal(beam, model.generate(pixels, max_new_tokens=8, num_beams=3,
                                            length_penalty=0.6, use_cache=False))
    generator = torch.Generator().manual_seed(0)
    sampled = model.generate(pixels, max_new_tokens=8, do_sample=True, top_p=0.9,
                             generator=generator)
    assert sampled.shape[0] == 3


def test_generate_checks_room_and_restores_training_mode():
    model = _model()
    pixels = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(pixels, max_new_tokens=32)  # bos + 32 > context_length 32
    assert model.generate(pixels, max_new_tokens=31).shape[1] <= 31
    assert model.training


def test_configs_round_trip_validate_and_match_open_clip_size(tmp_path):
    for name in ("coca-tiny", "coca-vit-b-32"):
        config = get_preset(name)
        assert config_from_dict(config_to_dict(config)) == config
    for bad in ({"pooler": "cascade"}, {"text_mask": "nope"},
                {"pooler": "shared", "caption_queries": 1}):
        with pytest.raises(ConfigError):
            _model(**bad)
    with torch.device("meta"):
        big = vlp.create_model("coca-vit-b-32")
    assert sum(p.numel() for p in big.parameters()) == OPEN_CLIP_COCA_VIT_B_32_PARAMS


def test_save_and_load_round_trip_with_a_tied_head(tmp_path):
    model = _model(tie_lm_head=True).eval()
    vlp.save(model, tmp_path / "coca")
    loaded = vlp.load(tmp_path / "coca").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.text.token_embed.weight.data_ptr()
    batch = _batch(model.config)
    torch.testing.assert_close(loaded(batch)["loss"], model(batch)["loss"])


def test_grad_checkpointing_gives_the_same_gradients():
    model = _model()
    batch = _batch(model.config)
    model(batch)["loss"].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(batch)["loss"].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-5, rtol=1e-4)


def test_learns_a_few_pairs_and_captions_them():
    # 4 random images with their own captions: both losses fall and greedy decoding then
    # reproduces each training caption
    model = _model()
    config = model.config
    batch = {"pixels": torch.randn(4, 3, 64, 64),
             "input_ids": _ids(config, batch=4, length=10, real=(4, 5, 6, 7))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        out = model(batch)
        first = first or {k: v.item() for k, v in out["losses"].items()}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    last = {k: v.item() for k, v in model(batch)["losses"].items()}
    assert last["caption"] < 0.1 * first["caption"]
    assert last["contrastive"] < 0.1 * first["contrastive"]
    captions = model.generate(batch["pixels"], max_new_tokens=9)
    assert torch.equal(captions, batch["input_ids"][:, 1:7])  # eos included, pad after
