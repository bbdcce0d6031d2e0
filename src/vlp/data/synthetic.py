"""The built-in synthetic dataset: coloured shapes with captions, QA pairs and class labels.

Every image is a pure function of (seed, split, index): a split regenerates byte-identically, and
changing one split's size never changes another split. `generate` returns items in memory;
`write_dataset` writes the train/val/test splits as CSV, JSONL, COCO, image folder and WebDataset.
Scenes, captions and questions come from `vlp.data.synthetic_world`, pixels from
`vlp.data.synthetic_render`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp.data.sources import TEMPLATES_FILE
from vlp.data.synthetic_render import _render
from vlp.data.synthetic_world import (
    _COLOUR_NAMES,
    BACKGROUNDS,
    CLASS_NAMES,
    QA_TYPES,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    _ambiguous_caption_share,
    _CaptionFacts,
    _captions,
    _corrupt,
    _questions,
    _sample_scene,
    _Scene,
    _split_key,
    duplicate_caption_share,
)
from vlp.errors import ConfigError, DataError

FORMATS: tuple[str, ...] = ("csv", "jsonl", "coco", "imagefolder", "wds")


@dataclass
class SynthItem:
    """One generated image and everything known about it; objects[0] is the labelled object."""

    image: Image.Image
    captions: list[str]
    label: int  # index into CLASS_NAMES of the main (largest) object
    class_name: str
    objects: list[dict[str, Any]]  # colour, shape, size, position, x, y, radius, bbox (pixels)
    qa: list[dict[str, str]]  # {"question", "answer", "type"}
    noisy: list[dict[str, Any] | None]  # per caption: None, or {"kind", "original", ...}
    background: str
    twin: dict[str, Any] | None = None  # {"of": index, "kind": "colour_swap"|"position_swap"}


@dataclass
class _Drawn:
    scene: _Scene
    image: Image.Image | None  # replaced by `jpeg` once written to disk
    objects: list[dict[str, Any]]
    captions: list[str]
    facts: list[_CaptionFacts | None] = field(default_factory=list)  # None: subject-only
    jpeg: bytes = b""


# ---------------------------------------------------------------------------------------------
# generation


def _check_arguments(
    split: str, n_images: int, seed: int, image_size: int, captions_per_image: int,
    noisy_fraction: float,
) -> None:
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split must be a non-empty string, got {split!r}")
    for name, value, low in (("n_images", n_images, 0), ("seed", seed, 0),
                             ("image_size", image_size, 16), ("captions_per_image",
                                                              captions_per_image, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= noisy_fraction < 1.0:
        raise ConfigError(f"noisy_fraction must be in [0, 1), got {noisy_fraction!r}")


def _iter_drawn(
    split: str, n_images: int, seed: int, image_size: int, captions_per_image: int
) -> Iterator[_Drawn]:
    key = _split_key(split)
    previous: _Scene | None = None
    for index in range(n_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, key], spawn_key=(0, index)))
        scene = _sample_scene(rng, previous, index - 1)
        image, objects = _render(rng, scene, image_size)
        captions, facts = _captions(scene, captions_per_image)
        yield _Drawn(scene, image, objects, captions, facts)
        previous = scene


def generate(
    split: str,
    n_images: int,
    seed: int,
    image_size: int = 64,
    captions_per_image: int = 5,
    noisy_fraction: float = 0.0,
) -> list[SynthItem]:
    """The first `n_images` images of a split; a longer run of the same split extends a shorter one
    (except which captions `noisy_fraction` picks)."""
    _check_arguments(split, n_images, seed, image_size, captions_per_image, noisy_fraction)
    drawn = list(_iter_drawn(split, n_images, seed, image_size, captions_per_image))
    scenes = [d.scene for d in drawn]
    captions, noisy = _corrupt([d.captions for d in drawn], scenes, noisy_fraction, seed, split)
    items = []
    for index, d in enumerate(drawn):
        colour, shape, _ = d.scene.slots[d.scene.main]
        class_name = f"{colour} {shape}"
        items.append(SynthItem(
            image=d.image, captions=captions[index], label=CLASS_NAMES.index(class_name),
            class_name=class_name, objects=d.objects, qa=_questions(d.scene),
            noisy=noisy[index], background=d.scene.background, twin=d.scene.twin,
        ))
    return items


# ---------------------------------------------------------------------------------------------
# writing


def _prepare_out_dir(out: Path) -> None:
    """Create `out`, or clear a previous synthetic dataset there; refuse any other non-empty dir."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; expected a dataset directory")
    if out.is_dir() and any(out.iterdir()):
        meta_path = out / "meta.json"
        try:
            previous = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("generator") != "vlp.data.synthetic":
            raise DataError(f"{out}: directory is not empty and holds no vlp synthetic dataset "
                            "(meta.json); expected an empty or new directory")
        for name in ("images", "imagefolder", "wds", "coco"):
            shutil.rmtree(out / name, ignore_errors=True)
        for path in out.glob("*.csv"):
            path.unlink()
        for path in out.glob("*.jsonl"):
            path.unlink()
        meta_path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 946684800, 0o644  # fixed: byte-identical
    tar.addfile(info, io.BytesIO(payload))


