"""VQA benchmarks in their released layouts: VQAv2 and OK-VQA, each a questions JSON
(``{"questions": [{"image_id", "question", "question_id"}]}``) and an annotations JSON
(``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type", ...}]}``) over the
COCO 2014 images (``<split>2014/COCO_<split>2014_%012d.jpg``). The reader gives
`vlp.data.qa.QARecord`s, typed by ``answer_type`` (VQA's per-type accuracy), with their
``question_id``s for the evaluation server's result file; vlp's own QA JSONL reads as format
``qa``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlp.benchmarks.captions import read_json
from vlp.data.qa import QARecord, read_qa_jsonl
from vlp.errors import DataError

VQA_FILES = {  # format: (questions, annotations, where they come from)
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json",
              "v2_mscoco_{split}2014_annotations.json", "https://visualqa.org/download.html"),
    "okvqa": ("OpenEnded_mscoco_{split}2014_questions.json",
              "mscoco_{split}2014_annotations.json", "https://okvqa.allenai.org/download.html"),
}
COCO_IMAGE = "{split}2014/COCO_{split}2014_{image_id:012d}.jpg"
QA_FORMATS = (*VQA_FILES, "qa")
DEFAULT_SPLIT = {"vqav2": "val", "okvqa": "val"}


@dataclass
class Questions:
    records: list[QARecord]
    question_ids: list[int | str]
    where: str

    def __len__(self) -> int:
        return len(self.records)


def read_questions(fmt: str, root: str | os.PathLike[str], split: str | None = None
                   ) -> Questions:
    """The ``split`` (train or val) of a VQA benchmark; for format ``qa``, ``root`` is a
    JSONL file of vlp's QA rows and the question ids are the row numbers."""
    if fmt == "qa":
        records = read_qa_jsonl(root)
        return Questions(records, list(range(len(records))), str(root))
    split = split or DEFAULT_SPLIT[fmt]
    if split not in ("train", "val"):
        raise DataError(f"{fmt}: no split {split!r} with annotations; expected train or val")
    root = Path(root)
    questions_name, annotations_name, origin = VQA_FILES[fmt]
    questions_name, annotations_name = (questions_name.format(split=split),
                                        annotations_name.format(split=split))
    questions = read_json(root / questions_name, questions_name, origin)
    annotations = read_json(root / annotations_name, annotations_name, origin)
    by_id = {}
    where = root / annotations_name
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise DataError(f"{where}: expected an object with an 'annotations' list")
    for index, annotation in enumerate(annotations["annotations"]):
        answers = annotation.get("answers") if isinstance(annotation, dict) else None
        if "question_id" not in (annotation or {}) or not isinstance(answers, list) or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise DataError(f"{where}: annotations[{index}] needs 'question_id' and "
                            f"'answers': [{{'answer': str}}, ...]")
        by_id[annotation["question_id"]] = annotation
    where = root / questions_name
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise DataError(f"{where}: expected an object with a 'questions' list")
    records, ids = [], []
    for index, question in enumerate(questions["questions"]):
        if not isinstance(question, dict) or not all(
                k in question for k in ("image_id", "question", "question_id")):
            raise DataError(f"{where}: questions[{index}] needs 'image_id', 'question' and "
                            f"'question_id'")
        annotation = by_id.get(question["question_id"])
        if annotation is None:
            raise DataError(f"{root / annotations_name}: no annotation for question_id "
                            f"{question['question_id']!r} of {questions_name}")
        image = root / COCO_IMAGE.format(split=split, image_id=int(question["image_id"]))
        records.append(QARecord(str(image), question["question"],
                                tuple(a["answer"] for a in annotation["answers"]),
                                annotation.get("answer_type")))
        ids.append(question["question_id"])
    if not records:
        raise DataError(f"{where}: no questions")
    return Questions(records, ids, str(where))
