import dataclasses
import math

import pytest
import torch

import vlp
from vlp.config import config_from_dict, config_to_dict, get_preset
from vlp.errors import ConfigError, DataError
from vlp.losses import IGNORE_INDEX
from vlp.models import build_model
from vlp.models.simvlm import SimVLM, split_at, text_words
from vlp.nn.convstem import ConvPatchEmbed
from vlp.nn.transformer import DropPath

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = [False, True]  # decoder_only


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _config(**overrides):
    config = get_preset("simvlm-tiny")
    config.vision.layers, config.text.layers = 2, 1
    return dataclasses.replace(config, **overrides)


def _model(**overrides) -> SimVLM:
    return build_model(_config(**overrides)).eval()


def _ids(config, real=(5, 8, 12), length=12):
    """bos + random words + eos, right-padded with pad_id to ``length``."""
    t = config.text
    ids = torch.full((len(real), length), t.pad_id)
    for row, n in enumerate(real):
        ids[row, :n] = torch.randint(3, t.vocab_size, (n,))
        ids[row, 0], ids[row, n - 1] = t.bos_id, t.eos_id
    return ids


def _pixels(config, batch=3):
    size = config.vision.image_size
    return torch.randn(batch, 3, size, size)


def _split(model, ids, cut):
    words, lengths = text_words(ids, **model._ids())
    return split_at(words, lengths, torch.as_tensor(cut), **model._ids())


# -- the PrefixLM split -----------------------------------------------------------------------

def test_split_puts_the_prefix_in_the_encoder_and_the_rest_in_the_targets():
    model = _model()
    t = model.config.text
    ids = torch.tensor([[t.bos_id, 10, 11, 12, 13, t.eos_id, t.pad_id],
                        [t.bos_id, 20, 21, t.eos_id, t.pad_id, t.pad_id, t.pad_id]])
    inputs = _split(model, ids, [3, 0])
    assert inputs.prefix_ids.tolist() == [[t.bos_id, 10, 11, 12], [t.bos_id] + [t.pad_id] * 3]
    assert inputs.prefix_valid.tolist() == [[True] * 4, [True, False, False, False]]
    # the decoder starts from bos (targets shifted right); the loss covers the suffix words
    # and eos only
    assert inputs.decoder_ids.tolist() == [[t.bos_id, 13, t.eos_id], [t.bos_id, 20, 21]]
    assert inputs.labels.tolist() == [[13, t.eos_id, IGNORE_INDEX], [20, 21, t.eos_id]]


def test_random_cuts_cover_empty_and_full_prefixes():
    model = _model()
    lengths = torch.full((4000,), 5)
    cuts = model.sample_cut(lengths)
    assert cuts.min() == 0 and cuts.max() == 4  # empty prefixes, never an empty suffix
    counts = torch.bincount(cuts, minlength=5).float() / len(cuts)
    torch.testing.assert_close(counts, torch.full((5,), 1 / 5), atol=0.03, rtol=0)
    assert (_model(prefix="none").sample_cut(lengths) == 0).all()


def test_given_cuts_are_clamped_to_each_text():
    model = _model()
    t = model.config.text
    ids = torch.tensor([[t.bos_id, 10, 11, 12, t.eos_id], [t.bos_id, 20, t.eos_id, t.pad_id,
                                                          t.pad_id]])
    inputs = model.prefix_inputs(ids, torch.tensor([-2, 5]))
    # a negative cut is an empty prefix; one past the end leaves only eos to predict
    assert inputs.prefix_ids.tolist() == [[t.bos_id, t.pad_id], [t.bos_id, 20]]
    assert inputs.labels.tolist() == [[10, 11, 12, t.eos_id], [t.eos_id] + [IGNORE_INDEX] * 3]


# -- the mechanism ----------------------------------------------------------------------------

