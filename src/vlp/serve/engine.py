"""The model behind `vlp serve`: one batch function per endpoint, each through the library's
own inference code (`vlp.eval` embeds, scores zero-shot, captions and answers; pixels come
through `vlp.data.images`, the inference input path), so a served result is what the library
gives for the same input.

Only `Batcher`'s worker thread calls `ServedModel.run`. Items carry encoded image bytes that
`vlp.serve.limits.check_image` has already accepted; an image that still cannot be decoded
(a truncated file) becomes that item's `RequestError`, never the batch's.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp import factory
from vlp.contract import CAPTION, EMBED, ITM, VQA
from vlp.data.images import read_images
from vlp.data.qa import QARecord
from vlp.errors import ConfigError, DataError
from vlp.eval.captioning import generate_captions
from vlp.eval.embed import embed_images, embed_texts, inference
from vlp.eval.vqa import answer_questions
from vlp.eval.zeroshot import zero_shot_classifier
from vlp.hub import is_pretrained_name, resolve
from vlp.serve.limits import RequestError

CLASSIFIER_CACHE = 64  # zero-shot classifiers kept, by (labels, templates)
# endpoint -> the task (`PretrainModel.tasks`) it needs
ENDPOINT_TASKS = {"embed_image": EMBED, "embed_text": EMBED, "zeroshot": EMBED,
                  "caption": CAPTION, "vqa": VQA, "itm": ITM, "search": EMBED}


def unreadable(reason: str | None = None) -> RequestError:
    why = f" ({reason})" if reason else ""
    return RequestError(422, f"the image could not be decoded{why}: truncated or damaged data")


class ServedModel:
    """A model loaded for inference (`vlp.factory.load_model_and_transforms`)."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu",
                 index: str | os.PathLike[str] | None = None,
                 fast_decode: bool = False) -> None:
        """``path``: what `vlp.load` takes (a model or run directory, or a hub name);
        ``index``: a `vlp index` directory built with this model, for ``/v1/search``;
        ``fast_decode``: every endpoint decodes large JPEGs at a reduced scale
        (`vlp.data.transforms.ImageTransform.draft_size`)."""
        self.fast_decode = fast_decode
        self.model, self.tokenizer, self.transform = factory.load_model_and_transforms(
            resolve(path), map_location=device, fast_decode=fast_decode)
        # a hub name as given, a directory by its own name: never the machine's path
        self.name = str(path) if is_pretrained_name(path) else Path(path).resolve().name
        self._classifiers: OrderedDict[tuple, Tensor] = OrderedDict()
        self.index = None
        if index is not None:
            self.index = open_index(index, path, self)

    def search_info(self) -> dict[str, Any] | None:
        if self.index is None:
            return None
        info = self.index.info
        return {"name": Path(self.index.directory).resolve().name, "kind": info["kind"],
                "count": info["count"], "dim": info["dim"], "modality": info["modality"]}

    @property
    def family(self) -> str:
        return self.model.config.family

    def tasks(self) -> list[str]:
        tasks = self.model.tasks()
        if self.tokenizer is None:  # without a tokenizer only images can be embedded
            tasks = tasks & {EMBED}
        return sorted(tasks)

    def endpoints(self) -> list[str]:
        """The /v1 endpoints this model answers."""
        names = {"embed_image": "embed/image", "embed_text": "embed/text"}
        tasks = set(self.tasks())
        usable = [e for e, task in ENDPOINT_TASKS.items() if task in tasks]
        if self.tokenizer is None:
            usable = [e for e in usable if e in ("embed_image", "search")]
        if self.index is None:
            usable = [e for e in usable if e != "search"]
        return [f"/v1/{names.get(e, e)}" for e in usable]

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        return {"name": self.name, "family": self.family, "tasks": self.tasks(),
                "endpoints": self.endpoints(),
                "image_size": config.vision.image_size,
                "context_length": config.text.context_length,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "fast_decode": self.fast_decode,
                "index": self.search_info()}

    def require(self, endpoint: str) -> None:
        """RequestError 400 naming what the model serves when it cannot serve ``endpoint``."""
        task = ENDPOINT_TASKS[endpoint]
        if endpoint == "search" and self.index is None:
            raise RequestError(400, "/v1/search: this server has no index (start it with "
                                    f"--index DIR); endpoints here: {self.endpoints()}")
        needs_text = endpoint not in ("embed_image", "search")
        if task in self.tasks() and not (needs_text and self.tokenizer is None):
            return
        try:
            self.model.require(task, f"/v1/{endpoint.replace('_', '/')}")
        except ConfigError as error:
            raise RequestError(400, f"{error}; endpoints here: {self.endpoints()}") from None
        raise RequestError(400, f"/v1/{endpoint.replace('_', '/')} needs a tokenizer, which "
                                f"the model directory lacks; endpoints here: "
                                f"{self.endpoints()}")

    # -- batch functions (the worker thread) --------------------------------------------------

    def run(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        kind, *options = key
        return getattr(self, f"_{kind}")(list(items), *options)

    def _embed_image(self, images: list[bytes]) -> list[Any]:
        try:
            result = embed_images(self.model, images, transform=self.transform,
                                  batch_size=len(images), progress=False)
        except DataError:  # none of the images could be read
            return [unreadable()] * len(images)
        out: list[Any] = [unreadable()] * len(images)
        for row, index in enumerate(result.indices.tolist()):
            out[index] = {"embedding": result.embeddings[row].tolist()}
        return out

    def _embed_text(self, requests: list[list[str]]) -> list[Any]:
        texts = [text for request in requests for text in request]
        embeddings = embed_texts(self.model, self.tokenizer, texts, batch_size=len(texts),
                                 progress=False).tolist()
        out, start = [], 0
        for request in requests:
            out.append({"embeddings": embeddings[start:start + len(request)]})
            start += len(request)
        return out

    def classifier(self, labels: tuple[str, ...], templates: tuple[str, ...] | None) -> Tensor:
        """``[D, C]`` zero-shot weights of ``labels`` (`vlp.eval.zeroshot`), cached."""
        key = (labels, templates)
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        weights = zero_shot_classifier(self.model, self.tokenizer, list(labels),
                                       list(templates) if templates else None, progress=False)
        self._classifiers[key] = weights
        if len(self._classifiers) > CLASSIFIER_CACHE:
            self._classifiers.popitem(last=False)
        return weights

    def _zeroshot(self, requests: list[tuple[bytes, tuple, tuple | None]]) -> list[Any]:
        embedded = self._embed_image([image for image, _, _ in requests])
        out: list[Any] = []
        for result, (_, labels, templates) in zip(embedded, requests):
            if isinstance(result, Exception):
                out.append(result)
                continue
            image = torch.tensor(result["embedding"])[None]
            with torch.inference_mode():
                weights = self.classifier(labels, templates)
                cosines = self.model.similarity(image, weights.T)[0]
                probabilities = torch.softmax(self.model.zeroshot_logit_scale() * cosines,
                                              dim=-1)
            out.append({"scores": dict(zip(labels, probabilities.tolist())),
                        "similarities": dict(zip(labels, cosines.tolist()))})
        return out

    def _caption(self, images: list[bytes], max_new_tokens: int, num_beams: int,
                 prompt: str | None) -> list[Any]:
        result = generate_captions(self.model, self.tokenizer, images, batch_size=len(images),
                                   max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   prompt=prompt, progress=False,
                                   fast_decode=self.fast_decode)
        out: list[Any] = [unreadable()] * len(images)
        for index, (_, text) in zip(result.indices, result.pairs):
            out[index] = {"caption": text}
        return out

    def _vqa(self, requests: list[tuple[bytes, str]], max_new_tokens: int,
             num_beams: int) -> list[Any]:
        records = [QARecord(image, question, ("",)) for image, question in requests]
        answers = answer_questions(self.model, self.tokenizer, records, batch_size=len(records),
                                   num_beams=num_beams, max_new_tokens=max_new_tokens,
                                   progress=False, fast_decode=self.fast_decode)
        return [unreadable() if answer is None else {"answer": answer} for answer in answers]

    def _search(self, queries: list[tuple[str, Any]], k: int) -> list[Any]:
        """Each query ("text", str) or ("image", bytes): its top ``k`` in the index."""
        texts = [i for i, (kind, _) in enumerate(queries) if kind == "text"]
        images = [i for i, (kind, _) in enumerate(queries) if kind == "image"]
        vectors: dict[int, Any] = {}
        if texts:
            embedded = embed_texts(self.model, self.tokenizer, [queries[i][1] for i in texts],
                                   batch_size=len(texts), progress=False)
            vectors.update(zip(texts, embedded.numpy()))
        out: list[Any] = [unreadable()] * len(queries)
        if images:
            for i, result in zip(images, self._embed_image([queries[i][1] for i in images])):
                if not isinstance(result, Exception):
                    vectors[i] = result["embedding"]
        if vectors:
            order = sorted(vectors)
            found = self.index.search([vectors[i] for i in order], k)
            for i, results in zip(order, found):
                out[i] = {"results": [{**r, "thumbnail": f"/v1/search/thumbnail/{r['row']}"}
                                      for r in results]}
        return out

    def _itm(self, requests: list[tuple[bytes, list[str]]]) -> list[Any]:
        batch = read_images([image for image, _ in requests], self.transform)
        out: list[Any] = [None] * len(requests)
        for index, reason in zip(batch.unreadable, batch.reasons):
            out[index] = unreadable(reason)
        if batch.pixels is None:
            return out
        row_of = {index: row for row, index in enumerate(batch.indices.tolist())}
        pairs = [(row_of[i], text) for i, (_, texts) in enumerate(requests) if i in row_of
                 for text in texts]
        config = self.model.config
        input_ids = self.tokenizer([text for _, text in pairs],
                                   context_length=config.text.context_length)
        rows = torch.tensor([row for row, _ in pairs], dtype=torch.long)
        with inference(self.model) as device:
            probabilities = self.model.itm_probability(
                batch.pixels.to(device)[rows.to(device)], input_ids.to(device),
                (input_ids != config.text.pad_id).to(device)).cpu().tolist()
        start = 0
        for i, (_, texts) in enumerate(requests):
            if i in row_of:
                out[i] = {"probabilities": probabilities[start:start + len(texts)]}
                start += len(texts)
        return out


def open_index(directory: str | os.PathLike[str], path: str | os.PathLike[str],
               served: ServedModel) -> Any:
    """The `vlp.search.Index` at ``directory``, queried with the served model, which must be
    the one the index was built with (or one with the same embedding width and name)."""
    from vlp.search import Index

    index = Index(directory)
    built_with = index.info["model"]
    given = str(path) if is_pretrained_name(path) else str(Path(path).resolve())
    if built_with != given:
        raise ConfigError(f"--index {directory}: built with model {built_with}, not {given}; "
                          "serve that model or rebuild the index with this one")
    if index.info["modality"] != "image" and served.tokenizer is None:
        raise ConfigError(f"--index {directory}: a text index needs the model's tokenizer")
    index.use_model(served.model, served.tokenizer, served.transform)
    return index
