"""The one inference input path (`vlp.data.images`): the unique images of a source, and one
rule for unreadable images everywhere (embed, retrieval, ITM re-ranking, captioning, VQA eval,
CapFilt): skipped, counted and named, never raised mid-run, the rest scored as if it were
absent."""

import csv
import io
import json
import warnings

import pytest
import torch
from PIL import Image

import vlp
from vlp.config import get_preset
from vlp.data import CsvSource, ListSource
from vlp.data.images import (
    collate_images,
    group_images,
    image_batches,
    image_inputs,
    read_images,
    unique_images,
)
from vlp.data.qa import QARecord, qa_loader, read_qa_jsonl
from vlp.data.transforms import image_transform
from vlp.eval.captioning import caption_eval
from vlp.eval.embed import embed_images
from vlp.eval.rerank import itm_rerank_eval
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.vqa import vqa_eval
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
SKIP_KEYS = ("num_skipped", "skipped")


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(out, format="PNG")
    return out.getvalue()


# -- the unique images of a source ----------------------------------------------------------------

def test_group_images_paths_by_string_bytes_by_content_first_seen():
    red, blue = _png("red"), _png("blue")
    source = ListSource(["b.jpg", red, "a.jpg", bytes(red), "b.jpg", blue, "a.jpg"],
                        ["one", "two", "", "three", "four", None, "five"])
    groups = group_images(source)
    assert groups.images == ["b.jpg", red, "a.jpg", blue]
    assert groups.ids == ["b.jpg", "1", "a.jpg", "5"]  # a path, or the key of bytes' record
    assert groups.texts == ["one", "two", "three", "four", "five"]
    assert groups.text_to_image == [0, 1, 1, 0, 2]
    assert groups.references() == [["one", "four"], ["two", "three"], ["five"], []]
    captioned = groups.captioned()  # the blue image has no caption
    assert captioned.images == ["b.jpg", red, "a.jpg"] and captioned.ids == groups.ids[:3]
    assert captioned.text_to_image == groups.text_to_image
    assert unique_images(source) == (groups.images, groups.ids)
    # a plain list is taken as given; a source is reduced to its unique images
    assert image_inputs([red, "x.jpg", red]) == ([red, "x.jpg", red], ["#0", "x.jpg", "#2"])
    assert image_inputs(source) == (groups.images, groups.ids)


def test_collate_sets_unreadable_items_apart_with_their_reason(tmp_path):
    (tmp_path / "good.png").write_bytes(_png("green"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    images = [str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
              str(tmp_path / "missing.png"), _png("red")]
    transform = image_transform(get_preset("clip-tiny"), train=False)
    read = read_images(images, transform)
    assert read.indices.tolist() == [0, 3] and read.pixels.shape[0] == 2
    assert read.unreadable == [1, 2] and read.reasons == ["corrupt_image", "missing_image"]
    batches = list(image_batches(images, transform, batch_size=2, extras=["a", "b", "c", "d"]))
    assert [b.indices.tolist() for b in batches] == [[0], [3]]
    assert [b.extras for b in batches] == [["a"], ["d"]]
    assert batches[1].unreadable == [2]
    empty = collate_images([])
    assert empty.pixels is None and empty.unreadable == [] and empty.indices.numel() == 0


# -- one corrupt image among a few: every inference path skips it and names it --------------------

@pytest.fixture(scope="module")
def world(synthetic_train_csv, tmp_path_factory):
    """Three synthetic images with their captions (the first with a second one), a corrupt
    image second in the source, the same source without it, and QA records on both."""
    train_csv = synthetic_train_csv(16)
    root = train_csv.parent
    with open(train_csv) as f:
        rows = [(str(root / row["filepath"]), row["caption"]) for row in csv.DictReader(f)][:3]
    out = tmp_path_factory.mktemp("corrupt")
    broken = str(out / "broken.jpg")
    (out / "broken.jpg").write_bytes(b"\xff\xd8 a cut-off jpeg")
    clean = rows + [(rows[0][0], "the same picture again")]
    mixed = [rows[0], (broken, "a picture that cannot be read"), *clean[1:]]
    for name, pairs in (("clean", clean), ("mixed", mixed)):
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "caption"])
            writer.writerows(pairs)
    questions = [r for r in read_qa_jsonl(root / "train_qa.jsonl")
                 if r.image in {image for image, _ in rows}][:6]
    corrupt = QARecord(broken, "what colour is the circle?", ("blue",), "colour")
    captions = [caption for _, caption in mixed]
    tokenizer = train_tokenizer(captions * 4 + [f"{q.question} {q.answers[0]}"
                                                for q in questions] * 4,
                                vocab_size=1024, context_length=32)
    return {"clean": CsvSource(out / "clean.csv"), "mixed": CsvSource(out / "mixed.csv"),
            "broken": broken, "questions": questions,
            "mixed_questions": [*questions[:2], corrupt, *questions[2:]],
            "tokenizer": tokenizer, "good": [image for image, _ in rows]}


def _model(name, tokenizer):
    config = get_preset(name)
    config.text.vocab_size = max(config.text.vocab_size, tokenizer.vocab_size)
    config.text.pad_id, config.text.bos_id = tokenizer.pad_id, tokenizer.bos_id
    config.text.eos_id = tokenizer.eos_id
    if name == "blip-tiny":
        config.queue_size = 8
    torch.manual_seed(0)
    return build_model(config).eval()


def _without_skips(metrics):
    return {k: v for k, v in metrics.items() if k not in SKIP_KEYS}


