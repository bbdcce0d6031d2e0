"""Classification benchmarks in their released layouts: ImageNet-1k (one folder per wnid),
CIFAR-10 and CIFAR-100 (the binary versions, parsed byte by byte; nothing is unpickled) and
any image folder. Each reader gives a `Classification`: a labelled `vlp.data.ListSource` (image
paths, or CIFAR's pixels encoded as PNG bytes) with its class names, which zero-shot
classification (`vlp.eval.zeroshot`) and the linear probe read.

vlp ships no ImageNet class names: the reader takes them from a file the user has, beside the
class folders (see `IMAGENET_NAMES`). For the whole ImageNet-1k (all 1,000 wnid folders) with
open_clip installed, the names and the 80 prompt templates of the CLIP paper's protocol come
from open_clip's `zero_shot_metadata` when the user gives none, as CLIP_benchmark does.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.sources import ImageFolderSource, ListSource
from vlp.errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_SIDE = 32
CIFAR_PIXELS = 3 * CIFAR_SIDE * CIFAR_SIDE  # a record's red, green and blue planes, row-major
IMAGENET_SOURCE = ("the ILSVRC2012 validation images from https://image-net.org, sorted into "
                   "one folder per wnid (n01440764/...)")
IMAGENET_NAMES = ("classnames.txt", "LOC_synset_mapping.txt")
IMAGENET_NAMES_SOURCE = (
    "classnames.txt (one name per line, in sorted wnid order) or LOC_synset_mapping.txt "
    "('n01440764 tench, Tinca tinca' lines, from the Kaggle ImageNet object localization "
    "release); vlp ships no ImageNet class names (with all 1000 wnid folders and open_clip "
    "installed, open_clip's are used)")
IMAGENET_CLASSES = 1000
CIFAR = {  # format: (directory, {split: batch files}, label bytes, label byte used, names file)
    "cifar10": ("cifar-10-batches-bin",
                {"test": ["test_batch.bin"],
                 "train": [f"data_batch_{i}.bin" for i in range(1, 6)]},
                1, 0, "batches.meta.txt"),
    "cifar100": ("cifar-100-binary", {"test": ["test.bin"], "train": ["train.bin"]},
                 2, 1, "fine_label_names.txt"),  # <coarse label><fine label><pixels>
}
CLASSIFICATION_FORMATS = ("imagefolder", "imagenet", "cifar10", "cifar100")
DEFAULT_SPLIT = {"imagefolder": "test", "imagenet": "val", "cifar10": "test", "cifar100": "test"}


@dataclass
class Classification:
    """A labelled image set: ``source`` records carry the image and its label, an index into
    ``classnames``; ``templates`` are the dataset's own zero-shot prompts (None: generic)."""

    source: ListSource
    classnames: list[str]
    templates: list[str] | None
    where: str

    def __len__(self) -> int:
        return len(self.source)


def missing(path: Path, official: str, origin: str) -> DataError:
    """The one-line error for a file of a release that is not where it should be."""
    return DataError(f"{path}: not found; expected {official} from {origin}")


def read_classification(fmt: str, root: str | os.PathLike[str], split: str | None = None
                        ) -> Classification:
    """The ``split`` of a classification benchmark under ``root`` in format ``fmt``."""
    split = split or DEFAULT_SPLIT[fmt]
    root = Path(root)
    if fmt in CIFAR:
        return read_cifar(fmt, root, split)
    if fmt == "imagenet":
        return read_imagenet(root, split)
    return read_imagefolder(root, split)


def _names_from_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def imagenet_classnames(root: Path, wnids: list[str]) -> list[str]:
    """The names of ``wnids`` from ``classnames.txt`` or ``LOC_synset_mapping.txt`` in
    ``root`` (the first name of each synset's list)."""
    listed, mapping = root / IMAGENET_NAMES[0], root / IMAGENET_NAMES[1]
    if not listed.is_file() and not mapping.is_file():
        standard = _open_clip_imagenet(wnids)
        if standard is not None:
            return standard[0]
    if listed.is_file():
        names = _names_from_file(listed)
        if len(names) != len(wnids):
            raise DataError(f"{listed}: {len(names)} class names for {len(wnids)} wnid folders; "
                            f"expected one name per line in sorted wnid order")
        return names
    if not mapping.is_file():
        raise missing(root / IMAGENET_NAMES[0], IMAGENET_NAMES_SOURCE, "the user's files")
    by_wnid = {}
    for number, line in enumerate(_names_from_file(mapping), start=1):
        wnid, _, names = line.partition(" ")
        if not names.strip():
            raise DataError(f"{mapping}:{number}: expected 'wnid name, synonyms', got {line!r}")
        by_wnid[wnid] = names.split(",")[0].strip()
    absent = [wnid for wnid in wnids if wnid not in by_wnid]
    if absent:
        raise DataError(f"{mapping}: no names for wnid folders {absent[:3]}")
    return [by_wnid[wnid] for wnid in wnids]


