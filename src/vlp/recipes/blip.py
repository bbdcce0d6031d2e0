"""`vlp demo --family blip`: blip-tiny pretrained on the synthetic world's captions (ITC + ITM + LM
through the normal trainer), then fine-tuned on its question/answer pairs (the answer decoder
given image and question; `vlp train --train-kind qa`), scored on held-out data against
baselines: retrieval R@1 by ITC alone and with ITM re-ranking, captions against an untrained
blip-tiny, VQA accuracy against the majority answer."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

import vlp
from vlp.data import build_source
from vlp.data.qa import read_qa_jsonl
from vlp.eval.captioning import caption_eval
from vlp.eval.rerank import itm_rerank_eval
from vlp.eval.vqa import accuracy_by_type, majority_baselines, vqa_eval
from vlp.models import build_model
from vlp.recipes.common import (
    CAPTION_MAX_NEW_TOKENS,
    DemoConfig,
    clear_previous_run,
    learning_rate,
    r4,
    resolve_settings,
    write_demo_data,
)
from vlp.run import train
from vlp.train import TrainConfig

BLIP_DEFAULTS = {"n_train": 5000, "n_test": 1000, "steps": 1500, "batch_size": 64,
                 "vqa_steps": 300}
BLIP_LR = 5e-4  # peak learning rate of the pretraining
K_TEST = 16  # ITC candidates the ITM head re-scores per query
VQA_LR = 5e-4
VQA_EVAL_QUESTIONS = 2000  # the first questions of test_qa.jsonl (grouped by image)


def blip_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family blip`: ``cfg``'s settings over `BLIP_DEFAULTS`, a fresh run."""
    settings = resolve_settings(cfg, BLIP_DEFAULTS)
    clear_previous_run(Path(cfg.out))
    return blip_demo(Path(cfg.out), settings, lr=learning_rate(cfg, BLIP_LR), seed=cfg.seed,
                     num_workers=cfg.num_workers, progress=cfg.progress)


