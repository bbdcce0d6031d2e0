"""clip-tiny learns the synthetic world through the real pipeline: files on disk, the real
loader and trainer, then held-out zero-shot classification and retrieval far above chance."""

import pytest

from vlp.recipes import DemoConfig, demo


@pytest.mark.slow
def test_clip_tiny_learns_the_synthetic_world(tmp_path):
    result = demo(DemoConfig(out=str(tmp_path / "demo"), n_train=1000, n_test=200, steps=200,
                             batch_size=64, num_workers=0, progress=False))
    chance_retrieval = 1 / 200
    chance_classes = 1 / result["num_classes"]
    assert result["num_test_pairs"] == 200 and result["num_classes"] >= 48
    assert result["i2t_r1"] >= 10 * chance_retrieval, result
    assert result["t2i_r1"] >= 10 * chance_retrieval, result
    assert result["zeroshot_top1"] >= 3 * chance_classes, result
    assert (tmp_path / "demo" / "checkpoint-latest" / "model.safetensors").is_file()


@pytest.mark.slow
def test_coca_tiny_learns_to_caption_the_synthetic_world(tmp_path):
    import copy

    import torch

    import vlp
    from vlp.models import build_model
    from vlp.recipes import evaluate_demo_model

    result = demo(DemoConfig(out=str(tmp_path / "demo"), family="coca", n_train=1000, n_test=200,
                             steps=220, batch_size=64, num_workers=0, progress=False))
    # an untrained coca-tiny with the same tokenizer ids, scored on the same held-out data
    trained = vlp.load(result["checkpoint"])
    tokenizer = vlp.load_tokenizer(result["checkpoint"])
    torch.manual_seed(0)
    untrained = build_model(copy.deepcopy(trained.config))
    baseline = evaluate_demo_model(untrained, tokenizer, tmp_path / "demo" / "data",
                                   captioning=True, progress=False)
    chance_classes = 1 / result["num_classes"]
    assert result["family"] == "coca" and result["num_caption_images"] == 200, result
    assert result["cider"] >= 3 * baseline["cider"] + 0.2, (result, baseline)
    assert result["bleu_4"] > baseline["bleu_4"] + 0.1, (result, baseline)
    assert result["zeroshot_top1"] >= 3 * chance_classes, result
    assert result["zeroshot_top1"] >= 2 * baseline["zeroshot_top1"], (result, baseline)
    print("coca demo", result, "untrained", {k: baseline[k] for k in
                                              ("cider", "bleu_4", "zeroshot_top1", "i2t_r1")})


def test_demo_rejects_an_unknown_family(tmp_path):
    from vlp.errors import ConfigError

    with pytest.raises(ConfigError, match="'clip', 'coca', 'blip'"):
        demo(DemoConfig(out=str(tmp_path / "demo"), family="nonesuch"))
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_blip_tiny_retrieves_captions_and_answers_the_synthetic_world(tmp_path):
    result = demo(DemoConfig(out=str(tmp_path / "demo"), family="blip", n_train=1000, n_test=200,
                             steps=100, vqa_steps=150, batch_size=32, lr=1e-3, num_workers=0,
                             progress=False))
    print("blip demo", result)
    assert result["family"] == "blip" and result["num_test_pairs"] == 200, result
    # not asserted here: ITM re-ranking beating ITC R@1. At this budget neither has learned
    # (measured: ITC/ITM R@1 0.5-1.5% on 200 pairs, ITM loss 0.63 ~ chance)
    assert result["cider"] >= 3 * result["cider_untrained"] + 0.2, result
    assert result["vqa_accuracy"] >= 2 * result["vqa_majority_accuracy"], result
    assert result["vqa_accuracy_rank"] >= 2 * result["vqa_majority_accuracy"], result


@pytest.mark.slow
def test_simvlm_tiny_captions_and_answers_zero_shot(tmp_path, one_thread):
    from pathlib import Path

    from vlp.recipes.simvlm import simvlm_demo

    # PrefixLM pretraining on image-text pairs + the text-only corpus, then zero-shot use;
    # the ablation without text-only data is the demo's (it doubles the time)
    result = simvlm_demo(Path(tmp_path / "demo"),
                         {"n_train": 1000, "n_test": 200, "steps": 350, "batch_size": 64,
                          "n_text_scenes": 1000},
                         lr=1e-3, seed=0, num_workers=0, progress=False, ablation=False)
    print("simvlm demo", result)
    assert result["family"] == "simvlm" and result["num_caption_images"] == 200, result
    assert result["cider"] >= 3 * result["cider_untrained"] + 0.1, result
    # zero-shot VQA, no QA pair ever seen with an image: answered after the model's own
    # caption (the corpus's described form) and ranked after the question alone (its bare
    # form). Measured at this budget: 23.3% and 17.7%, majority answer 10.1%, untrained 0%
    # and 3.6%; at the demo's budget 27.8% and 37.1%
    assert result["caption_vqa_accuracy"] >= result["vqa_majority_accuracy"], result
    assert result["caption_vqa_accuracy"] >= result["caption_vqa_accuracy_untrained"] + 0.05, \
        result
    assert result["vqa_rank_accuracy"] >= 1.3 * result["vqa_majority_accuracy"], result
    assert result["vqa_rank_accuracy"] >= result["vqa_rank_accuracy_untrained"] + 0.05, result


@pytest.mark.slow
def test_blip2_recipe_answers_held_out_questions_zero_shot(tmp_path, one_thread):
    from pathlib import Path

    from vlp.recipes.blip2 import blip2_demo

    # the whole recipe at a reduced budget: frozen clip-tiny ViT, a GPT-2 trained on text
    # alone, stage 1, stage 2 on captions only, then VQA with no QA pair ever seen with an image
    result = blip2_demo(Path(tmp_path / "demo"),
                        {"n_train": 600, "n_test": 100, "vit_steps": 100, "lm_steps": 300,
                         "stage1_steps": 60, "stage2_steps": 200, "batch_size": 32},
                        lr=1e-3, seed=0, num_workers=0, progress=False)
    print("blip2 demo", result)
    assert result["family"] == "blip2" and result["num_caption_images"] == 200, result
    assert result["trainable_params"] < result["frozen_params"], result
    assert result["vqa_accuracy"] >= 2 * result["vqa_majority_accuracy"], result
    # not asserted yet: answers better with the image than the same frozen LM without it
    # (measured equal at this budget, 35.7% vs 33.9% at the demo's default one)
