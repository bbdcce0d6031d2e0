"""BLIP evaluation: ITM re-ranked retrieval, the official VQA accuracy, answer ranking."""

import json

import pytest
import torch

from vlp.config import get_preset
from vlp.data.qa import QARecord, read_qa_jsonl
from vlp.errors import ConfigError, DataError
from vlp.eval.rerank import itm_rerank_scores
from vlp.eval.retrieval import retrieval_metrics, score_retrieval_metrics
from vlp.eval.vqa import (
    accuracy_summary,
    majority_baselines,
    normalize_answer,
    vqa_accuracy,
)
from vlp.models import build_model

# -- retrieval with ITM re-ranking ---------------------------------------------------------------


def test_score_metrics_match_feature_metrics_and_hand_ranks():
    # 3 images, 4 texts (image 0 has texts 0 and 3); hand-built cosines
    similarity = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                               [0.5, 0.4, 0.3, 0.6],
                               [0.1, 0.2, 0.7, 0.0]])
    text_to_image = torch.tensor([0, 1, 2, 0])
    metrics = score_retrieval_metrics(similarity, similarity.T, text_to_image, ks=(1, 2))
    # i2t: image 0 best own 0.9 -> rank 1; image 1 own 0.4, beaten by 0.5, 0.6 -> 3; image 2 -> 1
    assert metrics["i2t_r1"] == pytest.approx(2 / 3) and metrics["i2t_r2"] == pytest.approx(2 / 3)
    # t2i: text 0 -> 1; text 1 own 0.4 vs 0.1, 0.2 -> 1; text 2 own 0.7 vs 0.8 -> 2; text 3 own
    # 0.2 vs 0.6 -> 2
    assert metrics["t2i_r1"] == 0.5 and metrics["t2i_r2"] == 1.0
    # a similarity that is a product of features gives the same numbers both ways
    features_i, features_t = torch.randn(5, 8), torch.randn(7, 8)
    groups = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    by_features = retrieval_metrics(features_i, features_t, groups)
    by_scores = score_retrieval_metrics(features_i @ features_t.T, features_t @ features_i.T,
                                        groups)
    assert by_features == pytest.approx(by_scores)


def test_rerank_rescores_only_the_itc_top_k():
    torch.manual_seed(0)
    num_images, num_texts, k = 6, 9, 3
    similarity = torch.rand(num_images, num_texts)
    image_tokens = torch.arange(num_images, dtype=torch.float)[:, None, None]  # id per image
    input_ids = torch.arange(num_texts)[:, None]
    mask = torch.ones(num_texts, 1, dtype=torch.bool)
    bonus = torch.randn(num_images, num_texts)  # a known "ITM logit" per pair

    def match(tokens, ids, _mask):
        return bonus[tokens[:, 0, 0].long(), ids[:, 0]]

    i2t, t2i = itm_rerank_scores(similarity, image_tokens, input_ids, mask, match, k,
                                 batch_size=4)
    top_texts = similarity.topk(k, dim=1).indices
    for image in range(num_images):
        scored = torch.isfinite(i2t[image]).nonzero()[:, 0]
        assert set(scored.tolist()) == set(top_texts[image].tolist())
        assert torch.allclose(i2t[image, scored], similarity[image, scored] + bonus[image, scored])
    top_images = similarity.T.topk(k, dim=1).indices
    for text in range(num_texts):
        scored = torch.isfinite(t2i[text]).nonzero()[:, 0]
        assert set(scored.tolist()) == set(top_images[text].tolist())
        assert torch.allclose(t2i[text, scored], similarity[scored, text] + bonus[scored, text])
    # a zero ITM logit keeps ITC's order inside the top k and drops everything below it
    i2t_zero, _ = itm_rerank_scores(similarity, image_tokens, input_ids, mask,
                                    lambda t, i, m: torch.zeros(len(i)), k)
    assert torch.equal(i2t_zero.topk(k, dim=1).indices, top_texts)
    with pytest.raises(ConfigError, match="k_test"):
        itm_rerank_scores(similarity, image_tokens, input_ids, mask, match, 0)


