"""The end-to-end demo: synthetic data on disk -> clip-tiny (or coca-tiny) through the real
loaders and trainer -> held-out zero-shot classification and retrieval (and, for coca-tiny,
captioning), on CPU in minutes."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import vlp
from vlp.data import build_source
from vlp.data.synthetic import write_dataset
from vlp.data.synthetic_world import CLASS_NAMES
from vlp.errors import ConfigError
from vlp.eval.captioning import caption_eval
from vlp.eval.suite import EvalSpec, evaluate
from vlp.run import train
from vlp.train import TrainConfig


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    n_train: int | None = None  # training images (5 captions each)
    n_test: int | None = None  # held-out images, one caption each: the retrieval split
    steps: int | None = None  # optimizer steps
    batch_size: int | None = None
    lr: float | None = None  # None: the family's (`LR`)
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


FAMILIES = ("clip", "coca", "blip", "simvlm", "blip2", "capfilt")
MODELS = {"clip": "clip-tiny", "coca": "coca-tiny"}
LR = {"blip": 5e-4}  # peak learning rate per family; 1e-3 for the others
DEFAULTS = {"n_train": 5000, "n_test": 1000, "steps": 1800, "batch_size": 128}
COCA_DEFAULTS = {"n_train": 5000, "n_test": 1000, "steps": 800, "batch_size": 128}
N_VAL = 200  # images of the val split (5 captions each): the captioning references
CAPTION_MAX_NEW_TOKENS = 24
CAPTION_NUM_BEAMS = 1  # greedy


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo and return its metrics (fractions) and the checkpoint it wrote."""
    start = time.time()
    if cfg.family not in FAMILIES:
        raise ConfigError(f"family: unknown {cfg.family!r}; expected one of {FAMILIES}")
    lr = cfg.lr if cfg.lr is not None else LR.get(cfg.family, 1e-3)
    if cfg.family == "blip":
        from vlp.demo_blip import BLIP_DEFAULTS, blip_demo

        settings = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v
                    for k, v in BLIP_DEFAULTS.items()}
        _clear_previous_run(Path(cfg.out))
        return blip_demo(Path(cfg.out), settings, lr=lr, seed=cfg.seed,
                         num_workers=cfg.num_workers, progress=cfg.progress)
    if cfg.family == "blip2":
        from vlp.demo_blip2 import BLIP2_DEFAULTS, blip2_demo

        given = {"n_train": cfg.n_train, "n_test": cfg.n_test, "stage2_steps": cfg.steps,
                 "batch_size": cfg.batch_size}
        settings = {k: v if given.get(k) is None else given[k] for k, v in BLIP2_DEFAULTS.items()}
        _clear_previous_run(Path(cfg.out))
        for run in ("vit", "stage1", "stage2"):
            _clear_previous_run(Path(cfg.out) / run)
        return blip2_demo(Path(cfg.out), settings, lr=lr, seed=cfg.seed,
                          num_workers=cfg.num_workers, progress=cfg.progress)
    if cfg.family == "capfilt":
        from vlp.demo_capfilt import CAPFILT_DEFAULTS, capfilt_demo

        given = {"n_web": cfg.n_train, "n_test": cfg.n_test, "steps": cfg.steps,
                 "batch_size": cfg.batch_size}
        settings = {k: v if given.get(k) is None else given[k]
                    for k, v in CAPFILT_DEFAULTS.items()}
        _clear_capfilt_run(Path(cfg.out))
        return capfilt_demo(Path(cfg.out), settings, seed=cfg.seed,
                            num_workers=cfg.num_workers, progress=cfg.progress)
    if cfg.family == "simvlm":
        from vlp.demo_simvlm import SIMVLM_DEFAULTS, simvlm_demo

        settings = {k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else v
                    for k, v in SIMVLM_DEFAULTS.items()}
        _clear_previous_run(Path(cfg.out))
        for run in ("with_text", "without_text"):
            _clear_previous_run(Path(cfg.out) / run)
        return simvlm_demo(Path(cfg.out), settings, lr=lr, seed=cfg.seed,
                           num_workers=cfg.num_workers, progress=cfg.progress)
    defaults = COCA_DEFAULTS if cfg.family == "coca" else DEFAULTS
    settings = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v
                for k, v in defaults.items()}
    out = Path(cfg.out)
    data_dir = out / "data"
    _clear_previous_run(out)
    print(f"[1/3] writing the synthetic dataset to {data_dir}", flush=True)
    meta = write_dataset(data_dir, formats=("csv", "imagefolder"), n_train=settings["n_train"],
                         n_val=N_VAL, n_test=settings["n_test"], seed=cfg.seed,
                         progress=cfg.progress)

    model_name = MODELS[cfg.family]
    print(f"[2/3] training {model_name} for {settings['steps']} steps", flush=True)
    steps = settings["steps"]
    train_cfg = TrainConfig(
        model=model_name,
        train_data=str(data_dir / "train.csv"),
        output_dir=str(out),
        batch_size=settings["batch_size"],
        lr=lr,
        weight_decay=0.1,
        warmup_steps=max(1, steps // 10),
        max_steps=steps,
        checkpoint_every=max(1, steps // 3),
        keep_last=2,
        log_every=100,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
    )
    result = train(train_cfg)
    checkpoint = result["checkpoint"]

    print(f"[3/3] evaluating {checkpoint} on the held-out split", flush=True)
    model = vlp.load(checkpoint)
    tokenizer = vlp.load_tokenizer(checkpoint)
    metrics = evaluate_demo_model(model, tokenizer, data_dir, captioning=cfg.family == "coca",
                                  num_workers=cfg.num_workers, progress=cfg.progress)
    summary = {
        "zeroshot_top1": round(metrics["zeroshot_top1"], 4),
        "zeroshot_top5": round(metrics["zeroshot_top5"], 4),
        "i2t_r1": round(metrics["i2t_r1"], 4),
        "t2i_r1": round(metrics["t2i_r1"], 4),
        "i2t_r5": round(metrics["i2t_r5"], 4),
        "t2i_r5": round(metrics["t2i_r5"], 4),
        "num_classes": len(CLASS_NAMES),
        "num_test_pairs": int(metrics["num_texts"]),
        "test_duplicate_caption_share": meta["duplicate_caption_share"]["test"],
        "train_steps": result["step"],
        "final_loss": round(float(result["loss"]), 4),
        "wall_s": round(time.time() - start, 1),
        "checkpoint": str(checkpoint),
    }
    if cfg.family == "coca":
        summary = {"family": "coca", **summary}
        summary.update({
            "cider": round(metrics["cider"], 4),
            "bleu_4": round(metrics["bleu_4"], 4),
            "rouge_l": round(metrics["rouge_l"], 4),
            "caption_split": "val",
            "num_caption_images": int(metrics["num_caption_images"]),
        })
    print(f"zero-shot top-1 {summary['zeroshot_top1']:.1%} (chance {1 / len(CLASS_NAMES):.1%}), "
          f"image->text R@1 {summary['i2t_r1']:.1%}, text->image R@1 {summary['t2i_r1']:.1%} "
          f"(chance {1 / max(1, summary['num_test_pairs']):.1%})", flush=True)
    if cfg.family == "coca":
        print(f"captioning on the held-out val split ({summary['num_caption_images']} images, "
              f"5 references each): CIDEr {summary['cider']:.3f}, "
              f"BLEU-4 {summary['bleu_4']:.3f}", flush=True)
    return summary


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


def _clear_capfilt_run(out: Path) -> None:
    """The CapFilt demo's runs and stage outputs resume when present, so a rerun removes them."""
    for name in ("blip", "capfilt", "downstream"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _clear_previous_run(out: Path) -> None:
    """The demo owns its directory: a rerun starts training afresh (the data is rewritten by
    ``write_dataset``, which replaces only its own earlier output)."""
    if not out.is_dir():
        return
    for path in out.glob("checkpoint-*"):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
    for name in ("log.jsonl", "train_config.json"):
        (out / name).unlink(missing_ok=True)
