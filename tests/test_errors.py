"""One error path: a user's mistake is one line on stderr (`vlp: error: ...`, exit 2), with the
traceback only under --debug or VLP_DEBUG=1; weight files that would run code are refused in
one line."""

from __future__ import annotations

import os

import pytest
import torch

from vlp.cli import main
from vlp.errors import CheckpointError
from vlp.store import read_state_dict


class Payload:
    """A pickle that would run a command when loaded."""

    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


@pytest.fixture
def malicious(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"visual.proj": Payload()}}, path)
    return path


def test_a_malicious_pickle_is_refused_in_one_line(tmp_path, malicious, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(malicious)
    message = str(caught.value)
    assert "\n" not in message and "weights_only=False" not in message
    assert message.startswith(f"{malicious}: refused: loading it would run code")
    assert "posix.system" in message
    assert main(["convert", "--from", "lavis", "--to", "vlp", str(malicious),
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlp: error: ") and err.count("\n") == 1 and "refused" in err
    assert not (tmp_path / "owned.txt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("state, message", [
    ({1: torch.zeros(2)}, "entry 1 is a int key"),
    ({"a": 3}, "entry 'a' is a str key to a int"),
])
def test_weight_files_with_other_than_named_tensors_are_refused(tmp_path, state, message):
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(tmp_path / "w.pt")


def test_garbage_weights_name_the_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="w.bin: not a readable weights-only torch file"):
        read_state_dict(tmp_path / "w.bin")


@pytest.mark.parametrize("how", ["plain", "--debug", "VLP_DEBUG"])
def test_debug_shows_the_traceback(tmp_path, malicious, how, capsys, monkeypatch):
    monkeypatch.setenv("VLP_DEBUG", "1" if how == "VLP_DEBUG" else "0")
    argv = ["convert", "--from", "lavis", "--to", "vlp", str(malicious), str(tmp_path / "o")]
    assert main((["--debug"] if how == "--debug" else []) + argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlp: error: ") and "refused" in last
    if how == "plain":
        assert err.count("\n") == 1
    else:
        assert "Traceback (most recent call last)" in err and "read_state_dict" in err


def _image_folder(root):
    from PIL import Image

    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / name / "0.png")
    return root


def test_an_image_folder_as_training_data_with_a_tokenizer_is_one_line(tmp_path, capsys):
    from vlp.tokenizers import train_tokenizer

    train_tokenizer(["a cat", "a dog"], vocab_size=300, context_length=16).save(tmp_path / "tok")
    folder = _image_folder(tmp_path / "folder")
    code = main(["train", "--model", "clip-tiny", "--train-data", str(folder), "--tokenizer",
                 str(tmp_path / "tok"), "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"train_data: {folder} holds images without captions" in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_an_empty_shard_says_the_training_data_is_empty(tmp_path, capsys):
    import tarfile

    shard = tmp_path / "empty-000000.tar"
    tarfile.open(shard, "w").close()
    code = main(["train", "--model", "clip-tiny", "--train-data", str(shard), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "train_tokenizer" not in err
    assert f"{shard}: the training data holds no captions (no samples" in err
