"""Validation at the boundaries: every file vlp reads is UTF-8 (a BOM allowed) or a DataError
naming the file, line and byte; CSVs are strict; JSON depth and size are bounded; images are
opened only when they are regular files, high bit depths are scaled, EXIF orientation applied;
a class folder without images is refused."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from vlp.config import load_config
from vlp.data import build_source, open_image
from vlp.data.qa import read_qa_jsonl
from vlp.data.text import TextCorpus
from vlp.data.webdataset import _stats_count
from vlp.errors import CheckpointError, ConfigError, DataError
from vlp.store import read_json_object
from vlp.train.checkpoint import load_checkpoint

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    return "a.png"


CSV_CASES = [
    # (file bytes, options, error pattern)
    (b"filepath,caption\n\"a.png,one\nb.png,two\nc.png,three\n", {},
     r"data.csv:2: not a well-formed CSV row \(a quote opened here is never closed\)"),
    (b"filepath,caption\n\"a.png\"x,one\n", {}, r"data.csv:2: not a well-formed CSV row"),
    (b"filepath,caption,caption\na.png,one,two\n", {},
     r"data.csv:1: the header names column\(s\) \['caption'\] more than once"),
    (b"filepath,caption\na.png," + b"x" * 140_000 + b"\n", {},
     r"data.csv:2: .*a field longer than 131072 characters"),
    (b"filepath,caption\na.png,one\nb.png,caf\xe9\n", {},
     r"data.csv:3: not UTF-8 text: byte 0xe9 at column 10"),
    ("filepath,caption\na.png,one\n".encode("utf-16"), {},
     r"data.csv:1: not UTF-8 text: byte 0xff at column 1 \(it looks like UTF-16\)"),
    (b"filepath,caption\na.png,one\n", {"separator": ";;"},
     r"separator ';;': expected one character"),
]


@pytest.mark.parametrize("content, options, error", CSV_CASES)
def test_csv_files_are_read_strictly(tmp_path, image, content, options, error):
    (tmp_path / "data.csv").write_bytes(content)
    with pytest.raises((DataError, ConfigError), match=error):
        build_source("csv", tmp_path / "data.csv", **options)


def test_a_csv_with_a_bom_and_quoted_line_breaks_reads(tmp_path, image):
    (tmp_path / "data.csv").write_bytes(b"\xef\xbb\xbffilepath,caption\r\n"
                                        b"a.png,\"two\r\nlines, \"\"quoted\"\"\"\r\n")
    source = build_source("csv", tmp_path / "data.csv")
    assert len(source) == 1 and source[0].text == 'two\r\nlines, "quoted"'


JSONL_CASES = [
    (b'{"image": "a.png", "caption": "one"}\n{"image": "a.png", "caption": "d\xc3"}\n',
     r"data.jsonl:2: not UTF-8 text: byte 0xc3 at column 33"),
    (b'{"image": "a.png", "caption": "\\ud800"}\n',
     r"data.jsonl:1: 'caption': text holds '\\ud800', half of a surrogate pair"),
    (('{"image": "a.png", "caption": ' + DEEP + "}\n").encode(),
     r"data.jsonl:1: JSON nested too deeply"),
    (b'{"image": ["a.png"], "caption": "one"}\n', r"data.jsonl:1: 'image' should be a string"),
]


@pytest.mark.parametrize("content, error", JSONL_CASES)
def test_jsonl_rows_name_the_line_and_byte(tmp_path, image, content, error):
    (tmp_path / "data.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=error):
        build_source("jsonl", tmp_path / "data.jsonl")


def test_jsonl_with_a_bom_reads(tmp_path, image):
    (tmp_path / "data.jsonl").write_bytes(b'\xef\xbb\xbf{"image": "a.png", "caption": "one"}\n')
    assert build_source("jsonl", tmp_path / "data.jsonl")[0].text == "one"


COCO_CASES = [
    ({"images": [{"id": [1], "file_name": "a.png"}], "annotations": []},
     r"images\[0\].id is a list; expected an integer or a string"),
    ({"images": [{"id": 1, "file_name": 7}], "annotations": []},
     r"images\[0\].file_name is 7; expected a file name"),
    ({"images": [{"id": 1, "file_name": "a.png"}],
      "annotations": [{"image_id": [1], "caption": "x"}]},
     r"annotations\[0\] refers to image_id \[1\]"),
]


@pytest.mark.parametrize("data, error", COCO_CASES)
def test_coco_ids_and_file_names_are_checked(tmp_path, image, data, error):
    (tmp_path / "coco.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=error):
        build_source("coco", tmp_path / "coco.json")


@pytest.mark.parametrize("content, error", [
    (DEEP.encode(), "nested too deeply"), (b'{"images": "\xff"}', "not UTF-8 text"),
])
def test_coco_json_that_is_no_coco_json(tmp_path, content, error):
    (tmp_path / "coco.json").write_bytes(content)
    with pytest.raises(DataError, match=error):
        build_source("coco", tmp_path / "coco.json")


def test_text_lists_corpora_and_qa_rows(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(b"one\ntwo \xff\n")
    with pytest.raises(DataError, match=r"corpus.txt:2: not UTF-8 text: byte 0xff at column 5"):
        TextCorpus(tmp_path / "corpus.txt")
    (tmp_path / "corpus.jsonl").write_bytes(b'{"text": "\\udfff"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:1: 'text': text holds"):
        TextCorpus(tmp_path / "corpus.jsonl")
    (tmp_path / "qa.jsonl").write_text('{"image": "a.png", "question": ["q"], "answer": "a"}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: 'image', 'question' and every answer"):
        read_qa_jsonl(tmp_path / "qa.jsonl")


@pytest.mark.parametrize("content, error", [
    (b"\xff\xfe{}", "not UTF-8 text"), (DEEP.encode(), "JSON nested too deeply"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_model_configs_and_training_state(tmp_path, content, error):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=f"config.json: {error}"):
        load_config(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json: (not readable|JSON nested|expected)"):
        read_json_object(tmp_path / "config.json", CheckpointError)


@pytest.mark.parametrize("state, error", [
    ({"version": 2}, "train_state.json: missing"),
    ({"version": 2, "step": "3", "epoch": 0, "rng": [], "extra": {}, "data": None,
      "scheduler": None}, "train_state.json: step is a str"),
])
def test_a_damaged_train_state_is_a_checkpoint_error(tmp_path, state, error):
    from test_checkpoint import training_objects
    from vlp.train.checkpoint import save_checkpoint

    model, optimizer, scheduler = training_objects()
    directory = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer,
                                scheduler=scheduler)
    (directory / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=error):
        load_checkpoint(tmp_path, model, optimizer, scheduler)


def test_stats_files_that_are_not_json_give_no_count(tmp_path):
    for content in (b"\xff\xfe\x00", DEEP.encode(), b"[1]", b'{"successes": -4}'):
        (tmp_path / "shard_stats.json").write_bytes(content)
        assert _stats_count(str(tmp_path / "shard.tar")) is None


# ---------------------------------------------------------------------------------------------
# images


def test_a_named_pipe_is_skipped_never_opened(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    result = []
    reader = threading.Thread(target=lambda: result.append(open_image(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert result == ["not_a_file"]  # a hang leaves it empty
    assert open_image(str(tmp_path)) == "missing_image"


@pytest.mark.parametrize("array, fmt", [
    (np.full((6, 6), 32768, np.uint16), "PNG"),  # 16-bit grey: PIL alone gives white
    (np.full((6, 6), 0.5, np.float32), "TIFF"),  # 32-bit float: PIL alone gives black
    (np.full((6, 6), 1 << 30, np.int32), "TIFF"),  # 32-bit integer
])
def test_high_bit_depth_images_are_scaled(tmp_path, array, fmt):
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(array).save(path, fmt)
    opened = open_image(str(path))
    assert opened.mode == "RGB" and abs(opened.getpixel((0, 0))[0] - 128) <= 1


def test_exif_orientation_is_applied_unless_switched_off(tmp_path):
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    wide.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = open_image(str(tmp_path / "photo.jpg"))
    assert upright.size == (20, 40)
    top = upright.getpixel((10, 5))
    assert top[0] > 200 and top[2] < 60  # the red half is on top once turned
    assert open_image(str(tmp_path / "photo.jpg"), exif_orientation=False).size == (40, 20)


def test_an_empty_class_folder_is_refused(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "1.png")
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class directories \['dog'\] hold no images"):
        build_source("imagefolder", tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "1.png")
    assert len(build_source("imagefolder", tmp_path)) == 2
