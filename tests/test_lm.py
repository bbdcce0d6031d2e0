"""The GPT-2-shaped language model (family lm): text-only documents through the normal trainer,
and transformers reading its export (and vlp reading transformers' GPT-2) with equal logits."""

import json

import pytest
import torch

import vlp
from vlp.data import build_source, make_loader
from vlp.data.text import TextCorpus
from vlp.errors import CheckpointError, ConfigError, DataError
from vlp.interop import convert, load_any
from vlp.losses import IGNORE_INDEX
from vlp.models.lm import document_labels
from vlp.run import train
from vlp.tokenizers import train_tokenizer
from vlp.train import TrainConfig

WORDS = "red blue green circle square triangle left right top bottom small large".split()


def write_corpus(path, n=400, seed=0):
    """JSONL documents: a description alone, or a description then a question and answer."""
    rng = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            picks = torch.randint(len(WORDS), (7,), generator=rng).tolist()
            text = " ".join(WORDS[j] for j in picks[:6])
            qa = f"Question: what color? Short answer: {WORDS[picks[6] % 3]}"
            f.write(json.dumps({"texts": [text, qa]} if i % 2 else {"text": text}) + "\n")
    return path


def lm_config(tmp_path, out, **fields):
    return TrainConfig(model="gpt2-tiny", train_data=str(tmp_path / "corpus.jsonl"),
                       train_kind="text", output_dir=str(out), batch_size=16, lr=1e-3,
                       warmup_steps=2, log_every=1, checkpoint_every=3, seed=0,
                       model_overrides={"text": {"layers": 2, "width": 64, "heads": 2}},
                       **fields)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


def test_documents_are_packed_segments_and_labels_stop_after_the_last_eos(corpus):
    tokenizer = train_tokenizer(list(TextCorpus(corpus)), vocab_size=300, context_length=64)
    source = build_source("text", str(corpus))
    batch = next(iter(make_loader(source, transform=None, tokenizer=tokenizer, batch_size=4,
                                  train=False)))
    assert set(batch) == {"input_ids", "index", "num_skipped"}
    documents = [source.corpus.documents[i] for i in batch["index"].tolist()]
    expected = tokenizer.pack(documents)[:, :batch["input_ids"].shape[1]]
    assert torch.equal(batch["input_ids"], expected)
    two = documents[1]  # row 1 holds two segments: bos a eos bos b eos
    assert len(two) == 2 and (batch["input_ids"][1] == tokenizer.bos_id).sum() == 2
    labels = document_labels(batch["input_ids"], tokenizer.pad_id)
    for row, ids in zip(labels, batch["input_ids"], strict=True):
        length = int((ids != tokenizer.pad_id).sum())
        assert (row[:length - 1] != IGNORE_INDEX).all() and (row[length - 1:] == IGNORE_INDEX).all()


def test_text_documents_train_resume_exactly_and_refuse_image_families(tmp_path, corpus):
    straight = train(lm_config(tmp_path, tmp_path / "a", max_steps=6))
    train(lm_config(tmp_path, tmp_path / "b", max_steps=3))
    resumed = train(lm_config(tmp_path, tmp_path / "b", max_steps=6, resume="latest"))
    assert resumed["loss"] == straight["loss"]
    a, b = vlp.load(tmp_path / "a"), vlp.load(tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()
           if '"loss"' in line]
    assert log[-1]["loss"] < log[0]["loss"]

    with pytest.raises(ConfigError, match="holds text-only documents but CLIP trains on images"):
        train(TrainConfig(model="clip-tiny", train_data=str(corpus), train_kind="text",
                          output_dir=str(tmp_path / "c"), batch_size=8, max_steps=1))


def test_lm_refuses_image_data_and_bad_documents(tmp_path, synthetic_train_csv):
    csv = synthetic_train_csv(64)
    with pytest.raises(ConfigError, match="holds images but CausalLM trains on text alone"):
        train(TrainConfig(model="gpt2-tiny", train_data=str(csv), output_dir=str(tmp_path / "d"),
                          batch_size=8, max_steps=1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"texts": ["one", 2]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'texts' is not a string or a non-empty"):
        build_source("text", str(bad))


def test_hf_gpt2_export_loads_in_transformers_with_equal_logits_and_generations(tmp_path,
                                                                                corpus):
    transformers = pytest.importorskip("transformers")
    train(lm_config(tmp_path, tmp_path / "run", max_steps=3))
    out = convert(tmp_path / "run", tmp_path / "hf", "vlp", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ours = vlp.load(tmp_path / "run").eval()
    tokenizer = vlp.load_tokenizer(tmp_path / "run")
    ids = tokenizer.pack([["red circle left", "Question: what color? Short answer:"],
                          ["blue square"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours.logits(ids), rtol=0, atol=1e-5)
    # the text-generation pipeline, reading the exported tokenizer files, continues a prompt as
    # greedy decoding of vlp's own logits does
    generator = transformers.pipeline("text-generation", model=str(out))
    prompt = "red circle"
    text = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    row = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(6):
            row.append(int(ours.logits(torch.tensor([row]))[0, -1].argmax()))
    assert text == tokenizer.backend.decode(row)


def test_hf_gpt2_imports_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=64, n_layer=2,
                                     n_head=4, activation_function="gelu_new")
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "gpt2")
    imported = load_any(tmp_path / "gpt2", "hf").model
    assert imported.config.family == "lm" and imported.config.text.act == "gelu_tanh"
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(imported.logits(ids), reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)
    back = convert(tmp_path / "gpt2", tmp_path / "again", "hf", "hf")
    again = transformers.GPT2LMHeadModel.from_pretrained(back).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, imported.logits(ids),
                                   rtol=0, atol=1e-5)
    config.scale_attn_by_inverse_layer_idx = True
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "scaled")
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load_any(tmp_path / "scaled", "hf")
