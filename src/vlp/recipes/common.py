"""What the demo recipes share: their configuration (`DemoConfig`) and the settings a recipe
reads from it, the synthetic dataset they write, the held-out evaluation of a model that embeds
images and texts (`evaluate_demo_model`), and the clearing of an earlier run.

Each family's module imports this one and no other recipe module; the registry in
`vlp.recipes` imports the family modules."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlp.data import build_source
from vlp.data.synthetic import write_dataset
from vlp.data.synthetic_world import CLASS_NAMES
from vlp.eval.captioning import caption_eval
from vlp.eval.suite import EvalSpec, evaluate
from vlp.report import write_report


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    n_train: int | None = None  # training images (5 captions each)
    n_test: int | None = None  # held-out images, one caption each: the retrieval split
    steps: int | None = None  # optimizer steps
    batch_size: int | None = None
    lr: float | None = None  # None: the family's (`DEFAULT_LR` unless its recipe says)
    seed: int = 0
    num_workers: int = 2
    progress: bool = True
    family: str = "clip"  # "clip": clip-tiny; "coca": coca-tiny, also scored on captioning;
    # "blip": blip-tiny, scored on ITM re-ranked retrieval, captioning and VQA; "simvlm":
    # simvlm-tiny pretrained with a text-only corpus, zero-shot captioning and VQA, ablation;
    # "blip2": the two-stage recipe on a frozen ViT and a frozen small LM, zero-shot VQA and
    # captions (`steps` sets stage 2's; the other stages keep `BLIP2_DEFAULTS`); "capfilt":
    # BLIP's CapFilt on noisy web data, then clip-tiny pretrained on noisy / bootstrapped /
    # clean data (`n_train` web images, `steps` and `batch_size` of those three runs)
    vqa_steps: int | None = None  # blip: VQA fine-tuning steps after pretraining


DEFAULT_LR = 1e-3  # peak learning rate of a recipe that names none
N_VAL = 200  # images of the val split (5 captions each): the captioning references
CAPTIONS_PER_IMAGE = 5  # the synthetic world's training captions per image
CAPTION_MAX_NEW_TOKENS = 24
CAPTION_NUM_BEAMS = 1  # greedy


def learning_rate(cfg: DemoConfig, default: float = DEFAULT_LR) -> float:
    """``cfg.lr`` when given, else the recipe's ``default``."""
    return cfg.lr if cfg.lr is not None else default


def resolve_settings(cfg: DemoConfig, defaults: Mapping[str, int],
                     fields: Mapping[str, str] | None = None) -> dict[str, int]:
    """``defaults`` with each key replaced by ``cfg``'s field of that name (or of the name
    ``fields`` maps the key to) where that field is set; a key no `DemoConfig` field names
    keeps its default."""
    fields = fields or {}
    settings = {}
    for key, default in defaults.items():
        value = getattr(cfg, fields.get(key, key), None)
        settings[key] = default if value is None else value
    return settings


def r4(value: Any) -> float:
    """A reported metric: a float rounded to 4 places."""
    return round(float(value), 4)


def write_demo_data(data_dir: Path, settings: Mapping[str, int], *, seed: int, progress: bool,
                    formats: tuple[str, ...] = ("csv",)) -> dict[str, Any]:
    """The synthetic world under ``data_dir``: ``settings["n_train"]`` training images,
    `N_VAL` val images (the captioning references) and ``settings["n_test"]`` held-out
    images, with their question/answer files; returns the dataset's metadata."""
    return write_dataset(data_dir, formats=formats, n_train=settings["n_train"], n_val=N_VAL,
                         n_test=settings["n_test"], seed=seed, progress=progress)


def evaluate_demo_model(model: nn.Module, tokenizer: Any, data_dir: str | Path, *,
                        captioning: bool = False, num_workers: int = 0,
                        progress: bool = True) -> dict[str, float]:
    """The demo's held-out metrics of ``model`` on the dataset under ``data_dir``: zero-shot
    on the test split's image folder and retrieval on test.csv; with ``captioning``, also
    greedy captions of the val split's images scored against their 5 references each (its
    keys ``cider``, ``bleu_4``, ``rouge_l``, ... and ``num_images``)."""
    data_dir = Path(data_dir)
    spec = EvalSpec(zeroshot_data=str(data_dir / "imagefolder" / "test"),
                    classnames=list(CLASS_NAMES),
                    retrieval_data=str(data_dir / "test.csv"), num_workers=num_workers,
                    progress=progress)
    metrics = evaluate(model, tokenizer, spec)
    if captioning:
        source = build_source("csv", str(data_dir / "val.csv"))
        captions = caption_eval(model, tokenizer, source, batch_size=64,
                                max_new_tokens=CAPTION_MAX_NEW_TOKENS,
                                num_beams=CAPTION_NUM_BEAMS, num_workers=num_workers,
                                progress=progress, backend="vlp")
        metrics.update({k: v for k, v in captions.items() if k not in metrics})
        metrics["num_caption_images"] = captions["num_images"]  # zero-shot has its own count
    return metrics


def write_run_reports(out: Path) -> list[str]:
    """`vlp report`'s page of every training run the demo left under ``out`` (``out`` itself
    and run directories below it, the data excepted), each as ``report.html`` in its run
    directory; prints and returns their paths."""
    runs = [out] if (out / "log.jsonl").is_file() else []
    runs += sorted(log.parent for log in out.glob("*/**/log.jsonl")
                   if "data" not in log.relative_to(out).parts[:1])
    paths = [str(write_report(run)) for run in runs]
    for path in paths:
        print(f"report: {path}", flush=True)
    return paths


def clear_previous_run(out: Path, *runs: str) -> None:
    """The demo owns its directory: a rerun starts training afresh in ``out`` and in each of
    its subdirectories ``runs`` (the data is rewritten by ``write_dataset``, which replaces
    only its own earlier output)."""
    for path in (out, *(out / run for run in runs)):
        _clear_run(path)


def _clear_run(out: Path) -> None:
    if not out.is_dir():
        return
    for path in out.glob("checkpoint-*"):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
    for name in ("log.jsonl", "train_config.json", "report.html", "results.json"):
        (out / name).unlink(missing_ok=True)
