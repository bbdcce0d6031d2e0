"""The synthetic world: determinism, labels matching pixels, captions needing binding, formats."""

import csv
import io
import itertools
import json
import re
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from vlp.data.synthetic import generate, write_dataset
from vlp.data.synthetic_render import GRADIENT_MAX_SHIFT, OBJECT_COLOUR_JITTER
from vlp.data.synthetic_world import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    NOISE_KINDS,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    duplicate_caption_share,
)
from vlp.errors import ConfigError, DataError

COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


@pytest.fixture(scope="module")
def train_items():
    return generate("train", 600, seed=0, captions_per_image=5)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    """The 1,000-image retrieval split, written as the demo writes it."""
    out = tmp_path_factory.mktemp("synth_test")
    meta = write_dataset(out, formats=("jsonl",), n_train=0, n_val=0, n_test=1000, progress=False)
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    return meta, rows


def test_class_names_and_templates():
    assert len(CLASS_NAMES) == len(COLOURS) * len(SHAPES) >= 48
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    # imagefolder sorts class dirs; its labels agree only if CLASS_NAMES sorts the same way
    assert CLASS_NAMES == sorted(CLASS_NAMES, key=lambda n: n.replace(" ", "_"))
    assert all("{}" in t for t in ZEROSHOT_TEMPLATES) and len(ZEROSHOT_TEMPLATES) >= 3


def test_same_seed_same_output_other_seed_differs():
    first, again = generate("val", 10, seed=3), generate("val", 10, seed=3)
    other = generate("val", 10, seed=4)
    for a, b in zip(first, again, strict=True):
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.captions, a.qa, a.objects, a.label) == (b.captions, b.qa, b.objects, b.label)
    assert all(a.image.tobytes() != c.image.tobytes() for a, c in zip(first, other, strict=True))
    assert [a.captions for a in first] != [c.captions for c in other]


def test_split_length_does_not_change_earlier_images():
    short, long = generate("train", 6, seed=0), generate("train", 15, seed=0)
    assert [s.image.tobytes() for s in short] == [x.image.tobytes() for x in long[:6]]
    assert [s.captions for s in short] == [x.captions for x in long[:6]]


def test_splits_share_no_images():
    digests = {
        split: {item.image.tobytes() for item in generate(split, 60, seed=0)}
        for split in ("train", "val", "test")
    }
    assert all(len(d) == 60 for d in digests.values())
    for a, b in itertools.combinations(digests.values(), 2):
        assert not a & b


def test_every_caption_names_every_object_and_main_is_largest(train_items):
    for item in train_items:
        main = item.objects[0]
        assert item.class_name == f"{main['colour']} {main['shape']}" == CLASS_NAMES[item.label]
        assert len(item.captions) == 5 and len(set(item.captions)) == 5
        for number, caption in enumerate(item.captions):
            assert f"{main['colour']} {main['shape']}" in caption
            names = sum(f"{obj['colour']} {obj['shape']}" in caption for obj in item.objects)
            if names != len(item.objects):  # subject-only: never the first caption
                assert number > 0 and names == 1, (caption, item.objects)
                assert f"a large {main['colour']} {main['shape']}" in caption, caption
        for other in item.objects[1:]:
            assert main["radius"] > 1.4 * other["radius"]
            assert (main["size"], other["size"]) == ("large", "small")


def test_all_classes_occur(train_items):
    counts = Counter(item.label for item in train_items)
    assert len(counts) == len(CLASS_NAMES)
    assert min(counts.values()) >= 4  # roughly balanced, not just present


def test_pixels_show_the_described_objects(train_items):
    """The colour at each object's centre is that object's colour; objects do not overlap."""
    for item in train_items[:300]:
        pixels = np.asarray(item.image, dtype=np.float32)
        assert item.image.mode == "RGB" and pixels.shape == (64, 64, 3)
        for obj in item.objects:
            centre = pixels[int(obj["y"]), int(obj["x"])]
            distance = np.linalg.norm(centre - np.asarray(COLOURS[obj["colour"]]))
            assert distance < 45, (obj, centre)
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        for a, b in itertools.combinations(item.objects, 2):
            gap = np.hypot(a["x"] - b["x"], a["y"] - b["y"]) - a["radius"] - b["radius"]
            assert gap > 0


def test_backgrounds_never_hide_objects():
    """Even at full gradient shift and colour jitter, no object colour nears a background."""
    worst = min(
        np.linalg.norm(
            np.clip(np.add(colour, jitter), 0, 255)
            - np.clip(np.add(tone, shift), 0, 255)
        )
        for colour in COLOURS.values()
        for tone in BACKGROUNDS.values()
        for shift in np.linspace(-GRADIENT_MAX_SHIFT, GRADIENT_MAX_SHIFT, 15)
        for jitter in itertools.product((-OBJECT_COLOUR_JITTER, OBJECT_COLOUR_JITTER), repeat=3)
    )
    assert worst > 70


