"""Text-only corpora: mixed into image-text batches (SimVLM's PrefixLM pretraining) or trained on
alone (a causal LM, source kind ``"text"``). A ``.txt`` file holds one text per line; a JSONL
file a text field per row, or ``"texts"``: the segments of one document (each tokenised as bos +
text + eos, packed into one row: `vlp.tokenizers.Tokenizer.pack`).

Like the image loader, every choice is a function of (seed, epoch, position): each epoch is a
seeded permutation dealt round-robin to ranks, so a run resumed from ``state_dict`` draws exactly
the batches an uninterrupted run would have drawn next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from vlp.data.loader import rank_indices
from vlp.data.pipeline import derive_seed, trim_padding
from vlp.data.records import check_text, jsonl_rows, read_utf8
from vlp.errors import ConfigError, DataError
from vlp.tokenizers import Tokenizer

TEXT_KEYS = ("texts", "text", "caption")  # JSONL fields tried in order when no key is given
_TEXT_STREAM = 0x7E47  # mixed into the seed, so the text order differs from the image order


class TextCorpus:
    """The non-empty documents of a file, in file order: ``len(corpus)`` documents,
    ``corpus.documents[i]`` the segments of one (a tuple of texts), ``iter(corpus)`` every text.
    A ``.jsonl`` file reads field ``key`` of each row (default: "texts" (a list of segments),
    else "text", else "caption")."""

    def __init__(self, path: str | os.PathLike[str], key: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such text corpus file")
        if self.path.suffix.lower() == ".jsonl":
            self.documents = _jsonl_documents(self.path, key)
        else:  # one text per line; ``key`` names the JSONL field and is unused here
            lines = read_utf8(self.path).splitlines()
            self.documents = [(line.strip(),) for line in lines if line.strip()]
        if not self.documents:
            raise DataError(f"{self.path}: the text corpus has no non-empty texts")

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[str]:
        return (text for document in self.documents for text in document)

    def __repr__(self) -> str:
        return f"TextCorpus({str(self.path)!r}, {len(self)} texts)"


def _jsonl_documents(path: Path, key: str | None) -> list[tuple[str, ...]]:
    documents = []
    keys = (key,) if key is not None else TEXT_KEYS
    for where, row in jsonl_rows(path):
        found = next((k for k in keys if k in row), None)
        if found is None:
            raise DataError(f"{where}: no text field {list(keys)} in a corpus row; got "
                            f"{sorted(row)}")
        value = row[found]
        segments = value if isinstance(value, list) else [value]
        if not segments or not all(isinstance(text, str) for text in segments):
            raise DataError(f"{where}: {found!r} is not a string or a non-empty list of "
                            "strings")
        for text in segments:
            check_text(text, f"{where}: {found!r}")
        document = tuple(text.strip() for text in segments if text.strip())
        if document:
            documents.append(document)
    return documents


class TextBatches:
    """Endless batches ``(rows, L)`` of tokenised texts for one rank (bos + tokens + eos, padded
    to the longest row), shuffled per epoch."""

    def __init__(self, corpus: TextCorpus, tokenizer: Tokenizer, rows: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if rows < 1:
            raise ConfigError(f"text batches need rows >= 1, got {rows}")
        if len(corpus) < rows * world_size:
            raise DataError(f"{corpus!r}: too few texts for one batch of {rows} per rank "
                            f"({world_size} rank(s))")
        self.corpus, self.tokenizer, self.rows = corpus, tokenizer, rows
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_per_epoch = len(corpus) // world_size // rows
        self.epoch = self.batches_done = 0
        self._order: Tensor | None = None

    def next(self) -> Tensor:
        if self.batches_done >= self.batches_per_epoch:
            self.epoch, self.batches_done, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = rank_indices(len(self.corpus), epoch=self.epoch,
                                       seed=derive_seed(self.seed, _TEXT_STREAM), shuffle=True,
                                       rank=self.rank, world_size=self.world_size,
                                       drop_last=True)
        start = self.batches_done * self.rows
        documents = [self.corpus.documents[i]
                     for i in self._order[start:start + self.rows].tolist()]
        self.batches_done += 1
        return trim_padding(self.tokenizer.pack(documents), self.tokenizer.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "rows": self.rows,
                "texts": len(self.corpus), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position (same corpus size, rows and seed)."""
        expected = {"rows": self.rows, "texts": len(self.corpus), "seed": self.seed}
        differ = {key: (state.get(key), value) for key, value in expected.items()
                  if state.get(key) != value}
        if differ:
            detail = ", ".join(f"{key}: saved {old}, now {new}"
                               for key, (old, new) in differ.items())
            raise DataError(f"cannot resume the text stream exactly: {detail}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._order = None
