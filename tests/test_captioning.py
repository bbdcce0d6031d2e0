"""Captioning metrics (hand-computed cases, parity with pycocoevalcap) and caption_eval."""

import math
import warnings

import pytest
import torch
from PIL import Image

from vlp.config import get_preset
from vlp.data import CsvSource
from vlp.errors import ConfigError, DataError
from vlp.eval.captioning import (
    bleu_scores,
    caption_eval,
    caption_metrics,
    cider_d_score,
    generate_captions,
    pycocoevalcap_available,
    rouge_l_score,
    tokenize_caption,
)
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_identical_caption_scores_one():
    refs = {0: ["a red circle on a blue square"]}
    cands = {0: "a red circle on a blue square"}
    assert bleu_scores(refs, cands)[3] == pytest.approx(1.0, abs=1e-8)
    assert rouge_l_score(refs, cands) == pytest.approx(1.0)


def test_partial_overlap_worked_by_hand():
    # clipped matches: unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5, trigrams 1/4, 4-grams
    # 0/3; equal lengths -> no brevity penalty. LCS "the cat on the mat" = 5 -> P = R = 5/6.
    refs = {0: ["the cat is on the mat"]}
    cands = {0: "the cat sat on the mat"}
    b1, b2, b3, b4 = bleu_scores(refs, cands)
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx(0.5)
    assert b4 == pytest.approx(0.0, abs=1e-4)
    assert rouge_l_score(refs, cands) == pytest.approx(5 / 6)


def test_brevity_penalty_and_closest_reference_length():
    short = bleu_scores({0: ["the cat sat on the mat"]}, {0: "the cat"})
    assert short[0] == pytest.approx(math.exp(1 - 6 / 2))
    # closest reference (2 words, not 10) sets the length: 3 >= 2, no penalty; precision 2/3
    closest = bleu_scores({0: ["a cat", "a b c d e f g h i j"]}, {0: "a cat sat"})
    assert closest[0] == pytest.approx(2 / 3)
    # ROUGE-L: P = 1, R = 1/3, F = (1 + b^2) P R / (R + b^2 P) with b = 1.2
    expected = 2.44 * (1 / 3) / (1 / 3 + 1.44)
    assert rouge_l_score({0: ["the cat sat on the mat"]}, {0: "the cat"}) == pytest.approx(
        expected)


def test_cider_d_by_hand_and_ranks_matching_above_mismatched():
    refs = {0: ["a red circle on grass"], 1: ["two blue squares in snow"]}
    # disjoint captions: every n-gram has df 1 -> equal idf weights, cosine 1 for n = 1..4,
    # no length penalty: (1 + 1 + 1 + 1) / 4 * 10 per image
    assert cider_d_score(refs, {0: refs[0][0], 1: refs[1][0]}) == pytest.approx(10.0)
    swapped = cider_d_score(refs, {0: refs[1][0], 1: refs[0][0]})
    assert swapped == pytest.approx(0.0)
    # the clipping of CIDEr-D: repeating a matching word does not raise the score
    repeated = cider_d_score(refs, {0: "red red red red red", 1: refs[1][0]})
    once = cider_d_score(refs, {0: "red", 1: refs[1][0]})
    assert repeated <= once + 1e-9


def test_tokenize_caption_like_ptb():
    assert tokenize_caption("A man's dog, running (fast)!") == (
        "a man 's dog running -lrb- fast -rrb-")
    assert tokenize_caption('Don\'t "quote": 3.5 t-shirts -- 50%.') == (
        "do n't quote 3.5 t-shirts 50 %")


def test_caption_metrics_vlp_backend_tokenises_and_leaves_out_meteor():
    refs = {"a.jpg": ["The cat is on the mat.", "A cat on a mat!"], "b.jpg": ["Two dogs run."]}
    cands = {"a.jpg": "the cat is on the mat", "b.jpg": "Two dogs run"}
    with pytest.warns(UserWarning, match="METEOR"):
        metrics = caption_metrics(refs, cands, backend="vlp")
    assert "meteor" not in metrics
    assert metrics["bleu_1"] == pytest.approx(1.0)
    assert metrics["rouge_l"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="b.jpg"):
        caption_metrics({"a.jpg": ["x"]}, cands, backend="vlp")
    with pytest.raises(ConfigError, match="backend"):
        caption_metrics(refs, cands, backend="nltk")


