"""One evaluation entry point over the benchmarks a run asks for, shared by the CLI and the
trainer's periodic evaluation: zero-shot classification, retrieval (with ITM re-ranking for
models that have an ITM head), captioning and VQA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlp.data import build_source
from vlp.data.qa import read_qa_jsonl
from vlp.errors import ConfigError
from vlp.eval.captioning import caption_eval
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.vqa import vqa_eval
from vlp.eval.zeroshot import zeroshot_eval

VQA_PREFIXED = ("num_skipped", "skipped")  # vqa_eval keys merged as vqa_num_skipped, ...


@dataclass
class EvalSpec:
    """Which held-out data to score; every field may be left empty."""

    zeroshot_data: str | None = None  # image-folder root
    classnames: list[str] | None = None  # label space; default: the folder's class names
    templates: list[str] | None = None  # prompt templates with one "{}"
    retrieval_data: str | None = None  # captions source (csv, tsv, jsonl, coco, wds)
    retrieval_kind: str = "auto"
    retrieval_options: dict[str, Any] = field(default_factory=dict)  # image_key, caption_key, ...
    itm_k: int | None = None  # retrieval: also ITM re-rank each query's ITC top-k (BLIP)
    caption_data: str | None = None  # captions source: every image captioned, CIDEr & co.
    caption_prompt: str | None = None  # text each generated caption starts from
    num_beams: int = 3  # captioning and open-ended VQA
    max_new_tokens: int = 20  # captioning
    vqa_data: str | None = None  # QA JSONL: {"image", "question", "answer" | "answers"}
    vqa_mode: str = "generate"  # "generate" (open-ended) or "rank" (over vqa_candidates)
    vqa_candidates: list[str] | None = None
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = True

    def is_empty(self) -> bool:
        return not (self.zeroshot_data or self.retrieval_data or self.caption_data
                    or self.vqa_data)


def evaluate(model: nn.Module, tokenizer: Any, spec: EvalSpec) -> dict[str, Any]:
    """The metrics of every benchmark ``spec`` names, merged into one flat dict (captioning
    keys prefixed ``caption_``, VQA keys start with ``vqa_``, but for ``num_questions``).
    Unreadable images are skipped by each benchmark and named: ``skipped`` (retrieval),
    ``caption_skipped``, ``vqa_skipped``, with their counts ``num_skipped``, ...)."""
    if spec.vqa_mode == "rank" and spec.vqa_data and not spec.vqa_candidates:
        raise ConfigError("VQA mode 'rank' needs candidate answers (vqa_candidates)")
    metrics: dict[str, float] = {}
    if spec.zeroshot_data:
        metrics.update(zeroshot_eval(model, tokenizer, spec.zeroshot_data,
                                     classnames=spec.classnames, templates=spec.templates,
                                     batch_size=spec.batch_size, num_workers=spec.num_workers,
                                     progress=spec.progress))
    if spec.retrieval_data:
        options = {k: v for k, v in spec.retrieval_options.items() if v is not None}
        source = build_source(spec.retrieval_kind, spec.retrieval_data, **options)
        if spec.itm_k:
            from vlp.eval.rerank import itm_rerank_eval

            metrics.update(itm_rerank_eval(model, tokenizer, source, k_test=spec.itm_k,
                                           batch_size=min(spec.batch_size, 128),
                                           num_workers=spec.num_workers,
                                           progress=spec.progress))
        else:
            metrics.update(retrieval_eval(model, tokenizer, source, batch_size=spec.batch_size,
                                          num_workers=spec.num_workers, progress=spec.progress))
    if spec.caption_data:

        options = {k: v for k, v in spec.retrieval_options.items() if v is not None}
        source = build_source(spec.retrieval_kind, spec.caption_data, **options)
        scores = caption_eval(model, tokenizer, source, batch_size=min(spec.batch_size, 64),
                              max_new_tokens=spec.max_new_tokens, num_beams=spec.num_beams,
                              prompt=spec.caption_prompt, num_workers=spec.num_workers,
                              progress=spec.progress)
        metrics.update({f"caption_{k}": v for k, v in scores.items()})
    if spec.vqa_data:

        image_root = spec.retrieval_options.get("image_root")
        scores = vqa_eval(model, tokenizer, read_qa_jsonl(spec.vqa_data, image_root),
                          mode=spec.vqa_mode, candidates=spec.vqa_candidates,
                          batch_size=min(spec.batch_size, 64), num_beams=spec.num_beams,
                          num_workers=spec.num_workers, progress=spec.progress)
        # its skip count would overwrite retrieval's under the same name
        metrics.update({f"vqa_{k}" if k in VQA_PREFIXED else k: v for k, v in scores.items()})
    return metrics
