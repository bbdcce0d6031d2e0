"""Caption benchmarks in their released layouts: the Karpathy splits of COCO and Flickr30k
(``dataset_coco.json``, ``dataset_flickr30k.json``), NoCaps validation
(``nocaps_val_4500_captions.json``, with each image's domain) and vlp's own caption files.
Each reader gives a `Captions`: a `vlp.data.ListSource` with one record per caption, which
retrieval (`vlp.eval.retrieval`, `vlp.eval.rerank`) and captioning (`vlp.eval.captioning`)
group by image, plus each image's official id for the evaluation server's result file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.benchmarks.classes import missing
from vlp.data.sources import ListSource, build_source
from vlp.errors import DataError

KARPATHY_ZIP = ("Karpathy's caption_datasets.zip "
                "(https://cs.stanford.edu/people/karpathy/deepimagesent/)")
KARPATHY = {  # format: (annotation file, images directory default, where the images come from)
    "coco-karpathy": ("dataset_coco.json", None, "COCO 2014 images (https://cocodataset.org)"),
    "flickr30k-karpathy": ("dataset_flickr30k.json", "flickr30k-images",
                           "the Flickr30k images (https://shannon.cs.illinois.edu/"
                           "DenotationGraph/)"),
}
KARPATHY_SPLITS = {"test": ("test",), "val": ("val",), "train": ("train", "restval")}
NOCAPS_FILE = "nocaps_{split}_4500_captions.json"
NOCAPS_ORIGIN = "https://nocaps.org/download"
NOCAPS_IMAGES = ("validation", "val", "images")  # the first that exists under root, else root
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
OWN_FORMATS = ("csv", "tsv", "jsonl", "coco")  # vlp's caption files: root is the file
CAPTION_FORMATS = (*KARPATHY, "nocaps", *OWN_FORMATS)
DEFAULT_SPLIT = {"coco-karpathy": "test", "flickr30k-karpathy": "test", "nocaps": "val"}


@dataclass
class Captions:
    """Captioned images: ``source`` has one record per caption; ``image_ids`` gives each
    image path its official id (COCO's ``cocoid``, ...); ``domains`` NoCaps' domain of each."""

    source: ListSource | Any
    image_ids: dict[str, Any]
    where: str
    domains: dict[str, str] | None = None


def read_json(path: Path, official: str, origin: str) -> Any:
    if not path.is_file():
        raise missing(path, official, origin)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def read_captions(fmt: str, root: str | os.PathLike[str], split: str | None = None) -> Captions:
    """The ``split`` of a caption benchmark in format ``fmt`` under ``root`` (for vlp's own
    formats, ``root`` is the file)."""
    if fmt in KARPATHY:
        return read_karpathy(fmt, Path(root), split or DEFAULT_SPLIT[fmt])
    if fmt == "nocaps":
        return read_nocaps(Path(root), split or DEFAULT_SPLIT[fmt])
    source = build_source(fmt, root)
    return Captions(source, {}, str(root))


def _field(item: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get(key), kind):
        raise DataError(f"{where}: expected key {key!r} ({getattr(kind, '__name__', kind)})")
    return item[key]


def read_karpathy(fmt: str, root: Path, split: str) -> Captions:
    """``dataset_coco.json`` / ``dataset_flickr30k.json``: the images whose ``split`` is in
    the requested one (train = train + restval), each ``filepath/filename`` under ``root``
    (Flickr30k: under ``root/flickr30k-images`` when it exists), with every ``sentences[].raw``.
    The image id is ``cocoid`` (COCO) or ``imgid`` (Flickr30k)."""
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{fmt}: no split {split!r}; expected one of {sorted(KARPATHY_SPLITS)}")
    name, image_dir, image_origin = KARPATHY[fmt]
    path = root / name
    data = read_json(path, name, KARPATHY_ZIP)
    images = _field(data, "images", str(path), list)
    base = root / image_dir if image_dir and (root / image_dir).is_dir() else root
    id_key = "cocoid" if fmt == "coco-karpathy" else "imgid"
    paths, texts, image_ids = [], [], {}
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        if _field(image, "split", where, str) not in KARPATHY_SPLITS[split]:
            continue
        file = base / image.get("filepath", "") / _field(image, "filename", where, str)
        image_ids[str(file)] = image.get(id_key, index)
        for number, sentence in enumerate(_field(image, "sentences", where, list)):
            paths.append(str(file))
            texts.append(_field(sentence, "raw", f"{where}.sentences[{number}]", str))
    if not paths:
        raise DataError(f"{path}: no captioned images in split {split!r} (images[].split "
                        f"{' or '.join(KARPATHY_SPLITS[split])}); images from {image_origin}")
    return Captions(ListSource(paths, texts), image_ids, str(path))


def read_nocaps(root: Path, split: str) -> Captions:
    """``nocaps_val_4500_captions.json`` (COCO style: ``images[]`` with ``id``,
    ``file_name``, ``domain``; ``annotations[]`` with ``image_id``, ``caption``); images under
    the first of ``validation/``, ``val/``, ``images/`` in ``root`` that exists, else ``root``."""
    if split != "val":
        raise DataError(f"nocaps: no split {split!r}; only 'val' has public captions")
    name = NOCAPS_FILE.format(split=split)
    path = root / name
    data = read_json(path, name, NOCAPS_ORIGIN)
    base = next((root / d for d in NOCAPS_IMAGES if (root / d).is_dir()), root)
    files, domains, image_ids = {}, {}, {}
    for index, image in enumerate(_field(data, "images", str(path), list)):
        where = f"{path}: images[{index}]"
        file = str(base / _field(image, "file_name", where, str))
        domain = _field(image, "domain", where, str)
        if domain not in NOCAPS_DOMAINS:
            raise DataError(f"{where}: domain {domain!r}; expected one of {NOCAPS_DOMAINS}")
        files[_field(image, "id", where, (int, str))] = file
        domains[file], image_ids[file] = domain, image["id"]
    paths, texts = [], []
    for index, annotation in enumerate(_field(data, "annotations", str(path), list)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(annotation, "image_id", where, (int, str))
        if image_id not in files:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        paths.append(files[image_id])
        texts.append(_field(annotation, "caption", where, str))
    if not paths:
        raise DataError(f"{path}: no annotations")
    return Captions(ListSource(paths, texts), image_ids, str(path), domains)
