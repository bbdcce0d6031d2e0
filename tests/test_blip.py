"""BLIP: parameter sharing, the three text modes, generation, momentum distillation, ITM."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlp
from vlp.config import get_preset
from vlp.errors import ConfigError
from vlp.losses import distilled_contrastive_loss, sample_hard_negatives
from vlp.models import build_model
from vlp.nn.momentum import FeatureQueue


def tiny(**overrides):
    config = get_preset("blip-tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return build_model(config).eval()


def batch(config, rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = config.text
    ids = torch.randint(3, 1000, (rows, 10), generator=generator)
    lengths = [10, 6, 8, 9][:rows]
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
    ids[:, 0] = text.bos_id
    for row, length in enumerate(lengths):
        ids[row, length - 1] = text.eos_id
    ids = ids.masked_fill(~mask, text.pad_id)
    size = config.vision.image_size
    return {"pixels": torch.randn(rows, 3, size, size, generator=generator), "input_ids": ids,
            "attention_mask": mask}


# -- parameter sharing (paper Table 3) -------------------------------------------------------------

def _self_attention_params(width: int, layers: int) -> int:
    # per layer: fused qkv + output projection (weights and biases) + the post-attention LN
    return layers * (4 * width * width + 4 * width + 2 * width)


@pytest.mark.parametrize("share, millions", [("all_but_sa", 252), ("all", 224), ("none", 361)])
def test_sharing_has_the_paper_parameter_structure(share, millions):
    config = get_preset("blip-vit-b-16")
    config.share = share
    with torch.device("meta"):
        model = build_model(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions  # Table 3
    encoder_ids = {id(p) for p in model.text_encoder.parameters()}
    own = {name: p for name, p in model.text_decoder.named_parameters()
           if id(p) not in encoder_ids}
    own_count = sum(p.numel() for p in own.values())
    if share == "all_but_sa":
        assert all(name.split(".")[2] in ("attn", "norm1") for name in own), sorted(own)
        assert own_count == _self_attention_params(768, 12)  # 28.4M: Table 3's 252M - 224M
    elif share == "all":
        assert own_count == 0
    else:
        assert own_count == sum(p.numel() for p in model.text_encoder.parameters())


def test_shared_modules_survive_save_and_load(tmp_path):
    model = tiny()
    vlp.save(model, tmp_path / "blip")
    loaded = vlp.load(tmp_path / "blip").eval()
    for m in (model, loaded):
        encoder_block, decoder_block = m.text_encoder.blocks[1], m.text_decoder.blocks[1]
        assert decoder_block.mlp is encoder_block.mlp
        assert decoder_block.cross_attn is encoder_block.cross_attn
        assert decoder_block.attn is not encoder_block.attn
    b = batch(model.config)
    with torch.no_grad():
        for method in ("itm_logits", "caption_logits"):
            args = (b["pixels"], b["input_ids"], b["attention_mask"])
            assert torch.equal(getattr(model, method)(*args), getattr(loaded, method)(*args))


# -- the three modes -------------------------------------------------------------------------------

def test_unimodal_encoder_is_bidirectional_and_ignores_padding():
    model = tiny()
    b = batch(model.config)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
        longer = torch.cat([ids, torch.zeros_like(ids[:, :5])], dim=1)
        torch.testing.assert_close(model.encode_text(longer), text, atol=1e-6, rtol=0)
        changed = ids.clone()
        changed[0, 5] += 1  # a later token changes the [CLS] state: bidirectional
        assert not torch.allclose(model.encode_text(changed, mask)[0], text[0])
        other_images = torch.randn_like(b["pixels"])
        sims = model.itc_similarity(b["pixels"], ids, mask)
        torch.testing.assert_close(sims, model.encode_image(b["pixels"]) @ text.T)
        assert not torch.allclose(model.itm_logits(other_images, ids, mask),
                                  model.itm_logits(b["pixels"], ids, mask))


def test_decoder_is_causal_and_starts_with_dec():
    model = tiny()
    b = batch(model.config)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        logits = model.caption_logits(b["pixels"], ids, mask)
        assert logits.shape == (3, 10, model.config.text.vocab_size)
        changed = ids.clone()
        changed[:, 6] = 7
        later = model.caption_logits(b["pixels"], changed, mask)
        torch.testing.assert_close(later[:, :6], logits[:, :6])
        assert not torch.allclose(later[:, 6:], logits[:, 6:])
        first = ids.clone()
        first[:, 0] = 5  # replaced by [DEC] anyway (replace_first_token)
        torch.testing.assert_close(model.caption_logits(b["pixels"], first, mask), logits)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3),
                                     dict(do_sample=True, top_p=0.9)])
def test_cached_generation_equals_recomputation(options):
    model = tiny()
    b = batch(model.config)
    prompt = b["input_ids"][:, :3]
    runs = []
    for use_cache in (True, False):
        extra = {"generator": torch.Generator().manual_seed(1)} if options.get("do_sample") else {}
        runs.append(model.generate(b["pixels"], prompt, max_new_tokens=8, use_cache=use_cache,
                                   **options, **extra))
        runs.append(model.answer(b["pixels"], b["input_ids"], b["attention_mask"],
                                 max_new_tokens=5, use_cache=use_cache, **options, **extra))
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])
    assert runs[0].shape[0] == 3 and runs[0].shape[1] <= 8


def test_answers_ignore_question_padding_unless_told():
    model = tiny()
    b = batch(model.config)
    question, mask = b["input_ids"], b["attention_mask"]
    answer = torch.tensor([[0, 40, 41]] * 3)
    padded = torch.cat([question, torch.zeros_like(question[:, :4])], dim=1)
    with torch.no_grad():
        logits = model.vqa_answer_logits(b["pixels"], question, answer, mask)
        torch.testing.assert_close(model.vqa_answer_logits(b["pixels"], padded, answer),
                                   logits, atol=1e-5, rtol=0)
        model.config.mask_question_padding = "never"
        assert not torch.allclose(model.vqa_answer_logits(b["pixels"], padded, answer), logits)


# -- pretraining objectives ------------------------------------------------------------------------

def test_training_step_reports_each_objective_and_masks_padding_and_prompt():
    model = tiny(lm_prompt_tokens=2).train()
    b = batch(model.config)
    features = model.features(b)
    # LM targets: tokens after [DEC] that are real, minus the 2 prompt tokens
    assert features["lm_tokens"].tolist() == [10 - 1 - 2, 6 - 1 - 2, 8 - 1 - 2]
    out = model.loss(features)
    assert set(out["losses"]) == {"itc", "itm", "lm"}
    total = sum(out["losses"].values())
    assert math.isclose(out["loss"].item(), total.item(), rel_tol=1e-6)


def test_momentum_encoders_follow_the_ema_and_queue_wraps_around():
    model = tiny(queue_size=5, momentum=0.9).train()
    twin = model.momentum_encoders["text_proj"]
    assert not list(twin.parameters())  # buffers: the optimizer never sees them
    with torch.no_grad():
        model.text_proj.weight.add_(1.0)  # student moves away from its copy
    before = twin.weight.clone()
    model.loss(model.features(batch(model.config)))
    torch.testing.assert_close(twin.weight, 0.9 * before + 0.1 * model.text_proj.weight)
    assert int(model.queue.ptr) == 3
    queue = FeatureQueue(5, 2, streams=("image",))
    first, second = torch.ones(3, 2), torch.full((3, 2), 2.0)
    queue.enqueue(image=first)
    queue.enqueue(image=second)  # rows 3, 4 then 0
    assert int(queue.ptr) == 1 and int(queue.batches) == 2
    assert queue.get("image")[[3, 4, 0]].eq(2.0).all() and queue.get("image")[[1, 2]].eq(1).all()
    with pytest.raises(ConfigError, match="does not fit a queue of 5"):
        queue.enqueue(image=torch.ones(6, 2))


def test_distillation_targets():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    image_bank = torch.cat([image, F.normalize(torch.randn(6, 8), dim=-1)])
    text_bank = torch.cat([text, F.normalize(torch.randn(6, 8), dim=-1)])
    scale = torch.tensor(1 / 0.07)
    hard = distilled_contrastive_loss(image, text, image_bank, text_bank, scale, alpha=0.0)
    targets = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(hard.logits_per_image, targets)
                      + F.cross_entropy(hard.logits_per_text, targets))
    torch.testing.assert_close(hard.loss, expected)
    # alpha=1 with the student equal to the momentum encoder: targets are the student's own
    # softmax, so the loss is its entropy
    soft = distilled_contrastive_loss(image, text, image_bank, text_bank, scale, alpha=1.0)
    entropy = [-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
               for logits in (soft.logits_per_image, soft.logits_per_text)]
    torch.testing.assert_close(soft.loss, 0.5 * (entropy[0] + entropy[1]))


def test_alpha_ramps_over_warmup_steps():
    model = tiny(alpha_warmup_steps=4).train()
    assert model.alpha() == 0.0
    model.loss(model.features(batch(model.config)))
    assert math.isclose(model.alpha(), 0.4 * 1 / 4)


def test_hard_negatives_never_pick_the_positive_and_follow_similarity():
    similarity = torch.tensor([[9.0, 1.0, 50.0], [50.0, 9.0, 1.0], [1.0, 50.0, 9.0]])
    image_per_text, text_per_image = sample_hard_negatives(similarity)
    assert image_per_text.tolist() == [1, 2, 0]  # for text j: the image most like it
    assert text_per_image.tolist() == [2, 0, 1]
    draws = torch.stack([sample_hard_negatives(torch.zeros(4, 4))[0] for _ in range(50)])
    assert not (draws == torch.arange(4)).any()


def test_hard_negatives_over_every_ranks_candidates_skip_this_ranks_positives():
    # rank 1 of 2 with 2 pairs each: its rows' positives are candidate columns 2 and 3
    i2t = torch.tensor([[50.0, 1.0, 9.0, 1.0], [1.0, 1.0, 1.0, 9.0]])
    t2i = torch.tensor([[1.0, 50.0, 9.0, 1.0], [1.0, 1.0, 1.0, 9.0]])
    image_per_text, text_per_image = sample_hard_negatives(i2t, t2i, offset=2)
    assert text_per_image[0] == 0 and image_per_text[0] == 1
    draws = torch.stack([torch.stack(sample_hard_negatives(torch.zeros(2, 4), torch.zeros(2, 4),
                                                           offset=2)) for _ in range(100)])
    assert not (draws == torch.tensor([2, 3])).any()  # never the positive
    assert {0, 1} <= set(draws.flatten().tolist())  # the other rank's pairs are drawn
    with pytest.raises(ValueError, match="similarity_t2i"):
        sample_hard_negatives(i2t, t2i[:, :3], offset=2)


# -- errors ----------------------------------------------------------------------------------------

def test_missing_parts_and_bad_switches_are_named():
    model = tiny(text_decoder=False, queue_size=0)
    b = batch(model.config)
    with pytest.raises(ConfigError, match=r"config\.text_decoder=False"):
        model.caption_logits(b["pixels"], b["input_ids"])
    with pytest.raises(ConfigError, match="share 'some'"):
        tiny(share="some")
    with pytest.raises(ConfigError, match="mask_question_padding"):
        tiny(mask_question_padding="sometimes")
    with pytest.raises(ConfigError, match="enc_id 5000"):
        tiny(enc_id=5000)
    config = get_preset("blip-tiny")
    config.vision.width = 64
    with pytest.raises(ConfigError, match="cannot read question states"):
        build_model(config).answer(b["pixels"], b["input_ids"])


def test_contract_itm_probability_and_zeroshot_scale():
    model = tiny()
    rows = batch(model.config, rows=3)
    with torch.no_grad():
        logits = model.itm_logits(rows["pixels"], rows["input_ids"], rows["attention_mask"])
        probability = model.itm_probability(rows["pixels"], rows["input_ids"],
                                            rows["attention_mask"])
    assert probability.shape == (3,) and bool(((probability > 0) & (probability < 1)).all())
    assert torch.allclose(probability, torch.softmax(logits, dim=-1)[:, 1])
    assert model.zeroshot_logit_scale() == 100.0
    clip = vlp.create_model("clip-tiny")
    with pytest.raises(ConfigError, match="no image-text matching head"):
        clip.itm_probability(rows["pixels"], rows["input_ids"])
