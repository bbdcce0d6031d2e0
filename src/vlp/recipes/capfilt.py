"""`vlp demo --family capfilt`: BLIP's dataset bootstrapping, measured end to end on the synthetic
world, where every web caption's noise is known.

1. Data: "web" images with one caption each, 30% of them noise (another image's caption, the
   words shuffled, or a colour swapped); the same images with their true captions (the clean
   control); a smaller human-annotated set (5 captions per image, a COCO stand-in); held-out
   test images.
2. blip-tiny pretrained on web + human-annotated pairs (ITC + ITM + LM), as BLIP pretrains on
   web data with COCO and VG in the mix.
3. `vlp capfilt`: captioner (LM) and filter (ITC + ITM) fine-tuned separately on the
   human-annotated set; a synthetic caption per web image (nucleus sampling); ITM decisions on
   original and synthetic captions; the bootstrapped dataset with its report.
4. The same small model (clip-tiny, same steps, tokenizer and seed) pretrained on (a) the noisy
   web data, (b) the bootstrapped data, (c) the clean web data, scored on held-out retrieval
   and zero-shot classification.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path
from typing import Any

import vlp
from vlp.capfilt import CapfiltConfig, capfilt
from vlp.capfilt.output import dataset_csv
from vlp.capfilt.training import pretrain
from vlp.data.synthetic import write_dataset
from vlp.recipes.common import (
    CAPTIONS_PER_IMAGE,
    DemoConfig,
    evaluate_demo_model,
    r4,
    resolve_settings,
)
from vlp.run import train
from vlp.train import TrainConfig

CAPFILT_DEFAULTS = {"n_web": 6000, "n_clean": 2000, "n_test": 1000, "blip_steps": 2200,
                    "blip_batch_size": 32, "finetune_steps": 600, "steps": 300,
                    "batch_size": 128}
NOISE = 0.3  # the default noisy-caption share of the web data
BLIP_LR = 5e-4
FINETUNE_LR = 5e-4
SYNTHETIC_PER_IMAGE = 3  # nucleus-sampled captions per web image
ITM_THRESHOLD = 0.5  # CapfiltConfig's default, BLIP's: keep a caption when P(match) >= 0.5
DOWNSTREAM_MODEL = "clip-tiny"
DOWNSTREAM_LR = 1e-3
RUNS = (("a", "noisy web data"), ("b", "bootstrapped (CapFilt)"), ("c", "clean web data"))


def capfilt_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family capfilt`: ``cfg``'s settings over `CAPFILT_DEFAULTS` (``cfg.n_train``
    sets the web images), fresh runs and stage outputs."""
    settings = resolve_settings(cfg, CAPFILT_DEFAULTS, {"n_web": "n_train"})
    _clear_capfilt_run(Path(cfg.out))
    return capfilt_demo(Path(cfg.out), settings, seed=cfg.seed, num_workers=cfg.num_workers,
                        progress=cfg.progress)