@pytest.mark.skipif(not pycocoevalcap_available(), reason="pycocoevalcap / java not installed")
def test_scores_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    generator = torch.Generator().manual_seed(0)
    words = "a the dog cat red blue circle square on in of sits runs big small".split()

    def sentence(low: int, high: int) -> str:
        n = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,),
                                                             generator=generator))

    refs = {i: [sentence(3, 10) for _ in range(1 + i % 4)] for i in range(12)}
    cands = {i: sentence(2, 10) for i in range(12)}
    cands[3] = refs[3][0]
    gts, res = refs, {i: [c] for i, c in cands.items()}
    theirs_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu_scores(refs, cands) == pytest.approx(theirs_bleu, abs=1e-6)
    assert rouge_l_score(refs, cands) == pytest.approx(Rouge().compute_score(gts, res)[0],
                                                       abs=1e-6)
    assert cider_d_score(refs, cands) == pytest.approx(Cider().compute_score(gts, res)[0],
                                                       abs=1e-6)
    raw = ["A man's dog, running (fast) on the beach!", "Don't \"quote\": 3.5 t-shirts at 10:30.",
           "A close-up of a cat's face; it's 5 o'clock [x]"]
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(raw)})
    assert [tokenize_caption(t) for t in raw] == [theirs[i][0] for i in range(len(raw))]


# -- generation + caption_eval on a tiny random CoCa -------------------------------------------

CAPTIONS = ["a red circle", "a small red circle", "a blue square", "one blue square",
            "a green star", "the green star"]


@pytest.fixture(scope="module")
def tiny_coca():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16)
    config = get_preset("coca-tiny")
    config.embed_dim = 32
    config.caption_queries = 4
    config.pooler_heads = 2
    config.decoder_layers = 1
    config.decoder_heads = 2
    v = config.vision
    v.image_size, v.patch_size, v.width, v.layers, v.heads = 32, 16, 32, 1, 2
    t = config.text
    t.width, t.layers, t.heads, t.context_length = 32, 1, 2, 16
    t.vocab_size = tokenizer.vocab_size
    t.pad_id, t.bos_id, t.eos_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    return build_model(config).eval(), tokenizer


def write_caption_csv(tmp_path, broken: bool = False):
    rows = ["filepath,caption"]
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        rows += [f"{i}.png,{CAPTIONS[2 * i]}", f"{i}.png,{CAPTIONS[2 * i + 1]}"]
    if broken:
        (tmp_path / "broken.png").write_bytes(b"not an image")
        rows.append("broken.png,a broken image")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "captions.csv"


def test_generate_captions_one_per_readable_image(tiny_coca, tmp_path):
    model, tokenizer = tiny_coca
    write_caption_csv(tmp_path, broken=True)
    images = [str(tmp_path / n) for n in ("0.png", "broken.png", "1.png")]
    result = generate_captions(model, tokenizer, images, batch_size=2, max_new_tokens=5,
                               num_beams=1, progress=False)
    assert [image for image, _ in result.pairs] == [images[0], images[2]]
    assert result.indices == [0, 2]
    assert result.skipped == [images[1]]
    assert all(isinstance(text, str) for _, text in result.pairs)
    # greedy decoding is deterministic and the batch size does not change it
    again = generate_captions(model, tokenizer, images, batch_size=1, max_new_tokens=5,
                              num_beams=1, progress=False)
    assert again.pairs == result.pairs
    prompted = generate_captions(model, tokenizer, images[:1], batch_size=1, max_new_tokens=3,
                                 num_beams=1, prompt="a red", progress=False)
    assert len(prompted.pairs) == 1


def test_caption_eval_scores_each_unique_image(tiny_coca, tmp_path):
    model, tokenizer = tiny_coca
    source = CsvSource(write_caption_csv(tmp_path, broken=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = caption_eval(model, tokenizer, source, batch_size=2, max_new_tokens=4,
                               num_beams=2, progress=False, backend="vlp")
    assert metrics["num_images"] == 3
    assert metrics["num_skipped"] == 1
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["cider"] >= 0.0
