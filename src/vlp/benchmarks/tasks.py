"""One benchmark task on one dataset: read the released files (`vlp.benchmarks.classes`,
`captions`, `questions`), run vlp's evaluation (`vlp.eval`) and return one flat result with
the protocol it followed; captioning and VQA also give the rows of the official evaluation
server's result file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vlp.benchmarks import captions, classes, probe, questions
from vlp.benchmarks.captions import CAPTION_FORMATS, Captions, read_captions
from vlp.benchmarks.classes import CLASSIFICATION_FORMATS, read_classification
from vlp.benchmarks.questions import QA_FORMATS, read_questions
from vlp.cliargs import fast_decode_option, option
from vlp.data.images import group_images
from vlp.errors import ConfigError, DataError
from vlp.eval.captioning import (
    BACKENDS,
    caption_metrics,
    generate_captions,
    pycocoevalcap_available,
)
from vlp.eval.embed import embed_images
from vlp.eval.rerank import itm_rerank_eval
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.vqa import VQA_MODES, accuracy_summary, answer_questions
from vlp.eval.zeroshot import default_templates, zeroshot_eval

TASK_FORMATS = {
    "zeroshot": CLASSIFICATION_FORMATS,
    "linear-probe": CLASSIFICATION_FORMATS,
    "few-shot": CLASSIFICATION_FORMATS,
    "retrieval": CAPTION_FORMATS,
    "captioning": CAPTION_FORMATS,
    "vqa": QA_FORMATS,
}
FORMATS = tuple(dict.fromkeys(f for formats in TASK_FORMATS.values() for f in formats))
TEXT_TASKS = ("zeroshot", "retrieval", "captioning", "vqa")  # need the model's tokenizer


@dataclass
class BenchmarkTask:
    """One entry of a suite, and the flags of `vlp benchmark`."""

    task: str | None = option(None, "what to measure", choices=tuple(TASK_FORMATS),
                              section="benchmark")
    format: str | None = option(None, "the dataset's layout, as released", choices=FORMATS)
    root: str | None = option(None, "the dataset's directory (vlp's own csv/jsonl/coco/qa: "
                              "the file)", metavar="DIR")
    split: str | None = option(None, "split to score (default: test for CIFAR, Karpathy "
                               "and image folders, val for ImageNet, NoCaps, VQAv2, OK-VQA)")
    name: str | None = option(None, "name of the result (default: format-split-task)")
    templates: str | None = option(None, "zero-shot: prompt templates with '{}', one per line "
                                   "(default: the dataset's templates.txt, else generic ones)",
                                   metavar="FILE")
    batch_size: int = option(64, "images per batch")
    fast_decode: bool = fast_decode_option()
    itm_k: int | None = option(None, "retrieval: ITM re-rank each query's top K (BLIP, "
                               "BLIP-2); adds itm_i2t_r1, ...", metavar="K")
    num_beams: int = option(3, "captioning and VQA: beams (1: greedy)")
    max_new_tokens: int = option(20, "captioning: longest caption, in tokens")
    min_new_tokens: int = option(0, "captioning: shortest caption before eos may end it")
    prompt: str | None = option(None, "captioning: text every caption starts from")
    caption_backend: str = option("auto", "captioning metrics: pycocoevalcap (with Java), vlp "
                                  "(pure Python, no METEOR) or auto", choices=BACKENDS)
    vqa_mode: str = option("generate", "VQA: generate answers, or rank --vqa-candidates",
                           choices=VQA_MODES)
    vqa_candidates: str | None = option(None, "VQA rank mode: candidate answers, one per line",
                                        metavar="FILE")
    l2_grid: tuple[float, ...] = option(probe.L2_GRID, "linear probe: L2 strengths to choose "
                                        "from on the held-out part of the train split")
    holdout: float = option(probe.HOLDOUT, "linear probe: share of the train split held out")
    shots: tuple[int, ...] = option((1, 2, 4, 8, 16), "few-shot: images per class")
    seeds: int = option(5, "few-shot: draws per k")
    fewshot_l2: float = option(probe.FEW_SHOT_L2, "few-shot: L2 strength of the classifier")
    num_workers: int = 0

    def check(self, where: str = "vlp benchmark") -> None:
        for field in ("task", "format", "root"):
            if not getattr(self, field):
                raise ConfigError(f"{where}: {field!r} is required")
        if self.task not in TASK_FORMATS:
            raise ConfigError(f"{where}: task {self.task!r}; expected one of "
                              f"{list(TASK_FORMATS)}")
        if self.format not in TASK_FORMATS[self.task]:
            raise ConfigError(f"{where}: format {self.format!r} does not serve task "
                              f"{self.task!r}; expected one of {list(TASK_FORMATS[self.task])}")

    def label(self, split: str) -> str:
        return self.name or f"{self.format}-{split}-{self.task}"


class Outcome(NamedTuple):
    result: dict[str, Any]
    server: tuple[str, list[dict[str, Any]]] | None  # ("captions" | "vqa", result file rows)


def _lines(path: str | None, what: str) -> list[str] | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: {what} file not found")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if not lines:
        raise DataError(f"{path}: no {what} (one per line)")
    return lines


def _split(spec: BenchmarkTask) -> str:
    defaults = {**classes.DEFAULT_SPLIT, **captions.DEFAULT_SPLIT, **questions.DEFAULT_SPLIT}
    return spec.split or defaults.get(spec.format) or Path(spec.root).stem  # own files: name


def result_name(spec: BenchmarkTask) -> str:
    """The name of ``spec``'s result (its ``name``, else format-split-task)."""
    return spec.label(_split(spec))


