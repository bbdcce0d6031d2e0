"""Visual question answering data: JSONL rows ``{"image", "question", "answer" | "answers",
"type"?}`` (the synthetic world's ``*_qa.jsonl``), and batches for BLIP's VQA path.

A batch is ``{"pixels", "question_ids", "question_mask", "answer_ids", "answer_mask"}``:
question and answer are each bos + tokens + eos, right-padded (BLIP puts [ENC] / [DEC] in
the bos slot); the answer is `target_answer` of the reference answers, tokenised by
`AnswerTokenizer` as the model reads answers. `vlp train --train-kind qa` (`QASource`) batches
every distinct answer instead (`answer_weights`, as BLIP fine-tunes VQA): ``answer_ids`` has
one row per distinct answer, question by question, ``answer_count`` (B,) how many rows each
question has and ``answer_weight`` each row's share of its question's answers. `qa_loader`
reads images through `vlp.data.images` (the inference input path):
its batches also name the rows they hold (``index``) and the questions whose image could not be
read (``unreadable``, ``reasons``), which are skipped, never raised.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vlp.data.images import ImageItem, collate_images, image_batches
from vlp.data.records import check_text, jsonl_rows, resolve_image_path
from vlp.data.transforms import image_transform
from vlp.errors import DataError


@dataclass(frozen=True, slots=True)
class QARecord:
    image: str  # resolved path
    question: str
    answers: tuple[str, ...]  # every annotator's answer (one for the synthetic world)
    type: str | None = None  # question type, for per-type accuracy


def read_qa_jsonl(path: str | os.PathLike[str],
                  image_root: str | os.PathLike[str] | None = None) -> list[QARecord]:
    """Every QA row of a JSONL file; image paths are relative to the file's directory (or
    ``image_root``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such QA file")
    root = str(image_root) if image_root is not None else str(path.parent)
    records = []
    for where, row in jsonl_rows(path):
        answers = row.get("answers", [row["answer"]] if "answer" in row else [])
        if isinstance(answers, str):
            answers = [answers]
        if not row.get("image") or not row.get("question") or not answers:
            raise DataError(f"{where}: a QA row needs 'image', 'question' and 'answer' (a "
                            f"string) or 'answers' (a list); got keys {sorted(row)}")
        texts = [row["image"], row["question"], *answers] if isinstance(answers, list) else []
        if not texts or not all(isinstance(text, str) for text in texts):
            raise DataError(f"{where}: 'image', 'question' and every answer must be strings")
        for text in texts:
            check_text(text, where)
        records.append(QARecord(resolve_image_path(root, row["image"]), row["question"],
                                tuple(str(a) for a in answers), row.get("type")))
    if not records:
        raise DataError(f"{path}: has no QA rows")
    return records


def target_answer(answers: tuple[str, ...]) -> str:
    """The answer a model is trained to give: the most common reference answer, the first
    among equals."""
    return Counter(answers).most_common(1)[0][0]


def answer_weights(answers: tuple[str, ...] | list[str]) -> tuple[list[str], list[float]]:
    """The distinct answers of a question (first-seen order) and each one's share of the
    reference answers: BLIP's VQA targets, every annotator's answer weighted by how many
    gave it (weights sum to 1)."""
    counts = Counter(answers)
    return list(counts), [count / len(answers) for count in counts.values()]


def answer_texts(config: Any, answers: list[str]) -> list[str]:
    """``answers`` as the model's answer decoder reads them. A model whose config sets
    ``answer_continues_question`` (SimVLM: PrefixLM learns the answer as the rest of one text
    that the question starts) gets each answer after a space, as it follows the question's last
    word: a byte-level BPE without a prefix space spells "red" there as the token " red", and
    scoring or training on "red" would use a token the model never saw in that place. Other
    models read the answer as a text of its own (BLIP's answer decoder), so it stays as given;
    for tokenizers that drop leading spaces (WordPiece, CLIP's BPE) both spellings are equal."""
    if getattr(config, "answer_continues_question", False):
        return [" " + answer.lstrip() for answer in answers]
    return list(answers)


