"""The one input path for images at inference: decode, transform, batch, and set aside the
images that cannot be read.

Embedding, captioning, ITM re-ranking, VQA eval and CapFilt all read pixels through
`ImageDataset` + `collate_images` (or `image_batches`, the DataLoader over both), so an
unreadable image is treated the same everywhere: it is skipped, counted and named by the caller
(its position comes back in `ImageBatch.unreadable`, with the reason), never raised mid-run.

`group_images` is the one rule for "the unique images of a source": a path is one image by its
string, encoded bytes (WebDataset) are one image by their content hash, kept in first-seen
order; an image is named by its path, or by the key of the record that brought its bytes.
Training batches group captions by the same rule (`image_group_id`).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlp.errors import ConfigError, DataError

ImageInput = str | Path | bytes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def open_image(image: ImageInput, *, exif_orientation: bool = True,
               draft_size: int | None = None) -> Image.Image | str:
    """The decoded RGB image, or the skip reason ("missing_image", "corrupt_image", or
    "not_a_file": a path to a named pipe, device or socket, never opened, so nothing blocks).

    16-bit and 32-bit images are scaled from their own range to 8 bits (PIL alone clips them to
    white); ``exif_orientation`` turns a camera photo upright by its EXIF Orientation tag, as
    viewers show it. PIL's decompression-bomb limit applies (such an image is corrupt_image).
    ``draft_size``: a JPEG may be decoded DCT-scaled (1/2, 1/4, 1/8) as long as both sides stay
    at least this many pixels (PIL's draft mode: several times faster on large photos, pixels
    close to but not equal to a full decode then resize)."""
    if not image:
        return "missing_image"
    if not isinstance(image, bytes):
        try:
            if not stat.S_ISREG(os.stat(image).st_mode):
                return "missing_image" if os.path.isdir(image) else "not_a_file"
        except (FileNotFoundError, NotADirectoryError):
            return "missing_image"
        except (OSError, ValueError):
            return "corrupt_image"
    stream = io.BytesIO(image) if isinstance(image, bytes) else image
    try:
        with Image.open(stream) as opened:
            if draft_size is not None and opened.format == "JPEG":
                opened.draft("RGB", (draft_size, draft_size))
            opened.load()
            if exif_orientation:  # in place: no copy of an upright image
                ImageOps.exif_transpose(opened, in_place=True)
            return _to_rgb(opened)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing_image"
    except Exception:  # PIL raises many types on corrupt data (OSError, SyntaxError, ...)
        return "corrupt_image"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # float images are in [0, 1] unless they say otherwise
            top = 1.0 if values.size == 0 or np.nanmax(values) <= 1.0 else float(np.nanmax(values))
        elif image.mode.startswith("I;16") or (values.size and 0 <= values.min()
                                                and values.max() <= 65535):
            top = 65535.0
        else:  # 32-bit signed integers
            top = float(2**31 - 1)
        scaled = np.clip(np.nan_to_num(values / top), 0.0, 1.0) * 255.0
        return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def images_in_directory(directory: str | Path) -> list[Path]:
    """Every image file under ``directory`` (recursively), sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of images")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


# -- the unique images of a source ----------------------------------------------------------------

def image_identity(image: ImageInput) -> str | bytes:
    """What makes two images the same one: a path's string, or encoded bytes' content hash."""
    return hashlib.sha1(image).digest() if isinstance(image, bytes) else str(image)


def image_group_id(image: ImageInput) -> int:
    """`image_identity` as a stable 63-bit integer (the same on every rank, run and platform):
    training batches carry it as ``image_id`` so that captions of one image are never each
    other's negatives."""
    identity = image_identity(image)
    data = identity if isinstance(identity, bytes) else identity.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _image_id(image: ImageInput, key: Any, position: int) -> str:
    if not isinstance(image, bytes):
        return str(image)
    return str(key) if key is not None else f"#{position}"


def list_ids(images: Sequence[ImageInput]) -> list[str]:
    """Names of a plain list of images: each path as itself, encoded bytes by position (``#i``)."""
    return [_image_id(image, None, i) for i, image in enumerate(images)]


@dataclass
class ImageGroups:
    """The unique images of a source with their captions.

    ``ids[i]`` names ``images[i]`` (its path, or the key of the record that brought its bytes);
    ``text_to_image[t]`` is the image of caption ``texts[t]``. Missing or empty captions are
    left out (an image may then have none: see `captioned`). ``lost`` lists the samples the
    source skipped before any image was read (name, reason), e.g. a truncated shard's.
    """

    images: list[ImageInput] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_to_image: list[int] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)

    @property
    def image_to_texts(self) -> list[list[int]]:
        """Caption indices of each image, in caption order."""
        result: list[list[int]] = [[] for _ in self.images]
        for text_index, image_index in enumerate(self.text_to_image):
            result[image_index].append(text_index)
        return result

    def references(self) -> list[list[str]]:
        """The captions of each image, in caption order."""
        return [[self.texts[t] for t in texts] for texts in self.image_to_texts]

    def captioned(self) -> ImageGroups:
        """The same groups without the images that have no caption (renumbered, order kept)."""
        has_text = set(self.text_to_image)
        kept = [i for i in range(len(self.images)) if i in has_text]
        new_index = {old: new for new, old in enumerate(kept)}
        return ImageGroups([self.images[i] for i in kept], [self.ids[i] for i in kept],
                           list(self.texts), [new_index[i] for i in self.text_to_image],
                           list(self.lost))


