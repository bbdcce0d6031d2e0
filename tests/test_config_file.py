"""`vlp train --config FILE`: a JSON or YAML object of the training flags; flags beside it
override its values, and a run's own train_config.json reruns the run."""

import json
import sys

import pytest

from vlp.cli import build_parser, main
from vlp.cliargs import config_from_args
from vlp.train import TrainConfig

TINY = {"embed_dim": 16,
        "vision": {"image_size": 32, "patch_size": 16, "width": 16, "layers": 1, "heads": 2},
        "text": {"vocab_size": 300, "context_length": 12, "width": 16, "layers": 1, "heads": 2}}


def _flags(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _train_config(argv: list[str]) -> TrainConfig:
    return config_from_args(TrainConfig, build_parser().parse_args(["train", *argv]))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line, no traceback
    return err[0]


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _ran(run) -> dict:
    ran = json.loads((run / "train_config.json").read_text())
    ran.pop("output_dir")
    return ran


def test_config_file_runs_as_its_flags_and_train_config_json_reruns(
        synthetic_train_csv, tmp_path, one_thread, capsys):
    values = {"model": "clip-tiny", "model_overrides": TINY,
              "train_data": str(synthetic_train_csv(24)), "batch_size": 8, "max_steps": 3,
              "lr": 2e-3, "betas": [0.8, 0.95], "warmup_steps": 1, "grad_clip": None,
              "num_workers": 0, "progress": False, "seed": 5}
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({**values, "output-dir": str(tmp_path / "from_file")}))
    flags = {k: v for k, v in values.items() if v is not None}  # a None flag is its default
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", *_flags(flags), "--output-dir", str(tmp_path / "from_flags")]) == 0
    # the run's own record of its settings reruns it (into another directory)
    assert main(["train", "--config", str(tmp_path / "from_file" / "train_config.json"),
                 "--output-dir", str(tmp_path / "rerun")]) == 0
    capsys.readouterr()
    # grad_clip: None in the file is no clipping; its flag's default is 1.0
    assert _ran(tmp_path / "from_file")["grad_clip"] is None
    assert _ran(tmp_path / "from_flags")["grad_clip"] == 1.0
    assert {**_ran(tmp_path / "from_file"), "grad_clip": 1.0} == _ran(tmp_path / "from_flags")
    assert _ran(tmp_path / "rerun") == _ran(tmp_path / "from_file")
    losses = _losses(tmp_path / "from_file")
    assert len(losses) == 3
    assert _losses(tmp_path / "rerun") == losses


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_flags_override_the_file(tmp_path, suffix):
    config = tmp_path / ("recipe" + suffix)
    if suffix == ".json":
        config.write_text(json.dumps({"train_data": "a.csv", "lr": 0.1, "max_steps": 9,
                                      "retrieval_data": "t.csv", "eval_batch_size": 7,
                                      "accum_features": False}))
    else:
        config.write_text("train_data: a.csv\nlr: 0.1\nmax-steps: 9\nretrieval_data: t.csv\n"
                          "eval_batch_size: 7\naccum_features: false\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--lr", "0.5",
                                      "--eval-batch-size", "3"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.train_data, cfg.lr, cfg.max_steps, cfg.accum_features) == ("a.csv", 0.5, 9, False)
    assert vars(args)["eval.retrieval_data"] == "t.csv"  # evaluation flags too
    assert vars(args)["eval.batch_size"] == 3
    # flags given beside the file win, in any order
    args = build_parser().parse_args(["train", "--accum-features", "--config", str(config)])
    assert config_from_args(TrainConfig, args).accum_features is True


@pytest.mark.parametrize("text, expected", [
    ('{"train_data": "a.csv", "max_stepz": 3}', "unknown key 'max_stepz' (did you mean "
                                                 "'max_steps'?)"),
    ('{"train_data": "a.csv", "max_steps": "3"}', "max_steps='3': expected an integer"),
    ('{"train_data": "a.csv", "precision": "fp8"}', "precision='fp8': expected one of"),
    ('{"train_data": "a.csv", "betas": [0.9]}', "betas=[0.9]: expected a list of 2 values"),
    ('{"train_data": "a.csv", "model_overrides": [1]}', "model_overrides=[1]: expected an "
                                                        "object"),
    ('{"train_data": null}', "train_data=None: expected a value"),
    ('{"config": "other.json"}', "unknown key 'config'"),
    ("[1, 2]", "expected an object of option: value"),
    ("{", "not valid JSON"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, expected):
    config = tmp_path / "bad.json"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"vlp: error: {config}: ")
    assert expected in line


def test_yaml_without_pyyaml_names_the_extra_and_json_still_works(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    config = tmp_path / "recipe.yaml"
    config.write_text("train_data: a.csv\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "recipe.yaml: a YAML config (or the same keys as a JSON object) needs yaml, which " \
        "is not installed: pip install 'vlp[yaml]'" in _error_line(capsys)
    (tmp_path / "recipe.json").write_text('{"train_data": "a.csv", "max_steps": 2}')
    assert _train_config(["--config", str(tmp_path / "recipe.json")]).max_steps == 2


def test_a_missing_config_file_and_a_missing_train_data(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in _error_line(capsys)
    (tmp_path / "partial.json").write_text('{"max_steps": 2}')
    with pytest.raises(SystemExit) as exit_info:  # still required, from the file or a flag
        main(["train", "--config", str(tmp_path / "partial.json")])
    assert exit_info.value.code == 2
    assert "--train-data" in _error_line(capsys)
