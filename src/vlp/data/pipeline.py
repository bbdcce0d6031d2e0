"""The per-sample work of both loader paths: decode, check, augment and collate into a batch.

It runs inside DataLoader workers. A sample's augmentation generator is seeded by `derive_seed`
from (seed, epoch, position), never from the worker that runs it. Unreadable images, missing
captions or labels and samples lost to damaged shards are skipped; their counts and listing
entries ride inside each batch for the `Loader` to pop.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vlp.data.images import image_group_id, open_image
from vlp.data.qa import answer_weights
from vlp.data.records import Record

Batch = dict[str, Any]
Tokenizer = Callable[[list[str]], torch.Tensor]
SKIP_REASONS = ("missing_image", "corrupt_image", "not_a_file", "missing_caption", "missing_label",
                "truncated_shard", "duplicate_key")
MAX_SKIPPED_ITEMS = 100  # skipped samples listed per epoch (all are counted)
# carried from workers inside each batch, popped by Loader
_SKIPPED_KEY = "_skipped_by_reason"
_SKIPPED_ITEMS_KEY = "_skipped_items"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers; equal parts give equal seeds on every platform."""
    data = b"".join(int(part).to_bytes(8, "little", signed=True) for part in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True, slots=True)
class _Lost:
    """A sample known to be lost before reading it, e.g. cut off with its tar shard."""

    reason: str
    note: str  # the listing entry; empty for all but one sample of the same damage


# (sample index, record or a thunk reading it or _Lost, augmentation seed, name to list it by)
Item = tuple[int, Record | Callable[[], Record] | _Lost, int, str | None]


def _record_name(record: Record) -> str:
    """An image path, else the record's key: how a skipped map-style sample is listed."""
    return record.image if isinstance(record.image, str) and record.image else record.key