def test_rerank_can_fix_an_itc_mistake_within_the_top_k():
    similarity = torch.tensor([[0.5, 0.6, 0.1], [0.6, 0.5, 0.1], [0.1, 0.2, 0.9]])
    text_to_image = torch.arange(3)
    itm = torch.tensor([[4.0, -4.0, 0.0], [-4.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    i2t, t2i = itm_rerank_scores(similarity, torch.arange(3.0)[:, None, None],
                                 torch.arange(3)[:, None], torch.ones(3, 1, dtype=torch.bool),
                                 lambda t, i, m: itm[t[:, 0, 0].long(), i[:, 0]], k_test=2)
    before = score_retrieval_metrics(similarity, similarity.T, text_to_image)
    after = score_retrieval_metrics(i2t, t2i, text_to_image)
    assert before["i2t_r1"] == pytest.approx(1 / 3) and after["i2t_r1"] == 1.0
    assert after["t2i_r1"] == 1.0


def test_blip_rerank_eval_on_a_tiny_model(tmp_path):
    from PIL import Image

    from vlp.data.sources import ListSource
    from vlp.eval.rerank import itm_rerank_eval
    from vlp.tokenizers import train_tokenizer

    captions = ["a red circle", "a blue square", "a green triangle", "two red squares"]
    paths = []
    for index, colour in enumerate(["red", "blue", "green", "purple"]):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(str(path))
    tokenizer = train_tokenizer(captions * 4, vocab_size=1024, context_length=32)
    torch.manual_seed(0)
    model = build_model(get_preset("blip-tiny"))
    metrics = itm_rerank_eval(model, tokenizer, ListSource(paths, captions), k_test=2,
                              batch_size=3, ks=(1, 2, 3), progress=False)
    assert metrics["num_images"] == 4 and metrics["k_test"] == 2
    for key in ("i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r3", "itm_rsum"):
        assert 0.0 <= metrics[key] <= (6.0 if key.endswith("rsum") else 1.0)
    # R@k beyond k_test can only count candidates inside the top k_test
    assert metrics["itm_i2t_r3"] == metrics["itm_i2t_r2"]
    assert metrics["itm_t2i_r3"] == metrics["itm_t2i_r2"]


# -- VQA accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("  the Dog. ", "dog"), ("an apple", "apple"), ("dont", "don't"),
    ("yes!", "yes"), ("red-blue", "red blue"), ("1,000", "1000"), ("2.5", "2.5"),
    ("ten cats", "10 cats"), ("none", "0"), ("isnt", "isn't"), ("left , right", "left  right"),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == " ".join(normal.split())


@pytest.mark.parametrize("hits, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                            (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(hits, expected):
    # hand-computed: with h matching annotators, leaving one of them out leaves h - 1 matches
    # (h of the 10 subsets), leaving another out leaves h: mean of min(1, matches / 3)
    answers = ["two"] * hits + ["three"] * (10 - hits)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_reference_and_summaries():
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(DataError):
        vqa_accuracy("yes", [])
    records = [QARecord("a.jpg", "q1", ("yes",), "exists"), QARecord("a.jpg", "q2", ("red",),
                                                                     "colour"),
               QARecord("b.jpg", "q3", ("no",), "exists"), QARecord("b.jpg", "q4", ("yes",),
                                                                    "exists")]
    summary = accuracy_summary(["yes", "blue", "yes", "yes"], records)
    assert summary["vqa_accuracy"] == 0.5 and summary["vqa_acc_exists"] == pytest.approx(2 / 3)
    assert summary["vqa_acc_colour"] == 0.0 and summary["num_questions"] == 4
    baselines = majority_baselines(records, records)
    assert baselines["majority_answer"] == "yes" and baselines["majority_accuracy"] == 0.5
    assert baselines["type_majority_accuracy"] == 0.75  # "yes" for exists, "red" for colour


def test_read_qa_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"image": "images/0.jpg", "question": "what colour?", "answer": "red",
             "type": "colour"}, {"image": "/abs/1.jpg", "question": "q", "answers": ["a", "b"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = read_qa_jsonl(path)
    assert first.image == str(tmp_path / "images/0.jpg") and first.answers == ("red",)
    assert second.image == "/abs/1.jpg" and second.answers == ("a", "b") and second.type is None
    path.write_text(json.dumps({"image": "x.jpg", "question": "q"}) + "\n")
    with pytest.raises(DataError, match="qa.jsonl:1"):
        read_qa_jsonl(path)


# -- answer ranking and the VQA batch path ---------------------------------------------------------


def _tiny_blip():
    torch.manual_seed(0)
    return build_model(get_preset("blip-tiny")).eval()


def test_rank_answers_is_the_full_answer_log_likelihood():
    model = _tiny_blip()
    text = model.config.text
    pixels = torch.randn(2, 3, 64, 64)
    questions = torch.tensor([[text.bos_id, 10, 11, text.eos_id], [text.bos_id, 12, text.eos_id,
                                                                    text.pad_id]])
    candidates = torch.tensor([[text.bos_id, 20, text.eos_id, text.pad_id],
                               [text.bos_id, 21, 22, text.eos_id],
                               [text.bos_id, 23, text.eos_id, text.pad_id]])
    scores = model.rank_answers(pixels, questions, candidates)
    assert scores.shape == (2, 3)
    for row in range(2):
        for c in range(3):
            length = int((candidates[c] != text.pad_id).sum())
            answer = candidates[c:c + 1, :length]
            with torch.no_grad():
                logits = model.vqa_answer_logits(pixels[row:row + 1],
                                                 questions[row:row + 1], answer)
            log_probs = logits[0, :-1].log_softmax(-1)
            expected = log_probs.gather(-1, answer[0, 1:, None]).sum()
            assert scores[row, c] == pytest.approx(float(expected), abs=1e-4)


def test_rank_mode_picks_the_most_likely_candidate(monkeypatch):
    from vlp.eval import vqa as vqa_module
    from vlp.tokenizers import train_tokenizer

    model = _tiny_blip()
    tokenizer = train_tokenizer(["red blue green yes no what colour is it"] * 4,
                                vocab_size=1024, context_length=32)
    records = [QARecord("x", "what colour is it?", ("blue",)) for _ in range(3)]
    batch = {"pixels": torch.randn(3, 3, 64, 64),
             "question_ids": tokenizer([r.question for r in records]), "index": torch.arange(3)}
    batch["question_mask"] = batch["question_ids"] != tokenizer.pad_id  # as QACollate gives
    monkeypatch.setattr(vqa_module, "qa_loader", lambda *a, **k: [batch])
    candidates = ["red", "blue", "green"]
    predictions = vqa_module.answer_questions(model, tokenizer, records, mode="rank",
                                              candidates=candidates, progress=False)
    ids = tokenizer(candidates)
    scores = model.rank_answers(batch["pixels"], batch["question_ids"], ids)
    assert predictions == [candidates[i] for i in scores.argmax(1).tolist()]
    generated = vqa_module.answer_questions(model, tokenizer, records, num_beams=1,
                                            max_new_tokens=3, progress=False)
    assert len(generated) == 3 and all(isinstance(g, str) for g in generated)
    with pytest.raises(ConfigError, match="candidate"):
        vqa_module.answer_questions(model, tokenizer, records, mode="rank")


def test_vqa_batch_trains_the_answer_decoder():
    model = _tiny_blip().train()
    text = model.config.text
    batch = {"pixels": torch.randn(4, 3, 64, 64),
             "question_ids": torch.tensor([[text.bos_id, 10, 11, text.eos_id]] * 4),
             "answer_ids": torch.tensor([[text.bos_id, 20, text.eos_id]] * 4)}
    out = model(batch)
    assert set(out["losses"]) == {"vqa"} and out["loss"].requires_grad
    out["loss"].backward()
    assert model.text_decoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.visual.transformer.blocks[0].attn.qkv.weight.grad is not None  # via question


def test_vlp_eval_cli_reranks_captions_and_answers(synthetic_train_csv, tmp_path, capsys):
    """`vlp eval` on a saved blip-tiny: ITM re-ranked retrieval, captioning and both VQA modes
    in one JSON; rank mode without candidates is a clear error."""
    import vlp
    from vlp.cli import main
    from vlp.tokenizers import train_tokenizer

    data = synthetic_train_csv(16).parent
    captions = [line.split(",", 1)[1] for line in (data / "train.csv").read_text().splitlines()]
    tokenizer = train_tokenizer(captions[1:] + ["yes", "no", "red", "blue"], vocab_size=1024,
                                context_length=32)
    torch.manual_seed(0)
    checkpoint = tmp_path / "blip"
    vlp.save(build_model(get_preset("blip-tiny")), checkpoint, tokenizer)
    candidates = tmp_path / "answers.txt"
    candidates.write_text("yes\nno\nred\nblue\n")
    common = ["eval", str(checkpoint), "--no-progress", "--num-workers", "0",
              "--eval-batch-size", "8", "--num-beams", "1"]
    assert main(common + ["--retrieval-data", str(data / "test.csv"), "--itm-k", "3",
                          "--caption-data", str(data / "val.csv"),
                          "--vqa-data", str(data / "test_qa.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["k_test"] == 3 and metrics["num_texts"] == 8
    assert 0 <= metrics["itm_i2t_r1"] <= metrics["itm_i2t_r5"] <= 1
    assert metrics["caption_num_images"] == 8 and metrics["caption_cider"] >= 0
    questions = len(read_qa_jsonl(data / "test_qa.jsonl"))
    assert metrics["num_questions"] == questions and 0 <= metrics["vqa_accuracy"] <= 1
    assert main(common + ["--vqa-data", str(data / "test_qa.jsonl"), "--vqa-mode", "rank",
                          "--vqa-candidates", str(candidates)]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["num_questions"] == questions
    assert main(common + ["--vqa-data", str(data / "test_qa.jsonl"), "--vqa-mode",
                          "rank"]) == 2
    assert "needs candidate answers" in capsys.readouterr().err