@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_decoder_is_causal_over_the_suffix(decoder_only):
    model = _model(decoder_only=decoder_only)
    ids = _ids(model.config, real=(12, 12, 12))
    pixels = _pixels(model.config)
    inputs = _split(model, ids, [4, 4, 4])
    logits = model.prefix_lm_logits(pixels, inputs)
    for position in range(1, inputs.decoder_ids.shape[1]):
        changed = inputs.decoder_ids.clone()
        changed[:, position] = (changed[:, position] + 7) % model.config.text.vocab_size
        other = model.prefix_lm_logits(pixels, inputs._replace(decoder_ids=changed))
        torch.testing.assert_close(other[:, :position], logits[:, :position])  # never earlier
        assert not torch.allclose(other[:, position:], logits[:, position:])


@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_every_prefix_token_reaches_every_suffix_logit(decoder_only):
    model = _model(decoder_only=decoder_only)
    ids = _ids(model.config, real=(12, 12, 12))
    pixels = _pixels(model.config)
    inputs = _split(model, ids, [5, 5, 5])
    logits = model.prefix_lm_logits(pixels, inputs)
    for position in range(inputs.prefix_ids.shape[1]):
        changed = inputs.prefix_ids.clone()
        changed[:, position] = (changed[:, position] + 7) % model.config.text.vocab_size
        other = model.prefix_lm_logits(pixels, inputs._replace(prefix_ids=changed))
        differs = (other - logits).abs().amax(dim=-1) > 1e-6  # (B, T)
        assert differs.all(), (position, differs)
    # so does the image
    other = model.prefix_lm_logits(pixels.roll(1, 0), inputs)
    assert ((other - logits).abs().amax(dim=-1) > 1e-6).all()


def test_encoder_is_bidirectional_over_image_and_prefix():
    model = _model()
    ids = _ids(model.config, real=(12, 12, 12))
    pixels = _pixels(model.config)
    inputs = _split(model, ids, [6, 6, 6])
    states = model.encode(pixels, inputs.prefix_ids, inputs.prefix_valid).states
    changed = inputs.prefix_ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % model.config.text.vocab_size
    other = model.encode(pixels, changed, inputs.prefix_valid).states
    grid = model.image_embed.grid**2
    # the last prefix word changes the first image token and the first text token (bos)
    assert not torch.allclose(other[:, 0], states[:, 0])
    assert not torch.allclose(other[:, grid], states[:, grid])


@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_prefix_padding_is_invisible(decoder_only):
    model = _model(decoder_only=decoder_only)
    ids = _ids(model.config, real=(12, 12, 12))
    pixels = _pixels(model.config)
    inputs = _split(model, ids, [2, 5, 7])
    logits = model.prefix_lm_logits(pixels, inputs)
    noisy = inputs.prefix_ids.masked_fill(~inputs.prefix_valid, 99)
    other = model.prefix_lm_logits(pixels, inputs._replace(prefix_ids=noisy))
    torch.testing.assert_close(other, logits)


@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_empty_prefix_and_text_only_batches_train(decoder_only):
    model = _model(decoder_only=decoder_only).train()
    config = model.config
    ids = _ids(config)
    out = model({"pixels": _pixels(config), "input_ids": ids})  # random cuts, some empty
    empty = _model(decoder_only=decoder_only, prefix="none").train()
    assert torch.isfinite(empty({"pixels": _pixels(config), "input_ids": ids})["loss"])
    text_only = model({"text_ids": ids})
    assert set(text_only["losses"]) == {"prefix_lm"} and torch.isfinite(text_only["loss"])
    mixed = model({"pixels": _pixels(config), "input_ids": ids, "text_ids": ids[:2]})
    assert set(mixed["losses"]) == {"prefix_lm", "image_text", "text"}
    (out["loss"] + mixed["loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a text-only row with an empty prefix: the encoder holds bos alone
    words, lengths = text_words(ids, **model._ids())
    inputs = split_at(words, lengths, torch.zeros_like(lengths), **model._ids())
    assert torch.isfinite(model.prefix_lm_logits(None, inputs)).all()


def test_loss_is_the_mean_over_target_tokens():
    model = _model().train()
    config = model.config
    with torch.no_grad():  # every weight 1: uniform logits over the vocabulary
        for p in model.parameters():
            p.fill_(1.0)
    out = model({"pixels": _pixels(config), "input_ids": _ids(config), "text_ids": _ids(config)})
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(config.text.vocab_size)))


