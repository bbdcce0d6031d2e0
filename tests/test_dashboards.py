"""`vlp train --report-to tensorboard,wandb`: the scalars of log.jsonl in TensorBoard's event
file (read with TensorBoard's EventAccumulator) and in W&B's offline run file (read with W&B's
own record protobufs), step for step."""

import glob
import json
import struct

import pytest

from vlp.cli import main
from vlp.errors import ConfigError
from vlp.run import train
from vlp.train import TrainConfig
from vlp.train.config import check_config

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"embed_dim": 32,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"vocab_size": 320, "context_length": 12, "width": 32, "layers": 1, "heads": 2}}


def wandb_history(run_dir) -> list[dict[str, float]]:
    """The history rows of the offline run's ``.wandb`` file: a LevelDB-style log (32 KiB
    blocks of chunks with a 7-byte header) of W&B ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    rows, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def expected_scalars(records):
    """tag -> {step: value} as the dashboards should hold them, from log.jsonl."""
    tags: dict[str, dict[int, float]] = {}
    for record in records:
        if "eval" in record:
            items = {f"eval/{k}": v for k, v in record["eval"].items()}
        elif record.get("end_of_epoch"):
            items = {"epoch/epoch": record["epoch"], "epoch/skipped_total":
                     record["skipped_total"]}
        else:
            items = {f"train/{k}": v for k, v in record.items() if k != "step"}
        for tag, value in items.items():
            tags.setdefault(tag, {})[record["step"]] = value
    return tags


@pytest.fixture(scope="module")
def run(synthetic_train_csv, tmp_path_factory):
    data = str(synthetic_train_csv(10))
    out = tmp_path_factory.mktemp("dash") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "vlp-test")
        train(TrainConfig(model="clip-tiny", model_overrides=TINY, train_data=data,
                          val_data=data, output_dir=str(out), batch_size=4, max_steps=5,
                          eval_every=2, num_workers=0, progress=False,
                          report_to="tensorboard,wandb"))
    return out


def test_tensorboard_holds_every_scalar_of_the_log(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    expected = expected_scalars(records)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/data_s", "eval/val_loss",
            "epoch/skipped_total"} <= set(expected)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        logged = {event.step: event.value for event in events.Scalars(tag)}
        assert logged == pytest.approx(values, rel=1e-6), tag
    assert sorted(expected["eval/val_loss"]) == [2, 4, 5]
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5]


def test_wandb_offline_run_holds_every_scalar_of_the_log(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    expected = expected_scalars(records)
    rows = wandb_history(run)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5]  # one row per optimizer step
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                logged.setdefault(key, {})[row["_step"]] = value
    assert set(logged) == set(expected)
    for tag, values in expected.items():
        assert logged[tag] == pytest.approx(values, rel=1e-9), tag
    assert (run / "wandb-run-id").read_text().strip() in str(
        next((run / "wandb").glob("offline-run-*")))


def test_unknown_dashboard_is_a_config_error(synthetic_train_csv, tmp_path, capsys):
    cfg = TrainConfig(train_data="x.csv", max_steps=1, report_to="tensorboard,mlflow")
    with pytest.raises(ConfigError, match=r"report_to=.*unknown \['mlflow'\]"):
        check_config(cfg)
    assert main(["train", "--train-data", str(synthetic_train_csv(10)), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "r"), "--report-to", "tensorbord"]) == 2
    error = capsys.readouterr().err
    assert "tensorbord" in error and "['tensorboard', 'wandb']" in error
    assert not (tmp_path / "r").exists()
