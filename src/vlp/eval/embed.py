"""Images and texts to embeddings through any model's ``encode_image`` / ``encode_text``.

Zero-shot, retrieval and ``vlp embed`` all encode through here, so eval mode, inference
mode, autocast, batching and the handling of unreadable images are decided in one place.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlp.data.pipeline import open_image
from vlp.data.sources import IMAGE_EXTENSIONS
from vlp.data.transforms import image_transform
from vlp.errors import ConfigError, DataError
from vlp.store.files import atomic_write, atomic_write_text

ImageInput = str | Path | bytes


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode, inference mode and (on CUDA) bf16 autocast; each module's mode is restored."""
    modes = [(module, module.training) for module in model.modules()]
    device = model_device(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            yield device
    finally:
        for module, was_training in modes:
            module.training = was_training


def _finish(features: Tensor) -> Tensor:
    # autocast may hand back bf16; renormalising in fp32 keeps cosine similarities exact
    return F.normalize(features.float(), dim=-1).cpu()


def embed_texts(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """[M, D] float32 CPU L2-normalised text embeddings, in the order of ``texts``."""
    texts = list(texts)
    if not texts:
        raise DataError("no texts to embed")
    context_length = model.config.text.context_length
    chunks = []
    with inference(model) as device:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="texts", leave=False, disable=not progress):
            input_ids = tokenizer(texts[start : start + batch_size], context_length=context_length)
            chunks.append(_finish(model.encode_text(input_ids.to(device))))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------
# images


class ImageEmbeddings(NamedTuple):
    embeddings: Tensor  # [K, D] float32 on CPU, L2-normalised
    indices: Tensor  # [K] long: position in the input list of each embedded image
    ids: list[str]  # [K] path (or record key) of each embedded image
    skipped: list[str]  # ids of the inputs that could not be read, in input order


class _PixelsDataset(Dataset):
    """Decodes and transforms one image per item; an unreadable image gives ``None`` pixels."""

    def __init__(self, images: list[ImageInput], transform: Callable[[Image.Image], Tensor]):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None]:
        image = open_image(self.images[index])
        if isinstance(image, str):  # the skip reason: missing or corrupt
            return index, None
        return index, self.transform(image)


def _collate_pixels(items: list[tuple[int, Tensor | None]]) -> tuple[Tensor, Tensor | None, list]:
    readable = [(index, pixels) for index, pixels in items if pixels is not None]
    unreadable = [index for index, pixels in items if pixels is None]
    indices = torch.tensor([index for index, _ in readable], dtype=torch.long)
    pixels = torch.stack([p for _, p in readable]) if readable else None
    return indices, pixels, unreadable


def images_in_directory(directory: str | Path) -> list[Path]:
    """Every image file under ``directory`` (recursively), sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of images")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_inputs(images: Any) -> tuple[list[ImageInput], list[str]]:
    """(images, ids) from a directory, a list of paths/bytes, or a source of records."""
    if isinstance(images, str | Path):
        paths = [str(p) for p in images_in_directory(images)]
        return paths, list(paths)
    items = list(images)
    if items and hasattr(items[0], "image"):  # records of a vlp.data source
        return _unique_record_images(items)
    return items, [f"#{i}" if isinstance(x, bytes) else str(x) for i, x in enumerate(items)]


def _unique_record_images(records: Iterable[Any]) -> tuple[list[ImageInput], list[str]]:
    # caption sources repeat an image once per caption; embed each path once, first-seen order
    images, ids, seen = [], [], set()
    for record in records:
        image = record.image
        if isinstance(image, bytes):
            images.append(image)
            ids.append(str(record.key))
        elif str(image) not in seen:
            seen.add(str(image))
            images.append(image)
            ids.append(str(image))
    return images, ids


def embed_images(
    model: nn.Module,
    images: Any,
    *,
    transform: Callable[[Image.Image], Tensor] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageEmbeddings:
    """Embed a directory, a list of paths / encoded bytes, or a ``vlp.data`` source.

    Sources are reduced to their unique images (a stream is read into memory once). Unreadable
    images are skipped and listed in ``skipped``, so one broken file never ends a long run;
    ``indices`` maps rows back to inputs. ``transform`` defaults to the model's eval preprocessing.
    """
    image_list, ids = _image_inputs(images)
    if not image_list:
        where = f" in {images}" if isinstance(images, str | Path) else ""
        raise DataError(f"no images to embed{where}")
    dataset = _PixelsDataset(image_list, transform or image_transform(model, train=False))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_pixels,
        pin_memory=model_device(model).type == "cuda",
    )
    chunks, kept, unreadable = [], [], []
    with inference(model) as device:
        for indices, pixels, bad in tqdm(loader, desc="images", leave=False, disable=not progress):
            unreadable.extend(bad)
            if pixels is not None:
                chunks.append(_finish(model.encode_image(pixels.to(device, non_blocking=True))))
                kept.append(indices)
    if not chunks:
        raise DataError(f"none of the {len(image_list)} images could be read (first: {ids[0]})")
    indices = torch.cat(kept)
    return ImageEmbeddings(
        embeddings=torch.cat(chunks),
        indices=indices,
        ids=[ids[i] for i in indices.tolist()],
        skipped=[ids[i] for i in unreadable],
    )


# ---------------------------------------------------------------------------------------
# files


def save_embeddings(path: str | Path, embeddings: Tensor, ids: Sequence[str]) -> Path:
    """Write ``[K, D]`` embeddings with their ids, atomically.

    ``.safetensors``: tensor ``"embeddings"`` with the ids as JSON in metadata ``"ids"``.
    ``.npy``: the array, with the ids in ``<stem>.ids.json`` beside it (npy holds no metadata).
    """
    path = Path(path)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(
            f"need [K, D] embeddings and K ids; got {tuple(embeddings.shape)} and {len(ids)} ids"
        )
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npy"):
        raise ConfigError(f"{path}: embeddings file must end in .safetensors or .npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings = embeddings.detach().float().cpu().contiguous()
    ids = [str(i) for i in ids]
    if suffix == ".safetensors":
        metadata = {"ids": json.dumps(ids), "format": "pt"}
        atomic_write(path, lambda tmp: save_file({"embeddings": embeddings}, tmp, metadata))
    else:
        atomic_write(path, lambda tmp: np.save(tmp, embeddings.numpy()))
        ids_path = path.with_suffix(".ids.json")
        atomic_write_text(ids_path, json.dumps(ids) + "\n")
    return path


def load_embeddings(path: str | Path) -> tuple[Tensor, list[str]]:
    """Read back what ``save_embeddings`` wrote: (``[K, D]`` float32 tensor, ids)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: embeddings file not found")
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as opened:
            embeddings = opened.get_tensor("embeddings")
            ids = json.loads((opened.metadata() or {}).get("ids", "[]"))
        return embeddings, ids
    ids_path = path.with_suffix(".ids.json")
    if not ids_path.is_file():
        raise DataError(f"{ids_path}: ids file for {path.name} not found")
    embeddings = torch.from_numpy(np.load(path, allow_pickle=False))
    return embeddings, json.loads(ids_path.read_text())
