"""vlp.eval: metric functions on hand-made features, and the model-level evals on a tiny CLIP."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlp.config import get_preset
from vlp.contract import PretrainModel
from vlp.data.sources import CsvSource, ImageFolderSource
from vlp.data.transforms import image_transform
from vlp.errors import ConfigError
from vlp.eval import (
    embed_images,
    embed_texts,
    load_embeddings,
    retrieval_eval,
    retrieval_metrics,
    save_embeddings,
    topk_accuracy,
    zero_shot_classifier,
    zeroshot_eval,
)
from vlp.eval.retrieval import retrieval_groups
from vlp.eval.zeroshot import GENERIC_TEMPLATES
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer

# ---------------------------------------------------------------------------------------
# retrieval_metrics: with one-hot image features, text m scores SCORES[m, n] against image n


def _one_hot_images(n: int) -> torch.Tensor:
    return torch.eye(n)


# text x image similarities; the own image of text m is image m
SCORES = torch.tensor([
    [0.9, 0.1, 0.2, 0.3],  # t2i rank 1
    [0.8, 0.5, 0.7, 0.1],  # own 0.5 < 0.8, 0.7: rank 3
    [0.1, 0.2, 0.3, 0.25],  # own 0.3 first: rank 1
    [0.6, 0.7, 0.8, 0.1],  # own 0.1 last: rank 4
])
# i2t (columns): img0 rank 1; img1 0.5 < 0.7: 2; img2 0.3 < 0.7, 0.8: 3;
# img3 own 0.1 < 0.3, 0.25 and tied with text1's 0.1 (ties count against): 4


def test_perfect_retrieval_scores_one():
    features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    metrics = retrieval_metrics(features, features, torch.arange(6))
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert metrics[key] == 1.0
    assert metrics["i2t_mean_rank"] == metrics["t2i_median_rank"] == 1.0
    assert metrics["rsum"] == 6.0
    assert metrics["num_images"] == 6 and metrics["num_texts"] == 6


def test_known_ranks_both_directions_with_a_tie():
    metrics = retrieval_metrics(_one_hot_images(4), SCORES, torch.arange(4), ks=(1, 2, 3))
    # i2t ranks [1, 2, 3, 4] (3 if ties went the model's way); t2i ranks [1, 3, 1, 4]
    assert metrics["i2t_r1"] == 0.25 and metrics["i2t_r2"] == 0.5 and metrics["i2t_r3"] == 0.75
    assert metrics["t2i_r1"] == 0.5 and metrics["t2i_r2"] == 0.5 and metrics["t2i_r3"] == 0.75
    assert metrics["i2t_mean_rank"] == 2.5 and metrics["i2t_median_rank"] == 2.5
    assert metrics["t2i_mean_rank"] == 2.25 and metrics["t2i_median_rank"] == 2.0
    assert metrics["rsum"] == pytest.approx(0.25 + 0.5 + 0.75 + 0.5 + 0.5 + 0.75)


def test_an_image_hits_when_any_of_its_captions_ranks_high():
    scores = torch.tensor([
        [0.2, 0.9],  # caption of image 0
        [0.8, 0.1],  # caption of image 0: image 0's best caption, top of its column
        [0.3, 0.4],  # caption of image 1
        [0.5, 0.6],  # caption of image 1: image 1's best, but text 0 scores 0.9 there
    ])
    metrics = retrieval_metrics(_one_hot_images(2), scores, torch.tensor([0, 0, 1, 1]),
                                ks=(1, 2))
    assert metrics["i2t_r1"] == 0.5 and metrics["i2t_r2"] == 1.0  # ranks [1, 2]
    assert metrics["t2i_r1"] == 0.75  # ranks [2, 1, 1, 1]
    assert metrics["t2i_mean_rank"] == 1.25 and metrics["t2i_median_rank"] == 1.0
    assert metrics["num_texts"] == 4


def test_collapsed_features_score_chance_not_perfect():
    same = torch.ones(5, 4) / 2
    metrics = retrieval_metrics(same, same, torch.arange(5), ks=(1,))
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0
    assert metrics["t2i_mean_rank"] == 5.0


def _brute_force_ranks(images, texts, text_to_image):
    similarity = (images @ texts.T).numpy()  # (N, M)
    i2t = []
    for n in range(similarity.shape[0]):
        order = np.argsort(-similarity[n])
        own = np.nonzero(text_to_image.numpy()[order] == n)[0]
        i2t.append(own.min() + 1)
    t2i = []
    for m in range(similarity.shape[1]):
        order = np.argsort(-similarity[:, m])
        t2i.append(int(np.nonzero(order == int(text_to_image[m]))[0][0]) + 1)
    return np.array(i2t), np.array(t2i)


def test_chunking_does_not_change_results_and_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(37, 16, generator=generator)
    texts = torch.randn(90, 16, generator=generator)
    text_to_image = torch.cat([torch.arange(37), torch.randint(0, 37, (53,), generator=generator)])
    chunked = retrieval_metrics(images, texts, text_to_image, chunk_size=5)
    whole = retrieval_metrics(images, texts, text_to_image, chunk_size=10_000)
    assert chunked == whole
    i2t, t2i = _brute_force_ranks(images, texts, text_to_image)
    for k in (1, 5, 10):
        assert chunked[f"i2t_r{k}"] == pytest.approx((i2t <= k).mean())
        assert chunked[f"t2i_r{k}"] == pytest.approx((t2i <= k).mean())
    assert chunked["i2t_median_rank"] == pytest.approx(np.median(i2t))
    assert chunked["t2i_mean_rank"] == pytest.approx(t2i.mean())


def test_retrieval_rejects_an_image_without_captions():
    with pytest.raises(ValueError, match="image 2 has no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 1]))


# ---------------------------------------------------------------------------------------
# topk_accuracy


def test_topk_accuracy_with_known_logits():
    logits = torch.tensor([
        [3.0, 1.0, 2.0],  # label 0 first
        [0.0, 5.0, 1.0],  # label 2 second
        [2.0, 1.0, 0.5],  # label 2 third
        [1.0, 2.0, 3.0],  # label 0 third
    ])
    labels = torch.tensor([0, 2, 2, 0])
    assert topk_accuracy(logits, labels, ks=(1, 2, 3)) == {"top1": 0.25, "top2": 0.5, "top3": 1.0}
    assert set(topk_accuracy(logits, labels)) == {"top1", "top5"}


def test_topk_accuracy_counts_ties_against_the_label():
    assert topk_accuracy(torch.zeros(4, 10), torch.arange(4), ks=(1, 5)) == {
        "top1": 0.0, "top5": 0.0
    }


# ---------------------------------------------------------------------------------------
# embeddings files


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_save_and_load_embeddings_round_trip(tmp_path, suffix):
    embeddings = torch.randn(3, 5)
    ids = ["a.jpg", "b/c.jpg", "d é.png"]
    path = save_embeddings(tmp_path / "out" / f"emb{suffix}", embeddings, ids)
    loaded, loaded_ids = load_embeddings(path)
    assert torch.equal(loaded, embeddings) and loaded_ids == ids
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_save_embeddings_rejects_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match=r"\.safetensors or \.npy"):
        save_embeddings(tmp_path / "emb.pt", torch.zeros(1, 2), ["x"])


# ---------------------------------------------------------------------------------------
# model level: a tiny CLIP, a tokenizer trained on the fly, images written to tmp_path

CLASSES = ["red circle", "blue square", "green triangle"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def _tiny_clip(tokenizer):
    config = get_preset("clip-tiny")
    config.embed_dim = 32
    config.vision.image_size, config.vision.patch_size = 32, 8
    config.vision.width, config.vision.layers, config.vision.heads = 32, 2, 2
    config.text.width, config.text.layers, config.text.heads = 32, 2, 2
    config.text.context_length = 16
    config.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return build_model(config)


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    corpus = [template.format(name) for name in CLASSES for template in GENERIC_TEMPLATES]
    tokenizer = train_tokenizer(corpus * 4, vocab_size=300, context_length=16)
    return _tiny_clip(tokenizer), tokenizer


def _draw(path, colour, index):
    image = Image.new("RGB", (40, 36), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((4 + index, 4, 30, 30 - index), fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


class ColourOracle(PretrainModel):
    """A model on the contract (`vlp.contract`) with features fixed by hand.

    An image is its mean colour minus grey; a text is the colour word it names, the same way.
    Every image then matches its own colour's texts with cosine ~1 and the others' with ~-0.5,
    so zero-shot accuracy and retrieval recall must come out exactly 1.0.
    """

    def __init__(self, tokenizer, config):
        super().__init__()
        self.tokenizer = tokenizer
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def encode_image(self, pixels):
        rgb = pixels.float().mean(dim=(2, 3))  # (B, 3)
        return torch.nn.functional.normalize(rgb - rgb.mean(dim=1, keepdim=True), dim=-1)

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        vectors = []
        for text in self.tokenizer.batch_decode(input_ids):
            (colour,) = [c for c in COLOURS if re.search(rf"\b{c}\b", text)]
            rgb = torch.tensor(COLOURS[colour], dtype=torch.float32)
            vectors.append(rgb - rgb.mean())
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


@pytest.fixture(scope="module")
def oracle(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    return ColourOracle(tokenizer, model.config), tokenizer


@pytest.fixture()
def image_folder(tmp_path):
    """root/{class_dir}/{i}.jpg, two per class, plus one unreadable file, second in order."""
    root = tmp_path / "imagefolder"
    for name in CLASSES:
        for index in range(2):
            _draw(root / name.replace(" ", "_") / f"{index:06d}.jpg", name.split()[0], index)
    (root / "blue_square" / "000000_broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture()
def captions_csv(tmp_path):
    """4 images, 2 captions each (8 rows), one CSV beside an images/ directory."""
    rows = ["filepath,caption"]
    for index in range(4):
        colour = list(COLOURS)[index % 3]
        _draw(tmp_path / "images" / f"{index:06d}.jpg", colour, index)
        rows += [f"images/{index:06d}.jpg,a {colour} circle", f"images/{index:06d}.jpg,{colour}"]
    path = tmp_path / "captions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_embed_texts_is_normalised_batch_invariant_and_keeps_train_mode(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    model.train()
    model.text.eval()  # a frozen tower stays in eval mode afterwards
    texts = ["a red circle", "blue", "a photo of a green triangle.", "a blue square"]
    whole = embed_texts(model, tokenizer, texts, batch_size=16, progress=False)
    one_by_one = embed_texts(model, tokenizer, texts, batch_size=1, progress=False)
    assert model.training and model.visual.training and not model.text.training
    model.train()
    assert whole.shape == (4, 32) and whole.dtype == torch.float32
    assert torch.allclose(whole.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(whole, one_by_one, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)


def test_zero_shot_classifier_averages_templates_per_class(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    templates = ["a photo of a {}.", "a {}."]
    classifier = zero_shot_classifier(model, tokenizer, CLASSES, templates, batch_size=2,
                                      progress=False)
    assert classifier.shape == (32, 3)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(3), atol=1e-5)
    for c, name in enumerate(CLASSES):
        prompts = embed_texts(model, tokenizer, [t.format(name) for t in templates],
                              progress=False)
        expected = torch.nn.functional.normalize(prompts.sum(dim=0), dim=0)
        assert torch.allclose(classifier[:, c], expected, atol=1e-5)


def test_zero_shot_rejects_templates_without_a_slot(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    with pytest.raises(ConfigError, match="exactly one"):
        zero_shot_classifier(model, tokenizer, CLASSES, ["a photo"], progress=False)


def test_embed_images_skips_unreadable_and_is_batch_invariant(clip_and_tokenizer, image_folder):
    model, _ = clip_and_tokenizer
    batched = embed_images(model, image_folder, batch_size=4, progress=False)
    single = embed_images(model, image_folder, batch_size=1, progress=False)
    in_worker = embed_images(model, image_folder, batch_size=3, num_workers=1, progress=False)
    assert torch.allclose(in_worker.embeddings, batched.embeddings, atol=1e-5)
    assert batched.embeddings.shape == (6, 32)
    assert batched.skipped == [str(image_folder / "blue_square" / "000000_broken.jpg")]
    assert batched.ids == single.ids and len(batched.ids) == 6
    assert batched.ids == sorted(batched.ids)
    assert batched.indices.tolist() == [0, 2, 3, 4, 5, 6]
    assert torch.allclose(batched.embeddings, single.embeddings, atol=1e-5)
    assert torch.allclose(batched.embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_zeroshot_eval_keys_ranges_and_determinism(clip_and_tokenizer, image_folder):
    model, tokenizer = clip_and_tokenizer
    first = zeroshot_eval(model, tokenizer, image_folder, batch_size=4, progress=False)
    again = zeroshot_eval(model, tokenizer, str(image_folder), batch_size=2, progress=False)
    assert set(first) == {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_top1",
                          "num_images", "num_classes", "num_skipped"}
    assert first["num_images"] == 6 and first["num_classes"] == 3 and first["num_skipped"] == 1
    assert first["zeroshot_top5"] == 1.0  # only 3 classes
    assert first["zeroshot_top1"] in {i / 6 for i in range(7)}
    assert 0.0 <= first["zeroshot_mean_per_class_top1"] <= 1.0
    assert first == again


def test_zeroshot_top1_matches_per_image_encoding(clip_and_tokenizer, image_folder):
    model, tokenizer = clip_and_tokenizer
    templates = ["a photo of a {}."]
    metrics = zeroshot_eval(model, tokenizer, image_folder, templates=templates, progress=False)
    source = ImageFolderSource(image_folder)
    prompts = torch.cat([model.encode_text(tokenizer(t.format(c), context_length=16))
                         for c in source.classnames for t in templates])
    transform = image_transform(model.config.vision, train=False)
    correct = []
    with torch.no_grad():
        for record in source:
            if record.key.endswith("broken.jpg"):
                continue
            pixels = transform(Image.open(record.image).convert("RGB"))[None]
            scores = model.encode_image(pixels) @ prompts.T
            correct.append(int(scores.argmax()) == record.label)
    assert len(correct) == metrics["num_images"] == 6
    assert metrics["zeroshot_top1"] == pytest.approx(sum(correct) / 6)


def test_zeroshot_is_exact_for_a_model_that_sees_colour(oracle, image_folder):
    model, tokenizer = oracle
    metrics = zeroshot_eval(model, tokenizer, image_folder, progress=False)
    assert metrics["zeroshot_top1"] == 1.0 and metrics["zeroshot_mean_per_class_top1"] == 1.0
    # labels follow class names, not positions: the folder sorts "blue square" first
    reordered = zeroshot_eval(model, tokenizer, image_folder, classnames=CLASSES[::-1],
                              progress=False)
    assert reordered == metrics
    with pytest.raises(ConfigError, match="not among"):
        zeroshot_eval(model, tokenizer, image_folder, classnames=CLASSES[:2], progress=False)


def test_retrieval_is_perfect_for_a_model_that_sees_colour(oracle, tmp_path):
    model, tokenizer = oracle
    rows = ["filepath,caption"]
    for index, colour in enumerate(COLOURS):
        _draw(tmp_path / f"{index}.png", colour, index)
        rows += [f"{index}.png,{colour}", f"{index}.png,a {colour} circle"]
    rows.append("broken.png,a red circle")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    metrics = retrieval_eval(model, tokenizer, CsvSource(tmp_path / "captions.csv"), batch_size=2,
                             progress=False)
    assert metrics["num_images"] == 3 and metrics["num_texts"] == 6
    assert metrics["num_skipped"] == 1
    assert metrics["rsum"] == 6.0
    assert metrics["i2t_mean_rank"] == metrics["t2i_mean_rank"] == 1.0


def test_retrieval_eval_keys_ranges_and_determinism(clip_and_tokenizer, captions_csv):
    model, tokenizer = clip_and_tokenizer
    first = retrieval_eval(model, tokenizer, CsvSource(captions_csv), batch_size=3,
                           progress=False)
    again = retrieval_eval(model, tokenizer, CsvSource(captions_csv), batch_size=8,
                           progress=False)
    assert first["num_images"] == 4 and first["num_texts"] == 8 and first["num_skipped"] == 0
    for direction in ("i2t", "t2i"):
        assert 0.0 <= first[f"{direction}_r1"] <= first[f"{direction}_r5"] <= 1.0
        assert 1.0 <= first[f"{direction}_median_rank"] <= 7.0
    assert first["t2i_r5"] == 1.0  # 4 images: every rank <= 4
    assert first["i2t_r10"] == 1.0  # 6 wrong texts per image: every rank <= 7
    assert first["rsum"] == pytest.approx(sum(
        first[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)
    ))
    assert first.keys() == again.keys()
    for key in first:
        assert first[key] == pytest.approx(again[key], abs=1e-6)


def test_retrieval_eval_drops_captions_of_unreadable_images(clip_and_tokenizer, captions_csv):
    model, tokenizer = clip_and_tokenizer
    (captions_csv.parent / "images" / "000001.jpg").write_bytes(b"truncated")
    metrics = retrieval_eval(model, tokenizer, CsvSource(captions_csv), progress=False)
    assert metrics["num_skipped"] == 1
    assert metrics["num_images"] == 3 and metrics["num_texts"] == 6


def test_a_stream_of_records_groups_like_its_map_source(captions_csv):
    source = CsvSource(captions_csv)
    streamed = retrieval_groups(iter(list(source)))
    grouped = source.groups()
    assert (streamed.images, streamed.texts, streamed.text_to_image) == \
        (grouped.images, grouped.texts, grouped.text_to_image)
    assert streamed == retrieval_groups(source)
    assert streamed.ids == [str(image) for image in streamed.images]
    assert streamed.text_to_image == [0, 0, 1, 1, 2, 2, 3, 3]


def test_zeroshot_templates_default_to_the_datasets_own_else_generic(clip_and_tokenizer,
                                                                     image_folder, tmp_path):
    """A folder without templates.txt uses prompts for any photo collection; one that ships
    templates.txt (the synthetic world writes its own) uses those."""
    import shutil

    from vlp.eval.zeroshot import GENERIC_TEMPLATES, zero_shot_classifier

    model, tokenizer = clip_and_tokenizer
    source = ImageFolderSource(image_folder)
    assert source.templates is None
    generic = zero_shot_classifier(model, tokenizer, source.classnames, progress=False)
    explicit = zero_shot_classifier(model, tokenizer, source.classnames,
                                    list(GENERIC_TEMPLATES), progress=False)
    assert torch.equal(generic, explicit)
    assert zeroshot_eval(model, tokenizer, image_folder, progress=False) == zeroshot_eval(
        model, tokenizer, image_folder, templates=list(GENERIC_TEMPLATES), progress=False)

    own = ["a drawing of a {}.", "{} on white"]
    shipped = tmp_path / "shipped"
    shutil.copytree(image_folder, shipped)
    (shipped / "templates.txt").write_text("\n".join(own) + "\n")
    assert ImageFolderSource(shipped).templates == own
    assert zeroshot_eval(model, tokenizer, shipped, progress=False) == zeroshot_eval(
        model, tokenizer, image_folder, templates=own, progress=False)
