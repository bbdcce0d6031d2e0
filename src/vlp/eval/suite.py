"""One evaluation entry point over the benchmarks a run asks for, shared by the CLI and the
trainer's periodic evaluation: zero-shot classification, retrieval (with ITM re-ranking for
models that have an ITM head), captioning and VQA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlp.cliargs import check_ranges, fast_decode_option, option
from vlp.data import build_source
from vlp.data.qa import read_qa_jsonl
from vlp.errors import ConfigError
from vlp.eval.captioning import caption_eval
from vlp.eval.rerank import itm_rerank_eval
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.vqa import VQA_MODES, vqa_eval
from vlp.eval.zeroshot import zeroshot_eval

CAPTION_KINDS = ("auto", "csv", "tsv", "jsonl", "coco", "wds")  # sources with captions
VQA_PREFIXED = ("num_skipped", "skipped")  # vqa_eval keys merged as vqa_num_skipped, ...


@dataclass
class EvalSpec:
    """Which held-out data to score and how; every field may be left empty. The fields with
    help text are `vlp eval`'s (and `vlp train`'s) flags, derived by `vlp.cliargs`."""

    zeroshot_data: str | None = option(None, "image folder (class_name/*.jpg) for zero-shot "
                                       "classification", metavar="DIR",
                                       section="evaluation data")
    classnames: list[str] | None = None  # label space; default: the folder's class names
    templates: list[str] | None = None  # prompt templates with one "{}"
    retrieval_data: str | None = option(None, "captions data for image<->text retrieval "
                                        "(CSV/TSV/JSONL/COCO/WDS)", metavar="PATH")
    retrieval_kind: str = option("auto", "format of --retrieval-data and --caption-data "
                                 "(default: from the path)", choices=CAPTION_KINDS)
    retrieval_options: dict[str, Any] = field(default_factory=dict)  # image_key, caption_key..
    itm_k: int | None = option(None, "retrieval: ITM re-rank each query's ITC top-K (models "
                               "with an ITM head; BLIP: 256 on COCO); adds itm_i2t_r1, ...",
                               metavar="K", section="matching, captioning and VQA",
                               valid="positive_count")
    caption_data: str | None = option(None, "captions data (CSV/TSV/JSONL/COCO/WDS): caption "
                                      "every image, score BLEU/METEOR/ROUGE-L/CIDEr against "
                                      "its captions", metavar="PATH")
    caption_prompt: str | None = option(None, "text every generated caption starts from "
                                        "(BLIP: 'a picture of ')")
    num_beams: int = option(3, "beams for captioning and open-ended VQA (1: greedy)",
                            valid="positive_count")
    max_new_tokens: int = option(20, "longest generated caption, in tokens",
                                 valid="positive_count")
    min_new_tokens: int = option(0, "shortest generated caption before eos may end it (BLIP "
                                 "and LAVIS evaluate with a minimum length of 5)",
                                 valid="count")
    repetition_penalty: float = option(1.0, "captioning: the scores of tokens already in the "
                                       "caption are divided by this (1: off)",
                                       valid="positive")
    early_stopping: bool = option(False, "beam search: end a caption as soon as num_beams "
                                  "hypotheses are finished, rather than when none can "
                                  "improve (transformers' default)")
    vqa_data: str | None = option(None, 'QA JSONL rows {"image", "question", "answer" | '
                                  '"answers"}: VQA accuracy', metavar="FILE")
    vqa_mode: str = option("generate", "generate: open-ended answers; rank: the likeliest of "
                           "--vqa-candidates", choices=VQA_MODES)
    vqa_candidates: list[str] | None = None
    batch_size: int = option(256, "batch size for encoding", valid="positive_count")
    fast_decode: bool = fast_decode_option()
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, "evaluation")

    def is_empty(self) -> bool:
        return not (self.zeroshot_data or self.retrieval_data or self.caption_data
                    or self.vqa_data)

    def check(self) -> None:
        """Read every file this spec names and check its options, as the evaluation will: a
        training run calls it before its first step, so a wrong path never costs the run."""
        check_ranges(self, "evaluation")
        if self.vqa_mode == "rank" and self.vqa_data and not self.vqa_candidates:
            raise ConfigError("VQA mode 'rank' needs candidate answers (vqa_candidates)")
        if self.zeroshot_data:
            build_source("imagefolder", self.zeroshot_data)
        options = {k: v for k, v in self.retrieval_options.items() if v is not None}
        for data in (self.retrieval_data, self.caption_data):
            if data:
                build_source(self.retrieval_kind, data, **options)
        if self.vqa_data:
            read_qa_jsonl(self.vqa_data, self.retrieval_options.get("image_root"))


def evaluate(model: nn.Module, tokenizer: Any, spec: EvalSpec) -> dict[str, Any]:
    """The metrics of every benchmark ``spec`` names, merged into one flat dict (captioning
    keys prefixed ``caption_``, VQA keys start with ``vqa_``, but for ``num_questions``).
    Unreadable images are skipped by each benchmark and named: ``skipped`` (retrieval),
    ``caption_skipped``, ``vqa_skipped``, with their counts ``num_skipped``, ...)."""
    check_ranges(spec, "evaluation")
    if spec.vqa_mode == "rank" and spec.vqa_data and not spec.vqa_candidates:
        raise ConfigError("VQA mode 'rank' needs candidate answers (vqa_candidates)")
    metrics: dict[str, float] = {}
    if spec.zeroshot_data:
        metrics.update(zeroshot_eval(model, tokenizer, spec.zeroshot_data,
                                     classnames=spec.classnames, templates=spec.templates,
                                     batch_size=spec.batch_size, num_workers=spec.num_workers,
                                     progress=spec.progress, fast_decode=spec.fast_decode))
    if spec.retrieval_data:
        options = {k: v for k, v in spec.retrieval_options.items() if v is not None}
        source = build_source(spec.retrieval_kind, spec.retrieval_data, **options)
        if spec.itm_k:
            metrics.update(itm_rerank_eval(model, tokenizer, source, k_test=spec.itm_k,
                                           batch_size=min(spec.batch_size, 128),
                                           num_workers=spec.num_workers,
                                           progress=spec.progress,
                                           fast_decode=spec.fast_decode))
        else:
            metrics.update(retrieval_eval(model, tokenizer, source, batch_size=spec.batch_size,
                                          num_workers=spec.num_workers, progress=spec.progress,
                                          fast_decode=spec.fast_decode))
    if spec.caption_data:

        options = {k: v for k, v in spec.retrieval_options.items() if v is not None}
        source = build_source(spec.retrieval_kind, spec.caption_data, **options)
        scores = caption_eval(model, tokenizer, source, batch_size=min(spec.batch_size, 64),
                              max_new_tokens=spec.max_new_tokens, num_beams=spec.num_beams,
                              prompt=spec.caption_prompt, num_workers=spec.num_workers,
                              progress=spec.progress, min_new_tokens=spec.min_new_tokens,
                              repetition_penalty=spec.repetition_penalty,
                              early_stopping=spec.early_stopping,
                              fast_decode=spec.fast_decode)
        metrics.update({f"caption_{k}": v for k, v in scores.items()})
    if spec.vqa_data:

        image_root = spec.retrieval_options.get("image_root")
        scores = vqa_eval(model, tokenizer, read_qa_jsonl(spec.vqa_data, image_root),
                          mode=spec.vqa_mode, candidates=spec.vqa_candidates,
                          batch_size=min(spec.batch_size, 64), num_beams=spec.num_beams,
                          num_workers=spec.num_workers, progress=spec.progress,
                          fast_decode=spec.fast_decode)
        # its skip count would overwrite retrieval's under the same name
        metrics.update({f"vqa_{k}" if k in VQA_PREFIXED else k: v for k, v in scores.items()})
    return metrics