def test_vqa_batches_decode_the_answer_after_the_question():
    model = _model().train()
    config = model.config
    questions, answers = _ids(config, real=(6, 4, 9)), _ids(config, real=(3, 4, 3), length=5)
    out = model({"pixels": _pixels(config), "question_ids": questions, "answer_ids": answers})
    assert torch.isfinite(out["loss"])
    features = model.features({"pixels": _pixels(config), "question_ids": questions,
                               "answer_ids": answers})
    assert features["lm_tokens"].tolist() == [2, 3, 2]  # answer words + eos


# -- the conv stem ----------------------------------------------------------------------------

@pytest.mark.parametrize("image_size,patch,blocks", [(64, 16, 3), (64, 8, 3), (32, 8, 0),
                                                     (48, 16, 2), (224, 16, 3)])
def test_conv_stem_grid_and_positions_follow_the_image_size(image_size, patch, blocks):
    embed = ConvPatchEmbed(image_size, patch, 32, blocks=blocks, channels=8)
    grid = image_size // patch
    assert embed.grid == grid and embed.positions().shape == (grid * grid, 32)
    tokens = embed(torch.randn(2, 3, image_size, image_size))
    assert tokens.shape == (2, grid * grid, 32)
    assert len(embed.stages) == blocks
    # positions are 2-D: token (r, c) gets row r's plus column c's embedding
    r, c = grid - 1, 0
    torch.testing.assert_close(embed.positions()[r * grid + c],
                               embed.pos_rows[r] + embed.pos_cols[c])


def test_conv_stem_sees_where_things_are():
    embed = ConvPatchEmbed(64, 16, 32, blocks=3, channels=8).eval()
    image = torch.zeros(1, 3, 64, 64)
    bright = image.clone()
    bright[..., :16, :16] = 3.0  # the top-left patch only
    change = (embed(bright) - embed(image)).abs().amax(-1)[0]  # (16,) per token
    # GroupNorm statistics span the image, so every token moves; the patch itself most
    assert change.argmax() == 0


def test_resnet_stem_is_resnet_50s_first_three_stages_at_stride_16():
    torchvision = pytest.importorskip("torchvision")
    config = get_preset("simvlm-base")
    assert (config.stem, config.conv_blocks, config.conv_width) == ("resnet50", 3, 64)
    v = config.vision
    embed = ConvPatchEmbed(v.image_size, v.patch_size, v.width, blocks=config.conv_blocks,
                           channels=config.conv_width, stem=config.stem).eval()
    assert embed.stride == 16 and embed.proj.kernel_size == (1, 1)
    # the same convolutions, in the same order and shapes, as torchvision's ResNet-50 conv1 +
    # layer1..3 (GroupNorm in place of BatchNorm: the same two vectors per norm)
    reference = torchvision.models.resnet50()
    ours = [p.shape for p in embed.stages.parameters()]
    theirs = [p.shape for m in (reference.conv1, reference.bn1, reference.layer1,
                                reference.layer2, reference.layer3) for p in m.parameters()]
    assert sorted(ours) == sorted(theirs)
    assert sum(p.numel() for p in embed.stages.parameters()) == 8_543_296
    with torch.no_grad():
        pixels = torch.randn(1, 3, 224, 224)
        assert embed.stages(pixels).shape == (1, 1024, 14, 14)
        assert embed(pixels).shape == (1, 196, 768)
    deep = ConvPatchEmbed(224, 16, 768, blocks=3, channels=64, stem="resnet101")
    assert sum(p.numel() for p in deep.stages.parameters()) == 27_535_424
    light = ConvPatchEmbed(224, 16, 768, blocks=3, channels=64)
    assert sum(p.numel() for p in light.stages.parameters()) == 1_188_352


