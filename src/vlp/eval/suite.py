"""One evaluation entry point over the benchmarks a run asks for, shared by the CLI and the
trainer's periodic evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlp.data import build_source
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.zeroshot import zeroshot_eval


@dataclass
class EvalSpec:
    """Which held-out data to score; every field may be left empty."""

    zeroshot_data: str | None = None  # image-folder root
    classnames: list[str] | None = None  # label space; default: the folder's class names
    templates: list[str] | None = None  # prompt templates with one "{}"
    retrieval_data: str | None = None  # captions source (csv, tsv, jsonl, coco, wds)
    retrieval_kind: str = "auto"
    retrieval_options: dict[str, Any] = field(default_factory=dict)  # image_key, caption_key, ...
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = True

    def is_empty(self) -> bool:
        return not (self.zeroshot_data or self.retrieval_data)


def evaluate(model: nn.Module, tokenizer: Any, spec: EvalSpec) -> dict[str, float]:
    """Zero-shot classification and/or retrieval metrics, merged into one flat dict."""
    metrics: dict[str, float] = {}
    if spec.zeroshot_data:
        metrics.update(zeroshot_eval(model, tokenizer, spec.zeroshot_data,
                                     classnames=spec.classnames, templates=spec.templates,
                                     batch_size=spec.batch_size, num_workers=spec.num_workers,
                                     progress=spec.progress))
    if spec.retrieval_data:
        options = {k: v for k, v in spec.retrieval_options.items() if v is not None}
        source = build_source(spec.retrieval_kind, spec.retrieval_data, **options)
        metrics.update(retrieval_eval(model, tokenizer, source, batch_size=spec.batch_size,
                                      num_workers=spec.num_workers, progress=spec.progress))
    return metrics
