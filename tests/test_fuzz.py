"""The fuzz suite: generated inputs to every reader and to the command line each end in success
or a VlpError, never another exception or a hang (each case runs under a time limit).

CI runs a fixed, derandomized set of examples per target (VLP_FUZZ_EXAMPLES, default 40);
`make fuzz` runs many more. Each test prints its outcome counts (run with -s to see them)."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlp.config import load_config
from vlp.data import build_source, open_image
from vlp.data.webdataset import _stats_count
from vlp.errors import VlpError
from vlp.store import read_state_dict
from vlp.train.checkpoint import load_checkpoint, save_checkpoint

EXAMPLES = int(os.environ.get("VLP_FUZZ_EXAMPLES", "40"))
CASE_SECONDS = 20  # a case that takes longer is a hang
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int = CASE_SECONDS) -> Iterator[None]:
    def expired(signum, frame):
        raise Hang(f"a case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(counts: Counter, run: Callable[[], object]) -> None:
    """Run one case: success or a VlpError, counted; anything else fails the test."""
    with time_limit():
        try:
            run()
        except VlpError:
            counts["vlp_error"] += 1
            return
    counts["success"] += 1


@pytest.fixture(scope="module")
def report():
    counts: dict[str, Counter] = {}
    yield lambda name: counts.setdefault(name, Counter())
    for name, counted in counts.items():
        print(f"fuzz {name}: {sum(counted.values())} cases, {dict(counted)}")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
CELLS = st.sampled_from(["a.png", "missing.png", "", "x", '"', '""', ",", "\t", "\n", "\r\n",
                         "caption", "filepath", "label", "é", "\ufeff", "\x00", "1", "-1",
                         "1.5"])
ROWS = st.lists(st.lists(CELLS, max_size=5).map(lambda cells: "".join(cells)), max_size=8)


def _iterate(source) -> None:
    for index in range(min(len(source), 16)):
        record = source[index]
        if isinstance(record.image, str) and record.image:
            open_image(record.image)


@FUZZ
@given(lines=ROWS, header=st.sampled_from(["filepath,caption", "filepath\tcaption",
                                            "filepath,caption,label", "caption", ""]),
       noise=st.binary(max_size=12), kind=st.sampled_from(["csv", "tsv"]),
       separator=st.sampled_from([None, ",", "\t", ";", ";;", ""]))
def test_csv_and_tsv(tmp_path_factory, report, lines, header, noise, kind, separator):
    root = tmp_path_factory.mktemp("csv")
    (root / "a.png").write_bytes(PNG)
    path = root / f"data.{kind}"
    path.write_bytes((header + "\n" + "\n".join(lines)).encode("utf-8", "surrogatepass")
                     + noise)
    options = {"separator": separator} if separator is not None else {}
    outcome(report("csv/tsv"), lambda: _iterate(build_source(kind, path, **options)))


@FUZZ
@given(rows=st.lists(JSON | st.fixed_dictionaries(
           {"image": st.sampled_from(["a.png", "", "missing.png"]) | JSON,
            "caption": st.text(max_size=10) | JSON}), max_size=6),
       noise=st.binary(max_size=12))
def test_jsonl(tmp_path_factory, report, rows, noise):
    root = tmp_path_factory.mktemp("jsonl")
    (root / "a.png").write_bytes(PNG)
    path = root / "data.jsonl"
    text = "\n".join(json.dumps(row) for row in rows)
    path.write_bytes(text.encode() + noise)
    outcome(report("jsonl"), lambda: _iterate(build_source("jsonl", path)))


@FUZZ
@given(data=st.fixed_dictionaries({
    "images": st.lists(JSON | st.fixed_dictionaries({"id": JSON, "file_name": JSON}),
                       max_size=4) | JSON,
    "annotations": st.lists(JSON | st.fixed_dictionaries({"image_id": JSON, "caption": JSON,
                                                          "id": JSON}), max_size=4) | JSON,
}) | JSON)
def test_coco(tmp_path_factory, report, data):
    path = tmp_path_factory.mktemp("coco") / "captions.json"
    path.write_text(json.dumps(data))
    outcome(report("coco"), lambda: build_source("coco", path).groups())


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(["cat", "dog", ".hidden", "a_b", "é"]),
                            st.lists(st.tuples(st.sampled_from(["1.png", "2.jpg", "x.txt",
                                                                "3.PNG", "sub/4.png"]),
                                               st.sampled_from([PNG, b"", b"\x89PNG",
                                                                PNG[:20]])),
                                     max_size=3), max_size=3),
       templates=st.none() | st.binary(max_size=20))
def test_image_folders(tmp_path_factory, report, tree, templates):
    root = tmp_path_factory.mktemp("folder")
    for class_dir, files in tree.items():
        (root / class_dir).mkdir()
        for name, payload in files:
            (root / class_dir / name).parent.mkdir(exist_ok=True)
            (root / class_dir / name).write_bytes(payload)
    if templates is not None:
        (root / "templates.txt").write_bytes(templates)
    outcome(report("image folders"), lambda: _iterate(build_source("imagefolder", root)))


@FUZZ
@given(members=st.lists(st.tuples(st.sampled_from(["s0.jpg", "s0.txt", "s1.png", "s1.json",
                                                   "s1.txt", "dir/s2.jpg", "s3", ".s4.txt"]),
                                  st.sampled_from([PNG, b"a caption", b'{"caption": "x"}',
                                                   b"\xff\xfe", b"[[[[", b""])),
                        max_size=6),
       cut=st.none() | st.integers(min_value=0, max_value=4000),
       stats=st.none() | st.binary(max_size=30) | JSON.map(lambda v: json.dumps(v).encode()))
def test_webdataset_tars_and_stats(tmp_path_factory, report, members, cut, stats):
    root = tmp_path_factory.mktemp("wds")
    shard = root / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if cut is not None:
        with open(shard, "r+b") as f:
            f.truncate(min(cut, shard.stat().st_size))
    if stats is not None:
        (root / "shard-000000_stats.json").write_bytes(stats)

    def read() -> None:
        count = _stats_count(str(shard))
        assert count is None or (isinstance(count, int) and count >= 0)
        source = build_source("wds", str(shard))
        for record in source:
            open_image(record.image)

    outcome(report("webdataset"), read)


@FUZZ
@given(data=JSON | st.dictionaries(st.sampled_from(["family", "embed_dim", "vision", "text",
                                                     "loss", "init_logit_scale"]),
                                    JSON | st.integers(-2**40, 2**40), max_size=6),
       raw=st.none() | st.binary(max_size=40))
def test_model_config_json(tmp_path_factory, report, data, raw):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    outcome(report("config.json"), lambda: load_config(path))


SIZES = st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 10**9])


PER_KIND = settings(FUZZ, max_examples=max(10, EXAMPLES // 4))  # targets with several kinds


@pytest.mark.parametrize("preset", ["clip-tiny", "coca-tiny", "blip-tiny", "simvlm-tiny",
                                    "gpt2-tiny", "siglip-tiny", "blip2-tiny"])
@PER_KIND
@given(vision=st.fixed_dictionaries({}, optional={
           "image_size": st.sampled_from([0, 8, 16, 17]), "patch_size": SIZES,
           "width": SIZES, "layers": SIZES, "heads": SIZES,
           "mlp_ratio": st.sampled_from([0.0, 0.5, 2.0, float("nan")]),
           "pool": st.sampled_from(["cls", "mean", "map", "none", "x"])}),
       text=st.fixed_dictionaries({}, optional={
           "vocab_size": SIZES, "context_length": SIZES, "width": SIZES, "layers": SIZES,
           "heads": SIZES, "pad_id": SIZES, "eos_id": SIZES}),
       top=st.dictionaries(st.sampled_from(["embed_dim", "decoder_layers", "decoder_heads",
                                            "caption_queries", "pooler_heads", "conv_blocks"]),
                           SIZES, max_size=2))
def test_model_configs_are_built(report, preset, vision, text, top):
    """A preset with generated sizes (tiny, or absurd: refused before allocation) is built."""
    import dataclasses

    import vlp
    from vlp.config import get_preset

    fields = {f.name for f in dataclasses.fields(get_preset(preset))}
    top = {key: value for key, value in top.items() if key in fields}
    overrides = {**top, **({"vision": vision} if vision and preset != "gpt2-tiny" else {}),
                 **({"text": text} if text else {})}
    outcome(report(f"model build ({preset})"), lambda: vlp.create_model(preset, **overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_checkpoint import training_objects

    model, optimizer, scheduler = training_objects()
    directory = save_checkpoint(tmp_path_factory.mktemp("checkpoint"), 1, model=model,
                                optimizer=optimizer, scheduler=scheduler)
    return directory, (directory / "train_state.json").read_bytes(), training_objects


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["version", "step", "epoch", "rng", "extra",
                                                "data", "scheduler"]), JSON, max_size=3),
       drop=st.lists(st.sampled_from(["step", "epoch", "rng", "extra"]), max_size=2))
def test_training_state_json(report, checkpoint, changes, drop):
    directory, original, training_objects = checkpoint
    state = {**json.loads(original), **changes}
    for key in drop:
        state.pop(key, None)
    (directory / "train_state.json").write_text(json.dumps(state))
    model, optimizer, scheduler = training_objects()
    try:
        outcome(report("train_state.json"),
                lambda: load_checkpoint(directory, model, optimizer, scheduler))
    finally:
        (directory / "train_state.json").write_bytes(original)


@FUZZ
@given(payload=st.binary(max_size=200), suffix=st.sampled_from([".pt", ".bin",
                                                                ".safetensors"]))
def test_weight_files(tmp_path_factory, report, payload, suffix):
    path = tmp_path_factory.mktemp("weights") / f"w{suffix}"
    path.write_bytes(payload)
    outcome(report("weight files"), lambda: read_state_dict(path))


NUMBERS = st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e400", "0.5", "1.5", "x",
                           "", "3", "2147483648"])
TRAIN_FLAGS = ["--lr", "--weight-decay", "--beta1", "--beta2", "--eps", "--grad-clip",
               "--batch-size", "--grad-accum", "--warmup-steps", "--min-lr-ratio",
               "--max-steps", "--epochs", "--text-ratio", "--keep", "--eval-batch-size",
               "--num-beams", "--device", "--separator", "--precision", "--itm-k"]


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), NUMBERS | st.sampled_from(
    ["cpu", "cuda", "tpu", ";;", "bf16"])), max_size=4))
def test_command_line_arguments(tmp_path_factory, report, capsys, flags):

    root = tmp_path_factory.mktemp("cli")
    argv = ["train", "--train-data", str(root / "absent.csv"), "--output-dir",
            str(root / "run"), "--no-progress", "--max-steps", "1"]
    for flag, value in flags:
        argv += [flag, value]

    outcome(report("command line"), lambda: _refused(argv, capsys))
    assert not (root / "run" / "log.jsonl").exists()


def _refused(argv: list[str], capsys) -> None:
    """Run the command line; it must end in one error line and exit 2 (argparse's refusal of a
    flag's value included), counted as a refusal."""
    from vlp.cli import main

    try:
        code = main(argv)
    except SystemExit as done:  # argparse's refusal of a flag's value
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err, err
    raise VlpError("refused")


COMMANDS = {  # a command line whose model does not exist, and the flags to fuzz
    "eval": (["eval", "{root}/absent-model", "--retrieval-data", "{root}/absent.csv"],
             ["--eval-batch-size", "--num-beams", "--max-new-tokens", "--min-new-tokens",
              "--repetition-penalty", "--itm-k", "--separator", "--retrieval-kind",
              "--vqa-mode", "--num-workers"]),
    "zeroshot": (["zeroshot", "{root}/absent-model", "--data", "{root}/absent-dir"],
                 ["--eval-batch-size", "--num-workers", "--classnames", "--templates"]),
    "caption": (["caption", "{root}/absent-model", "--images", "{root}/absent-dir", "--out",
                 "{root}/captions.jsonl"],
                ["--batch-size", "--num-beams", "--max-new-tokens", "--kind", "--separator",
                 "--num-workers"]),
    "convert": (["convert", "{root}/absent-model", "{root}/converted"],
                ["--from", "--to", "--image-size", "--tokenizer", "--config",
                 "--architecture"]),
}
VALUES = NUMBERS | st.sampled_from(["cpu", "vlp", "hf", "open_clip", "lavis", "csv", "wds",
                                    "rank", ";;", ""])


@pytest.mark.parametrize("command", sorted(COMMANDS))
@PER_KIND
@given(data=st.data())
def test_other_commands_arguments(tmp_path_factory, report, capsys, command, data):

    root = tmp_path_factory.mktemp("cli")
    base, names = COMMANDS[command]
    flags = data.draw(st.lists(st.tuples(st.sampled_from(names), VALUES), max_size=4))
    argv = [a.format(root=root) for a in base]
    for flag, value in flags:
        argv += [flag, value]

    outcome(report(f"command line ({command})"), lambda: _refused(argv, capsys))
    assert sorted(p.name for p in root.iterdir()) == []  # nothing written
