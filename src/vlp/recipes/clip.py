"""`vlp demo --family clip|coca`: synthetic data on disk -> clip-tiny (or coca-tiny) through the
real loaders and trainer -> held-out zero-shot classification and retrieval (and, for coca-tiny,
captioning), on CPU in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import vlp
from vlp.data.synthetic_world import CLASS_NAMES
from vlp.recipes.common import (
    DemoConfig,
    clear_previous_run,
    evaluate_demo_model,
    learning_rate,
    resolve_settings,
    write_demo_data,
)
from vlp.run import train
from vlp.train import TrainConfig

CLIP_DEFAULTS = {"n_train": 5000, "n_test": 1000, "steps": 1800, "batch_size": 128}
COCA_DEFAULTS = {"n_train": 5000, "n_test": 1000, "steps": 800, "batch_size": 128}
MODELS = {"clip": "clip-tiny", "coca": "coca-tiny"}


def clip_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family clip`: ``cfg``'s settings over `CLIP_DEFAULTS`, a fresh run."""
    return _recipe(cfg, "clip", CLIP_DEFAULTS)


def coca_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family coca`: ``cfg``'s settings over `COCA_DEFAULTS`, a fresh run."""
    return _recipe(cfg, "coca", COCA_DEFAULTS)


def _recipe(cfg: DemoConfig, family: str, defaults: dict[str, int]) -> dict[str, Any]:
    settings = resolve_settings(cfg, defaults)
    clear_previous_run(Path(cfg.out))
    return clip_demo(Path(cfg.out), settings, family=family, lr=learning_rate(cfg),
                     seed=cfg.seed, num_workers=cfg.num_workers, progress=cfg.progress)


def clip_demo(out: Path, settings: dict[str, int], *, family: str, lr: float, seed: int,
              num_workers: int, progress: bool) -> dict[str, Any]:
    """The clip / coca demo's stages (``family`` picks the model of `MODELS`); ``settings``
    holds `CLIP_DEFAULTS`' keys. Returns the metrics (fractions) and the checkpoint."""
    start = time.time()
    data_dir = out / "data"
    print(f"[1/3] writing the synthetic dataset to {data_dir}", flush=True)
    meta = write_demo_data(data_dir, settings, seed=seed, progress=progress,
                           formats=("csv", "imagefolder"))

    model_name = MODELS[family]
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
        seed=seed,
        num_workers=num_workers,
        progress=progress,
    )
    result = train(train_cfg)
    checkpoint = result["checkpoint"]

    print(f"[3/3] evaluating {checkpoint} on the held-out split", flush=True)
    model = vlp.load(checkpoint)
    tokenizer = vlp.load_tokenizer(checkpoint)
    metrics = evaluate_demo_model(model, tokenizer, data_dir, captioning=family == "coca",
                                  num_workers=num_workers, progress=progress)
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
    if family == "coca":
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
    if family == "coca":
        print(f"captioning on the held-out val split ({summary['num_caption_images']} images, "
              f"5 references each): CIDEr {summary['cider']:.3f}, "
              f"BLEU-4 {summary['bleu_4']:.3f}", flush=True)
    return summary