def test_resnet_stem_drops_residual_branches_in_training_only():
    embed = ConvPatchEmbed(64, 16, 32, blocks=3, channels=8, stem="resnet50", drop_path=0.5)
    blocks = [block for stage in embed.stages[1:] for block in stage]
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert len(rates) == 13 and rates[0] == 0 and rates[-1] == 0.5 and rates == sorted(rates)
    for module in embed.modules():  # every branch counts (norm3 starts at zero)
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight)
    pixels = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    first = embed.train()(pixels)
    torch.manual_seed(1)
    assert not torch.allclose(first, embed(pixels))
    torch.testing.assert_close(embed.eval()(pixels), embed(pixels))


@pytest.mark.parametrize("overrides,match", [
    ({"stem": "resnet18"}, "expected one of"),
    ({"stem": "resnet50", "conv_blocks": 0}, "1 to 4 ResNet stages"),
    ({"stem": "resnet50", "conv_blocks": 4}, "stride 32"),
])
def test_resnet_stem_refuses_bad_settings(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model(_config(**overrides))


def test_model_grid_matches_config():
    model = _model()
    v = model.config.vision
    assert model.image_embed.grid == v.image_size // v.patch_size
    prefix = model.encode(_pixels(model.config), torch.full((3, 1), model.config.text.bos_id))
    assert prefix.states.shape[1] == (v.image_size // v.patch_size) ** 2 + 1


# -- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder_only", VARIANTS)
@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3}])
def test_kv_cache_generation_equals_uncached(decoder_only, kwargs):
    model = _model(decoder_only=decoder_only)
    config = model.config
    with torch.no_grad():  # a peaked LM head so greedy / beam picks are far from ties
        model.lm_head.weight.mul_(40.0)
    pixels = _pixels(config)
    prompt = _ids(config, real=(4, 4, 4), length=4)[:, :3]  # bos + 2 words, no eos
    for prompt_ids in (None, prompt):
        cached = model.generate(pixels, prompt_ids=prompt_ids, max_new_tokens=8, **kwargs)
        uncached = model.generate(pixels, prompt_ids=prompt_ids, max_new_tokens=8,
                                  use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_cached_logits_equal_teacher_forcing(decoder_only):
    model = _model(decoder_only=decoder_only)
    ids = _ids(model.config, real=(12, 12, 12))
    pixels = _pixels(model.config)
    inputs = _split(model, ids, [3, 3, 3])
    expected = model.prefix_lm_logits(pixels, inputs)
    prefix = model.encode(pixels, inputs.prefix_ids, inputs.prefix_valid)
    logits, state = model.decode_cached(inputs.decoder_ids[:, :1], prefix, None)
    steps = [logits]
    for position in range(1, inputs.decoder_ids.shape[1]):
        logits, state = model.decode_cached(inputs.decoder_ids[:, position:position + 1], None,
                                            state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), expected, atol=1e-5, rtol=1e-4)


def test_answer_and_rank_answers():
    model = _model()
    config = model.config
    pixels = _pixels(config)
    questions = _ids(config, real=(6, 4, 9))
    answers = model.answer(pixels, questions, max_new_tokens=4)
    assert answers.shape[0] == 3 and answers.shape[1] <= 4
    candidates = _ids(config, real=(3, 4, 3), length=5)
    scores = model.rank_answers(pixels, questions, candidates)
    assert scores.shape == (3, 3) and (scores < 0).all()
    # the score of a candidate is its teacher-forced log-likelihood
    words, lengths = text_words(candidates, **model._ids())
    prefix_ids, prefix_valid = model.question_prefix(questions)
    from vlp.models.simvlm import prefix_lm_inputs

    row = prefix_lm_inputs(prefix_ids[:1, 1:], prefix_valid[:1].sum(1) - 1, words[1:2],
                           lengths[1:2], **model._ids())
    logits = model.prefix_lm_logits(pixels[:1], row).log_softmax(-1)
    labels = row.labels[0]
    expected = sum(logits[0, i, int(label)] for i, label in enumerate(labels)
                   if label != IGNORE_INDEX)
    torch.testing.assert_close(scores[0, 1], expected, atol=1e-4, rtol=1e-4)



