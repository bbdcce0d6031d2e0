"""Images and texts to embeddings through any model's ``encode_image`` / ``encode_text``.

Zero-shot, retrieval and ``vlp embed`` all encode through here, so eval mode, inference
mode, autocast and batching are decided in one place; images are read through
`vlp.data.images`, the input path captioning, re-ranking and VQA share (unreadable images
skipped and named).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlp.data.images import image_batches, image_inputs
from vlp.data.transforms import image_transform
from vlp.errors import ConfigError, DataError
from vlp.store.files import atomic_write, atomic_write_text


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
    reasons: list[str] = []  # why, one per entry of ``skipped`` ("missing_image", ...)


def embed_images(
    model: nn.Module,
    images: Any,
    *,
    ids: Sequence[str] | None = None,
    transform: Callable[[Image.Image], Tensor] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    fast_decode: bool = False,
) -> ImageEmbeddings:
    """Embed a directory, a list of paths / encoded bytes, or a ``vlp.data`` source.

    Sources are reduced to their unique images (`vlp.data.images.group_images`; a stream is
    read into memory once). Images are read through `vlp.data.images.image_batches`: unreadable
    ones are skipped and listed in ``skipped``, so one broken file never ends a long run;
    ``indices`` maps rows back to inputs. ``ids`` names a list of images (default: each path
    as itself, encoded bytes as ``#i``). ``transform`` defaults to the model's eval
    preprocessing, with ``fast_decode`` its reduced-scale JPEG decoding
    (`vlp.data.transforms.ImageTransform.draft_size`).
    """
    image_list, default_ids = image_inputs(images)
    if ids is None:
        ids = default_ids
    elif isinstance(images, str | Path) or len(ids) != len(image_list):
        raise ConfigError(f"embed_images: ids name a list of images; got {len(ids)} ids for "
                          f"{len(image_list)} images")
    ids = [str(i) for i in ids]
    if not image_list:
        where = f" in {images}" if isinstance(images, str | Path) else ""
        raise DataError(f"no images to embed{where}")
    if transform is None:
        transform = image_transform(model, train=False, fast_decode=fast_decode)
    loader = image_batches(image_list, transform,
                           batch_size=batch_size, num_workers=num_workers,
                           pin_memory=model_device(model).type == "cuda")
    chunks, kept, unreadable, reasons = [], [], [], []
    with inference(model) as device:
        for batch in tqdm(loader, desc="images", leave=False, disable=not progress):
            unreadable.extend(batch.unreadable)
            reasons.extend(batch.reasons)
            if batch.pixels is not None:
                pixels = batch.pixels.to(device, non_blocking=True)
                chunks.append(_finish(model.encode_image(pixels)))
                kept.append(batch.indices)
    if not chunks:
        raise DataError(f"none of the {len(image_list)} images could be read (first: {ids[0]})")
    indices = torch.cat(kept)
    return ImageEmbeddings(
        embeddings=torch.cat(chunks),
        indices=indices,
        ids=[ids[i] for i in indices.tolist()],
        skipped=[ids[i] for i in unreadable],
        reasons=reasons,
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
