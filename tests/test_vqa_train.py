"""VQA fine-tuning through the normal trainer: QA rows as a data source, question / answer
batches, and the answer decoders of BLIP and SimVLM learning from them."""

import json

import pytest
import torch

import vlp
from vlp.data import build_source, image_transform, make_loader
from vlp.data.qa import AnswerTokenizer, read_qa_jsonl
from vlp.errors import ConfigError, DataError
from vlp.eval.vqa import majority_baselines, vqa_eval
from vlp.run import train
from vlp.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"vision": {"layers": 1}, "text": {"layers": 1}}


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    from vlp.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("qa")
    write_dataset(out, formats=["csv"], n_train=300, n_val=8, n_test=60, image_size=64,
                  captions_per_image=1, progress=False)
    return out


def _losses(run):
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [record["loss"] for record in log if "loss" in record]


def test_qa_source_reads_questions_and_their_most_common_answer(tmp_path):
    rows = [{"image": "a.png", "question": "what colour?", "answers": ["red", "blue", "blue"]},
            {"image": "b.png", "question": "how many?", "answer": "2"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = build_source("qa", path)
    assert len(source) == 2 and source.has_answers and source.has_text
    first, second = source[0], source[1]
    assert (first.text, first.answer) == ("what colour?", "blue")
    assert first.image == str(tmp_path / "a.png")
    assert (second.text, second.answer) == ("how many?", "2")
    with pytest.raises(DataError, match="kind 'qa'"):  # read as captions: says what it is
        build_source("jsonl", path)
    path.write_text(json.dumps({"image": "a.png", "question": "q"}) + "\n")
    with pytest.raises(DataError, match="qa.jsonl:1"):
        build_source("qa", path)


def test_loader_batches_questions_and_answers_as_the_model_reads_them(qa_dir):
    from vlp.config import get_preset
    from vlp.tokenizers import train_tokenizer

    records = read_qa_jsonl(qa_dir / "train_qa.jsonl")
    tokenizer = train_tokenizer([f"{r.question} {r.answers[0]}" for r in records],
                                vocab_size=400, context_length=32)
    for preset, lead in (("simvlm-tiny", " "), ("blip-tiny", "")):
        config = get_preset(preset)
        loader = make_loader(build_source("qa", qa_dir / "train_qa.jsonl"),
                             transform=image_transform(config, False), tokenizer=tokenizer,
                             batch_size=4, train=False,
                             answer_tokenizer=AnswerTokenizer(tokenizer, config))
        batch = next(iter(loader))
        assert "input_ids" not in batch and batch["pixels"].shape[0] == 4
        for row, record in enumerate(records[:4]):
            assert tokenizer.decode(batch["question_ids"][row]) == record.question
            expected = tokenizer.encode(lead + record.answers[0])
            answer = batch["answer_ids"][row].tolist()
            assert answer[1:len(expected) + 2] == [*expected, tokenizer.eos_id]


def test_trainer_fine_tunes_simvlm_vqa_and_resumes(qa_dir, tmp_path):
    common = dict(model="simvlm-tiny", model_overrides=SMALL,
                  train_data=str(qa_dir / "train_qa.jsonl"), train_kind="qa",
                  val_data=str(qa_dir / "test_qa.jsonl"), val_kind="qa", batch_size=32,
                  lr=1e-3, weight_decay=0.05, warmup_steps=10, max_steps=80, num_workers=0,
                  progress=False, seed=0)
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), checkpoint_every=40,
                             keep_last=0, **common))
    losses = _losses(tmp_path / "full")
    assert losses[-1] < 0.4 * losses[0], losses
    assert full["eval"]["val_loss"] < 0.4 * losses[0], full["eval"]
    # generative answers on held-out images, no captions ever seen: the answer decoder learnt
    # the questions' answers (measured 29% vs the majority answer's 10%)
    model, tokenizer = vlp.load(full["checkpoint"]), vlp.load_tokenizer(full["checkpoint"])
    test = read_qa_jsonl(qa_dir / "test_qa.jsonl")
    accuracy = vqa_eval(model, tokenizer, test, num_beams=1, max_new_tokens=4,
                        progress=False)["vqa_accuracy"]
    majority = majority_baselines(read_qa_jsonl(qa_dir / "train_qa.jsonl"), test)
    assert accuracy >= 2 * majority["majority_accuracy"], (accuracy, majority)
    resumed = train(TrainConfig(output_dir=str(tmp_path / "resumed"),
                                resume=str(tmp_path / "full" / "checkpoint-0000040"), **common))
    assert resumed["step"] == 80
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_blip_fine_tunes_vqa_from_the_cli_and_clip_cannot(qa_dir, tmp_path, capsys):
    from vlp.cli import main

    run = tmp_path / "blip"
    args = ["train", "--train-data", str(qa_dir / "train_qa.jsonl"), "--train-kind", "qa",
            "--max-steps", "30", "--batch-size", "32", "--lr", "1e-3", "--num-workers", "0",
            "--no-progress"]
    assert main([*args, "--model", "blip-tiny", "--output-dir", str(run)]) == 0
    losses = _losses(run)
    assert len(losses) == 30 and losses[-1] < 0.7 * losses[0], losses
    assert torch.isfinite(torch.tensor(losses)).all()
    with pytest.raises(ConfigError, match="does not train on them"):
        train(TrainConfig(model="clip-tiny", train_data=str(qa_dir / "train_qa.jsonl"),
                          train_kind="qa", output_dir=str(tmp_path / "clip"), max_steps=1,
                          batch_size=8, num_workers=0, progress=False))
