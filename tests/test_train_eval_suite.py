"""`vlp train --eval-suite`: a benchmark suite run at every evaluation of a training run, its
numbers in log.jsonl and the progress line, its result files per evaluation, and a bad suite
refused before the first step."""

import json

import pytest

from vlp.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "data"
    assert main(["data", "synth", "--out", str(out), "--format", "csv", "--train", "32",
                 "--val", "0", "--test", "8", "--image-size", "32", "--no-progress"]) == 0
    return out


def _train(run, data, suite, *extra):
    return main(["train", "--model", "blip-tiny", "--model-overrides",
                 '{"objectives": ["lm"]}',  # a caption fine-tune: the LM loss alone
                 "--train-data", str(data / "train.csv"), "--output-dir", str(run),
                 "--max-steps", "4", "--batch-size", "8", "--eval-every", "2",
                 "--num-workers", "0", "--eval-suite", str(suite), *extra])


def test_a_blip_caption_fine_tune_logs_cider_per_evaluation(data, tmp_path, capsys, one_thread):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([
        {"task": "captioning", "format": "csv", "root": str(data / "test.csv"), "name": "coco",
         "num_beams": 1, "max_new_tokens": 5, "caption_backend": "vlp"},
        {"task": "retrieval", "format": "csv", "root": str(data / "test.csv")}]))
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(run, data, suite) == 0
    err = capsys.readouterr().err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every --eval-every steps and the end
    for record in evals:
        metrics = record["eval"]
        assert 0 <= metrics["coco/cider"] and 0 <= metrics["coco/bleu_4"] <= 1
        assert metrics["coco/num_images"] == 8
        assert 0 <= metrics["csv-test-retrieval/i2t_r1"] <= metrics["csv-test-retrieval/i2t_r10"]
        step_dir = run / "benchmarks" / f"step-{record['step']:07d}"
        rows = json.loads((step_dir / "coco_captions_results.json").read_text())
        assert len(rows) == 8 and set(rows[0]) == {"image_id", "caption"}
        table = json.loads((step_dir / "results.json").read_text())
        assert [r["task"] for r in table] == ["captioning", "retrieval"]
        assert table[0]["cider"] == metrics["coco/cider"]
    for step in (2, 4):  # the progress line shows each evaluation, counts left out
        line = next(x for x in err.splitlines() if x.startswith(f"eval step {step}:"))
        assert "coco/cider " in line and "num_images" not in line


@pytest.mark.parametrize("entry, expected", [
    ({"task": "captioning", "format": "coco-karpathy", "root": "nowhere"}, "dataset_coco.json"),
    ({"task": "zeroshot", "format": "cifar10", "root": "."}, "batches.meta.txt"),
    ({"task": "captioning", "format": "csv", "root": "test.csv", "colour": 1}, "colour"),
])
def test_a_bad_suite_is_one_line_before_the_first_step(entry, expected, data, tmp_path, capsys):
    suite = data / f"suite-{tmp_path.name}.json"  # roots relative to the suite's directory
    suite.write_text(json.dumps([entry]))
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(run, data, suite, "--no-progress") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0] and str(suite) in error[0], error
    assert not (run / "log.jsonl").exists()  # nothing trained


def test_a_missing_suite_file_is_one_line(data, tmp_path, capsys):
    capsys.readouterr()
    assert _train(tmp_path / "run", data, tmp_path / "nope.yaml", "--no-progress") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "nope.yaml" in error[0] and "suite file not found" in error[0]