def run_task(model: nn.Module, tokenizer: Any, spec: BenchmarkTask, *, model_name: str,
             progress: bool = True) -> Outcome:
    """The result of ``spec`` for ``model``: ``model``, ``task``, ``dataset``, ``split``,
    ``num_items``, ``protocol`` (what the numbers depend on) and the task's metrics."""
    spec.check()
    if tokenizer is None and spec.task in TEXT_TASKS:
        raise ConfigError(f"{model_name}: has no tokenizer; task {spec.task!r} needs one")
    split = _split(spec)
    common = {"batch_size": spec.batch_size, "num_workers": spec.num_workers,
              "progress": progress, "fast_decode": spec.fast_decode}
    runner = {"zeroshot": _zeroshot, "linear-probe": _probe, "few-shot": _probe,
              "retrieval": _retrieval, "captioning": _captioning, "vqa": _vqa}[spec.task]
    metrics, protocol, num_items, server = runner(model, tokenizer, spec, split, common)
    metrics = {k: v for k, v in metrics.items() if k != "skipped"}
    if spec.fast_decode:  # the numbers depend on it: pixels differ from the exact decoding's
        protocol = {**protocol, "fast_decode": True}
    result = {"model": model_name, "task": spec.task, "dataset": spec.format, "split": split,
              "name": spec.label(split), "num_items": num_items, "protocol": protocol,
              **metrics}
    return Outcome(result, server)


def _zeroshot(model, tokenizer, spec, split, common):
    data = read_classification(spec.format, spec.root, split)
    templates = _lines(spec.templates, "templates") or data.templates
    metrics = zeroshot_eval(model, tokenizer, data.source, classnames=data.classnames,
                            templates=templates, **common)
    protocol = {"templates": templates or default_templates(), "classes": len(data.classnames)}
    return metrics, protocol, metrics["num_images"], None


def _features(model, data, common) -> tuple[torch.Tensor, torch.Tensor, int]:
    embedded = embed_images(model, [r.image for r in data.source], **common)
    labels = torch.tensor([data.source[i].label for i in embedded.indices.tolist()])
    return embedded.embeddings, labels, len(embedded.skipped)


def _probe(model, tokenizer, spec, split, common):
    train = read_classification(spec.format, spec.root, "train")
    test = read_classification(spec.format, spec.root, split)
    if len(train.classnames) != len(test.classnames):
        raise DataError(f"{spec.root}: the train split names {len(train.classnames)} classes, "
                        f"{split} {len(test.classnames)}; expected one label space")
    train_x, train_y, train_skipped = _features(model, train, common)
    test_x, test_y, test_skipped = _features(model, test, common)
    classes = len(test.classnames)
    if spec.task == "linear-probe":
        metrics = probe.linear_probe(train_x, train_y, test_x, test_y, classes,
                                     grid=spec.l2_grid, holdout=spec.holdout)
        protocol = {"features": "frozen, L2-normalised image embeddings",
                    "classifier": "multinomial logistic regression, L-BFGS",
                    "l2_grid": list(spec.l2_grid), "holdout": spec.holdout,
                    "train_split": "train"}
    else:
        metrics = probe.few_shot(train_x, train_y, test_x, test_y, classes, shots=spec.shots,
                                 seeds=spec.seeds, l2=spec.fewshot_l2)
        protocol = {"shots": list(spec.shots), "seeds": spec.seeds, "l2": spec.fewshot_l2,
                    "classifier": "multinomial logistic regression, L-BFGS",
                    "train_split": "train"}
    metrics.update(num_images=len(test_y), num_skipped=train_skipped + test_skipped)
    return metrics, protocol, len(test_y), None


def _retrieval(model, tokenizer, spec, split, common):
    data = read_captions(spec.format, spec.root, split)
    if spec.itm_k:
        metrics = itm_rerank_eval(model, tokenizer, data.source, k_test=spec.itm_k, **common)
    else:
        metrics = retrieval_eval(model, tokenizer, data.source, **common)
    protocol = {"ks": [1, 5, 10], "itm_k": spec.itm_k, "recall": "fraction in [0, 1]"}
    return metrics, protocol, metrics["num_images"], None