def _write_split(
    out: Path, split: str, drawn: list[_Drawn], captions: list[list[str]],
    noisy: list[list[dict[str, Any] | None]], formats: Sequence[str], image_size: int,
    shard_size: int, seed: int,
) -> dict[str, Any]:
    """Every caption file of one split; rows are caption-major (all first captions, then all second
    captions, ...), so consecutive rows never repeat an image until the images run out."""
    image_paths = [f"images/{split}/{i:06d}.jpg" for i in range(len(drawn))]
    labels = [CLASS_NAMES.index("{} {}".format(*d.scene.slots[d.scene.main][:2])) for d in drawn]
    pairs = [(i, j) for j in range(max(len(c) for c in captions))
             for i in range(len(captions)) if j < len(captions[i])]
    files: dict[str, Any] = {}
    if "csv" in formats:
        with (out / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filepath", "caption"])
            writer.writerows([image_paths[i], captions[i][j]] for i, j in pairs)
        files["csv"] = f"{split}.csv"
    if "jsonl" in formats:
        _write_jsonl(out / f"{split}.jsonl",
                     [{"image": image_paths[i], "caption": captions[i][j]} for i, j in pairs])
        files["jsonl"] = f"{split}.jsonl"
    if "coco" in formats:
        (out / "coco").mkdir(exist_ok=True)
        coco = {
            "info": {"description": f"vlp synthetic shapes, split {split}, seed {seed}"},
            "images": [{"id": i, "file_name": f"{i:06d}.jpg", "width": image_size,
                        "height": image_size} for i in range(len(drawn))],
            "annotations": [{"id": k, "image_id": i, "caption": captions[i][j]}
                            for k, (i, j) in enumerate(pairs)],
        }
        (out / "coco" / f"captions_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
        files["coco"] = f"coco/captions_{split}.json"
    if "imagefolder" in formats:
        root = out / "imagefolder" / split
        for i, label in enumerate(labels):
            class_dir = root / CLASS_NAMES[label].replace(" ", "_")
            class_dir.mkdir(parents=True, exist_ok=True)
            _link_or_copy(out / image_paths[i], class_dir / f"{i:06d}.jpg")
        # the world's own prompts travel with its folders (zero-shot reads them there)
        (root / TEMPLATES_FILE).write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n",
                                           encoding="utf-8")
        files["imagefolder"] = f"imagefolder/{split}"
    if "wds" in formats:
        shard_dir = out / "wds" / split
        shard_dir.mkdir(parents=True, exist_ok=True)
        shards = []
        for shard, start in enumerate(range(0, len(pairs), shard_size)):
            name = f"shard-{shard:06d}.tar"
            with tarfile.open(shard_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key_index in range(start, min(start + shard_size, len(pairs))):
                    i, j = pairs[key_index]
                    key = f"{key_index:09d}"
                    sample = {"key": key, "caption": captions[i][j], "label": labels[i],
                              "class_name": CLASS_NAMES[labels[i]], "image": image_paths[i],
                              "image_index": i, "caption_index": j,
                              "noisy": noisy[i][j]["kind"] if noisy[i][j] else None,
                              "objects": drawn[i].objects}
                    _add_tar_member(tar, f"{key}.jpg", drawn[i].jpeg)
                    _add_tar_member(tar, f"{key}.txt", captions[i][j].encode("utf-8"))
                    _add_tar_member(tar, f"{key}.json", json.dumps(sample).encode("utf-8"))
            shards.append(f"wds/{split}/{name}")
        files["wds"] = shards
    qa_rows = []
    for i, d in enumerate(drawn):
        qa_rows += [{"image": image_paths[i], **row} for row in _questions(d.scene)]
    _write_jsonl(out / f"{split}_qa.jsonl", qa_rows)
    files["qa"] = f"{split}_qa.jsonl"
    noisy_rows = [{"image": image_paths[i], "caption": captions[i][j], **noisy[i][j]}
                  for i, j in pairs if noisy[i][j]]
    if noisy_rows:
        _write_jsonl(out / f"{split}_noisy.jsonl", noisy_rows)
        files["noisy"] = f"{split}_noisy.jsonl"
    return files


def write_dataset(
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = FORMATS,
    n_train: int = 5000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: int = 5,
    noisy_fraction: float = 0.0,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the train/val/test splits in every requested format and return what meta.json holds.

    Images are encoded once under images/{split}; imagefolder hard-links them and wds reuses their
    bytes. The test split has one caption per image; noise only ever touches the train split.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or isinstance(formats, str):
        raise ConfigError(f"formats: unknown {unknown or formats!r}; expected some of {FORMATS}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        per_image = 1 if split == "test" else captions_per_image
        _check_arguments(split, n, seed, image_size, per_image, noisy_fraction)
    out = Path(out_dir)
    _prepare_out_dir(out)
    meta: dict[str, Any] = {
        "generator": "vlp.data.synthetic",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "formats": list(formats),
        "counts": {},
        "captions_per_image": {},
        "duplicate_caption_share": {},
        "ambiguous_caption_share": {},
        "twin_share": {},
        "classes_present": {},
        "class_names": CLASS_NAMES,
        "zeroshot_templates": ZEROSHOT_TEMPLATES,
        "colours": _COLOUR_NAMES,
        "shapes": list(SHAPES),
        "backgrounds": list(BACKGROUNDS),
        "qa_types": list(QA_TYPES),
        "noisy": {"fraction": noisy_fraction, "splits": ["train"] if noisy_fraction else [],
                  "captions": 0, "kinds": {}},
        "files": {},
    }
    bar = tqdm(total=sum(sizes.values()), desc="vlp synth", unit="img", disable=not progress)
    try:
        for split, n_images in sizes.items():
            if n_images == 0:
                meta["counts"][split] = {"images": 0, "captions": 0}
                continue
            per_image = 1 if split == "test" else captions_per_image
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            drawn = []
            for index, d in enumerate(_iter_drawn(split, n_images, seed, image_size, per_image)):
                encoded = io.BytesIO()
                d.image.save(encoded, format="JPEG", quality=95, subsampling=0)
                d.jpeg, d.image = encoded.getvalue(), None
                (out / "images" / split / f"{index:06d}.jpg").write_bytes(d.jpeg)
                drawn.append(d)
                bar.update()
            fraction = noisy_fraction if split == "train" else 0.0
            captions, noisy = _corrupt([d.captions for d in drawn], [d.scene for d in drawn],
                                       fraction, seed, split)
            meta["files"][split] = _write_split(out, split, drawn, captions, noisy, formats,
                                                image_size, shard_size, seed)
            kinds = Counter(r["kind"] for row in noisy for r in row if r)
            meta["counts"][split] = {"images": n_images, "captions": sum(map(len, captions))}
            meta["captions_per_image"][split] = per_image
            meta["duplicate_caption_share"][split] = round(duplicate_caption_share(captions), 6)
            meta["ambiguous_caption_share"][split] = round(_ambiguous_caption_share(
                [d.scene for d in drawn], [d.facts for d in drawn]), 6)
            meta["twin_share"][split] = round(sum(d.scene.twin is not None for d in drawn)
                                              / n_images, 6)
            meta["classes_present"][split] = len({d.scene.slots[d.scene.main][:2] for d in drawn})
            if kinds:
                meta["noisy"]["captions"] = sum(kinds.values())
                meta["noisy"]["kinds"] = dict(sorted(kinds.items()))
    finally:
        bar.close()
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
