"""BLIP's VQA fine-tuning as the reference does it: every distinct annotator answer a decoder
row weighted by its share, the weighted summed NLL divided by the number of questions, and the
VQA layout (separate question encoder and answer decoder, the decoder reading text-width
question states) started from a pretrained BLIP, whatever its vision width."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlp
from vlp.config import get_preset
from vlp.data import build_source, image_transform, make_loader
from vlp.data.qa import AnswerTokenizer, answer_weights, target_answer
from vlp.models import build_model
from vlp.run import train
from vlp.store import WEIGHTS_FILE
from vlp.tokenizers import train_tokenizer
from vlp.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides):
    config = get_preset("blip-tiny")
    config.vision.layers = config.text.layers = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _ids(rows, config, generator):
    """bos + random tokens + eos per row (lengths given), right-padded."""
    width = max(rows) + 2
    ids = torch.full((len(rows), width), config.text.pad_id)
    for row, length in enumerate(rows):
        ids[row, 0] = config.text.bos_id
        ids[row, 1:length + 1] = torch.randint(3, 1000, (length,), generator=generator)
        ids[row, length + 1] = config.text.eos_id
    return ids


def test_answer_weights_are_each_answers_share_in_first_seen_order():
    answers = ("yes", "no", "yes", "maybe", "no", "yes")
    assert answer_weights(answers) == (["yes", "no", "maybe"], [3 / 6, 2 / 6, 1 / 6])
    assert answer_weights(["2"]) == (["2"], [1.0])
    distinct, weights = answer_weights(("b", "a", "a", "b"))  # a tie: the first seen leads
    assert distinct[weights.index(max(weights))] == target_answer(("b", "a", "a", "b")) == "b"


def test_weighted_multi_answer_loss_is_the_hand_computation():
    torch.manual_seed(0)
    model = build_model(_config(queue_size=0)).eval()
    generator = torch.Generator().manual_seed(1)
    config = model.config
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    questions = _ids([5, 3], config, generator)
    answers = _ids([1, 3, 2], config, generator)  # question 0: rows 0 and 1; question 1: row 2
    count, weight = torch.tensor([2, 1]), torch.tensor([2 / 3, 1 / 3, 1.0])
    with torch.no_grad():
        out = model.loss(model.features({"pixels": pixels, "question_ids": questions,
                                         "answer_ids": answers, "answer_count": count,
                                         "answer_weight": weight}))
        expected = torch.zeros(())
        for row, question in enumerate([0, 0, 1]):
            valid = answers[row] != config.text.pad_id
            answer = answers[row:row + 1, :int(valid.sum())]  # alone, unpadded
            question_ids = questions[question:question + 1]
            question_ids = question_ids[:, :int((question_ids != config.text.pad_id).sum())]
            logits = model.vqa_answer_logits(pixels[question:question + 1], question_ids, answer)
            nll = F.cross_entropy(logits[0, :-1], answer[0, 1:], label_smoothing=0.1,
                                  reduction="sum")  # BLIP: summed over the answer's tokens
            expected = expected + weight[row] * nll
        expected = expected / 2  # divided by the number of questions
    assert config.label_smoothing == 0.1
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert out["losses"]["vqa"] == out["loss"]
    # one answer per question without counts or weights: weight 1 each, still per question
    with torch.no_grad():
        single = model.loss(model.features({"pixels": pixels, "question_ids": questions,
                                            "answer_ids": answers[1:]}))
        per_row = model.features({"pixels": pixels, "question_ids": questions,
                                  "answer_ids": answers[1:], "answer_count": torch.tensor([1, 1]),
                                  "answer_weight": torch.tensor([1.0, 1.0])})["vqa_nll"]
    torch.testing.assert_close(single["loss"], per_row.sum() / 2)


def _qa_data(tmp_path, images: int = 16):
    """Red and blue squares; "what colour?" answered by three annotators each (one dissents)."""
    rows = []
    for index in range(images):
        colour = ("red", "blue")[index % 2]
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{index}.png")
        other = "blue" if colour == "red" else "red"
        rows.append({"image": f"{index}.png", "question": "what colour is it?",
                     "answers": [colour, other, colour]})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_loader_gives_every_distinct_answer_with_its_weight(tmp_path):
    path = _qa_data(tmp_path, images=4)
    config = _config()
    tokenizer = train_tokenizer(["what colour is it? red blue"] * 4, vocab_size=300,
                                context_length=16)
    loader = make_loader(build_source("qa", path), transform=image_transform(config, False),
                         tokenizer=tokenizer, batch_size=4, train=False,
                         answer_tokenizer=AnswerTokenizer(tokenizer, config))
    batch = next(iter(loader))
    assert batch["question_ids"].shape[0] == 4 and batch["answer_ids"].shape[0] == 8
    assert batch["answer_count"].tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(batch["answer_weight"], torch.tensor([2 / 3, 1 / 3] * 4))
    decoded = [tokenizer.decode(row) for row in batch["answer_ids"]]
    assert decoded == ["red", "blue", "blue", "red"] * 2


def _pretrained(tmp_path, vision_width: int):
    """A saved pretraining-layout BLIP (shared towers, heads, queue) whose ViT is
    ``vision_width`` wide, with its tokenizer."""
    config = _config()
    config.vision.width = vision_width
    tokenizer = train_tokenizer(["what colour is it? red blue"] * 4, vocab_size=300,
                                context_length=config.text.context_length)
    torch.manual_seed(0)
    model = build_model(config)
    return vlp.save(model, tmp_path / "pretrained", tokenizer), model


def test_vqa_layout_starts_from_a_pretrained_blip_as_blip_does(tmp_path):
    directory, pretrained = _pretrained(tmp_path, vision_width=64)
    config = pretrained.config.for_train_kind("qa")
    assert (config.vqa_layout, config.share, config.retrieval_heads, config.queue_size) == \
        (True, "none", False, 0)
    assert pretrained.config.for_train_kind("image_text") is pretrained.config
    model = build_model(config)
    model.init_from(directory / WEIGHTS_FILE)
    source, state = pretrained.state_dict(), model.state_dict()
    assert "text_proj.weight" not in state and not any("momentum" in k for k in state)
    for name, value in state.items():
        if name.startswith("text_decoder.") and name.endswith(".cross_attn.kv.weight"):
            # reads question states (text width 128), not image tokens (vision width 64)
            assert value.shape[-1] == 128 and source[name].shape[-1] == 64
        else:  # question encoder = text encoder, answer decoder = the captioning decoder
            torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    # the towers are untied: training one leaves the other
    assert model.text_decoder.blocks[0].mlp is not model.text_encoder.blocks[0].mlp


def test_blip_with_a_wider_vit_fine_tunes_and_answers_vqa(tmp_path):
    directory, pretrained = _pretrained(tmp_path, vision_width=192)
    assert pretrained.config.vision.width != pretrained.config.text.width
    path = _qa_data(tmp_path)
    result = train(TrainConfig(model=str(directory), train_data=str(path), train_kind="qa",
                               output_dir=str(tmp_path / "run"), batch_size=8, lr=1e-3,
                               warmup_steps=5, max_steps=60, num_workers=0, progress=False,
                               log_every=1))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().split("\n")
           if line]
    losses = [record["loss"] for record in log if "loss" in record]
    assert losses[-1] < 0.5 * losses[0], losses
    model, tokenizer = vlp.load(result["checkpoint"]), vlp.load_tokenizer(result["checkpoint"])
    assert model.config.vqa_layout and model.config.vision.width == 192
    transform = image_transform(model.config, False)
    pixels = torch.stack([transform(Image.new("RGB", (64, 64), c)) for c in ("red", "blue")])
    questions = tokenizer(["what colour is it?"] * 2)
    answers = model.eval().answer(pixels, questions, max_new_tokens=3)
    assert [tokenizer.decode(row) for row in answers] == ["red", "blue"]


def test_simvlm_fine_tunes_on_each_questions_most_common_answer():
    """SimVLM reads a multi-answer batch as its most common answer per question (the first
    among equals), exactly as a batch of those answers alone."""
    config = get_preset("simvlm-tiny")
    torch.manual_seed(0)
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(2)
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    questions = _ids([4, 2], config, generator)
    answers = _ids([1, 2, 3, 1], config, generator)  # q0: rows 0-2 (row 1 most common), q1: 3
    batch = {"pixels": pixels, "question_ids": questions, "answer_ids": answers,
             "answer_count": torch.tensor([3, 1]),
             "answer_weight": torch.tensor([0.25, 0.5, 0.25, 1.0])}
    with torch.no_grad():
        multi = model.features(batch)
        alone = model.features({"pixels": pixels, "question_ids": questions,
                                "answer_ids": answers[[1, 3]]})
    for key in ("lm_nll", "lm_tokens"):
        assert torch.equal(multi[key], alone[key]), key
    tie = {**batch, "answer_weight": torch.tensor([0.4, 0.4, 0.2, 1.0])}  # first among equals
    with torch.no_grad():
        first = model.features({"pixels": pixels, "question_ids": questions,
                                "answer_ids": answers[[0, 3]]})
        assert torch.equal(model.features(tie)["lm_nll"], first["lm_nll"])
