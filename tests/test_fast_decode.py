"""`--fast-decode` (reduced-scale JPEG decoding, `ImageTransform.draft_size`) on every command
that reads images for inference: off by default (the exact preprocessing), and when on, what a
command gives equals the Python API's ``image_transform(model, train=False, fast_decode=True)``
on the same file, and differs from the exact path's (`vlp serve --fast-decode`: in
tests/test_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlp
from photos import photo_jpeg  # tests/photos.py
from vlp.cli import build_parser, main
from vlp.cliargs import config_from_args
from vlp.data.images import read_images
from vlp.eval.embed import embed_images, load_embeddings
from vlp.tokenizers import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# every command that reads images for inference
COMMANDS = {
    "eval": ["ckpt", "--zeroshot-data", "d"],
    "zeroshot": ["ckpt", "--data", "d"],
    "caption": ["ckpt", "--images", "d", "--out", "o.jsonl"],
    "embed": ["ckpt", "--images", "d", "--out", "o.npy"],
    "search": ["index", "--image", "q.jpg"],
    "serve": ["ckpt"],
    "benchmark": ["ckpt", "--task", "zeroshot", "--format", "imagefolder", "--root", "d"],
    "capfilt": ["caption", "--out", "o"],
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast_decode")
    tokenizer = train_tokenizer(["a red circle", "a blue square", "a photo"] * 8,
                                vocab_size=300, context_length=32)
    torch.manual_seed(0)
    return vlp.save(vlp.create_model("clip-tiny"), root / "clip", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An image folder of 1024x768 JPEGs, two classes."""
    root = tmp_path_factory.mktemp("photos")
    for index, name in enumerate(["circle", "square", "circle", "square"]):
        (root / name).mkdir(exist_ok=True)
        (root / name / f"{index}.jpg").write_bytes(photo_jpeg(index))
    return root


def library_embeddings(model, images: list, fast_decode: bool) -> torch.Tensor:
    """``encode_image`` of the images read with the Python API's eval transform."""
    transform = vlp.image_transform(model, train=False, fast_decode=fast_decode)
    batch = read_images(images, transform)
    assert not batch.unreadable
    with torch.no_grad():
        return model.encode_image(batch.pixels)


def test_every_inference_command_takes_fast_decode_off_by_default():
    parser = build_parser()
    for command, argv in COMMANDS.items():
        for extra, expected in (([], False), (["--fast-decode"], True),
                                (["--fast-decode", "--no-fast-decode"], False)):
            args = parser.parse_args([command, *argv, *extra])
            value = vars(args)["eval.fast_decode" if command == "eval" else "fast_decode"]
            assert value is expected, (command, extra)
    # the flag reaches the configs built from the parsed flags
    from vlp.benchmarks.tasks import BenchmarkTask
    from vlp.capfilt import CapfiltConfig
    from vlp.cli import _eval_spec

    args = parser.parse_args(["eval", *COMMANDS["eval"], "--fast-decode"])
    assert _eval_spec(args, progress=False).fast_decode
    args = parser.parse_args(["benchmark", *COMMANDS["benchmark"], "--fast-decode"])
    assert config_from_args(BenchmarkTask, args, num_workers=0).fast_decode
    args = parser.parse_args(["capfilt", *COMMANDS["capfilt"], "--fast-decode"])
    assert config_from_args(CapfiltConfig, args).fast_decode


def test_python_entry_points_take_fast_decode(clip_dir, photos):
    model = vlp.load(clip_dir).eval()
    assert vlp.image_transform(model).draft_size is None
    assert vlp.image_transform(model, fast_decode=True).draft_size == 64
    from vlp.factory import load_model_and_transforms

    assert load_model_and_transforms(clip_dir)[2].draft_size is None
    assert load_model_and_transforms(clip_dir, fast_decode=True)[2].draft_size == 64
    files = sorted(photos.rglob("*.jpg"))
    fast = embed_images(model, files, fast_decode=True, progress=False).embeddings
    expected = torch.nn.functional.normalize(library_embeddings(model, files, True), dim=-1)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0)
    exact = embed_images(model, files, progress=False).embeddings
    assert (fast - exact).abs().max() > 1e-4


def test_embed_and_zeroshot_commands_with_and_without_fast_decode(clip_dir, photos, tmp_path,
                                                                  capsys):
    model = vlp.load(clip_dir).eval()
    found = {}
    for fast in (False, True):
        out = tmp_path / f"fast_{fast}.safetensors"
        assert main(["embed", str(clip_dir), "--images", str(photos), "--out", str(out),
                     "--num-workers", "0", "--no-progress",
                     *(["--fast-decode"] if fast else [])]) == 0
        assert json.loads(capsys.readouterr().out)["count"] == 4
        embeddings, ids = load_embeddings(out)
        expected = library_embeddings(model, ids, fast_decode=fast)
        expected = torch.nn.functional.normalize(expected, dim=-1)
        torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)
        found[fast] = embeddings
    assert (found[True] - found[False]).abs().max() > 1e-4  # the flag did change the decoding

    for command in (["zeroshot", str(clip_dir), "--data", str(photos)],
                    ["eval", str(clip_dir), "--zeroshot-data", str(photos)]):
        for fast in (False, True):
            assert main([*command, "--num-workers", "0", "--no-progress",
                         *(["--fast-decode"] if fast else [])]) == 0
            answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert answer["num_images"] == 4
            assert answer.get("fast_decode", False) is fast  # said only when on


def test_resumable_outputs_record_fast_decode_and_refuse_the_other_decoding(clip_dir, photos,
                                                                           tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="vlp embed's parts need pyarrow (the faiss extra)")
    out = tmp_path / "emb"
    argv = ["embed", str(clip_dir), "--images", str(photos), "--out", str(out),
            "--num-workers", "0", "--no-progress"]
    assert main([*argv, "--fast-decode"]) == 0
    assert json.loads((out / "embed.json").read_text())["fast_decode"] is True
    capsys.readouterr()
    assert main(argv) == 2  # the exact decoding may not resume a fast-decoded directory
    error = capsys.readouterr().err
    assert "fast_decode" in error and "other settings" in error

    from vlp.capfilt import CapfiltConfig
    from vlp.capfilt.stages import caption_settings, filter_settings

    blip = vlp.save(vlp.create_model("blip-tiny"), tmp_path / "blip")
    for fast in (False, True):  # recorded only when on: older outputs resume as they were
        cfg = CapfiltConfig(out=str(tmp_path / "cf"), captioner=str(blip), filter=str(blip),
                            fast_decode=fast)
        for settings in (caption_settings(cfg), filter_settings(cfg)):
            assert settings.get("fast_decode", False) is fast
