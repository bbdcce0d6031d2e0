import json
import pickle
import unicodedata

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import vlp
from vlp.errors import ConfigError, DataError
from vlp.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

PAD, EOS, BOS = 0, 1, 2  # train_tokenizer's ids (eos is never 2: HF CLIP reads that as argmax)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [
    f"A {colour} {shape} on a {background} background"
    for colour in COLOURS
    for shape in SHAPES
    for background in ("white", "black", "grey")
] + ["Two small shapes: a Red circle and a BLUE square.", "un café près du carré vert"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=400, context_length=16)


def _clip_like_backend() -> HFTokenizer:
    """A tokenizer.json like CLIPTokenizerFast saves: its post-processor adds bos/eos itself."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CAPTIONS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    backend.enable_truncation(max_length=77)
    backend.enable_padding(length=77, pad_id=1, pad_token="<|endoftext|>")
    return backend


def test_specials_get_ids_pad_0_eos_1_bos_2(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<bos>", "<eos>")
    assert 259 < tokenizer.vocab_size <= 400
    assert tokenizer.context_length == 16


def test_bpe_learns_merges_and_round_trips_lowercased(tokenizer):
    text = "A Yellow Triangle on a Grey background"
    token_ids = tokenizer.encode(text)
    assert len(token_ids) < len(text.encode()) // 2  # merges learned, not one token per byte
    assert tokenizer.decode(token_ids) == text.lower()
    assert tokenizer.decode(tokenizer(text)[0]) == text.lower()


def test_unicode_is_nfc_normalised_and_round_trips(tokenizer):
    decomposed = unicodedata.normalize("NFD", "Un Café")
    assert tokenizer.encode(decomposed) == tokenizer.encode("un café")
    assert tokenizer.decode(tokenizer.encode(decomposed)) == "un café"
    assert tokenizer.decode(tokenizer.encode("日本の犬")) == "日本の犬"  # unseen bytes still work


def test_lowercase_false_keeps_case():
    cased = train_tokenizer(CAPTIONS, vocab_size=300, context_length=8, lowercase=False)
    assert cased.decode(cased.encode("A Red Circle")) == "A Red Circle"


def test_call_layout_and_padding(tokenizer):
    texts = ["a red circle", "", "a blue square on a white background"]
    batch = tokenizer(texts)
    assert batch.dtype == torch.long and batch.shape == (3, 16)
    for row, text in zip(batch.tolist(), texts):
        token_ids = tokenizer.encode(text)
        expected = [BOS, *token_ids, EOS]
        assert row == expected + [PAD] * (16 - len(expected))
    assert tokenizer("a red circle").shape == (1, 16)
    assert tokenizer(texts, context_length=24).shape == (3, 24)
    assert tokenizer([]).shape == (0, 16)


def test_truncation_keeps_eos_last(tokenizer):
    text = " ".join(CAPTIONS[:4])
    token_ids = tokenizer.encode(text)
    assert len(token_ids) > 16
    row = tokenizer(text)[0].tolist()
    assert row == [BOS, *token_ids[:14], EOS]
    exact = tokenizer.encode("a red circle")
    fitted = tokenizer("a red circle", context_length=len(exact) + 2)[0].tolist()
    assert fitted == [BOS, *exact, EOS]  # exactly full: no pad, nothing cut
    with pytest.raises(ConfigError):
        tokenizer("a red circle", context_length=1)


def test_literal_special_token_text_is_not_a_special_id(tokenizer):
    row = tokenizer("a red <eos> circle")[0].tolist()
    assert row.count(tokenizer.eos_id) == 1  # only the eos we append
    assert tokenizer.decode(row) == "a red <eos> circle"


def test_decode_stops_at_eos_and_batch_decode(tokenizer):
    batch = tokenizer(["a red circle", "a green star"])
    with_junk = batch.clone()
    with_junk[0, -1] = tokenizer.encode("blue")[0]  # a token after eos/pads is ignored
    assert tokenizer.batch_decode(with_junk) == ["a red circle", "a green star"]
    raw = tokenizer.decode(batch[1], skip_special_tokens=False)
    assert raw.startswith("<bos>a green star<eos><pad>")


def test_save_load_round_trip_and_hf_readable(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 16
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<bos>", "<eos>", "<pad>")

    loaded = load_tokenizer(tmp_path / "tok")
    assert torch.equal(loaded(CAPTIONS), tokenizer(CAPTIONS))
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.context_length) == (
        PAD, BOS, EOS, 16)
    assert load_tokenizer(tmp_path / "tok", context_length=9)(CAPTIONS[0]).shape == (1, 9)
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").context_length == 16

    hf = HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.encode("a red circle").ids == [BOS, *tokenizer.encode("a red circle"), EOS]


def test_clip_like_post_processor_does_not_double_specials(tmp_path):
    backend = _clip_like_backend()
    assert backend.encode("a red circle").ids[0] == 0  # the setup really adds bos itself
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
    }))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.context_length) == (0, 1, 1, 77)
    token_ids = loaded.encode("a red circle")
    assert 0 not in token_ids and 1 not in token_ids
    row = loaded("a red circle")[0].tolist()
    assert row[: len(token_ids) + 2] == [0, *token_ids, 1]
    assert row.count(0) == 1  # one bos
    assert loaded.decode(row) == "a red circle"


def test_special_tokens_detected_without_config_files(tmp_path):
    _clip_like_backend().save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.bos_token, loaded.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert loaded.pad_id == loaded.eos_id  # no pad token: pad with eos
    assert loaded.context_length == 77


def test_special_tokens_map_and_insane_max_length(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<eos>"}, "eos_token": "<bos>"}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (EOS, BOS, PAD)  # roles swapped
    assert loaded.context_length == 77


def test_missing_files_and_bad_specials_raise_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "corrupt")

    tokenizer.save(tmp_path / "unknown")
    (tmp_path / "unknown" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match="'</s>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "unknown")

    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    (tmp_path / "plain").mkdir()
    plain.save(str(tmp_path / "plain" / "tokenizer.json"))
    with pytest.raises(DataError, match="cannot tell the bos_token"):
        load_tokenizer(tmp_path / "plain")


def test_train_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=100, context_length=16)
    with pytest.raises(DataError, match="no texts"):
        train_tokenizer(iter([]), vocab_size=300, context_length=16)
    with pytest.raises(ConfigError, match="context_length"):
        train_tokenizer(CAPTIONS, vocab_size=300, context_length=1)


def test_trains_from_a_generator():
    tokenizer = train_tokenizer((caption for caption in CAPTIONS), vocab_size=300,
                                context_length=8)
    assert tokenizer.decode(tokenizer.encode("a red star")) == "a red star"


def test_pickle_round_trip(tokenizer):
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(restored(CAPTIONS), tokenizer(CAPTIONS))
    assert restored.context_length == tokenizer.context_length
    assert (restored.pad_id, restored.bos_id, restored.eos_id) == (PAD, BOS, EOS)
    # plain-text specials survive pickling
    assert restored("a <eos>")[0].tolist().count(EOS) == 1


def _write_clip_bpe_pair(directory) -> None:
    """A tiny CLIP-style vocab.json + merges.txt: byte symbols, a few merges, two specials."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def test_vlp_load_tokenizer_reads_a_vocab_and_merges_directory(tmp_path):
    _write_clip_bpe_pair(tmp_path / "bpe")
    vocab = json.loads((tmp_path / "bpe" / "vocab.json").read_text())
    loaded = vlp.load_tokenizer(tmp_path / "bpe", context_length=6)  # not taken for a run dir
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (bos, eos, eos)  # CLIP pads with eos
    assert loaded("The  CAT")[0].tolist() == [bos, vocab["the</w>"], vocab["cat</w>"], eos, eos,
                                              eos]
    assert vlp.load_tokenizer(tmp_path / "bpe").context_length == 77