class AnswerTokenizer:
    """A tokenizer call over `answer_texts` for one model config (pickles into loader
    workers)."""

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer, self.config = tokenizer, config

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def __call__(self, answers: list[str], context_length: int | None = None) -> Tensor:
        return self.tokenizer(answer_texts(self.config, answers), context_length=context_length)


def left_padded_prompts(tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Generation prompts for a decoder-only LM: bos + each text's tokens (no eos), left-padded
    with the tokenizer's pad id, and their attention mask."""
    rows = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(texts)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = torch.tensor(row)
        mask[index, width - len(row):] = True
    return ids, mask


class QACollate:
    """Stack pixels; tokenise questions and answers (as `answer_texts` spells them for
    ``config``), padding trimmed to the longest row."""

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer, self.answers = tokenizer, AnswerTokenizer(tokenizer, config)
        self.config = config
        self.context_length, self.pad_id = config.text.context_length, config.text.pad_id

    def _tokens(self, tokenize: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = tokenize(texts, context_length=self.context_length)
        mask = ids != self.pad_id
        width = max(1, int(mask.sum(1).max()))
        return ids[:, :width], mask[:, :width]

    def texts(self, questions: list[str], answers: list[str]) -> dict[str, Tensor]:
        """``question_ids`` / ``question_mask`` / ``answer_ids`` / ``answer_mask``; questions as
        the model's ``answer`` reads them (``config.question_text``; left-padded generation
        prompts where ``config.left_padded_prompts()``)."""
        questions = [self.config.question_text(question) for question in questions]
        if self.config.left_padded_prompts():
            question_ids, question_mask = left_padded_prompts(self.tokenizer, questions)
        else:
            question_ids, question_mask = self._tokens(self.tokenizer, questions)
        answer_ids, answer_mask = self._tokens(self.answers, answers)
        return {"question_ids": question_ids, "question_mask": question_mask,
                "answer_ids": answer_ids, "answer_mask": answer_mask}

    def __call__(self, items: list[tuple[Tensor, str, str]]) -> dict[str, Tensor]:
        return {"pixels": torch.stack([pixels for pixels, _, _ in items]),
                **self.texts([question for _, question, _ in items],
                             [answer for _, _, answer in items])}

    def image_items(self, items: list[ImageItem]) -> dict[str, Any]:
        """`vlp.data.images.collate_images` over items whose extra is (question, answer),
        the readable ones tokenised as `__call__` does; ``index`` holds the positions of the
        batch's rows, ``unreadable`` / ``reasons`` the questions whose image could not be
        read (with no readable row, ``pixels`` is None and there are no token keys)."""
        images = collate_images(items)
        batch: dict[str, Any] = {"pixels": images.pixels, "index": images.indices,
                                 "unreadable": images.unreadable, "reasons": images.reasons}
        if images.pixels is not None:
            batch.update(self.texts([question for question, _ in images.extras],
                                    [answer for _, answer in images.extras]))
        return batch


def qa_loader(records: list[QARecord], config: Any, tokenizer: Any, *, batch_size: int,
              train: bool, num_workers: int = 0, seed: int = 0,
              fast_decode: bool = False) -> DataLoader:
    """Batches of QA pairs for a model ``config`` (shuffled, seeded, full batches if train),
    read through `vlp.data.images.image_batches`: a question whose image cannot be read is
    left out of its batch and listed in ``unreadable`` (see `QACollate.image_items`).
    ``fast_decode`` (evaluation only: ignored with ``train``): large JPEGs decode at a
    reduced scale (`vlp.data.transforms.ImageTransform.draft_size`)."""
    records = list(records)
    transform = image_transform(config, train, fast_decode=fast_decode and not train)
    return image_batches([record.image for record in records], transform,
                         extras=[(record.question, target_answer(record.answers))
                                 for record in records],
                         batch_size=batch_size, shuffle=train, drop_last=train, seed=seed,
                         num_workers=num_workers,
                         collate=QACollate(tokenizer, config).image_items)