def test_qa_answers_match_objects(train_items):
    for item in train_items:
        by_shape = {o["shape"]: o for o in item.objects}
        by_colour = {o["colour"]: o for o in item.objects}
        assert len(by_shape) == len(by_colour) == len(item.objects)  # questions are unambiguous
        types = Counter(q["type"] for q in item.qa)
        assert set(types) == {"colour", "shape", "count", "position", "size", "exists"}
        for q in item.qa:
            words = q["question"].rstrip("?").split()
            if q["type"] == "colour":
                assert q["answer"] == by_shape[words[-1]]["colour"]
            elif q["type"] == "shape":
                assert q["answer"] == by_colour[words[-2]]["shape"]
            elif q["type"] == "count":
                assert q["answer"] == ["one", "two", "three"][len(item.objects) - 1]
            elif q["type"] in ("position", "size"):
                obj = by_colour[words[2 if q["type"] == "size" else 3]]
                assert q["answer"] == obj[q["type"]]
            else:
                colour, shape = words[-2:]
                present = by_colour.get(colour, {}).get("shape") == shape
                assert q["answer"] == ("yes" if present else "no")
        _check_positions_against_coordinates(item.objects)


def _check_positions_against_coordinates(objects):
    if len(objects) == 1:
        obj = objects[0]
        expected = {"left": obj["x"] < 28, "right": obj["x"] > 36, "top": obj["y"] < 28,
                    "bottom": obj["y"] > 36, "center": abs(obj["x"] - 32) < 5}
        assert expected[obj["position"]], obj
        return
    axis = "x" if {"left", "right"} & {o["position"] for o in objects} else "y"
    order = ["left", "top", "center", "right", "bottom"]
    ranked = sorted(objects, key=lambda o: o[axis])
    assert [order.index(o["position"]) for o in ranked] == sorted(
        order.index(o["position"]) for o in objects
    )


def test_noisy_captions_are_recorded(train_items):
    clean = generate("train", 100, seed=0, captions_per_image=5)
    noisy = generate("train", 100, seed=0, captions_per_image=5, noisy_fraction=0.2)
    records = [(i, j, r) for i, item in enumerate(noisy) for j, r in enumerate(item.noisy) if r]
    assert len(records) == 100  # exactly 20% of 500 captions
    assert {r["kind"] for _, _, r in records} == set(NOISE_KINDS)
    for i, j, record in records:
        text, original = noisy[i].captions[j], clean[i].captions[j]
        assert record["original"] == original and text != original
        if record["kind"] == "mismatched":
            assert text in clean[record["source_index"]].captions
            assert record["source_index"] != i
        elif record["kind"] == "shuffled":
            assert sorted(text.split()) == sorted(original.split())
        else:
            present = {o["colour"] for o in noisy[i].objects}
            assert set(COLOUR_WORD.findall(text)) - present
    for a, b in zip(clean, noisy, strict=True):  # untouched captions stay as they were
        assert [c for c, r in zip(b.captions, b.noisy, strict=True) if not r] == [
            c for c, r in zip(a.captions, b.noisy, strict=True) if not r
        ]


def test_retrieval_split_is_unique_but_not_solvable_by_bag_of_words(test_split):
    meta, rows = test_split
    captions = [row["caption"] for row in rows]
    assert len(rows) == len({row["image"] for row in rows}) == 1000  # one caption per image
    share = meta["duplicate_caption_share"]["test"]
    assert share == duplicate_caption_share([[c] for c in captions])
    assert meta["duplicate_caption_share"]["test"] < 0.02
    assert meta["ambiguous_caption_share"]["test"] < 0.05  # captions identify their image
    # Any matcher that only sees a caption's word multiset ranks all captions with the same multiset
    # identically, so it gets at most one of each such group right.
    groups = defaultdict(list)
    for caption in captions:
        groups[frozenset(Counter(caption.split()).items())].append(caption)
    best_bag_of_words_recall_at_1 = len(groups) / len(captions)
    assert best_bag_of_words_recall_at_1 < 0.95
    # ... and the collisions are different statements (swapped colours or places), not duplicates.
    colliding = [g for g in groups.values() if len(g) > 1]
    assert colliding and all(len(set(g)) == len(g) for g in colliding)


