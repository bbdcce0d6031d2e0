"""VQA accuracy as the official VQA evaluation computes it, and BLIP answering over QA pairs.

Accuracy of one predicted answer against the annotators' answers: for each annotator left out,
``min(1, #other annotators who gave the prediction / 3)``, averaged over the leave-one-out
subsets (the 10-choose-9 subsets of VQAv2's ten answers). Answers are normalised first as the
official script does: whitespace, punctuation, periods, number words -> digits, articles
dropped, apostrophe-less contractions restored. (The official script normalises only when the
annotators disagree; here every answer is normalised, which can only turn misses into hits
that differ by case or punctuation.) A question with a single reference answer scores exact
match after normalisation, as every annotator agreeing would.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vlp.contract import VQA
from vlp.data.qa import AnswerTokenizer, QARecord, qa_loader
from vlp.errors import ConfigError, DataError
from vlp.eval.embed import inference

VQA_MODES = ("generate", "rank")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_NT_STEMS = ("ain", "aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven",
             "isn", "mightn", "mustn", "needn", "shan", "shouldn", "wasn", "weren", "won",
             "wouldn")
_CONTRACTIONS = {
    **{f"{stem}t": f"{stem}'t" for stem in _NT_STEMS},
    **{f"{modal}ve": f"{modal}'ve" for modal in ("could", "should", "would", "might", "must")},
    "im": "i'm", "ive": "i've", "youre": "you're", "youve": "you've", "youll": "you'll",
    "youd": "you'd", "hes": "he's", "shes": "she's", "theyre": "they're", "theyve": "they've",
    "theyll": "they'll", "theyd": "they'd", "weve": "we've", "wed": "we'd", "itd": "it'd",
    "itll": "it'll", "thats": "that's", "theres": "there's", "whats": "what's",
    "wheres": "where's", "whos": "who's", "hows": "how's", "lets": "let's", "yall": "y'all",
    "oclock": "o'clock", "maam": "ma'am",
}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not starting a decimal ("2.5" keeps its point)


def normalize_answer(answer: str) -> str:
    """An answer in the official VQA evaluation's normal form ("Two dogs." -> "2 dogs")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for mark in _PUNCTUATION:
        # a mark beside a space, or any mark in text with a "1,000"-style number, is dropped;
        # otherwise it separates words ("red-blue" -> "red blue")
        touches_space = f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if touches_space or _DIGIT_COMMA_DIGIT.search(text)
                            else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the annotators' ``answers``."""
    if not answers:
        raise DataError("vqa_accuracy: a question needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    hits = sum(matches)
    # leaving out a matching annotator leaves hits - 1 matches among the others, else hits
    return sum(min(1.0, (hits - match) / 3) for match in matches) / len(matches)


TYPE_KEY = "vqa_acc_"  # accuracy_summary's per-type keys: vqa_acc_<type>


def accuracy_summary(predictions: Sequence[str], records: Sequence[QARecord]
                     ) -> dict[str, float]:
    """``vqa_accuracy`` (mean over questions), per question type ``vqa_acc_<type>``, count."""
    if len(predictions) != len(records):
        raise ConfigError(f"{len(predictions)} predictions for {len(records)} questions")
    if not records:
        raise DataError("VQA eval: no questions")
    scores = [vqa_accuracy(p, r.answers) for p, r in zip(predictions, records)]
    metrics = {"vqa_accuracy": sum(scores) / len(scores), "num_questions": len(scores)}
    by_type: dict[str, list[float]] = {}
    for score, record in zip(scores, records):
        if record.type:
            by_type.setdefault(record.type, []).append(score)
    metrics.update({f"{TYPE_KEY}{t}": sum(s) / len(s) for t, s in sorted(by_type.items())})
    return metrics


def accuracy_by_type(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{type: accuracy}`` (4 decimals) from `accuracy_summary`'s ``vqa_acc_<type>`` keys,
    read under ``prefix`` when they were stored as ``<prefix>vqa_acc_<type>``."""
    key = prefix + TYPE_KEY
    return {k.removeprefix(key): round(float(v), 4) for k, v in metrics.items()
            if k.startswith(key)}


def majority_baselines(train: Sequence[QARecord], test: Sequence[QARecord]
                       ) -> dict[str, float]:
    """Accuracy on ``test`` of always giving the most common training answer
    (``majority_accuracy``) and the most common answer of the question's type
    (``type_majority_accuracy``): what a model that ignores the image can reach."""
    if not train:
        raise DataError("majority baseline: no training questions")
    overall = Counter(normalize_answer(a) for r in train for a in r.answers).most_common(1)[0][0]
    per_type: dict[str | None, Counter] = {}
    for record in train:
        per_type.setdefault(record.type, Counter()).update(
            normalize_answer(a) for a in record.answers)
    typed = [per_type[r.type].most_common(1)[0][0] if r.type in per_type else overall
             for r in test]
    return {"majority_accuracy": accuracy_summary([overall] * len(test), test)["vqa_accuracy"],
            "majority_answer": overall,
            "type_majority_accuracy": accuracy_summary(typed, test)["vqa_accuracy"]}


@torch.no_grad()
def answer_questions(model: nn.Module, tokenizer: Any, records: Sequence[QARecord], *,
                     mode: str = "generate", candidates: Sequence[str] | None = None,
                     batch_size: int = 64, num_beams: int = 3, max_new_tokens: int = 10,
                     num_workers: int = 0, progress: bool = True, fast_decode: bool = False,
                     **generate_kwargs: Any) -> list[str | None]:
    """One answer per question, None where its image cannot be read (images come through
    `vlp.data.qa.qa_loader`, so an unreadable one is skipped, never raised): ``"generate"``
    decodes open-ended (BLIP: beam 3, max 10 tokens); ``"rank"`` returns the candidate whose
    full answer sequence is most likely under the answer decoder (BLIP's rank inference,
    scoring every candidate), each candidate tokenised as the model reads answers
    (`vlp.data.qa.AnswerTokenizer`). Questions reach ``answer`` as the model reads them
    (`vlp.data.qa.QACollate`: BLIP-2 gets its VQA prompt), with their mask;
    ``generate_kwargs`` (length_penalty, ...) go to it too. ``fast_decode``: large JPEGs
    decode at a reduced scale (`vlp.data.transforms.ImageTransform.draft_size`)."""
    if mode not in VQA_MODES:
        raise ConfigError(f"VQA mode {mode!r}; expected one of {list(VQA_MODES)}")
    model.require(VQA, "VQA")
    if mode == "rank" and not candidates:
        raise ConfigError("VQA mode 'rank' needs a list of candidate answers")
    context_length = model.config.text.context_length
    records = list(records)
    loader = qa_loader(records, model.config, tokenizer, batch_size=batch_size, train=False,
                       num_workers=num_workers, fast_decode=fast_decode)
    answers: list[str | None] = [None] * len(records)
    with inference(model) as device:
        if mode == "rank":
            candidate_ids = AnswerTokenizer(tokenizer, model.config)(
                list(candidates), context_length=context_length)
            candidate_mask = candidate_ids != model.config.text.pad_id
            width = int(candidate_mask.sum(1).max())  # drop all-padding columns
            candidate_ids = candidate_ids[:, :width].to(device)
            candidate_mask = candidate_mask[:, :width].to(device)
        for batch in tqdm(loader, desc="vqa", leave=False, disable=not progress):
            if batch["pixels"] is None:  # no image of the batch could be read
                continue
            pixels = batch["pixels"].to(device)
            question_ids = batch["question_ids"].to(device)
            question_mask = batch["question_mask"].to(device)
            if mode == "rank":
                scores = model.rank_answers(pixels, question_ids, candidate_ids,
                                            candidate_mask=candidate_mask)
                texts = [candidates[i] for i in scores.argmax(1).tolist()]
            else:
                tokens = model.answer(pixels, question_ids, question_mask,
                                      max_new_tokens=max_new_tokens, num_beams=num_beams,
                                      **generate_kwargs)
                texts = [text.strip() for text in tokenizer.batch_decode(tokens.cpu())]
            for index, text in zip(batch["index"].tolist(), texts, strict=True):
                answers[index] = text
    return answers


def vqa_eval(model: nn.Module, tokenizer: Any, records: Sequence[QARecord], *,
             mode: str = "generate", candidates: Sequence[str] | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """`accuracy_summary` of the model's answers to ``records`` (``kwargs``: see
    `answer_questions`), over the questions it answered: a question whose image cannot be read
    is skipped, counted in ``num_skipped`` and named in ``skipped`` (its image's path, once per
    skipped question)."""
    records = list(records)
    predictions = answer_questions(model, tokenizer, records, mode=mode, candidates=candidates,
                                   **kwargs)
    answered = [(p, r) for p, r in zip(predictions, records) if p is not None]
    skipped = [str(r.image) for p, r in zip(predictions, records) if p is None]
    if records and not answered:
        raise DataError(f"VQA eval: none of the {len(records)} questions' images could be "
                        f"read (first: {skipped[0]})")
    metrics: dict[str, Any] = accuracy_summary([p for p, _ in answered],
                                               [r for _, r in answered])
    metrics["num_skipped"] = len(skipped)
    metrics["skipped"] = skipped
    return metrics