def read_imagenet(root: Path, split: str) -> Classification:
    """``root/<split>/<wnid>/*.JPEG`` with the class names of `imagenet_classnames`; labels
    are the sorted wnids' positions (the usual 0..999)."""
    directory = root / split
    if not directory.is_dir():
        raise missing(directory, IMAGENET_SOURCE, "image-net.org")
    folder = ImageFolderSource(directory, classes=_split_classes(root, directory))
    if not all(name.startswith("n") and name[1:].isdigit() for name in folder.classes):
        bad = next(n for n in folder.classes if not (n.startswith("n") and n[1:].isdigit()))
        raise DataError(f"{directory / bad}: expected class folders named by wnid (n01440764)")
    classnames = imagenet_classnames(root, folder.classes)
    standard = _open_clip_imagenet(folder.classes)
    templates = folder.templates or _templates(root) or (standard[1] if standard else None)
    return _from_folder(folder, classnames, templates, str(directory))


def _open_clip_imagenet(wnids: list[str]) -> tuple[list[str], list[str]] | None:
    """open_clip's ImageNet-1k class names (in sorted wnid order, the usual label order) and
    the CLIP paper's 80 prompt templates as ``{}`` strings, when ``wnids`` are all 1,000
    classes and open_clip is installed; else None."""
    if len(wnids) != IMAGENET_CLASSES:
        return None
    try:
        from open_clip import zero_shot_metadata
    except ImportError:
        return None
    names = list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    templates = [template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    return (names, templates) if len(names) == IMAGENET_CLASSES else None


def _templates(root: Path) -> list[str] | None:
    path = root / "templates.txt"
    return _names_from_file(path) or None if path.is_file() else None


def read_imagefolder(root: Path, split: str) -> Classification:
    """``root/<split>/<class>/*`` (or ``root/<class>/*`` when there is no split folder); the
    classes of every split folder beside it share one label space."""
    directory = root / split if (root / split).is_dir() else root
    folder = ImageFolderSource(directory, classes=_split_classes(root, directory))
    return _from_folder(folder, folder.classnames, folder.templates, str(directory))


def _split_classes(root: Path, directory: Path) -> list[str] | None:
    """The class folders of every split folder of ``root`` (one label space for all splits),
    or None when ``directory`` is ``root`` itself."""
    if directory == root:
        return None
    return sorted({entry.name for sibling in root.iterdir() if sibling.is_dir()
                   for entry in os.scandir(sibling)
                   if entry.is_dir() and not entry.name.startswith(".")})


def _from_folder(folder: ImageFolderSource, classnames: list[str],
                 templates: list[str] | None, where: str) -> Classification:
    records = list(folder)
    source = ListSource([r.image for r in records], labels=[r.label for r in records])
    return Classification(source, list(classnames), templates, where)


# -- CIFAR -----------------------------------------------------------------------------------------

def cifar_records(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [N], images [N, 32, 32, 3] uint8)`` of one binary batch file: each record is
    its label byte(s), then 1024 red, 1024 green and 1024 blue bytes, rows top to bottom."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    width = label_bytes + CIFAR_PIXELS
    if data.size == 0 or data.size % width:
        raise DataError(f"{path}: {data.size} bytes is not a whole number of {width}-byte "
                        f"records (label byte(s) + 3072 pixel bytes)")
    rows = data.reshape(-1, width)
    planes = rows[:, label_bytes:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
    return rows[:, label_index].astype(np.int64), planes.transpose(0, 2, 3, 1)


def _png(pixels: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(encoded, format="PNG")
    return encoded.getvalue()


def read_cifar(fmt: str, root: Path, split: str) -> Classification:
    """CIFAR-10/100 from the binary release under ``root`` (its extracted directory, or the
    directory holding it); images become PNG bytes, decoded by the one inference input path."""
    folder, splits, label_bytes, label_index, names_file = CIFAR[fmt]
    directory = root / folder if (root / folder).is_dir() else root
    archive = f"{fmt.replace('cifar', 'cifar-')}-binary.tar.gz"
    if split not in splits:
        raise DataError(f"{fmt}: no split {split!r}; expected one of {sorted(splits)}")
    names_path = directory / names_file
    if not names_path.is_file():
        raise missing(names_path, f"{folder}/{names_file} of {archive}", CIFAR_URL)
    classnames = [name.replace("_", " ") for name in _names_from_file(names_path)]
    labels, images = [], []
    for name in splits[split]:
        path = directory / name
        if not path.is_file():
            raise missing(path, f"{folder}/{name} of {archive}", CIFAR_URL)
        batch_labels, batch_images = cifar_records(path, label_bytes, label_index)
        if int(batch_labels.max()) >= len(classnames):
            raise DataError(f"{path}: label {int(batch_labels.max())} but {names_path.name} "
                            f"names {len(classnames)} classes")
        labels += batch_labels.tolist()
        images += [_png(pixels) for pixels in batch_images]
    return Classification(ListSource(images, labels=labels), classnames, None, str(directory))
