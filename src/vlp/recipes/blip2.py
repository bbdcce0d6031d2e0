"""`vlp demo --family blip2`: the BLIP-2 recipe in miniature on the synthetic world, then used
zero-shot.

1. A frozen image encoder: clip-tiny pretrained by the normal trainer; BLIP-2 reads its ViT by
   reference (``vision_path``).
2. A frozen LLM: a small GPT-2 (the ``gpt2-tiny`` preset, family lm) trained by the normal
   trainer on text alone, from the train split only: captions, and "Question: ... Short
   answer: ..." pairs, alone or after a caption of the same scene (segments bos ... eos, packed
   into one document), so it knows the answer format and vocabulary and how to answer from a
   preceding description. Exported with `vlp.interop.convert` as an HF GPT-2 directory.
3. Stage 1: blip2-tiny's Q-Former on the frozen ViT (ITC + ITM + ITG) through the trainer.
4. Stage 2: the stage-1 Q-Former feeding the frozen LLM soft prompts, trained on captions only
   (the paper's stage 2), through the trainer with the LLM's tokenizer.
5. Zero-shot on held-out images: VQA with "Question: {} Short answer:" (beam search, length
   penalty), captions (beam search), against the majority answer and the same LLM given no
   image.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import vlp
from vlp.config import VQA_PROMPT
from vlp.data import build_source
from vlp.data.qa import QARecord, left_padded_prompts, read_qa_jsonl
from vlp.eval.captioning import caption_metrics, generate_captions
from vlp.eval.vqa import accuracy_by_type, accuracy_summary, majority_baselines, vqa_eval
from vlp.interop import convert
from vlp.recipes.common import (
    DemoConfig,
    clear_previous_run,
    learning_rate,
    r4,
    resolve_settings,
    write_demo_data,
)
from vlp.run import train
from vlp.tokenizers import Tokenizer
from vlp.train import TrainConfig

BLIP2_DEFAULTS = {"n_train": 3000, "n_test": 300, "vit_steps": 800, "lm_steps": 800,
                  "stage1_steps": 1000, "stage2_steps": 3000, "batch_size": 64}  # ~20 min CPU
LM_LR, LM_WEIGHT_DECAY = 1e-3, 0.1
# LM documents: (kind, weight); a "segment" is bos + text + eos
LM_DOCS = (("caption", 0.15), ("caption+caption", 0.25), ("caption+qa", 0.4), ("qa", 0.2))
STAGE2_OVERRIDES = {"llm": "causal", "text_parts": False, "retrieval_heads": False,
                    "lm_head": False, "llm_context_length": 32}
VQA_EVAL_QUESTIONS = 1000  # the first questions of test_qa.jsonl (grouped by image)
VQA_BEAMS, VQA_LENGTH_PENALTY, VQA_MAX_NEW_TOKENS = 5, -1.0, 6  # paper: beams 5, penalty -1
VQA_OPTIONS = {"num_beams": VQA_BEAMS, "length_penalty": VQA_LENGTH_PENALTY,
               "max_new_tokens": VQA_MAX_NEW_TOKENS}
CAPTION_BEAMS, CAPTION_MAX_NEW_TOKENS = 5, 30


# -- the LLM: a small GPT-2 trained on text alone ------------------------------------------------

def qa_text(question: str, answer: str | None = None) -> str:
    prompt = VQA_PROMPT.format(question)
    return prompt if answer is None else f"{prompt} {answer}"


def lm_corpus(data_dir: Path) -> dict[str, dict[str, list[str]]]:
    """Per training image, its captions and its QA texts (train split only)."""
    scenes: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"captions": [], "qa": []})
    with open(data_dir / "train.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scenes[row["filepath"]]["captions"].append(row["caption"])
    for line in (data_dir / "train_qa.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        scenes[row["image"]]["qa"].append(qa_text(row["question"], row["answer"]))
    return dict(scenes)


def _document(scene: dict[str, list[str]], kind: str, rng: random.Random) -> list[str]:
    captions, qa = scene["captions"], scene["qa"]
    if kind == "caption":
        return [rng.choice(captions)]
    if kind == "caption+caption":
        return rng.sample(captions, 2)
    if kind == "caption+qa":
        return [rng.choice(captions), rng.choice(qa)]
    return [rng.choice(qa)]


def write_lm_corpus(scenes: dict[str, dict[str, list[str]]], path: Path, *, documents: int,
                    seed: int) -> Path:
    """``documents`` JSONL documents drawn from ``scenes`` (kinds weighted by `LM_DOCS`), each
    row ``{"texts": [segment, ...]}``: the text corpus the LLM trains on (source kind "text";
    each segment is tokenised as bos + text + eos, packed into one row)."""
    rng = random.Random(seed)
    keys = sorted(scenes)
    kinds, weights = zip(*LM_DOCS, strict=True)
    rows = [json.dumps({"texts": _document(scenes[rng.choice(keys)], kind, rng)})
            for kind in rng.choices(kinds, weights, k=documents)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# -- zero-shot VQA --------------------------------------------------------------------------------

@torch.no_grad()
def answers_without_image(llm: nn.Module, tokenizer: Tokenizer, records: list[QARecord], *,
                          batch_size: int = 50, progress: bool = True) -> list[str]:
    """The no-image baseline: the frozen ``llm`` answering "Question: {} Short answer:" from
    the text alone, decoded as the model's answers are (`VQA_OPTIONS`)."""
    answers: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc="vqa (no image)", leave=False,
                      disable=not progress):
        chunk = records[start:start + batch_size]
        ids, mask = left_padded_prompts(tokenizer, [qa_text(r.question) for r in chunk])
        tokens = llm.generate(input_ids=ids, attention_mask=mask, **VQA_OPTIONS,
                              pad_token_id=tokenizer.pad_id)[:, ids.shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(tokens)]
    return answers


