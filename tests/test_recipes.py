"""The training recipes under recipes/ (`vlp train --config recipes/NAME.yaml`), each run at a
reduced budget on a small synthetic world laid out where the recipes read it (data/synth,
runs/recipes), in the order they chain: every one runs and reports its metrics."""

import json
from pathlib import Path

import pytest

from vlp.cli import main
from vlp.data.synthetic import write_dataset

pytest.importorskip("yaml", reason="the recipes are YAML (the yaml extra)")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
README = Path(__file__).resolve().parents[1] / "README.md"
# in chain order (a fine-tune starts from its pretraining recipe's run), with the metrics its
# evaluation reports
METRICS = {
    "clip-pretrain": ("zeroshot_top1", "i2t_r1", "t2i_r1"),
    "clip-finetune-coco": ("zeroshot_top1", "zeroshot_top5"),
    "blip-pretrain": ("i2t_r1", "t2i_r1"),
    "blip-retrieval": ("itm_i2t_r1", "itm_t2i_r1"),
    "blip-caption": ("caption_cider", "caption_bleu_4"),
    "blip-vqa": ("vqa_accuracy",),
    "coca-pretrain": ("i2t_r1", "t2i_r1"),
    "coca-caption": ("caption_cider", "caption_bleu_4"),
}
REDUCED = ["--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--no-progress",
           "--eval-batch-size", "32"]


def test_every_recipe_is_tested_and_in_the_readme():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(METRICS)
    readme = README.read_text(encoding="utf-8")
    for name in METRICS:
        assert f"recipes/{name}.yaml" in readme


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    write_dataset(root / "data" / "synth", formats=["csv", "coco", "imagefolder"], n_train=16,
                  n_val=4, n_test=8, captions_per_image=2, progress=False)
    return root


def test_recipes_run_in_chain_and_report_their_metrics(workdir, monkeypatch, capsys,
                                                        one_thread):
    monkeypatch.chdir(workdir)
    for name, metrics in METRICS.items():
        assert main(["train", "--config", str(RECIPES / f"{name}.yaml"), *REDUCED]) == 0, name
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["step"] == 2, name
        assert set(metrics) <= set(result["eval"]), (name, sorted(result["eval"]))
        assert Path(result["output_dir"]) == Path("runs/recipes") / name


def test_a_fine_tune_before_its_starting_run_names_the_missing_directory(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data" / "synth", formats=["csv"], n_train=2, n_val=2, n_test=2,
                  captions_per_image=1, progress=False)
    assert main(["train", "--config", str(RECIPES / "coca-caption.yaml"), *REDUCED]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "vlp: error: runs/recipes/coca-pretrain: no such model or run directory"), err