def blip_demo(out: Path, settings: dict[str, int], *, lr: float, seed: int, num_workers: int,
              progress: bool) -> dict[str, Any]:
    """The BLIP demo's stages; ``settings`` holds `BLIP_DEFAULTS`' keys."""
    start = time.time()
    data_dir = out / "data"
    print(f"[1/4] writing the synthetic dataset to {data_dir}", flush=True)
    write_demo_data(data_dir, settings, seed=seed, progress=progress)
    steps = settings["steps"]
    print(f"[2/4] pretraining blip-tiny (ITC + ITM + LM) for {steps} steps", flush=True)
    result = train(TrainConfig(
        model="blip-tiny",  # alpha ramps up over the first epoch (the default, BLIP's)
        train_data=str(data_dir / "train.csv"), output_dir=str(out),
        batch_size=settings["batch_size"], lr=lr, weight_decay=0.05,
        warmup_steps=max(1, steps // 10), max_steps=steps, checkpoint_every=max(1, steps // 3),
        keep_last=2, log_every=50, seed=seed, num_workers=num_workers, progress=progress))
    checkpoint = result["checkpoint"]
    model, tokenizer = vlp.load(checkpoint), vlp.load_tokenizer(checkpoint)
    torch.manual_seed(seed)
    untrained = build_model(copy.deepcopy(model.config)).eval()

    print("[3/4] retrieval (ITC vs ITC + ITM re-ranking) and captioning", flush=True)
    retrieval = itm_rerank_eval(model, tokenizer, build_source("csv", str(data_dir / "test.csv")),
                                k_test=K_TEST, num_workers=num_workers, progress=progress)
    captions = {name: caption_eval(m, tokenizer, build_source("csv", str(data_dir / "val.csv")),
                                   batch_size=64, max_new_tokens=CAPTION_MAX_NEW_TOKENS,
                                   num_beams=1, num_workers=num_workers, progress=progress,
                                   backend="vlp")
                for name, m in (("trained", model), ("untrained", untrained))}

    vqa_steps = settings["vqa_steps"]
    print(f"[4/4] fine-tuning for VQA for {vqa_steps} steps, then answering held-out questions",
          flush=True)
    train_qa = read_qa_jsonl(data_dir / "train_qa.jsonl")
    test_qa = read_qa_jsonl(data_dir / "test_qa.jsonl")[:VQA_EVAL_QUESTIONS]
    # the answer decoder (and everything under it) on the QA rows, through the normal trainer
    tuned = train(TrainConfig(
        model=str(checkpoint), train_data=str(data_dir / "train_qa.jsonl"), train_kind="qa",
        output_dir=str(out / "vqa"), batch_size=settings["batch_size"], lr=VQA_LR,
        weight_decay=0.05, warmup_steps=max(1, vqa_steps // 10), max_steps=vqa_steps,
        checkpoint_every=0, keep_last=1, log_every=50, seed=seed, num_workers=num_workers,
        progress=progress))
    model = vlp.load(tuned["checkpoint"])
    candidates = sorted({a for r in train_qa for a in r.answers})
    generated = vqa_eval(model, tokenizer, test_qa, mode="generate", num_beams=1,
                         num_workers=num_workers, progress=progress)
    ranked = vqa_eval(model, tokenizer, test_qa, mode="rank", candidates=candidates,
                      num_workers=num_workers, progress=progress)
    baselines = majority_baselines(train_qa, test_qa)

    summary = {
        "family": "blip",
        "i2t_r1_itc": r4(retrieval["i2t_r1"]), "t2i_r1_itc": r4(retrieval["t2i_r1"]),
        "i2t_r1_itm": r4(retrieval["itm_i2t_r1"]), "t2i_r1_itm": r4(retrieval["itm_t2i_r1"]),
        "i2t_r5_itc": r4(retrieval["i2t_r5"]), "i2t_r5_itm": r4(retrieval["itm_i2t_r5"]),
        "k_test": K_TEST, "num_test_pairs": int(retrieval["num_texts"]),
        "cider": r4(captions["trained"]["cider"]), "bleu_4": r4(captions["trained"]["bleu_4"]),
        "cider_untrained": r4(captions["untrained"]["cider"]),
        "bleu_4_untrained": r4(captions["untrained"]["bleu_4"]),
        "num_caption_images": int(captions["trained"]["num_images"]),
        "vqa_accuracy": r4(generated["vqa_accuracy"]),
        "vqa_accuracy_rank": r4(ranked["vqa_accuracy"]),
        "vqa_majority_accuracy": r4(baselines["majority_accuracy"]),
        "vqa_type_majority_accuracy": r4(baselines["type_majority_accuracy"]),
        "vqa_by_type": accuracy_by_type(generated),
        "num_vqa_questions": int(generated["num_questions"]),
        "train_steps": result["step"], "final_loss": r4(result["loss"]),
        "vqa_steps": vqa_steps, "vqa_final_loss": r4(tuned["loss"]),
        "wall_s": round(time.time() - start, 1),
        "checkpoint": str(checkpoint), "vqa_checkpoint": str(tuned["checkpoint"]),
    }
    print(f"retrieval R@1 image->text {summary['i2t_r1_itc']:.1%} (ITC) -> "
          f"{summary['i2t_r1_itm']:.1%} (ITM re-ranked), text->image "
          f"{summary['t2i_r1_itc']:.1%} -> {summary['t2i_r1_itm']:.1%}; captions CIDEr "
          f"{summary['cider']:.3f} (untrained {summary['cider_untrained']:.3f}); VQA accuracy "
          f"{summary['vqa_accuracy']:.1%} generated, {summary['vqa_accuracy_rank']:.1%} ranked "
          f"(majority answer {summary['vqa_majority_accuracy']:.1%})", flush=True)
    return summary