def trim_padding(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row (at least one column kept)."""
    columns = (input_ids != pad_id).any(dim=0).nonzero()
    width = int(columns.max()) + 1 if columns.numel() else 1
    return input_ids[:, :width]


class _SamplePipeline:
    """Decode, augment and collate records into one batch; runs inside DataLoader workers.
    With ``has_answers`` (VQA records) the texts are questions and each record's distinct
    answers are tokenised by ``answer_tokenizer`` (default: ``tokenizer``), weighted and
    counted per question (``answer_weight``, ``answer_count``; see `vlp.data.qa`). Image-text
    batches carry ``image_id`` (B,): rows with the same image (`image_group_id`) share it.
    Without ``has_images`` (text-only documents) a batch is ``{"input_ids", "index"}``: each
    record's segments packed into a row (``tokenizer.pack``), padding columns trimmed."""

    def __init__(self, transform: Callable[..., torch.Tensor] | None, tokenizer: Tokenizer | None,
                 has_text: bool, has_labels: bool, has_answers: bool = False,
                 answer_tokenizer: Tokenizer | None = None, has_images: bool = True,
                 caption_prompt: str | None = None) -> None:
        if has_images and transform is None:
            raise ValueError("a source with images needs an image transform")
        self.transform = transform
        self.tokenizer = tokenizer
        self.has_text = has_text
        self.has_labels = has_labels
        self.has_answers = has_answers
        self.has_images = has_images
        self.answer_tokenizer = answer_tokenizer if answer_tokenizer is not None else tokenizer
        # before each caption (not VQA questions), one space between them
        self.caption_prompt = f"{caption_prompt.rstrip()} " if caption_prompt else ""

    def _load(self, record: Record, augment_seed: int) -> torch.Tensor | str | None:
        if self.has_text and (record.text is None or not record.text.strip()):
            return "missing_caption"
        if self.has_labels and record.label is None:
            return "missing_label"
        if not self.has_images:
            return None
        image = open_image(record.image)
        if isinstance(image, str):
            return image
        return self.transform(image, torch.Generator().manual_seed(augment_seed))

    def batch(self, items: Iterable[Item]) -> Batch:
        """Batch of items; a skipped one is listed by its name (default: `_record_name`)."""
        pixels: list[torch.Tensor] = []
        documents: list[tuple[str, ...]] = []
        texts: list[str] = []
        labels: list[int] = []
        answers: list[tuple[str, ...]] = []
        groups: list[int] = []  # image-text rows: `image_group_id` of each row's image
        indices: list[int] = []
        skipped: Counter[str] = Counter()
        listed: list[str] = []
        for index, record, augment_seed, name in items:
            if isinstance(record, _Lost):
                skipped[record.reason] += 1
                if record.note and len(listed) < MAX_SKIPPED_ITEMS:
                    listed.append(record.note)
                continue
            try:
                if callable(record):
                    record = record()
                loaded = self._load(record, augment_seed)
            except OSError:  # a shard that went unreadable after it was scanned
                loaded = "corrupt_image"
            if isinstance(loaded, str):
                skipped[loaded] += 1
                if len(listed) < MAX_SKIPPED_ITEMS:
                    where = name if name is not None else _record_name(record)
                    listed.append(f"{where}: {loaded}")
                continue
            if loaded is None:
                documents.append(record.segments or (record.text,))
            else:
                pixels.append(loaded)
            indices.append(index)
            if self.has_text:
                texts.append(record.text)
                if loaded is not None and not self.has_answers:
                    groups.append(image_group_id(record.image))
            if self.has_labels:
                labels.append(record.label)
            if self.has_answers:
                answers.append(record.answers or (record.answer or "",))
        if not self.has_images:
            return self._collate_documents(documents, indices, skipped, listed)
        batch = self._collate(pixels, texts, labels, indices, skipped, listed, answers)
        if self.has_text and not self.has_answers:
            batch["image_id"] = torch.tensor(groups, dtype=torch.long)
        return batch

    def _collate_documents(self, documents: list[tuple[str, ...]], indices: list[int],
                           skipped: Counter[str], listed: list[str]) -> Batch:
        if self.tokenizer is None:
            raise ValueError("text-only documents are tokenised in the loader; pass a tokenizer")
        ids = self.tokenizer.pack(documents) if documents else torch.empty(0, 1, dtype=torch.long)
        batch: Batch = {"input_ids": trim_padding(ids, self.tokenizer.pad_id),
                        "index": torch.tensor(indices, dtype=torch.long)}
        batch["num_skipped"] = sum(skipped.values())
        batch[_SKIPPED_KEY] = dict(skipped)
        batch[_SKIPPED_ITEMS_KEY] = listed
        return batch

    def _tokens(self, tokenizer: Tokenizer | None, texts: list[str]) -> torch.Tensor:
        if texts:
            return tokenizer(texts)
        return torch.empty(0, getattr(tokenizer, "context_length", 0), dtype=torch.long)

    def _collate(self, pixels: list[torch.Tensor], texts: list[str], labels: list[int],
                 indices: list[int], skipped: Counter[str], listed: list[str],
                 answers: list[tuple[str, ...]]) -> Batch:
        if pixels:
            pixel_batch = torch.stack(pixels)
        else:
            size = getattr(self.transform, "image_size", 0)
            pixel_batch = torch.empty(0, 3, size, size)
        batch: Batch = {"pixels": pixel_batch, "index": torch.tensor(indices, dtype=torch.long)}
        if self.has_answers:  # VQA: the models' question / answer batch keys
            # every distinct answer of each question, weighted (`vlp.data.qa.answer_weights`)
            rows, weights, counts = [], [], []
            for given in answers:
                distinct, shares = answer_weights(given)
                rows, weights = rows + distinct, weights + shares
                counts.append(len(distinct))
            if self.tokenizer is None:
                batch["questions"], batch["answers"] = texts, rows
            else:
                batch["question_ids"] = self._tokens(self.tokenizer, texts)
                batch["answer_ids"] = self._tokens(self.answer_tokenizer, rows)
            batch["answer_weight"] = torch.tensor(weights, dtype=torch.float32)
            batch["answer_count"] = torch.tensor(counts, dtype=torch.long)
        elif self.has_text:
            texts = [self.caption_prompt + text for text in texts]
            if self.tokenizer is None:
                batch["texts"] = texts
            else:
                batch["input_ids"] = self._tokens(self.tokenizer, texts)
        if self.has_labels:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["num_skipped"] = sum(skipped.values())
        batch[_SKIPPED_KEY] = dict(skipped)
        batch[_SKIPPED_ITEMS_KEY] = listed
        return batch