def _backend(name: str) -> str:
    if name == "auto":
        return "pycocoevalcap" if pycocoevalcap_available() else "vlp"
    return name


def _captioning(model, tokenizer, spec, split, common):
    data: Captions = read_captions(spec.format, spec.root, split)
    groups = group_images(data.source).captioned()
    references = groups.references()
    decoding = {"num_beams": spec.num_beams, "max_new_tokens": spec.max_new_tokens,
                "min_new_tokens": spec.min_new_tokens, "prompt": spec.prompt}
    generated = generate_captions(model, tokenizer, groups.images, groups.ids,
                                  **decoding, **common)
    if not generated.pairs:
        raise DataError(f"captioning: none of the {len(groups.images)} images of {data.where} "
                        f"could be read (first: {generated.skipped[0]})")
    candidates = {i: text for i, (_, text) in zip(generated.indices, generated.pairs)}
    backend = _backend(spec.caption_backend)
    metrics: dict[str, Any] = caption_metrics({i: references[i] for i in candidates},
                                              candidates, backend=backend)
    if data.domains:  # NoCaps: each domain scored on its own, as its evaluation does
        for domain in sorted(set(data.domains.values())):
            subset = {i: c for i, c in candidates.items()
                      if data.domains[str(groups.images[i])] == domain}
            if subset:
                scores = caption_metrics({i: references[i] for i in subset}, subset,
                                         backend=backend)
                metrics.update({f"{domain}_{k}": v for k, v in scores.items()})
    metrics.update(num_images=len(candidates), num_skipped=len(generated.skipped))
    rows = [{"image_id": data.image_ids.get(str(groups.images[i]), groups.ids[i]),
             "caption": text} for i, text in candidates.items()]
    protocol = {**decoding, "caption_backend": backend, "references_per_image":
                round(len(groups.texts) / max(1, len(groups.images)), 2)}
    return metrics, protocol, len(candidates), ("captions", rows)


def _vqa(model, tokenizer, spec, split, common):
    data = read_questions(spec.format, spec.root, split)
    candidates = _lines(spec.vqa_candidates, "candidate answers")
    if spec.vqa_mode == "rank" and not candidates:
        raise ConfigError("vqa: mode 'rank' needs vqa_candidates (a file, one answer a line)")
    answers = answer_questions(model, tokenizer, data.records, mode=spec.vqa_mode,
                               candidates=candidates, num_beams=spec.num_beams, **common)
    answered = [(a, r) for a, r in zip(answers, data.records) if a is not None]
    if not answered:
        raise DataError(f"vqa: none of the {len(data)} questions' images could be read "
                        f"(first: {data.records[0].image})")
    metrics: dict[str, Any] = accuracy_summary([a for a, _ in answered],
                                               [r for _, r in answered])
    metrics["num_skipped"] = len(data) - len(answered)
    rows = [{"question_id": qid, "answer": answer or ""}
            for qid, answer in zip(data.question_ids, answers)]
    protocol = {"mode": spec.vqa_mode, "num_beams": spec.num_beams,
                "candidates": len(candidates) if candidates else None,
                "accuracy": "official: min(#humans/3, 1) over the 10-choose-9 subsets"}
    return metrics, protocol, len(answered), ("vqa", rows)


def check_files(spec: BenchmarkTask, where: str = "vlp benchmark") -> None:
    """Read every file ``spec`` names (the dataset's split, the train split a probe fits on,
    templates, candidate answers) as running it will, so a wrong path is found before a
    training run's first step rather than at its first evaluation."""
    spec.check(where)
    split = _split(spec)
    if spec.task in ("zeroshot", "linear-probe", "few-shot"):
        read_classification(spec.format, spec.root, split)
        if spec.task != "zeroshot":
            read_classification(spec.format, spec.root, "train")
    elif spec.task in ("retrieval", "captioning"):
        read_captions(spec.format, spec.root, split)
    else:
        read_questions(spec.format, spec.root, split)
        if spec.vqa_mode == "rank" and not spec.vqa_candidates:
            raise ConfigError(f"{where}: vqa_mode 'rank' needs vqa_candidates (a file, one "
                              f"answer a line)")
    _lines(spec.templates, "templates")
    _lines(spec.vqa_candidates, "candidate answers")


def task_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(BenchmarkTask)}


def settings_given(args: Any) -> dict[str, Any]:
    """The task settings set on the command line (not the dataset ones: task, format, root,
    split, name), which a suite's entries take unless they set their own."""
    given = {}
    for field in dataclasses.fields(BenchmarkTask):
        if field.name in ("task", "format", "root", "split", "name", "num_workers"):
            continue
        value = getattr(args, field.name, field.default)
        value = tuple(value) if isinstance(value, list) else value
        if value != field.default:
            given[field.name] = value
    return given