def test_embed_and_retrieval_skip_and_name_a_corrupt_image(world):
    tokenizer = world["tokenizer"]
    clip = _model("clip-tiny", tokenizer)
    embedded = embed_images(clip, world["mixed"], batch_size=2, progress=False)
    assert embedded.skipped == [world["broken"]]
    assert embedded.ids == world["good"] and embedded.indices.tolist() == [0, 2, 3]
    clean = embed_images(clip, world["clean"], batch_size=2, progress=False)
    assert torch.allclose(embedded.embeddings, clean.embeddings, atol=1e-5)

    metrics = retrieval_eval(clip, tokenizer, world["mixed"], batch_size=2, progress=False)
    assert metrics["num_skipped"] == 1 and metrics["skipped"] == [world["broken"]]
    assert metrics["num_images"] == 3 and metrics["num_texts"] == 4
    reference = retrieval_eval(clip, tokenizer, world["clean"], batch_size=2, progress=False)
    assert reference["num_skipped"] == 0 and reference["skipped"] == []
    assert _without_skips(metrics) == _without_skips(reference)


def test_captioning_and_itm_reranking_skip_and_name_a_corrupt_image(world):
    tokenizer = world["tokenizer"]
    blip = _model("blip-tiny", tokenizer)
    options = dict(batch_size=2, max_new_tokens=4, num_beams=1, progress=False, backend="vlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # METEOR left out without Java
        metrics = caption_eval(blip, tokenizer, world["mixed"], **options)
        reference = caption_eval(blip, tokenizer, world["clean"], **options)
    assert metrics["num_skipped"] == 1 and metrics["skipped"] == [world["broken"]]
    assert metrics["num_images"] == 3
    assert _without_skips(metrics) == _without_skips(reference)

    reranked = itm_rerank_eval(blip, tokenizer, world["mixed"], k_test=2, batch_size=2,
                               progress=False)
    assert reranked["num_skipped"] == 1 and reranked["skipped"] == [world["broken"]]
    assert reranked["num_images"] == 3 and reranked["num_texts"] == 4
    clean = itm_rerank_eval(blip, tokenizer, world["clean"], k_test=2, batch_size=2,
                            progress=False)
    assert _without_skips(reranked) == pytest.approx(_without_skips(clean), abs=1e-6)


def test_vqa_eval_skips_and_names_a_corrupt_image(world):
    """Behaviour changed on purpose: a question whose image cannot be read used to end the
    run; it is now skipped and accuracy is over the answered questions."""
    tokenizer, mixed = world["tokenizer"], world["mixed_questions"]
    blip = _model("blip-tiny", tokenizer)
    options = dict(num_beams=1, max_new_tokens=3, progress=False)
    for batch_size in (1, 3):  # a batch with nothing readable, and a mixed one
        metrics = vqa_eval(blip, tokenizer, mixed, batch_size=batch_size, **options)
        assert metrics["num_skipped"] == 1 and metrics["skipped"] == [world["broken"]]
        assert metrics["num_questions"] == len(mixed) - 1
    alone = vqa_eval(blip, tokenizer, mixed, batch_size=1, **options)
    reference = vqa_eval(blip, tokenizer, world["questions"], batch_size=1, **options)
    assert reference["num_skipped"] == 0
    assert _without_skips(alone) == _without_skips(reference)
    candidates = sorted({a for q in mixed for a in q.answers})
    ranked = vqa_eval(blip, tokenizer, mixed, mode="rank", candidates=candidates,
                      batch_size=2, progress=False)
    assert ranked["skipped"] == [world["broken"]]


def test_qa_loader_batches_name_the_unreadable_questions(world):
    tokenizer, mixed = world["tokenizer"], world["mixed_questions"]
    batches = list(qa_loader(mixed, get_preset("blip-tiny"), tokenizer, batch_size=4,
                             train=False))
    first = batches[0]
    assert first["index"].tolist() == [0, 1, 3] and first["pixels"].shape[0] == 3
    assert first["question_ids"].shape[0] == 3
    assert first["unreadable"] == [2] and first["reasons"] == ["corrupt_image"]


def test_capfilt_filter_sets_aside_an_image_unreadable_since_captioning(world, tmp_path):
    """The filter reads images through the same path: an image that broke after the caption
    stage is dropped with its reason instead of ending the stage."""
    from vlp.capfilt import CapfiltConfig, capfilt

    tokenizer = world["tokenizer"]
    blip = _model("blip-tiny", tokenizer)
    vlp.save(blip, tmp_path / "blip", tokenizer=tokenizer)
    images = []
    for i, image in enumerate(world["good"][:2]):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(open(image, "rb").read())
    (tmp_path / "web.csv").write_text("filepath,caption\n0.jpg,a picture\n1.jpg,another\n")
    cfg = CapfiltConfig(out=str(tmp_path / "out"), data=str(tmp_path / "web.csv"),
                        captioner=str(tmp_path / "blip"), filter=str(tmp_path / "blip"),
                        max_new_tokens=4, itm_threshold=0.0, progress=False)
    capfilt(cfg, stages=("caption",))
    images[1].write_bytes(b"broken since")
    capfilt(cfg, stages=("filter",))
    rows = [json.loads(line) for line in (tmp_path / "out" / "filtered" / "unit-000000.jsonl")
            .read_text().splitlines()]
    assert [row.get("skipped") for row in rows] == [None, "corrupt_image"]
    assert all(c["itm"] is not None for c in rows[0]["captions"] if c["text"].strip())
    assert [(c["itm"], c["kept"]) for c in rows[1]["captions"]] == \
        [(None, False)] * len(rows[1]["captions"])
