"""`vlp report`: the HTML page of a real (tiny) run directory, read back with an HTML parser:
its plots hold every logged step, its evaluation metrics and checkpoints are there, and a
captioning or VQA run shows examples its checkpoint generates."""

import csv
import json
import shutil
from html.parser import HTMLParser

import pytest

import vlp
from vlp.cli import main
from vlp.data import build_source
from vlp.eval.captioning import caption_eval, generate_captions
from vlp.run import train
from vlp.train import TrainConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:METEOR left out")]
TINY = {"embed_dim": 32,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"vocab_size": 320, "context_length": 16, "width": 32, "layers": 1, "heads": 2}}


class Page(HTMLParser):
    """Plots (svg data-name -> {series: points}), tables (class -> rows of cell texts) and the
    <img> sources of each table."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.plots: dict[str, dict[str, int]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, list[str]] = {}
        self.scripts = 0
        self._plot = self._table = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._plot = a["data-name"]
            self.plots[self._plot] = {}
        elif tag == "polyline":
            self.plots[self._plot][a["data-series"]] = int(a["data-points"])
        elif tag == "table":
            self._table = a["class"]
            self.tables[self._table], self.images[self._table] = [], []
        elif tag == "tr":
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images[self._table].append(a["src"])
        elif tag in ("script", "link") or (tag != "img" and any(k == "src" for k in a)):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, name: str) -> list[dict[str, str]]:
        header, *rows = self.tables[name]
        return [dict(zip(header, row)) for row in rows]


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("world")
    write_dataset(out, formats=["csv"], n_train=10, n_val=6, n_test=6, image_size=32,
                  captions_per_image=2, progress=False)
    with (out / "train.csv").open(newline="") as f:  # one image that cannot be read
        rows = list(csv.DictReader(f))
    rows.insert(3, {**rows[0], "filepath": "images/missing.png"})
    with (out / "train.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def caption_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("coca") / "run"
    val = build_source("csv", str(world / "val.csv"))

    def captions(model, tokenizer, step):  # vlp's own CIDEr and BLEU: no Java in the loop
        metrics = caption_eval(model, tokenizer, val, max_new_tokens=6, num_beams=1,
                               progress=False, backend="vlp")
        return {f"caption_{k}": v for k, v in metrics.items()}

    train(TrainConfig(model="coca-tiny", model_overrides=TINY, train_data=str(world /
                      "train.csv"), val_data=str(world / "val.csv"), output_dir=str(run),
                      batch_size=4, max_steps=7, eval_every=3, checkpoint_every=3,
                      keep_last=0, num_workers=0, progress=False, lr=1e-3),
          eval_fn=captions)
    return run


def test_caption_run_report(caption_run, world, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(caption_run), "--out", str(out), "--examples", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out)}
    text = out.read_text()
    page = Page(text)
    assert page.scripts == 0 and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    records = _records(caption_run)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 7
    # every step's loss, each loss term, lr, grad norm, samples/s and the step time split
    assert page.plots["loss"] == {"loss": len(steps)}
    terms = {k for k in steps[0] if k.startswith("loss_")}
    assert terms == {"loss_contrastive", "loss_caption"}
    for name in [*terms, "lr", "grad_norm", "samples_per_s"]:
        assert page.plots[name] == {name: len(steps)}, name
    assert page.plots["step_time"] == {"data_s": len(steps), "compute_s": len(steps)}
    # every evaluation metric over the evaluations (steps 3, 6 and the end)
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    for metric in ("val_loss", "caption_cider", "caption_bleu_4"):
        assert page.plots[f"eval.{metric}"] == {metric: 3}
    table = page.rows("eval")
    assert [row["step"] for row in table] == ["3", "6", "7"]
    assert float(table[-1]["val_loss"]) == pytest.approx(evals[-1]["eval"]["val_loss"],
                                                         rel=1e-3)
    # the unreadable image, counted at the end of each epoch (21 rows, 5 batches of 4)
    skipped = page.rows("skipped")
    assert skipped[0]["samples skipped"] == "1" and "missing_image: 1" in skipped[0]["by reason"]
    assert "missing.png" in skipped[0]["first items"]
    summary = dict(page.tables["summary"][1:])
    assert summary["steps logged"] == "7" and summary["samples skipped"] == str(
        sum(r["skipped_total"] for r in records if r.get("end_of_epoch")))
    checkpoints = page.rows("checkpoints")
    assert [row["step"] for row in checkpoints] == ["3", "6", "7"]
    assert checkpoints[-1]["directory"] == "checkpoint-0000007 (latest)"
    # examples: the held-out images, the checkpoint's greedy caption, their references
    examples = page.rows("examples")
    assert len(examples) == 3 and len(page.images["examples"]) == 3
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images["examples"])
    model, tokenizer = vlp.load(caption_run), vlp.load_tokenizer(caption_run)
    first_image = examples[0]["image"]
    expected = generate_captions(model, tokenizer, [first_image], max_new_tokens=15,
                                 num_beams=1, progress=False).pairs[0][1]
    assert examples[0]["generated caption"] == " ".join(expected.split())
    with (world / "val.csv").open(newline="") as f:
        references = [row["caption"] for row in csv.DictReader(f)
                      if first_image.endswith(row["filepath"])]
    assert len(references) == 2 and all(r in examples[0]["references"] for r in references)
    # the run's data gone since: the page still comes, and says why it has no examples
    moved = tmp_path / "moved"
    shutil.copytree(caption_run, moved, symlinks=True)
    config = json.loads((moved / "train_config.json").read_text())
    config["val_data"] = str(tmp_path / "gone.csv")
    (moved / "train_config.json").write_text(json.dumps(config))
    assert main(["report", str(moved)]) == 0
    text = (moved / "report.html").read_text()
    assert "No examples: " in text and "gone.csv" in text
    assert Page(text).plots["loss"] == {"loss": len(steps)}


def test_report_of_a_run_without_captions_or_checkpoints_yet(world, tmp_path, capsys):
    run = tmp_path / "clip"
    train(TrainConfig(model="clip-tiny", model_overrides=TINY, train_data=str(world /
                      "train.csv"), output_dir=str(run), batch_size=4, max_steps=2,
                      num_workers=0, progress=False))
    assert main(["report", str(run)]) == 0
    page = Page((run / "report.html").read_text())
    assert page.plots["loss"] == {"loss": 2} and "examples" not in page.tables
    assert "eval" not in page.tables  # no evaluation ran: said in words
    # a run still being written: its last line cut short, no checkpoint yet
    for path in run.glob("checkpoint-*"):
        if path.is_symlink():
            path.unlink()
        else:
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 3, "epoch": 0, "lr": 0.0')
    assert main(["report", str(run), "--out", str(tmp_path / "live.html")]) == 0
    page = Page((tmp_path / "live.html").read_text())
    summary = dict(page.tables["summary"][1:])
    assert summary["unreadable log lines"] == "3" and summary["checkpoints"] == "0"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlp: error: ") and "nowhere" in error and "\n" not in error


def test_demo_writes_and_prints_its_report(tmp_path, capsys):
    from vlp.recipes import DemoConfig, demo

    out = tmp_path / "demo"
    result = demo(DemoConfig(out=str(out), n_train=40, n_test=20, steps=3, batch_size=16,
                             num_workers=0, progress=False))
    assert result["reports"] == [str(out / "report.html")]
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = Page((out / "report.html").read_text())
    steps = [r for r in _records(out) if "loss" in r]
    assert len(steps) == 3 and page.plots["loss"] == {"loss": 3}
    results = dict(page.tables["results"][1:])  # the demo's held-out metrics
    for metric in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
        assert float(results[metric]) == pytest.approx(result[metric], abs=1e-4)
    assert [row["step"] for row in page.rows("checkpoints")][-1] == "3"


def test_vqa_run_report_shows_questions_answers_and_references(world, tmp_path):
    from vlp.data.qa import read_qa_jsonl
    from vlp.eval.vqa import answer_questions

    run = tmp_path / "vqa"
    qa = world / "val_qa.jsonl"
    train(TrainConfig(model="simvlm-tiny", model_overrides={"vision": {"layers": 1},
                      "text": {"layers": 1}}, train_data=str(world / "train_qa.jsonl"),
                      train_kind="qa", val_data=str(qa), val_kind="qa", output_dir=str(run),
                      batch_size=8, max_steps=2, num_workers=0, progress=False))
    assert main(["report", str(run), "--examples", "2"]) == 0
    page = Page((run / "report.html").read_text())
    examples = page.rows("examples")
    records = read_qa_jsonl(qa)[:2]
    model, tokenizer = vlp.load(run), vlp.load_tokenizer(run)
    answers = answer_questions(model, tokenizer, records, num_beams=1, progress=False)
    assert [row["question"] for row in examples] == [r.question for r in records]
    assert [row["generated answer"] for row in examples] == [" ".join(a.split())
                                                             for a in answers]
    assert [row["references"] for row in examples] == ["".join(r.answers) for r in records]
    assert len(page.images["examples"]) == 2
