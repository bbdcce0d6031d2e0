"""BLIP fine-tuning as the reference does it: a caption prompt ("a picture of ") that the
captioner learns before each caption without loss on its tokens, and the distillation weight
ramped over the run's first epoch unless the config says otherwise."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import vlp
from vlp.config import get_preset
from vlp.data import build_source, image_transform, make_loader
from vlp.errors import ConfigError
from vlp.models import build_model
from vlp.run import train
from vlp.tokenizers import train_tokenizer
from vlp.train import TrainConfig

PROMPT = "a picture of "
SMALL = {"vision": {"layers": 1}, "text": {"layers": 1}, "queue_size": 16}


def _tiny_blip(tokenizer, **overrides):
    config = get_preset("blip-tiny")
    config.text.pad_id, config.text.bos_id = tokenizer.pad_id, tokenizer.bos_id
    config.text.eos_id = tokenizer.eos_id
    config.text.layers = config.vision.layers = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return build_model(config)


def test_prompt_tokens_carry_no_loss_and_the_loss_is_the_hand_computed_one(
        synthetic_train_csv, one_thread):
    data = synthetic_train_csv(16)
    with open(data) as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    tokenizer = train_tokenizer(captions * 2 + [PROMPT], vocab_size=1024, context_length=32)
    model = _tiny_blip(tokenizer, objectives=("lm",)).eval()
    loader = make_loader(build_source("csv", str(data)),
                         transform=image_transform(model, train=False), tokenizer=tokenizer,
                         batch_size=4, train=False, caption_prompt=PROMPT)
    batch = next(iter(loader))
    ids = batch["input_ids"]
    prompt = tokenizer.encode(PROMPT.rstrip())  # the trailing space goes with the caption
    assert len(prompt) == 3
    assert (ids[:, 1:4] == torch.tensor(prompt)).all()  # bos, the prompt, then the caption
    assert tokenizer.decode(ids[0]).startswith("a picture of ")
    model.mask_caption_prompt(len(prompt))
    with torch.no_grad():
        loss = model(batch)["losses"]["lm"]
        mask = ids != tokenizer.pad_id
        logits = model.caption_logits(batch["pixels"], ids, mask)  # [DEC] first
    # by hand: the token after position j is predicted at j; the prompt's three are not scored
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for j in range(len(prompt), int(mask[row].sum()) - 1):
            total += F.cross_entropy(logits[row, j][None], ids[row, j + 1][None],
                                     label_smoothing=0.1).item()
            count += 1
    assert math.isclose(loss.item(), total / count, rel_tol=1e-5)
    model.mask_caption_prompt(0)  # the prompt scored too: another loss
    with torch.no_grad():
        assert not math.isclose(model(batch)["losses"]["lm"].item(), loss.item(), rel_tol=1e-3)


def test_the_trainer_feeds_the_prompt_and_a_family_without_it_refuses(
        tmp_path, synthetic_train_csv, one_thread):
    data = synthetic_train_csv(16)
    seen = []

    def look(model, step):
        seen.append(model._prompt_tokens)

    train(TrainConfig(model="blip-tiny", model_overrides={**SMALL, "objectives": ["lm"]},
                      lm_prompt=PROMPT, train_data=str(data),
                      output_dir=str(tmp_path / "blip"), batch_size=4, max_steps=1,
                      num_workers=0, progress=False), after_backward=look)
    tokenizer = vlp.load_tokenizer(tmp_path / "blip" / "checkpoint-latest")  # the run's BPE
    assert seen == [len(tokenizer.encode(PROMPT.rstrip()))]
    with pytest.raises(ConfigError, match="lm_prompt"):
        train(TrainConfig(model="clip-tiny", lm_prompt=PROMPT, train_data=str(data),
                          output_dir=str(tmp_path / "clip"), batch_size=4, max_steps=1,
                          num_workers=0, progress=False))


@pytest.mark.parametrize("warmup, expected", [
    (None, [0, 0.25, 0.5, 0.75, 1, 1]),  # default: the first epoch (16 pairs / 4 = 4 steps)
    (2, [0, 0.5, 1, 1, 1, 1]),
    (0, [1, 1, 1, 1, 1, 1]),  # off
])
def test_alpha_ramps_over_the_runs_first_epoch_by_default(
        tmp_path, synthetic_train_csv, one_thread, warmup, expected):
    alphas = []

    def look(model, step):  # after the step's backward: the alpha its loss used
        alphas.append(model.alpha())

    overrides = {**SMALL, **({} if warmup is None else {"alpha_warmup_steps": warmup})}
    train(TrainConfig(model="blip-tiny", model_overrides=overrides,
                      train_data=str(synthetic_train_csv(16)), output_dir=str(tmp_path / "run"),
                      batch_size=4, max_steps=6, num_workers=0, progress=False),
          after_backward=look)
    assert alphas == pytest.approx([0.4 * ramp for ramp in expected])


def test_alpha_warmup_steps_must_not_be_negative():
    config = get_preset("blip-tiny")
    config.alpha_warmup_steps = -1
    with pytest.raises(ConfigError, match="alpha_warmup_steps"):
        build_model(config)
