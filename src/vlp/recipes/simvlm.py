"""`vlp demo --family simvlm`: simvlm-tiny pretrained with PrefixLM alone on the synthetic world's
image-text pairs mixed with a text-only corpus (captions of unrendered scenes followed by a
question and its answer, and a share of the questions alone with their answers), then used
zero-shot: captions after the prefix "a picture of" and answers after the question as prefix,
scored on held-out data against an untrained simvlm-tiny, the majority answer, and the same
pretraining budget without the text-only corpus (ablation).

Zero-shot VQA is scored three ways: the answer ranked over the training answers' vocabulary after
[image; question] (the headline: the model's own likelihoods, closed vocabulary as BLIP's rank
inference), the answer generated freely after [image; question], and the answer generated after
the model's own caption ("a picture of <caption>. <question>", the corpus's form)."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlp
from vlp.data import build_source
from vlp.data.qa import QARecord, read_qa_jsonl
from vlp.data.synthetic_text import write_text_corpus
from vlp.eval.captioning import caption_eval, generate_captions
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

SIMVLM_DEFAULTS = {"n_train": 4000, "n_test": 500, "steps": 1400, "batch_size": 64,
                   "n_text_scenes": 4000}
TEXT_RATIO = 0.5  # share of each batch that is text-only
# share of the corpus's questions also written alone ("<question> <answer>"): zero-shot, the
# question opens the text prefix right after the image, a form the described lines never show
BARE_SHARE = 0.3
CAPTION_PROMPT = "a picture of"
VQA_MAX_NEW_TOKENS = 5
VQA_EVAL_QUESTIONS = 1000  # the first questions of test_qa.jsonl (grouped by image)


def simvlm_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family simvlm`: ``cfg``'s settings over `SIMVLM_DEFAULTS`, fresh runs."""
    settings = resolve_settings(cfg, SIMVLM_DEFAULTS)
    clear_previous_run(Path(cfg.out), "with_text", "without_text")
    return simvlm_demo(Path(cfg.out), settings, lr=learning_rate(cfg), seed=cfg.seed,
                       num_workers=cfg.num_workers, progress=cfg.progress)


