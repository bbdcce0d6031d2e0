"""Every numeric flag and config field has its range declared beside the field (finite,
positive, probabilities in [0, 1], betas in [0, 1)); a value outside it, a device this machine
lacks, a batch size below 1 or an unknown CapFilt stage is one line before any work starts."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vlp.cli import main
from vlp.cliargs import range_error
from vlp.data.images import image_batches
from vlp.errors import ConfigError, VlpError
from vlp.train.distributed import check_device


def _run(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlp: error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "-1"], "grad_clip=-1.0 (--grad-clip): expected a number >= 0"),
    (["--grad-clip", "nan"], "grad_clip=nan (--grad-clip)"),
    (["--weight-decay", "nan"], "weight_decay=nan (--weight-decay): expected a finite number"),
    (["--lr", "nan"], "lr=nan (--lr): expected a finite number > 0"),
    (["--lr", "inf"], "lr=inf (--lr)"),
    (["--lr", "0"], "lr=0.0 (--lr): expected a number > 0"),
    (["--beta1", "1.5"], "betas=(1.5, 0.98) (--betas): expected a number in [0, 1)"),
    (["--beta2", "1"], "betas=(0.9, 1.0) (--betas): expected a number in [0, 1)"),
    (["--eps", "-1"], "eps=-1.0 (--eps): expected a number > 0"),
    (["--min-lr-ratio", "2"], "min_lr_ratio=2.0 (--min-lr-ratio): expected a number in [0, 1]"),
    (["--batch-size", "0"], "batch_size=0 (--batch-size): expected an integer >= 1"),
    (["--warmup-steps", "-3"], "warmup_steps=-3 (--warmup-steps): expected an integer >= 0"),
    (["--device", "tpu"], "device='tpu': not a device name"),
    (["--device", "cuda:99"], "device='cuda:99': "),
])
def test_train_flags_out_of_range_are_one_line_before_any_step(tmp_path, capsys, flags,
                                                               message):
    (tmp_path / "data.csv").write_text("filepath,caption\na.png,x\n")
    err = _run(["train", "--train-data", str(tmp_path / "data.csv"), "--max-steps", "1",
                "--output-dir", str(tmp_path / "run"), "--no-progress", *flags], capsys)
    assert message in err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_an_output_dir_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("filepath,caption\na.png,x\n")
    (tmp_path / "run").write_text("a file")
    err = _run(["train", "--train-data", str(tmp_path / "data.csv"), "--max-steps", "1",
                "--output-dir", str(tmp_path / "run"), "--device", "cpu"], capsys)
    assert f"{tmp_path / 'run'}: exists and is not a directory" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="no CUDA GPU is available here"):
        check_device("cuda")


def test_devices_this_machine_has():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device name"):
        check_device("gpu0")


@pytest.mark.parametrize("argv", [
    ["zeroshot", "m", "--data", "d", "--eval-batch-size", "0"],
    ["caption", "m", "--images", "d", "--out", "o.jsonl", "--batch-size", "-2"],
    ["caption", "m", "--images", "d", "--out", "o.jsonl", "--num-beams", "0"],
    ["convert", "--from", "vlp", "--to", "hf", "--image-size", "0", "a", "b"],
    ["eval", "m", "--zeroshot-data", "d", "--eval-batch-size", "0"],
])
def test_sizes_below_one_are_refused(argv, capsys):
    try:  # argparse refuses a flag's value (exit 2), the config a field's (returns 2)
        code = main(argv)
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err
    assert "expected an integer >= 1" in err or "batch_size=0" in err


def test_image_batches_refuse_a_batch_size_below_one():
    for size in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="batch_size"):
            image_batches(["a.png"], lambda image: image, batch_size=size)


def test_unknown_capfilt_stages_are_refused(tmp_path, capsys):
    err = _run(["capfilt", "run", "--stages", "caption,filterr", "--out", str(tmp_path)], capsys)
    assert "filterr" in err


@pytest.mark.parametrize("value, valid, ok", [
    (0.5, "beta", True), (1.0, "beta", False), (1.0, "probability", True),
    (float("nan"), "non_negative", False), (True, "positive_count", False),
    (3, "positive", True), (0, "count", True), (2.0, "count", False),
])
def test_ranges(value, valid, ok):
    assert (range_error(value, valid) is None) == ok


@pytest.mark.parametrize("change, field, expected", [
    ({"vision": {"width": 10**9}}, "vision.width", "an integer in [1, 32768]"),
    ({"text": {"layers": -1}}, "text.layers", "an integer in [1, 1024]"),
    ({"text": {"vocab_size": 0}}, "text.vocab_size", "an integer in [1, 4194304]"),
    ({"vision": {"patch_dropout": 2.0}}, "vision.patch_dropout", "a number in [0, 1]"),
    ({"embed_dim": 10**12}, "embed_dim", "an integer in [1, 32768]"),
])
def test_absurd_model_config_sizes_are_refused_before_allocation(tmp_path, capsys, change,
                                                                 field, expected):
    import vlp
    from vlp.config import config_to_dict, get_preset

    data = config_to_dict(get_preset("clip-tiny"))
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(VlpError, match=re.escape(f"config.json.{field}=")):
        vlp.load(model_dir)
    overrides = json.dumps(change)
    err = _run(["train", "--model", "clip-tiny", "--model-overrides", overrides, "--train-data",
                str(tmp_path / "none.csv"), "--output-dir", str(tmp_path / "run"),
                "--max-steps", "1"], capsys)
    assert f"{field}=" in err and expected in err


@pytest.mark.parametrize("argv", [
    ["serve", "MODEL", "--device", "tpu"],
    ["embed", "MODEL", "--images", "IMAGES", "--out", "OUT.npy", "--device", "tpu"],
    ["embed", "MODEL", "--images", "IMAGES", "--out", "OUT_DIR", "--device", "tpu"],
    ["search", "INDEX", "--text", "a cat", "--device", "tpu"],
    ["report", "RUN", "--device", "tpu"],
])
def test_device_is_checked_by_serve_embed_search_and_report(tmp_path, capsys, argv):
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    assert "device='tpu': not a device name" in _run(argv, capsys)


def test_embed_one_file_reads_the_sources_its_help_names(tmp_path):
    import numpy as np
    from PIL import Image

    import vlp

    model = vlp.create_model("clip-tiny")
    vlp.save(model, tmp_path / "model")
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.csv").write_text("filepath\n0.png\n1.png\n2.png\n")
    (tmp_path / "list.jsonl").write_text("".join(f'{{"image": "{i}.png"}}\n' for i in range(3)))
    for data in ("list.csv", "list.jsonl"):
        out = tmp_path / f"{data}.npy"
        assert main(["embed", str(tmp_path / "model"), "--images", str(tmp_path / data),
                     "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
        assert np.load(out).shape[0] == 3
