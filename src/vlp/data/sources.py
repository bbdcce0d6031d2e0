"""Data sources: image-text (or image-label) records read from files on disk.

A map-style source has ``len(source)`` and ``source[i] -> Record``; the loader shuffles and
shards its indices. `WebDatasetSource` (`vlp.data.webdataset`) is a stream of tar shards; the
loader splits its shards across ranks and workers. Records hold the image as a path (or raw
bytes) and are decoded only by the loader, so building a source never opens an image.
`build_source` picks any of them by kind name.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlp.cliargs import option
from vlp.data.images import IMAGE_EXTENSIONS, ImageGroups, group_images
from vlp.data.qa import read_qa_jsonl, target_answer
from vlp.data.records import (
    Record,
    as_text,
    cell,
    check_text,
    csv_rows,
    header_columns,
    jsonl_rows,
    parse_json,
    parse_label,
    read_utf8,
    require_file,
    resolve_image_path,
)
from vlp.data.text import TextCorpus
from vlp.data.webdataset import WebDatasetSource
from vlp.errors import ConfigError, DataError


class _StringColumn:
    """A read-only list of ``str | None`` kept in two numpy arrays.

    Forked DataLoader workers share it without touching Python object refcounts, so memory is
    not copied page by page as a long list of str objects would be.
    """

    def __init__(self, values: Iterable[str | None]) -> None:
        parts: list[bytes] = []
        lengths: list[int] = []
        for value in values:
            encoded = b"" if value is None else value.encode("utf-8")
            parts.append(encoded)
            lengths.append(-1 if value is None else len(encoded))
        sizes = np.array([max(n, 0) for n in lengths], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self._is_null = np.array([n < 0 for n in lengths], dtype=bool)

    def __len__(self) -> int:
        return len(self._is_null)

    def __getitem__(self, index: int) -> str | None:
        if self._is_null[index]:
            return None
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str | None]:
        return (self[i] for i in range(len(self)))


TEMPLATES_FILE = "templates.txt"  # beside an image folder's class directories


class MapSource:
    """Base of the random-access sources: ``len(source)`` records, ``source[i] -> Record``."""

    has_text: bool = True
    has_labels: bool = False
    has_answers: bool = False  # VQA records: text is the question, answer the target
    has_images: bool = True  # False: text-only documents (`TextSource`)
    templates: list[str] | None = None  # zero-shot prompts the dataset ships (image folders)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Record:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def groups(self) -> ImageGroups:
        """Captions grouped by image, by the one rule of `vlp.data.images.group_images`
        (rows with the same image share it); images without a caption are left out."""
        if not self.has_text:
            raise DataError(f"{self!r} has no captions to group for retrieval")
        return group_images(self).captioned()


class _TableSource(MapSource):
    """Rows of (image path, caption, label) held in compact columns."""

    def __init__(self, where: str, images: list[str], texts: list[str | None] | None,
                 labels: list[int] | None) -> None:
        self._where = where
        self._images = _StringColumn(images)
        self._texts = _StringColumn(texts) if texts is not None else None
        self._labels = np.array(labels, dtype=np.int64) if labels is not None else None
        self.has_text = texts is not None
        self.has_labels = labels is not None

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index = index % len(self)
        return Record(
            image=self._images[index] or "",
            text=self._texts[index] if self._texts is not None else None,
            label=int(self._labels[index]) if self._labels is not None else None,
            key=str(index),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, {len(self)} records)"


class CsvSource(_TableSource):
    """CSV/TSV with a header row; image paths are relative to the file's directory (or root)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_key: str = "filepath",
        caption_key: str | None = "caption",
        separator: str | None = None,
        label_key: str | None = None,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file(path)
        if separator is None:
            separator = "\t" if path.suffix.lower() == ".tsv" else ","
        root = str(image_root) if image_root is not None else str(path.parent)
        images: list[str] = []
        texts: list[str | None] = []
        labels: list[int] = []
        rows = csv_rows(path, separator)
        header = next(rows, (1, None))[1]
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row naming the columns")
        columns = header_columns(header, path)
        wanted = {"image_key": image_key, "caption_key": caption_key, "label_key": label_key}
        for setting, name in wanted.items():
            if name is not None and name not in columns:
                raise DataError(
                    f"{path}: no column {name!r} ({setting}); columns present: "
                    f"{list(columns)} (separator {separator!r})"
                )
        image_col = columns[image_key]
        text_col = columns[caption_key] if caption_key is not None else None
        label_col = columns[label_key] if label_key is not None else None
        for line, row in rows:
            if not row:
                continue
            images.append(resolve_image_path(root, cell(row, image_col)))
            if text_col is not None:
                texts.append(cell(row, text_col))
            if label_col is not None:
                labels.append(parse_label(cell(row, label_col), f"{path}:{line}", label_key))
        super().__init__(str(path), images, texts if caption_key is not None else None,
                         labels if label_key is not None else None)