def group_images(records: Iterable[Any]) -> ImageGroups:
    """The unique images of ``records`` (a source, or any records with ``image`` and, where
    present, ``text`` and ``key``) in first-seen order, each with its non-empty captions."""
    groups = ImageGroups()
    position: dict[str | bytes, int] = {}
    for record in records:
        image = record.image
        identity = image_identity(image)
        if identity not in position:
            position[identity] = len(groups.images)
            groups.images.append(image)
            groups.ids.append(_image_id(image, getattr(record, "key", None),
                                        len(groups.images) - 1))
        text = getattr(record, "text", None)
        if text is not None and text.strip():
            groups.texts.append(text)
            groups.text_to_image.append(position[identity])
    groups.lost = list(getattr(records, "lost_samples", ()))  # a stream's skipped samples
    return groups


def unique_images(records: Iterable[Any]) -> tuple[list[ImageInput], list[str]]:
    """(images, ids) of the unique images of ``records`` (`group_images`' rule)."""
    groups = group_images(records)
    return groups.images, groups.ids


def image_inputs(images: Any) -> tuple[list[ImageInput], list[str]]:
    """(images, ids) from a directory (its image files, sorted), records of a source (their
    unique images) or a plain list of paths / encoded bytes (as given, named by `list_ids`)."""
    if isinstance(images, str | Path):
        paths = [str(p) for p in images_in_directory(images)]
        return paths, list(paths)
    items = list(images)
    if items and hasattr(items[0], "image"):  # records of a vlp.data source
        return unique_images(items)
    return items, list_ids(items)


# -- decoding and batching ------------------------------------------------------------------------

class ImageItem(NamedTuple):
    index: int  # position in the dataset
    pixels: Tensor | None  # None: the image could not be read
    reason: str | None  # why not ("missing_image" / "corrupt_image"), else None
    extra: Any = None  # what rides along with the image (e.g. a question), if anything


class ImageBatch(NamedTuple):
    indices: Tensor  # [K] long: dataset positions of the readable items
    pixels: Tensor | None  # [K, 3, H, W]; None when no item of the batch could be read
    extras: list  # [K] the readable items' extras
    unreadable: list[int]  # dataset positions of the items whose image could not be read
    reasons: list[str]  # why, one per entry of ``unreadable``


class ImageDataset(Dataset):
    """Decodes and transforms one image per item; an unreadable image gives ``None`` pixels and
    its reason. ``extras[i]`` (optional) rides along with image ``i``."""

    def __init__(self, images: Sequence[ImageInput], transform: Callable[[Image.Image], Tensor],
                 extras: Sequence[Any] | None = None) -> None:
        if extras is not None and len(extras) != len(images):
            raise DataError(f"ImageDataset: {len(extras)} extras for {len(images)} images")
        self.images = list(images)
        self.transform = transform
        self.extras = list(extras) if extras is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageItem:
        extra = self.extras[index] if self.extras is not None else None
        image = open_image(self.images[index],
                           draft_size=getattr(self.transform, "draft_size", None))
        if isinstance(image, str):
            return ImageItem(index, None, image, extra)
        return ImageItem(index, self.transform(image), None, extra)


def collate_images(items: Sequence[ImageItem]) -> ImageBatch:
    """Stack the readable items' pixels; list the unreadable ones apart."""
    readable = [item for item in items if item.pixels is not None]
    unreadable = [item for item in items if item.pixels is None]
    return ImageBatch(
        indices=torch.tensor([item.index for item in readable], dtype=torch.long),
        pixels=torch.stack([item.pixels for item in readable]) if readable else None,
        extras=[item.extra for item in readable],
        unreadable=[item.index for item in unreadable],
        reasons=[item.reason for item in unreadable],
    )


def image_batches(images: Sequence[ImageInput], transform: Callable[[Image.Image], Tensor], *,
                  batch_size: int, extras: Sequence[Any] | None = None, num_workers: int = 0,
                  shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                  pin_memory: bool = False,
                  collate: Callable[[list[ImageItem]], Any] = collate_images) -> DataLoader:
    """A DataLoader of `ImageBatch` (or what ``collate`` makes of the items) over ``images``,
    in order unless ``shuffle`` (then seeded by ``seed``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected an integer >= 1")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ImageDataset(images, transform, extras), batch_size=batch_size,
                      shuffle=shuffle, drop_last=drop_last, generator=generator,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory)


def read_images(images: Sequence[ImageInput],
                transform: Callable[[Image.Image], Tensor]) -> ImageBatch:
    """One `ImageBatch` of ``images``, decoded here (no DataLoader): for a batch in hand."""
    dataset = ImageDataset(images, transform)
    return collate_images([dataset[i] for i in range(len(dataset))])
