"""clip-tiny learns the synthetic world through the real pipeline: files on disk, the real
loader and trainer, then held-out zero-shot classification and retrieval far above chance."""

import pytest

from vlp.demo import DemoConfig, demo


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
