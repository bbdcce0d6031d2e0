"""The `vlp` command: help for every subcommand, one-line errors on bad input, and the
commands run end to end on a small synthetic dataset."""

import argparse
import dataclasses
import json

import pytest

from vlp.capfilt import CapfiltConfig
from vlp.cli import build_parser, main
from vlp.cliargs import config_from_args
from vlp.train.config import TrainConfig

SUBCOMMANDS = [["data", "synth"], ["train"], ["eval"], ["zeroshot"], ["embed"], ["caption"],
               ["convert"], ["demo"], ["capfilt"], ["models"], ["serve"], ["benchmark"],
               ["report"], ["index"], ["search"]]


def test_every_subcommand_is_covered_by_the_help_test():
    registered = set(build_parser()._subparsers._group_actions[0].choices)
    assert registered == {words[0] for words in SUBCOMMANDS}


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w))
def test_every_subcommand_explains_its_arguments(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: vlp " + " ".join(words) in text
    assert "--" in text  # at least one documented option
    actions = build_parser()._subparsers._group_actions[0].choices
    assert words[0] in actions


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line, no traceback
    return err[0]


# the flags of `vlp train` and `vlp capfilt` are the fields of their config dataclasses
CONFIG_COMMANDS = [(TrainConfig, ["train", "--train-data", "d.csv"], {"train_data": "d.csv"}),
                   (CapfiltConfig, ["capfilt", "caption", "--out", "o"], {"out": "o"})]


def _subparser(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize(("cls", "argv", "given"), CONFIG_COMMANDS,
                         ids=lambda v: getattr(v, "__name__", ""))
def test_every_config_field_is_a_flag_with_the_field_default(cls, argv, given):
    options = _subparser(argv[0])._option_string_actions
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        assert flag in options and options[flag].dest == field.name, flag
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
    cfg = config_from_args(cls, build_parser().parse_args(argv))
    assert cfg == cls(**given)


def test_train_flags_reach_the_config():
    args = build_parser().parse_args([
        "train", "--train-data", "d.csv", "--model-overrides", '{"text": {"layers": 2}}',
        "--betas", "0.8", "0.9", "--beta2", "0.95", "--keep", "5", "--no-accum-features",
        "--grad-checkpointing", "--min-lr-ratio", "0.1", "--log-every", "3", "--max-steps",
        "7", "--no-progress"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.model_overrides == {"text": {"layers": 2}}
    assert cfg.betas == (0.8, 0.95) and cfg.keep_last == 5 and cfg.max_steps == 7
    assert not cfg.accum_features and cfg.grad_checkpointing and not cfg.progress
    assert cfg.min_lr_ratio == 0.1 and cfg.log_every == 3
    assert config_from_args(TrainConfig, build_parser().parse_args(
        ["train", "--train-data", "d.csv", "--beta1", "0.5"])).betas == (0.5, 0.98)


def test_one_num_workers_default():
    args = [build_parser().parse_args(argv) for argv in (
        ["train", "--train-data", "d.csv"], ["capfilt", "write", "--out", "o"],
        ["eval", "ckpt"], ["embed", "ckpt", "--out", "e.npy"])]
    assert {a.num_workers for a in args} == {TrainConfig().num_workers}
    assert CapfiltConfig().num_workers == TrainConfig().num_workers


@pytest.mark.parametrize("value", ["{bad", "[1, 2]", '"text"'])
def test_model_overrides_must_be_a_json_object(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train-data", "d.csv", "--model-overrides", value])
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("vlp train: error: argument --model-overrides:")
    assert "expected a JSON object" in line


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train-data", "d.csv", "--precision", "fp8"])
    assert exit_info.value.code == 2
    assert "--precision" in _error_line(capsys)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "data"
    assert main(["data", "synth", "--out", str(out), "--train", "40", "--val", "8", "--test",
                 "24", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(synth_dir):
    run = synth_dir.parent / "run"
    code = main(["train", "--train-data", str(synth_dir / "train.csv"), "--output-dir", str(run),
                 "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "2",
                 "--num-workers", "0", "--no-progress",
                 "--retrieval-data", str(synth_dir / "test.csv"), "--eval-every", "2"])
    assert code == 0
    return run


def test_missing_file_is_one_line(tmp_path, capsys):
    code = main(["train", "--train-data", str(tmp_path / "nope.csv"), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    line = _error_line(capsys)
    assert "nope.csv" in line and line.startswith("vlp: error:")


def test_bad_column_names_the_column(synth_dir, tmp_path, capsys):
    code = main(["train", "--train-data", str(synth_dir / "train.csv"), "--caption-key", "title",
                 "--max-steps", "1", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    line = _error_line(capsys)
    assert "'title'" in line and "train.csv" in line and "filepath" in line


def test_unknown_preset_lists_the_known_ones(synth_dir, tmp_path, capsys):
    code = main(["train", "--model", "clip-huge", "--train-data", str(synth_dir / "train.csv"),
                 "--max-steps", "1", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    line = _error_line(capsys)
    assert "clip-huge" in line and "clip-tiny" in line


def test_wrong_image_size_for_a_fixed_size_model(trained_run, tmp_path, capsys):
    # clip-tiny has 16 px patches: 60 px cannot be served
    code = main(["convert", "--from", "vlp", "--to", "vlp", "--image-size", "60",
                 str(trained_run / "checkpoint-latest"), str(tmp_path / "out")])
    assert code == 2
    line = _error_line(capsys)
    assert "60" in line and "16" in line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_train_eval_zeroshot_embed_end_to_end(synth_dir, trained_run, tmp_path, capsys):
    capsys.readouterr()
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert any("eval" in r and "i2t_r1" in r["eval"] for r in log)

    assert main(["eval", str(trained_run), "--zeroshot-data",
                 str(synth_dir / "imagefolder" / "test"), "--retrieval-data",
                 str(synth_dir / "coco" / "captions_test.json"), "--image-root",
                 str(synth_dir / "images" / "test"), "--num-workers", "0",
                 "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "i2t_r10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_texts"] == 24

    assert main(["zeroshot", str(trained_run), "--data", str(synth_dir / "imagefolder" / "test"),
                 "--num-workers", "0", "--no-progress"]) == 0
    assert "zeroshot_top5" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na small blue star to the left of a green square\n")
    assert main(["embed", str(trained_run), "--texts", str(texts), "--out",
                 str(tmp_path / "t.safetensors"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2
    assert main(["embed", str(trained_run), "--images", str(synth_dir / "images" / "test"),
                 "--out", str(tmp_path / "i.npy"), "--num-workers", "0", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 24 and out["dim"] == 128


def test_resume_latest_through_the_cli(synth_dir, trained_run, capsys):
    code = main(["train", "--train-data", str(synth_dir / "train.csv"), "--output-dir",
                 str(trained_run), "--max-steps", "6", "--batch-size", "16",
                 "--checkpoint-every", "2", "--num-workers", "0", "--no-progress",
                 "--resume", "latest"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6


def test_caption_writes_one_line_per_image(synth_dir, tmp_path, capsys):
    import vlp
    from vlp.tokenizers import train_tokenizer

    model = vlp.create_model("coca-tiny")
    tok = train_tokenizer(["a red circle", "a small blue star"] * 10, vocab_size=300,
                          context_length=32)
    vlp.save(model, tmp_path / "coca", tokenizer=tok)
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "coca"), "--images", str(synth_dir / "test.csv"),
                 "--out", str(tmp_path / "caps.jsonl"), "--max-new-tokens", "4",
                 "--num-beams", "1", "--num-workers", "0", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 24
    rows = [json.loads(line) for line in (tmp_path / "caps.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(set(r) == {"image", "caption"} for r in rows)


def test_evaluation_flags_are_the_eval_spec_fields_on_eval_and_train():
    """`vlp eval` and `vlp train` take every EvalSpec flag; training's --batch-size and the
    evaluation's --eval-batch-size stay apart; caption decoding settings reach the spec."""
    from vlp.cli import EVAL_NOT_FLAGS, EVAL_PREFIX, _eval_spec
    from vlp.eval.suite import EvalSpec

    for command in ("eval", "train"):
        options = _subparser(command)._option_string_actions
        for field in dataclasses.fields(EvalSpec):
            if field.name in EVAL_NOT_FLAGS:
                continue
            flag = "--eval-batch-size" if field.name == "batch_size" else \
                "--" + field.name.replace("_", "-")
            assert options[flag].dest == EVAL_PREFIX + field.name, (command, flag)
    args = build_parser().parse_args([
        "train", "--train-data", "d.csv", "--batch-size", "8", "--eval-batch-size", "32",
        "--caption-data", "c.csv", "--num-beams", "3", "--min-new-tokens", "5",
        "--repetition-penalty", "1.15", "--early-stopping", "--itm-k", "16"])
    assert config_from_args(TrainConfig, args).batch_size == 8
    spec = _eval_spec(args, progress=False)
    assert (spec.batch_size, spec.caption_data, spec.min_new_tokens, spec.repetition_penalty,
            spec.early_stopping, spec.itm_k) == (32, "c.csv", 5, 1.15, True, 16)
    defaults = _eval_spec(build_parser().parse_args(["eval", "ckpt"]), progress=True)
    assert defaults == EvalSpec(num_workers=TrainConfig().num_workers,
                                retrieval_options=defaults.retrieval_options)