class JsonlSource(_TableSource):
    """One JSON object per line; a caption may be a string or a list (one record per caption).
    A row without the caption key is a record without caption (the loader skips and counts it,
    as it does a CSV row without its caption cell); no row with it is a DataError."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_key: str = "image",
        caption_key: str | None = "caption",
        label_key: str | None = None,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file(path)
        root = str(image_root) if image_root is not None else str(path.parent)
        images: list[str] = []
        texts: list[str | None] = []
        labels: list[int] = []
        first_keys: list[str] | None = None
        captioned = False  # some row has caption_key; a row without it is skipped, as in CSV
        for where, row in jsonl_rows(path):
            first_keys = list(row) if first_keys is None else first_keys
            captioned = captioned or (caption_key is not None and caption_key in row)
            wanted = {"image_key": image_key, "label_key": label_key}
            for setting, key in wanted.items():
                if key is not None and key not in row:
                    hint = ("; QA rows (question + answer) are read as kind 'qa'"
                            if "question" in row else "")
                    raise DataError(f"{where}: no key {key!r} ({setting}); keys present: "
                                    f"{list(row)}{hint}")
            image = resolve_image_path(root, as_text(row[image_key], where, image_key))
            captions: list[str | None] = [None]
            if caption_key is not None:
                value = row.get(caption_key)
                if isinstance(value, list):
                    captions = [as_text(v, where, caption_key) for v in value]
                else:
                    captions = [as_text(value, where, caption_key)]
            label = (parse_label(row[label_key], where, label_key)
                     if label_key is not None else None)
            for caption in captions:
                images.append(image)
                texts.append(caption)
                if label is not None:
                    labels.append(label)
        if caption_key is not None and first_keys is not None and not captioned:
            hint = ("; QA rows (question + answer) are read as kind 'qa'"
                    if "question" in first_keys else "")
            raise DataError(f"{path}: no row has key {caption_key!r} (caption_key); keys "
                            f"present: {first_keys}{hint}")
        super().__init__(str(path), images, texts if caption_key is not None else None,
                         labels if label_key is not None else None)


class CocoSource(_TableSource):
    """COCO captions JSON (``images`` + ``annotations``): one record per caption annotation.

    ``file_name`` is relative to `image_root` (default: the JSON file's directory).
    """

    def __init__(self, annotation_json: str | os.PathLike[str],
                 image_root: str | os.PathLike[str] | None = None) -> None:
        path = require_file(annotation_json)
        root = str(image_root) if image_root is not None else str(path.parent)
        data = parse_json(read_utf8(path), str(path))
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DataError(f"{path}: expected a COCO captions object with 'images' and "
                            f"'annotations' lists")
        file_of_image: dict[Any, str] = {}
        for i, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
            if not isinstance(image["id"], int | str) or isinstance(image["id"], bool):
                raise DataError(f"{path}: images[{i}].id is a {type(image['id']).__name__}; "
                                "expected an integer or a string")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise DataError(f"{path}: images[{i}].file_name is "
                                f"{image['file_name']!r}; expected a file name")
            check_text(image["file_name"], f"{path}: images[{i}].file_name")
            file_of_image[image["id"]] = resolve_image_path(root, image["file_name"])
        images: list[str] = []
        texts: list[str | None] = []
        keys: list[str] = []
        for i, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or "image_id" not in annotation:
                raise DataError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
            image_id = annotation["image_id"]
            if not isinstance(image_id, int | str) or image_id not in file_of_image:
                raise DataError(f"{path}: annotations[{i}] refers to image_id {image_id!r}, "
                                f"which is not in 'images'")
            images.append(file_of_image[image_id])
            texts.append(as_text(annotation.get("caption"), f"{path}: annotations[{i}]",
                                  "caption"))
            keys.append(str(annotation.get("id", i)))
        self._image_order = [file_of_image[image["id"]] for image in data["images"]]
        self._keys = _StringColumn(keys)
        super().__init__(str(path), images, texts, None)

    def __getitem__(self, index: int) -> Record:
        record = super().__getitem__(index)
        return Record(record.image, record.text, None, self._keys[index] or "")

    def groups(self) -> ImageGroups:
        """Images in the order of the JSON's ``images`` list, each with its captions."""
        groups = super().groups()
        position = {image: i for i, image in enumerate(self._image_order)}
        order = sorted(range(len(groups.images)), key=lambda i: position[groups.images[i]])
        new_index = {old: new for new, old in enumerate(order)}
        return ImageGroups([groups.images[i] for i in order], [groups.ids[i] for i in order],
                           groups.texts, [new_index[i] for i in groups.text_to_image])


class ImageFolderSource(MapSource):
    """``root/<class_dir>/**/<image>``: class index from sorted class dirs, no captions.

    ``classnames`` are the directory names with ``_`` read as a space ("red_circle" -> "red
    circle"), ready for zero-shot prompts. Pass `classes` (directory names) to fix the label
    order, e.g. to share one label space between splits that lack some classes.
    """

    has_text = False
    has_labels = True

    def __init__(self, root: str | os.PathLike[str],
                 extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 classes: Sequence[str] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found (expected root/<class>/<image>)")
        self.root = root
        present = sorted(
            entry.name for entry in os.scandir(root)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not present:
            raise DataError(f"{root}: no class directories (expected root/<class>/<image>)")
        if classes is not None:
            unknown = sorted(set(present) - set(classes))
            if unknown:
                raise DataError(f"{root}: class directories {unknown} are not in the given "
                                f"classes")
        self.classes = list(classes) if classes is not None else present
        self.classnames = [name.replace("_", " ") for name in self.classes]
        templates = root / TEMPLATES_FILE
        if templates.is_file():  # the dataset's own zero-shot prompts, one per line
            lines = read_utf8(templates).splitlines()
            self.templates = [line.strip() for line in lines if line.strip()] or None
        suffixes = tuple(ext.lower() for ext in extensions)
        paths: list[str] = []
        labels: list[int] = []
        empty = []
        for label, class_dir in enumerate(self.classes):
            if class_dir not in present:
                continue
            before = len(paths)
            for directory, subdirs, files in os.walk(root / class_dir):
                subdirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(suffixes) and not name.startswith("."):
                        paths.append(os.path.join(directory, name))
                        labels.append(label)
            if len(paths) == before:
                empty.append(class_dir)
        if empty and classes is None:  # no image, no class (a given label space may lack some)
            raise DataError(f"{root}: class directories {empty[:10]} hold no images with "
                            f"extensions {list(suffixes)}; remove them or add their images")
        if not paths:
            raise DataError(f"{root}: no images with extensions {list(suffixes)} in class dirs")
        self._paths = _StringColumn(paths)
        self._labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Record:
        path = self._paths[index] or ""
        return Record(image=path, text=None, label=int(self._labels[index]),
                      key=os.path.relpath(path, self.root))

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images, " \
               f"{len(self.classes)} classes)"


class ListSource(MapSource):
    """Records from in-memory lists, e.g. the unique images of `ImageGroups` for eval."""

    def __init__(self, images: Sequence[str | bytes], texts: Sequence[str | None] | None = None,
                 labels: Sequence[int] | None = None) -> None:
        for name, values in (("texts", texts), ("labels", labels)):
            if values is not None and len(values) != len(images):
                raise DataError(f"ListSource: {len(values)} {name} for {len(images)} images")
        self._images = list(images)
        self._texts = list(texts) if texts is not None else None
        self._labels = list(labels) if labels is not None else None
        self.has_text = texts is not None
        self.has_labels = labels is not None

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Record:
        return Record(
            image=self._images[index],
            text=self._texts[index] if self._texts is not None else None,
            label=self._labels[index] if self._labels is not None else None,
            key=str(index),
        )


class QASource(MapSource):
    """VQA rows, JSONL ``{"image", "question", "answer" | "answers", "type"?}`` (`vlp.data.qa`):
    one record per question, its text the question and its answer `vlp.data.qa.target_answer`
    of the reference answers, for fine-tuning a generative answer decoder."""

    has_answers = True

    def __init__(self, path: str | os.PathLike[str],
                 image_root: str | os.PathLike[str] | None = None) -> None:
        # vlp.data.qa reads rows with this module's helpers
        self.path = str(path)
        self._records = read_qa_jsonl(path, image_root)
        self._answers = [target_answer(record.answers) for record in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        record = self._records[index]
        return Record(image=record.image, text=record.question, label=None, key=str(index),
                      answer=self._answers[index], answers=record.answers)

    def __repr__(self) -> str:
        return f"QASource({self.path!r}, {len(self)} questions)"


class TextSource(MapSource):
    """Text-only documents for a language model (kind "text"): a ``.txt`` file, one document
    per line, or JSONL rows with "texts" (a document's segments), "text" or ``caption_key``
    (`vlp.data.text.TextCorpus`). Records have no image."""

    has_images = False

    def __init__(self, path: str | os.PathLike[str], caption_key: str | None = None) -> None:
        self.corpus = TextCorpus(path, caption_key)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> Record:
        document = self.corpus.documents[index]
        return Record(image="", text=document[0], label=None, key=str(index),
                      segments=document)

    def groups(self) -> ImageGroups:
        raise DataError(f"{self!r} has no images to group for retrieval")

    def __repr__(self) -> str:
        return f"TextSource({str(self.corpus.path)!r}, {len(self)} documents)"


# ---------------------------------------------------------------------------------------
# source kinds by name

# kind -> (source class, default options)
# the options every file source takes, as config fields with their command-line help
SOURCE_OPTIONS = {
    "image_key": "CSV/JSONL column holding the image path (default: the source's: filepath "
                 "for CSV, image for JSONL)",
    "caption_key": "CSV/JSONL column holding the caption (default: caption)",
    "separator": "CSV separator (default: tab for .tsv, else comma)",
    "image_root": "COCO image directory, or the root of relative CSV/JSONL image paths",
}


def source_option(name: str) -> Any:
    """The config field (None by default, with its flag's help) of source option `name`."""
    return option(None, SOURCE_OPTIONS[name])


SOURCE_KINDS: dict[str, tuple[type, dict[str, Any]]] = {
    "csv": (CsvSource, {}),
    "tsv": (CsvSource, {"separator": "\t"}),
    "jsonl": (JsonlSource, {}),
    "coco": (CocoSource, {}),
    "imagefolder": (ImageFolderSource, {}),
    "wds": (WebDatasetSource, {}),
    "qa": (QASource, {}),
    "text": (TextSource, {}),
}


def infer_source_kind(path: str | os.PathLike[str]) -> str:
    """Kind from the file extension, or for a directory from its contents."""
    text = str(path)
    suffix = Path(text).suffix.lower()
    by_suffix = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "coco", ".tar": "wds",
                 ".txt": "text"}
    if suffix in by_suffix or any(mark in text for mark in ("{", "::", "://", "pipe:")):
        return by_suffix.get(suffix, "wds")
    if os.path.isdir(text):
        has_tar = any(p.suffix == ".tar" for p in Path(text).iterdir())
        return "wds" if has_tar else "imagefolder"
    raise DataError(f"{text}: cannot tell the data format; pass kind= one of {list(SOURCE_KINDS)}")


def build_source(kind: str, path: str | os.PathLike[str] | Sequence[str], **options: Any) -> Any:
    """A source by kind name ("csv", "tsv", "jsonl", "coco", "imagefolder", "wds", "qa", "text"
    or "auto"; "auto" never picks "qa", nor "text" for JSONL: both are JSONL too)."""
    if kind == "auto":
        kind = infer_source_kind(path if isinstance(path, str | os.PathLike) else path[0])
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"unknown data source kind {kind!r}; expected one of "
                          f"{sorted(SOURCE_KINDS)} or 'auto'")
    source_class, defaults = SOURCE_KINDS[kind]
    accepted = list(inspect.signature(source_class).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"data source {kind!r} takes no option(s) {unknown}; expected some of "
                          f"{accepted}")
    return source_class(path, **{**defaults, **options})