def test_write_dataset_formats_agree(tmp_path):
    out = tmp_path / "synth"
    meta = write_dataset(out, n_train=30, n_val=8, n_test=12, seed=1, captions_per_image=3,
                         noisy_fraction=0.1, shard_size=20, progress=False)
    sizes, per_image = {"train": 30, "val": 8, "test": 12}, {"train": 3, "val": 3, "test": 1}
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["class_names"] == CLASS_NAMES and meta["seed"] == 1
    assert meta["noisy"]["captions"] == 9 and (out / "train_noisy.jsonl").exists()
    for split, n_images in sizes.items():
        n_captions = n_images * per_image[split]
        assert meta["counts"][split] == {"images": n_images, "captions": n_captions}
        images = sorted((out / "images" / split).glob("*.jpg"))
        assert [p.name for p in images] == [f"{i:06d}.jpg" for i in range(n_images)]

        with (out / f"{split}.csv").open(newline="") as f:
            csv_rows = list(csv.DictReader(f))
        jsonl_rows = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        assert [(r["filepath"], r["caption"]) for r in csv_rows] == [
            (r["image"], r["caption"]) for r in jsonl_rows
        ]
        assert len(jsonl_rows) == n_captions
        assert all((out / r["image"]).is_file() for r in jsonl_rows)
        # caption-major order: the first n_images rows are n_images different images
        assert len({r["image"] for r in jsonl_rows[:n_images]}) == n_images

        coco = json.loads((out / "coco" / f"captions_{split}.json").read_text())
        assert len(coco["images"]) == n_images and len(coco["annotations"]) == n_captions
        file_of = {im["id"]: im["file_name"] for im in coco["images"]}
        assert all((out / "images" / split / name).is_file() for name in file_of.values())
        assert sorted((f"images/{split}/{file_of[a['image_id']]}", a["caption"])
                      for a in coco["annotations"]) == sorted(
            (r["image"], r["caption"]) for r in jsonl_rows)

        folder = sorted((out / "imagefolder" / split).glob("*/*.jpg"))
        assert len(folder) == n_images
        label_of_file = {p.name: CLASS_NAMES.index(p.parent.name.replace("_", " ")) for p in folder}
        for p in folder:
            assert p.read_bytes() == (out / "images" / split / p.name).read_bytes()

        members = []
        for shard in meta["files"][split]["wds"]:
            with tarfile.open(out / shard) as tar:
                members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert len(members) == 3 * n_captions
        assert len(meta["files"][split]["wds"]) == -(-n_captions // 20)
        for (jpg, image), (txt, text), (js, info) in zip(*[iter(members)] * 3, strict=True):
            key = jpg.removesuffix(".jpg")
            assert re.fullmatch(r"\d{9}", key) and (txt, js) == (f"{key}.txt", f"{key}.json")
            info = json.loads(info)
            assert info["key"] == key and info["caption"] == text.decode()
            assert image == (out / info["image"]).read_bytes()
            assert info["label"] == label_of_file[info["image"].rsplit("/", 1)[1]]

        qa_rows = [json.loads(x) for x in (out / f"{split}_qa.jsonl").read_text().splitlines()]
        assert {r["image"] for r in qa_rows} == {f"images/{split}/{i:06d}.jpg" for i in
                                                 range(n_images)}

    # the files hold exactly what generate() returns, and the JPEGs are close to its images
    items = generate("train", 30, seed=1, captions_per_image=3, noisy_fraction=0.1)
    jsonl_rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert sorted((r["image"], r["caption"]) for r in jsonl_rows) == sorted(
        (f"images/train/{i:06d}.jpg", c) for i, item in enumerate(items) for c in item.captions)
    decoded = Image.open(io.BytesIO((out / "images/train/000000.jpg").read_bytes())).convert("RGB")
    difference = np.abs(np.asarray(decoded, np.float32) - np.asarray(items[0].image, np.float32))
    assert difference.mean() < 3


def test_write_dataset_is_byte_identical_and_replaces_its_own_output(tmp_path):
    kwargs = dict(formats=("csv", "wds", "imagefolder"), n_train=6, n_val=2, n_test=3,
                  seed=5, progress=False)
    first, second = tmp_path / "a", tmp_path / "b"
    write_dataset(first, **kwargs)
    write_dataset(second, **kwargs)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    write_dataset(first, **{**kwargs, "n_train": 2})  # a rerun leaves no stale images behind
    assert len(list((first / "images" / "train").glob("*.jpg"))) == 2
    assert len(list((first / "imagefolder" / "train").rglob("*.jpg"))) == 2


def test_bad_arguments_raise_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's files")
    with pytest.raises(DataError, match="not empty"):
        write_dataset(tmp_path, n_train=1, n_val=1, n_test=1, progress=False)
    with pytest.raises(ConfigError, match="formats"):
        write_dataset(tmp_path / "x", formats=("csv", "parquet"), progress=False)
    with pytest.raises(ConfigError, match="n_images"):
        generate("train", -1, seed=0)
    with pytest.raises(ConfigError, match="noisy_fraction"):
        generate("train", 2, seed=0, noisy_fraction=1.5)