def _answer_tokenizer():
    from vlp.tokenizers import train_tokenizer

    # byte-level BPE without a prefix space: "red" opening a text and " red" after a word differ
    texts = ["what colour is the star? red", "what colour is the cross? blue"] * 8
    return train_tokenizer(texts, vocab_size=300, context_length=16)


def test_answers_are_tokenised_as_the_questions_continuation():
    from vlp.data.qa import QACollate, answer_texts

    tokenizer = _answer_tokenizer()
    assert tokenizer.encode(" red") != tokenizer.encode("red")
    config = _config()
    assert answer_texts(config, ["red", " blue"]) == [" red", " blue"]
    blip = get_preset("blip-tiny")
    assert answer_texts(blip, ["red"]) == ["red"]  # BLIP's answer decoder reads its own text
    config.text.context_length = 16
    batch = QACollate(tokenizer, config)([(torch.zeros(3, 8, 8), "what colour is it?", "red")])
    assert batch["answer_ids"][0, 1:-1].tolist() == tokenizer.encode(" red")


def test_rank_mode_scores_candidates_as_continuations(monkeypatch):
    from vlp.data.qa import QARecord
    from vlp.eval import vqa as vqa_module

    tokenizer = _answer_tokenizer()
    model = _model()
    records = [QARecord("x", "what colour is the star?", ("red",)) for _ in range(3)]
    batch = {"pixels": _pixels(model.config),
             "question_ids": tokenizer([r.question for r in records]), "index": torch.arange(3)}
    batch["question_mask"] = batch["question_ids"] != tokenizer.pad_id  # as QACollate gives
    monkeypatch.setattr(vqa_module, "qa_loader", lambda *a, **k: [batch])
    candidates = ["red", "blue"]
    predictions = vqa_module.answer_questions(model, tokenizer, records, mode="rank",
                                              candidates=candidates, progress=False)
    scores = model.rank_answers(batch["pixels"], batch["question_ids"],
                                tokenizer([" red", " blue"]))
    assert predictions == [candidates[i] for i in scores.argmax(1).tolist()]
    # the bare spelling scores other tokens: what the ranking must not use
    bare = model.rank_answers(batch["pixels"], batch["question_ids"], tokenizer(candidates))
    assert not torch.allclose(scores, bare)


# -- config, save / load, errors --------------------------------------------------------------

@pytest.mark.parametrize("name", ["simvlm-tiny", "simvlm-base"])
def test_presets_round_trip_through_json(name):
    config = get_preset(name)
    assert config_from_dict(config_to_dict(config)) == config
    assert config.conv_blocks == 3 and config.family == "simvlm"


def test_base_preset_has_the_papers_shape():
    config = get_preset("simvlm-base")
    assert (config.vision.width, config.vision.layers, config.text.layers,
            config.vision.heads) == (768, 12, 12, 12)
    assert config.vision.mlp_ratio * config.vision.width == 3072
    with torch.device("meta"):
        model = vlp.create_model("simvlm-base")
        decoder_only = vlp.create_model("simvlm-base", decoder_only=True)
    assert len(model.encoder.blocks) == 12 and len(model.decoder.blocks) == 12
    assert decoder_only.encoder is None and len(decoder_only.decoder.blocks) == 24
    assert decoder_only.decoder.blocks[0].cross_attn is None


