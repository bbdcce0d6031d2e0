"""`vlp.search.Index`: a built index loaded for queries by vectors, texts or images.

Results come best first as ``{"id", "score", "path", "caption", "row", ...}``: the metadata
row `vlp embed` wrote for the hit (``key``, ``offset`` and ``size`` name an image inside a
WebDataset shard; absent fields are left out). The model that embeds text and image queries is
the one recorded in ``index.json`` unless another is given.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from vlp.errors import ConfigError, DataError
from vlp.search.embed import import_pyarrow
from vlp.search.index import INDEX_FILE, INDEX_JSON, METADATA, import_faiss, set_params
from vlp.store.files import read_json_object

THUMBNAIL_PX = 256


class Index:
    """A `vlp index` directory in memory: the faiss index, its metadata, and (on first text
    or image query) the model."""

    def __init__(self, directory: str | os.PathLike[str], model: str | None = None,
                 device: str = "cpu", fast_decode: bool = False) -> None:
        directory = Path(directory)
        self.directory = directory
        self.info = read_json_object(directory / INDEX_JSON, DataError)
        if self.info.get("format") != "vlp-index":
            raise DataError(f"{directory / INDEX_JSON}: not a vlp index")
        faiss = import_faiss()
        if not (directory / INDEX_FILE).is_file():
            raise DataError(f"{directory / INDEX_FILE}: index file not found")
        self.index = faiss.read_index(str(directory / INDEX_FILE))
        set_params(faiss, self.index, self.info.get("params") or {})
        _, pq = import_pyarrow()
        table = pq.read_table(directory / METADATA)
        if table.num_rows != self.index.ntotal:
            raise DataError(f"{directory}: {METADATA} has {table.num_rows} rows for "
                            f"{self.index.ntotal} vectors")
        self.metadata = {name: table.column(name).to_pylist() for name in table.column_names}
        self.model_name = model or self.info["model"]
        self.device = device
        self.fast_decode = fast_decode  # image queries: large JPEGs decode at a reduced scale
        self._loaded: tuple[Any, Any, Any] | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: str | None = None,
             device: str = "cpu", fast_decode: bool = False) -> Index:
        return cls(directory, model=model, device=device, fast_decode=fast_decode)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def use_model(self, model: Any, tokenizer: Any, transform: Any) -> None:
        """Embed queries with a model already loaded (the server's), after checking its width."""
        self._loaded = (model, tokenizer, transform)

    def model(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            from vlp import factory
            from vlp.hub import resolve

            self._loaded = factory.load_model_and_transforms(
                resolve(self.model_name), map_location=self.device,
                fast_decode=self.fast_decode)
        return self._loaded

    # -- queries ------------------------------------------------------------------------------

    def search(self, vectors: Any, k: int = 10) -> list[list[dict[str, Any]]]:
        """Results for each row of ``vectors`` ([Q, dim] or [dim]; normalised here)."""
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"query vectors must be [Q, {self.dim}]; got {queries.shape}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = np.ascontiguousarray(queries / np.maximum(norms, 1e-12))
        scores, rows = self.index.search(queries, min(k, len(self)))
        return [[self.result(int(r), float(s)) for s, r in zip(qs, qr) if r >= 0]
                for qs, qr in zip(scores, rows)]

    def search_texts(self, texts: list[str], k: int = 10) -> list[list[dict[str, Any]]]:
        from vlp.eval.embed import embed_texts

        model, tokenizer, _ = self.model()
        if tokenizer is None:
            raise ConfigError(f"{self.model_name}: no tokenizer; text queries need one")
        return self.search(embed_texts(model, tokenizer, texts, progress=False).numpy(), k)

    def search_images(self, images: list[Any], k: int = 10) -> list[list[dict[str, Any]]]:
        """Results for each image (a path or encoded bytes); an unreadable one is a DataError
        naming it."""
        from vlp.eval.embed import embed_images

        model, _, transform = self.model()
        embedded = embed_images(model, list(images), transform=transform, progress=False)
        if embedded.skipped:
            raise DataError(f"query image {embedded.skipped[0]}: cannot be read "
                            f"({embedded.reasons[0]})")
        return self.search(embedded.embeddings.numpy(), k)

    def result(self, row: int, score: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.metadata["id"][row], "score": score,
                                 "path": self.metadata["path"][row]}
        for name in ("caption", "key"):
            if self.metadata.get(name) and self.metadata[name][row] is not None:
                entry[name] = self.metadata[name][row]
        entry["row"] = row
        return entry

    # -- the images behind results ------------------------------------------------------------

    def image_bytes(self, row: int) -> bytes:
        """The encoded image of result ``row``, read from where the metadata says it is (a
        file, or a byte range of a WebDataset shard)."""
        if not 0 <= row < len(self):
            raise DataError(f"row {row} is not in the index (0..{len(self) - 1})")
        path = self.metadata["path"][row]
        offset, size = self.metadata["offset"][row], self.metadata["size"][row]
        try:
            with open(path, "rb") as f:
                if offset is None:
                    return f.read()
                f.seek(offset)
                return f.read(size)
        except OSError as error:
            raise DataError(f"{self.metadata['id'][row]}: image not readable ({error})") from None

    def thumbnail(self, row: int, size: int = THUMBNAIL_PX) -> bytes:
        """A JPEG of result ``row``'s image, at most ``size`` pixels a side."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.image_bytes(row))) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=85)
        except DataError:
            raise
        except Exception as error:  # PIL raises many types on damaged data
            raise DataError(f"{self.metadata['id'][row]}: image not decodable ({error})") from None
        return buffer.getvalue()