def _clear_capfilt_run(out: Path) -> None:
    """The CapFilt demo's runs and stage outputs resume when present, so a rerun removes them."""
    for name in ("blip", "capfilt", "downstream"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _joined_csv(path: Path, tables: list[Path]) -> str:
    """One CSV of several ``filepath,caption`` tables, image paths made relative to ``path``."""
    rows = []
    for table in tables:
        with open(table, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                image = os.path.relpath(table.parent / row["filepath"], path.parent)
                rows.append((image, row["caption"]))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n")  # RFC 4180 (see capfilt.output)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    return str(path)


def _count_rows(table: str | Path) -> int:
    with open(table, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def capfilt_demo(out: Path, settings: dict[str, int], *, seed: int, num_workers: int,
                 progress: bool) -> dict[str, Any]:
    """The CapFilt demo's stages; ``settings`` holds `CAPFILT_DEFAULTS`' keys."""
    start = time.time()
    web, clean_web, human = out / "web", out / "web_clean", out / "human"
    print(f"[1/4] writing the synthetic world: {settings['n_web']} web images "
          f"({NOISE:.0%} noisy captions), their clean twins, {settings['n_clean']} "
          "human-annotated images", flush=True)
    meta = write_dataset(web, formats=("csv", "imagefolder"), n_train=settings["n_web"],
                         n_val=0, n_test=settings["n_test"], seed=seed, captions_per_image=1,
                         noisy_fraction=NOISE, progress=progress)
    write_dataset(clean_web, formats=("csv",), n_train=settings["n_web"], n_val=0, n_test=0,
                  seed=seed, captions_per_image=1, progress=progress)
    write_dataset(human, formats=("csv",), n_train=settings["n_clean"], n_val=0, n_test=0,
                  seed=seed + 1, captions_per_image=CAPTIONS_PER_IMAGE, progress=progress)
    pretrain_csv = _joined_csv(out / "pretrain.csv", [web / "train.csv", human / "train.csv"])

    steps = settings["blip_steps"]
    blip_batch = settings["blip_batch_size"]
    print(f"[2/4] pretraining blip-tiny (ITC + ITM + LM) on web + human-annotated pairs for "
          f"{steps} steps", flush=True)
    blip = train(TrainConfig(
        model="blip-tiny",  # alpha ramps up over the first epoch (the default, BLIP's)
        train_data=pretrain_csv, output_dir=str(out / "blip"), batch_size=blip_batch,
        lr=BLIP_LR, weight_decay=0.05, warmup_steps=max(1, steps // 10), max_steps=steps,
        log_every=50, seed=seed, num_workers=num_workers, progress=progress))["checkpoint"]

    print("[3/4] CapFilt: fine-tune captioner and filter on the human-annotated pairs, caption "
          "and filter the web data, write the bootstrapped dataset", flush=True)
    cfg = CapfiltConfig(
        out=str(out / "capfilt"), data=str(web / "train.csv"), unit_size=1000,
        pretrained=str(blip), clean_data=str(human / "train.csv"),
        finetune_steps=settings["finetune_steps"], finetune_batch_size=blip_batch,
        finetune_lr=FINETUNE_LR, num_captions=SYNTHETIC_PER_IMAGE,
        itm_threshold=ITM_THRESHOLD, pretrain_model=DOWNSTREAM_MODEL,
        pretrain_steps=settings["steps"], pretrain_batch_size=settings["batch_size"],
        pretrain_lr=DOWNSTREAM_LR, pretrain_weight_decay=0.1, pretrain_tokenizer=str(blip),
        seed=seed, num_workers=num_workers, progress=progress)
    report = capfilt(cfg, ("finetune", "caption", "filter", "write"))["write"]

    print(f"[4/4] pretraining {DOWNSTREAM_MODEL} for {settings['steps']} steps on (a) the noisy, "
          "(b) the bootstrapped, (c) the clean web data; held-out retrieval and zero-shot",
          flush=True)
    data = {"a": str(web / "train.csv"), "b": None, "c": str(clean_web / "train.csv")}
    runs: dict[str, dict[str, Any]] = {}
    for name, label in RUNS:
        result = pretrain(cfg, train_data=data[name],
                          output_dir=str(out / "downstream" / name) if data[name] else None)
        checkpoint = result["checkpoint"]
        metrics = evaluate_demo_model(vlp.load(checkpoint), vlp.load_tokenizer(checkpoint), web,
                                      num_workers=num_workers, progress=progress)
        table = data[name] or dataset_csv(cfg)
        runs[name] = {"data": label, "pairs": _count_rows(table),
                      **{k: round(float(metrics[k]), 4)
                         for k in ("i2t_r1", "t2i_r1", "zeroshot_top1")},
                      "checkpoint": str(checkpoint)}
    runs["a"]["noise_rate"] = report["noise_rate_before"]
    runs["b"]["noise_rate"] = report["noise_rate_after"]  # of the kept original captions
    runs["c"]["noise_rate"] = 0.0

    summary = {
        "family": "capfilt",
        **{key: _r4_or_none(report[key])
           for key in ("noise_rate_before", "noise_rate_after", "filter_precision",
                       "filter_recall", "share_original_kept", "share_synthetic_kept")},
        "kept_original": report["kept_original"], "kept_synthetic": report["kept_synthetic"],
        "runs": runs,
        "b_beats_a_i2t_r1": runs["b"]["i2t_r1"] > runs["a"]["i2t_r1"],
        "num_test_pairs": settings["n_test"],
        "test_duplicate_caption_share": meta["duplicate_caption_share"]["test"],
        "blip_steps": steps, "finetune_steps": settings["finetune_steps"],
        "downstream_steps": settings["steps"],
        "wall_s": round(time.time() - start, 1),
        "report": str(Path(dataset_csv(cfg)).with_name("report.html")),
    }
    print(format_table(summary), flush=True)
    return summary


def _r4_or_none(value: float | None) -> float | None:
    return None if value is None else r4(value)  # None: no caption dropped / kept


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"  # None: no caption dropped / kept


def format_table(summary: dict[str, Any]) -> str:
    """The demo's measurements as a plain-text table."""
    p = {k: _percent(summary[k]) for k in ("filter_precision", "filter_recall",
                                           "noise_rate_before", "noise_rate_after",
                                           "share_original_kept", "share_synthetic_kept")}
    lines = [
        f"filter: precision {p['filter_precision']}, recall {p['filter_recall']} at finding "
        f"noisy web captions; noise rate {p['noise_rate_before']} -> {p['noise_rate_after']}; "
        f"kept {p['share_original_kept']} of the web captions and "
        f"{p['share_synthetic_kept']} of the synthetic ones",
        f"{'':4}{'pretraining data':26}{'pairs':>7}{'noise':>8}{'i2t R@1':>9}{'t2i R@1':>9}"
        f"{'zero-shot':>11}",
    ]
    for name, run in summary["runs"].items():
        lines.append(f"({name}) {run['data']:26}{run['pairs']:>7}"
                     f"{_percent(run['noise_rate']):>8}"
                     f"{run['i2t_r1']:>9.1%}{run['t2i_r1']:>9.1%}{run['zeroshot_top1']:>11.1%}")
    return "\n".join(lines)