@pytest.mark.parametrize("decoder_only", VARIANTS)
def test_save_and_load_give_the_same_model(tmp_path, decoder_only):
    model = _model(decoder_only=decoder_only)
    vlp.save(model, tmp_path / "m")
    loaded = vlp.load(tmp_path / "m").eval()
    assert loaded.config == model.config and isinstance(loaded, SimVLM)
    pixels = _pixels(model.config)
    torch.testing.assert_close(loaded.generate(pixels, max_new_tokens=6),
                               model.generate(pixels, max_new_tokens=6))
    if model.config.tie_lm_head:
        assert loaded.lm_head.weight is loaded.token_embed.weight


def test_no_weight_decay_names_exist():
    model = _model()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


@pytest.mark.parametrize("overrides,match", [
    ({"prefix": "half"}, "simvlm.prefix"),
    ({"conv_blocks": 5}, "stride"),
    ({"conv_blocks": -1}, "blocks must be >= 0"),
])
def test_bad_configs_raise_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model(_config(**overrides))


def test_mismatched_widths_raise():
    config = _config()
    config.text.width = 64
    with pytest.raises(ConfigError, match="text.width"):
        build_model(config)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    config = model.config
    ids = _ids(config)
    with pytest.raises(ConfigError, match="start with bos"):
        model({"pixels": _pixels(config), "input_ids": ids[:, 1:]})
    with pytest.raises(ConfigError, match="needs 'pixels'"):
        model({"input_ids": ids})
    with pytest.raises(ConfigError, match="text_ids"):
        model({"labels": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"\(B, 3, 64, 64\)"):
        model.generate(torch.randn(3, 3, 32, 32))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(_pixels(config), max_new_tokens=1000)
    with pytest.raises(ConfigError, match="integer token ids"):
        model.answer(_pixels(config), torch.randn(3, 4))
    with pytest.raises(ConfigError, match="2 images for 3"):
        model.encode(_pixels(config, 2), ids)


# -- text-only data through the trainer -------------------------------------------------------

def test_text_corpus_reading(tmp_path):
    from vlp.data.text import TextBatches, TextCorpus

    (tmp_path / "c.txt").write_text("a red circle\n\n  a blue square  \n")
    assert list(TextCorpus(tmp_path / "c.txt")) == ["a red circle", "a blue square"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"caption": "two"}\n')
    assert list(TextCorpus(tmp_path / "c.jsonl")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"words": "one"}\n')
    with pytest.raises(DataError, match="no text field"):
        TextCorpus(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no non-empty texts"):
        TextCorpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such"):
        TextCorpus(tmp_path / "missing.txt")

    from vlp.tokenizers import train_tokenizer

    corpus = TextCorpus(tmp_path / "c.txt")
    tokenizer = train_tokenizer(list(corpus) * 5, vocab_size=300, context_length=16)
    stream = TextBatches(corpus, tokenizer, rows=1, seed=3)
    first = [stream.next() for _ in range(5)]
    resumed = TextBatches(corpus, tokenizer, rows=1, seed=3)
    stream_state = TextBatches(corpus, tokenizer, rows=1, seed=3)
    for _ in range(3):
        stream_state.next()
    resumed.load_state_dict(stream_state.state_dict())
    for expected in first[3:]:
        assert torch.equal(resumed.next(), expected)
    assert first[0].shape[1] < 16  # padding columns trimmed
    with pytest.raises(DataError, match="rows: saved 1, now 2"):
        TextBatches(corpus, tokenizer, rows=2, seed=3).load_state_dict(stream.state_dict())


def test_synthetic_corpus_writes_a_share_of_questions_alone():
    from vlp.data.synthetic_text import corpus_lines

    described = corpus_lines(30, seed=2)
    assert all(". " in line and "?" in line for line in described)
    mixed = corpus_lines(30, seed=2, bare_share=0.5)
    bare = [line for line in mixed if line not in described]
    # the described lines are the same ones, in order; each bare line is the question of the
    # described line just before it, with its answer
    assert [line for line in mixed if line in described] == described
    assert 0.3 * len(described) < len(bare) < 0.7 * len(described)
    for index, line in enumerate(mixed):
        if line in bare:
            assert mixed[index - 1].endswith(". " + line)
    assert len(corpus_lines(30, seed=2, bare_share=1.0)) == 2 * len(described)
    with pytest.raises(ConfigError, match="bare_share"):
        corpus_lines(3, bare_share=1.5)


def test_trainer_mixes_text_only_rows_and_resumes(tmp_path, synthetic_train_csv):
    import json

    from vlp.data.synthetic_text import write_text_corpus
    from vlp.run import train
    from vlp.train import TrainConfig

    corpus = tmp_path / "corpus.txt"
    assert write_text_corpus(corpus, 20) > 100
    small = {"vision": {"layers": 1}, "text": {"layers": 1}}
    common = dict(model="simvlm-tiny", model_overrides=small,
                  train_data=str(synthetic_train_csv(32)), text_data=str(corpus),
                  text_ratio=0.25, batch_size=8, max_steps=4, num_workers=0, progress=False,
                  seed=1)
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), checkpoint_every=2,
                             keep_last=0, **common))
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 4 and all("loss_text" in r and "loss_image_text" in r for r in steps)
    assert steps[0]["samples"] == 8  # 6 image-text + 2 text-only rows
    # resumed after step 2, the text stream continues where it was: the same last loss
    resumed = train(TrainConfig(output_dir=str(tmp_path / "resumed"),
                                resume=str(tmp_path / "full" / "checkpoint-0000002"), **common))
    assert resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6)
    # the corpus words are in the tokenizer trained for the run
    tokenizer = vlp.load_tokenizer(full["checkpoint"])
    assert len(tokenizer.encode(" what colour is the")) <= 4