def pretrain(out: Path, data_dir: Path, settings: dict[str, int], *, text_data: Path | None,
             tokenizer: str | None, lr: float, seed: int, num_workers: int,
             progress: bool) -> dict[str, Any]:
    steps = settings["steps"]
    return train(TrainConfig(
        model="simvlm-tiny", train_data=str(data_dir / "train.csv"), output_dir=str(out),
        text_data=str(text_data) if text_data is not None else None, text_ratio=TEXT_RATIO,
        tokenizer=tokenizer, batch_size=settings["batch_size"], lr=lr, weight_decay=0.05,
        warmup_steps=max(1, steps // 10), max_steps=steps, checkpoint_every=0, keep_last=1,
        log_every=50, seed=seed, num_workers=num_workers, progress=progress))


def answer_vocabulary(questions: list[QARecord]) -> list[str]:
    """Every answer of ``questions`` once, sorted: the candidates ranked zero-shot."""
    return sorted({a.strip() for q in questions for a in q.answers})


def with_own_captions(model: nn.Module, tokenizer: Any, questions: list[QARecord], *,
                      num_workers: int, progress: bool) -> list[QARecord]:
    """Each question after the model's own zero-shot caption of its image, as the corpus lines
    read ("<caption>. <question>"): the text-only skill answers from the caption."""
    images = sorted({q.image for q in questions})
    captions = dict(generate_captions(model, tokenizer, images, batch_size=64,
                                      max_new_tokens=CAPTION_MAX_NEW_TOKENS, num_beams=1,
                                      prompt=CAPTION_PROMPT, num_workers=num_workers,
                                      progress=progress).pairs)
    return [dataclasses.replace(q, question=f"{CAPTION_PROMPT} {captions[q.image]}. "
                                            f"{q.question.strip()}") for q in questions]


def zero_shot_scores(model: nn.Module, tokenizer: Any, data_dir: Path, questions: list,
                     candidates: list[str], *, num_workers: int,
                     progress: bool) -> dict[str, Any]:
    """Zero-shot captioning (prefix "a picture of", greedy) on the val split and zero-shot VQA
    on ``questions``: the question alone as prefix, the answer ranked over ``candidates``
    (``rank_*``) or generated (``vqa_*``, greedy), and generated after the model's own caption
    (``caption_vqa_accuracy``)."""
    captions = caption_eval(model, tokenizer, build_source("csv", str(data_dir / "val.csv")),
                            batch_size=64, max_new_tokens=CAPTION_MAX_NEW_TOKENS, num_beams=1,
                            prompt=CAPTION_PROMPT, num_workers=num_workers, progress=progress,
                            backend="vlp")
    ranked = vqa_eval(model, tokenizer, questions, mode="rank", candidates=candidates,
                      num_workers=num_workers, progress=progress)
    answers = vqa_eval(model, tokenizer, questions, mode="generate", num_beams=1,
                       max_new_tokens=VQA_MAX_NEW_TOKENS, num_workers=num_workers,
                       progress=progress)
    captioned = with_own_captions(model, tokenizer, questions, num_workers=num_workers,
                                  progress=progress)
    via_caption = vqa_eval(model, tokenizer, captioned, mode="generate", num_beams=1,
                           max_new_tokens=VQA_MAX_NEW_TOKENS, num_workers=num_workers,
                           progress=progress)
    return {"cider": captions["cider"], "bleu_4": captions["bleu_4"],
            "num_caption_images": captions["num_images"], **answers,
            **{f"rank_{k}": v for k, v in ranked.items()},
            "caption_vqa_accuracy": via_caption["vqa_accuracy"]}


def simvlm_demo(out: Path, settings: dict[str, int], *, lr: float, seed: int, num_workers: int,
                progress: bool, ablation: bool = True) -> dict[str, Any]:
    """The SimVLM demo's stages; ``settings`` holds `SIMVLM_DEFAULTS`' keys. ``ablation=False``
    skips the run without text-only data (its keys are then absent)."""
    start = time.time()
    data_dir = out / "data"
    print(f"[1/4] writing the synthetic dataset and its text-only corpus to {data_dir}",
          flush=True)
    write_demo_data(data_dir, settings, seed=seed, progress=progress)
    corpus = data_dir / "text_corpus.txt"
    n_lines = write_text_corpus(corpus, settings["n_text_scenes"], seed=seed,
                                bare_share=BARE_SHARE)

    steps = settings["steps"]
    print(f"[2/4] pretraining simvlm-tiny (PrefixLM, image-text + {TEXT_RATIO:.0%} text-only "
          f"rows) for {steps} steps", flush=True)
    started = time.time()
    with_text = pretrain(out / "with_text", data_dir, settings, text_data=corpus, tokenizer=None,
                         lr=lr, seed=seed, num_workers=num_workers, progress=progress)
    train_s = time.time() - started
    checkpoint = with_text["checkpoint"]
    without_text = None
    if ablation:
        print(f"[3/4] ablation: the same {steps} steps and batch size on image-text pairs "
              "alone", flush=True)
        without_text = pretrain(out / "without_text", data_dir, settings, text_data=None,
                                tokenizer=checkpoint, lr=lr, seed=seed,
                                num_workers=num_workers, progress=progress)

    print("[4/4] zero-shot captioning and VQA on held-out data", flush=True)
    tokenizer = vlp.load_tokenizer(checkpoint)
    train_qa = read_qa_jsonl(data_dir / "train_qa.jsonl")
    test_qa = read_qa_jsonl(data_dir / "test_qa.jsonl")[:VQA_EVAL_QUESTIONS]
    model = vlp.load(checkpoint)
    torch.manual_seed(seed)
    models = {"with_text": model, "untrained": build_model(copy.deepcopy(model.config)).eval()}
    if without_text is not None:
        models["without_text"] = vlp.load(without_text["checkpoint"])
    candidates = answer_vocabulary(train_qa)
    scores = {name: zero_shot_scores(m, tokenizer, data_dir, test_qa, candidates,
                                     num_workers=num_workers, progress=progress)
              for name, m in models.items()}
    baselines = majority_baselines(train_qa, test_qa)

    main = scores["with_text"]
    summary = {
        "family": "simvlm",
        "cider": r4(main["cider"]), "bleu_4": r4(main["bleu_4"]),
        "cider_untrained": r4(scores["untrained"]["cider"]),
        "caption_prompt": CAPTION_PROMPT,
        "num_caption_images": int(main["num_caption_images"]),
        "vqa_rank_accuracy": r4(main["rank_vqa_accuracy"]),
        "vqa_rank_accuracy_untrained": r4(scores["untrained"]["rank_vqa_accuracy"]),
        "vqa_rank_by_type": accuracy_by_type(main, "rank_"),
        "num_answer_candidates": len(candidates),
        "vqa_accuracy": r4(main["vqa_accuracy"]),
        "vqa_accuracy_untrained": r4(scores["untrained"]["vqa_accuracy"]),
        "caption_vqa_accuracy": r4(main["caption_vqa_accuracy"]),
        "caption_vqa_accuracy_untrained": r4(scores["untrained"]["caption_vqa_accuracy"]),
        "vqa_majority_accuracy": r4(baselines["majority_accuracy"]),
        "vqa_type_majority_accuracy": r4(baselines["type_majority_accuracy"]),
        "vqa_by_type": accuracy_by_type(main),
        "num_vqa_questions": int(main["num_questions"]),
        "text_corpus_lines": n_lines, "text_ratio": TEXT_RATIO,
        "train_steps": with_text["step"], "final_loss": r4(with_text["loss"]),
        "train_s": round(train_s, 1), "wall_s": round(time.time() - start, 1),
        "checkpoint": str(checkpoint),
    }
    if without_text is not None:
        ablated = scores["without_text"]
        summary.update({
            "cider_without_text": r4(ablated["cider"]),
            "vqa_rank_accuracy_without_text": r4(ablated["rank_vqa_accuracy"]),
            "vqa_rank_by_type_without_text": accuracy_by_type(ablated, "rank_"),
            "vqa_accuracy_without_text": r4(ablated["vqa_accuracy"]),
            "caption_vqa_accuracy_without_text": r4(ablated["caption_vqa_accuracy"]),
            "vqa_by_type_without_text": accuracy_by_type(ablated),
            "final_loss_without_text": r4(without_text["loss"]),
            "checkpoint_without_text": str(without_text["checkpoint"])})
    ablated = (f", without text-only data {summary['cider_without_text']:.3f}"
               if without_text is not None else "")
    ablated_vqa = (f", without text-only data {summary['vqa_rank_accuracy_without_text']:.1%}"
                   if without_text is not None else "")
    print(f"zero-shot captions ('{CAPTION_PROMPT} ...') CIDEr {summary['cider']:.3f} "
          f"(untrained {summary['cider_untrained']:.3f}{ablated}); zero-shot VQA accuracy, "
          f"answers ranked after the question {summary['vqa_rank_accuracy']:.1%} (majority "
          f"answer {summary['vqa_majority_accuracy']:.1%}, per-type majority "
          f"{summary['vqa_type_majority_accuracy']:.1%}, untrained "
          f"{summary['vqa_rank_accuracy_untrained']:.1%}{ablated_vqa}); generated after the "
          f"question {summary['vqa_accuracy']:.1%}, after its own caption "
          f"{summary['caption_vqa_accuracy']:.1%}", flush=True)
    return summary
