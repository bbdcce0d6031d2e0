"""`vlp.caption.caption`: JSONL of one caption per image from a checkpoint or a model."""

import json
import logging

import pytest
import torch
from PIL import Image

import vlp
from vlp.caption import caption
from vlp.config import get_preset
from vlp.errors import ConfigError
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer

CAPTIONS = ["a red circle", "a blue square", "a green star", "two red circles"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16)
    config = get_preset("coca-tiny")
    config.embed_dim, config.caption_queries, config.pooler_heads = 32, 4, 2
    config.decoder_layers, config.decoder_heads = 1, 2
    v = config.vision
    v.image_size, v.patch_size, v.width, v.layers, v.heads = 32, 16, 32, 1, 2
    t = config.text
    t.width, t.layers, t.heads, t.context_length = 32, 1, 2, 16
    t.vocab_size = tokenizer.vocab_size
    t.pad_id, t.bos_id, t.eos_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    directory = tmp_path_factory.mktemp("coca") / "model"
    vlp.save(build_model(config), directory, tokenizer=tokenizer)
    return directory


def write_images(directory, broken: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48, 40), colour).save(directory / f"{i}.png")
    if broken:
        (directory / "broken.jpg").write_bytes(b"\xff\xd8 truncated")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_directory_from_checkpoint_skips_unreadable(checkpoint, tmp_path, caplog):
    write_images(tmp_path / "images")
    out = tmp_path / "out" / "captions.jsonl"
    with caplog.at_level(logging.WARNING, logger="vlp.caption"):
        path = caption(checkpoint, tmp_path / "images", out, batch_size=2, max_new_tokens=5,
                       num_beams=2, progress=False)
    assert path == out
    rows = read_jsonl(out)
    assert [r["image"] for r in rows] == [str(tmp_path / "images" / f"{i}.png")
                                          for i in range(3)]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "skipped 1 unreadable" in caplog.text
    assert not [p for p in out.parent.iterdir() if p.name != "captions.jsonl"]  # no temp left


def test_caption_csv_with_a_model_matches_the_checkpoint_run(checkpoint, tmp_path):
    write_images(tmp_path, broken=False)
    # an image list with no caption column, one image listed twice: captioned once
    (tmp_path / "list.csv").write_text("filepath\n0.png\n1.png\n0.png\n")
    model, tokenizer = vlp.load(checkpoint), vlp.load_tokenizer(checkpoint)
    out = caption(model, tmp_path / "list.csv", tmp_path / "a.jsonl", tokenizer=tokenizer,
                  max_new_tokens=5, num_beams=1, progress=False)
    rows = read_jsonl(out)
    assert [r["image"] for r in rows] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    again = caption(checkpoint, [str(tmp_path / "0.png"), str(tmp_path / "1.png")],
                    tmp_path / "b.jsonl", max_new_tokens=5, num_beams=1, progress=False)
    assert [r["caption"] for r in read_jsonl(again)] == [r["caption"] for r in rows]


def test_caption_model_needs_a_tokenizer(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        caption(vlp.load(checkpoint), tmp_path, tmp_path / "x.jsonl", progress=False)


def test_missing_or_unknown_images_name_the_kinds_caption_accepts(tmp_path):
    from vlp.caption import resolve_images
    from vlp.cli import build_parser
    from vlp.errors import DataError

    with pytest.raises(DataError, match=r"missing_dir: no such image directory or data file$"):
        resolve_images(str(tmp_path / "missing_dir"))
    (tmp_path / "odd.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell the data format") as refused:
        resolve_images(str(tmp_path / "odd.bin"))
    parser = build_parser()
    caption_parser = parser._subparsers._group_actions[0].choices["caption"]
    kind = next(a for a in caption_parser._actions if a.dest == "kind")
    assert str([k for k in kind.choices if k != "auto"]) in str(refused.value)


def test_eval_and_caption_count_samples_lost_to_a_truncated_shard(checkpoint, tmp_path, caplog):
    import io
    import tarfile

    from vlp.data import WebDatasetSource
    from vlp.eval.captioning import caption_eval
    from vlp.eval.retrieval import retrieval_eval

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, colour, text in zip("abc", ["red", "blue", "green"], CAPTIONS):
            image = io.BytesIO()
            Image.new("RGB", (40, 40), colour).save(image, "PNG")
            for ext, data in (("png", image.getvalue()), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = shard.read_bytes()
    cut = data.rindex(b"c.png") + 512 + 20  # inside c's image
    shard.write_bytes(data[:cut])
    model, tokenizer = vlp.load(checkpoint), vlp.load_tokenizer(checkpoint)
    lost = [f"{shard}#c"]
    captioned = caption_eval(model, tokenizer, WebDatasetSource(shard), batch_size=2,
                             max_new_tokens=3, num_beams=1, progress=False)
    assert captioned["num_images"] == 2 and captioned["skipped"] == lost
    assert captioned["num_skipped"] == 1
    retrieved = retrieval_eval(model, tokenizer, WebDatasetSource(shard), batch_size=2,
                               progress=False)
    assert retrieved["num_images"] == 2 and retrieved["skipped"] == lost
    with caplog.at_level(logging.WARNING, logger="vlp.caption"):
        out = caption(checkpoint, shard, tmp_path / "captions.jsonl", batch_size=2,
                      max_new_tokens=3, num_beams=1, progress=False)
    assert len(read_jsonl(out)) == 2
    assert f"skipped 1 unreadable (first: {shard}#c: truncated_shard)" in caplog.text