def test_resnet_stem_trains_saves_and_loads(tmp_path, synthetic_train_csv):
    import json

    from vlp.run import train
    from vlp.train import TrainConfig

    small = {"vision": {"layers": 1}, "text": {"layers": 1}, "stem": "resnet50",
             "conv_width": 8}
    result = train(TrainConfig(model="simvlm-tiny", model_overrides=small,
                               train_data=str(synthetic_train_csv(32)), batch_size=8,
                               max_steps=3, num_workers=0, progress=False, lr=1e-3,
                               output_dir=str(tmp_path / "run")))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    loaded = vlp.load(result["checkpoint"]).eval()
    assert loaded.config.stem == "resnet50"
    assert len(loaded.image_embed.stages) == 4  # root + three stages of bottleneck blocks
    trained = loaded.image_embed.stages[1][0].norm3.weight
    assert trained.abs().sum() > 0  # zero-initialised, moved by training
    again = vlp.load(result["checkpoint"]).eval()
    pixels = _pixels(loaded.config)
    torch.testing.assert_close(again.generate(pixels, max_new_tokens=4),
                               loaded.generate(pixels, max_new_tokens=4))
    # a model directory written before the stem field loads with the light stem it was made with
    light = _model()
    vlp.save(light, tmp_path / "old")
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    del data["stem"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(data))
    old = vlp.load(tmp_path / "old").eval()
    assert old.config.stem == "light"
    torch.testing.assert_close(old.generate(pixels, max_new_tokens=4),
                               light.generate(pixels, max_new_tokens=4))


def test_trainer_rejects_text_data_for_other_families_and_bad_ratios(tmp_path,
                                                                     synthetic_train_csv):
    from vlp.run import train
    from vlp.train import TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\n" * 20)
    common = dict(train_data=str(synthetic_train_csv(32)), text_data=str(corpus), batch_size=8,
                  max_steps=1, num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="does not train on text-only rows"):
        train(TrainConfig(model="clip-tiny", output_dir=str(tmp_path / "a"), **common))
    with pytest.raises(ConfigError, match="text_ratio"):
        train(TrainConfig(model="simvlm-tiny", output_dir=str(tmp_path / "b"), text_ratio=1.0,
                          **{k: v for k, v in common.items()}))