# -- the recipe -----------------------------------------------------------------------------------

def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def _train(out: Path, settings: dict[str, int], steps: int, lr: float, seed: int,
           num_workers: int, progress: bool, data: Path, **fields: Any) -> dict[str, Any]:
    options = {"weight_decay": 0.05, "warmup_steps": max(1, steps // 10), **fields}
    return train(TrainConfig(
        train_data=str(data), output_dir=str(out), batch_size=settings["batch_size"], lr=lr,
        max_steps=steps, checkpoint_every=0, keep_last=1, log_every=50, seed=seed,
        num_workers=num_workers, progress=progress, **options))


def blip2_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """`vlp demo --family blip2`: ``cfg``'s settings over `BLIP2_DEFAULTS` (``cfg.steps`` sets
    stage 2's), fresh runs."""
    settings = resolve_settings(cfg, BLIP2_DEFAULTS, {"stage2_steps": "steps"})
    clear_previous_run(Path(cfg.out), "vit", "lm_run", "stage1", "stage2")
    return blip2_demo(Path(cfg.out), settings, lr=learning_rate(cfg), seed=cfg.seed,
                      num_workers=cfg.num_workers, progress=cfg.progress)


def blip2_demo(out: Path, settings: dict[str, int], *, lr: float, seed: int, num_workers: int,
               progress: bool) -> dict[str, Any]:
    """The BLIP-2 demo's stages; ``settings`` holds `BLIP2_DEFAULTS`' keys."""
    start = time.time()
    data_dir = out / "data"
    train_csv = data_dir / "train.csv"
    print(f"[1/6] writing the synthetic dataset to {data_dir}", flush=True)
    write_demo_data(data_dir, settings, seed=seed, progress=progress)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        return time.time()

    mark = lap("data", start)
    print(f"[2/6] the image encoder: clip-tiny for {settings['vit_steps']} steps", flush=True)
    vit = _train(out / "vit", settings, settings["vit_steps"], lr, seed, num_workers, progress,
                 train_csv, model="clip-tiny")
    mark = lap("vit", mark)
    print(f"[3/6] the LLM: GPT-2 on train-split text alone for {settings['lm_steps']} steps",
          flush=True)
    corpus = write_lm_corpus(lm_corpus(data_dir), out / "lm_corpus.jsonl",
                             documents=settings["lm_steps"] * settings["batch_size"], seed=seed)
    lm = _train(out / "lm_run", settings, settings["lm_steps"], LM_LR, seed, num_workers,
                progress, corpus, model="gpt2-tiny", train_kind="text",
                weight_decay=LM_WEIGHT_DECAY, warmup_steps=max(1, settings["lm_steps"] // 20))
    lm_dir = convert(lm["checkpoint"], out / "lm", "vlp", "hf")
    mark = lap("lm", mark)
    print(f"[4/6] stage 1: Q-Former on the frozen ViT (ITC + ITM + ITG) for "
          f"{settings['stage1_steps']} steps", flush=True)
    stage1 = _train(out / "stage1", settings, settings["stage1_steps"], lr, seed, num_workers,
                    progress, train_csv, model="blip2-tiny",
                    model_overrides={"vision_path": str(Path(vit["checkpoint"]).resolve())})
    mark = lap("stage1", mark)
    print(f"[5/6] stage 2: Q-Former -> frozen LLM on captions for {settings['stage2_steps']} "
          "steps", flush=True)
    stage2 = _train(out / "stage2", settings, settings["stage2_steps"], lr, seed, num_workers,
                    progress, train_csv, model=stage1["checkpoint"],
                    model_overrides=dict(STAGE2_OVERRIDES, llm_path=str(lm_dir.resolve())))
    mark = lap("stage2", mark)

    print("[6/6] zero-shot VQA and captioning on held-out images", flush=True)
    model = vlp.load(stage2["checkpoint"]).eval()
    tokenizer = vlp.load_tokenizer(stage2["checkpoint"])
    train_qa = read_qa_jsonl(data_dir / "train_qa.jsonl")
    test_qa = read_qa_jsonl(data_dir / "test_qa.jsonl")[:VQA_EVAL_QUESTIONS]
    with_image = vqa_eval(model, tokenizer, test_qa, batch_size=50, num_workers=num_workers,
                          progress=progress, **VQA_OPTIONS, pad_token_id=tokenizer.pad_id)
    no_image = accuracy_summary(
        answers_without_image(model.llm, tokenizer, test_qa, progress=progress), test_qa)
    baselines = majority_baselines(train_qa, test_qa)
    captions = _captioning(model, tokenizer, data_dir, num_workers, progress)
    lap("eval", mark)

    trainable, frozen = _count(model)
    stage1_model = vlp.load(stage1["checkpoint"])
    summary = {
        "family": "blip2",
        "vqa_accuracy": r4(with_image["vqa_accuracy"]),
        "vqa_no_image_accuracy": r4(no_image["vqa_accuracy"]),
        "vqa_majority_accuracy": r4(baselines["majority_accuracy"]),
        "vqa_type_majority_accuracy": r4(baselines["type_majority_accuracy"]),
        "vqa_by_type": accuracy_by_type(with_image),
        "vqa_no_image_by_type": accuracy_by_type(no_image),
        "num_vqa_questions": int(with_image["num_questions"]),
        "cider": r4(captions["image"]["cider"]), "bleu_4": r4(captions["image"]["bleu_4"]),
        "cider_no_image": r4(captions["no_image"]["cider"]),
        "bleu_4_no_image": r4(captions["no_image"]["bleu_4"]),
        "num_caption_images": int(captions["image"]["num_images"]),
        "caption_examples": captions["examples"],
        "trainable_params": trainable, "frozen_params": frozen,
        "frozen_vit_params": sum(p.numel() for p in model.visual.parameters()),
        "frozen_llm_params": sum(p.numel() for p in model.llm.parameters()),
        "stage1_trainable_params": _count(stage1_model)[0],
        "losses": {"vit": r4(vit["loss"]), "lm": r4(lm["loss"]), "stage1": r4(stage1["loss"]),
                   "stage2": r4(stage2["loss"])},
        "steps": {k: settings[k] for k in ("vit_steps", "lm_steps", "stage1_steps",
                                           "stage2_steps")},
        "timings_s": timings, "wall_s": round(time.time() - start, 1),
        "checkpoint": str(stage2["checkpoint"]), "lm_dir": str(lm_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"zero-shot VQA {summary['vqa_accuracy']:.1%} (beam {VQA_BEAMS}, length penalty "
          f"{VQA_LENGTH_PENALTY}) vs the same frozen LLM without the image "
          f"{summary['vqa_no_image_accuracy']:.1%}, majority answer "
          f"{summary['vqa_majority_accuracy']:.1%}, per-type majority "
          f"{summary['vqa_type_majority_accuracy']:.1%} ({summary['num_vqa_questions']} "
          f"held-out questions); captions CIDEr {summary['cider']:.3f} (no image "
          f"{summary['cider_no_image']:.3f}); trainable {trainable / 1e6:.2f}M vs frozen "
          f"{frozen / 1e6:.2f}M parameters; {summary['wall_s']:.0f} s", flush=True)
    return summary


def _captioning(model: nn.Module, tokenizer: Tokenizer, data_dir: Path, num_workers: int,
                progress: bool) -> dict[str, Any]:
    """Beam-search captions of the val images from the visual prompts, and the frozen LLM's one
    caption from bos alone (the no-image baseline), each scored against the 5 references."""
    groups = build_source("csv", str(data_dir / "val.csv")).groups()
    references = {i: [groups.texts[t] for t in texts]
                  for i, texts in enumerate(groups.image_to_texts)}
    generated = generate_captions(model, tokenizer, groups.images, batch_size=50,
                                  max_new_tokens=CAPTION_MAX_NEW_TOKENS, num_beams=CAPTION_BEAMS,
                                  num_workers=num_workers, progress=progress,
                                  pad_token_id=tokenizer.pad_id)
    with_image = dict(zip(generated.indices, (text for _, text in generated.pairs), strict=True))
    bos = torch.tensor([[tokenizer.bos_id]])
    blind = model.llm.generate(input_ids=bos, attention_mask=torch.ones_like(bos),
                               num_beams=CAPTION_BEAMS, max_new_tokens=CAPTION_MAX_NEW_TOKENS,
                               pad_token_id=tokenizer.pad_id)[:, 1:]
    blind_text = tokenizer.batch_decode(blind)[0].strip()
    metrics = {"image": caption_metrics(references, with_image, backend="vlp"),
               "no_image": caption_metrics(references, dict.fromkeys(with_image, blind_text),
                                           backend="vlp")}
    metrics["image"]["num_images"] = len(with_image)
    shown = list(with_image)[:3]
    metrics["examples"] = {"image": [[references[i][0], with_image[i]] for i in shown],
                           "no_image": blind_text}
    return metrics
