"""The tokenizer a new run starts with when none is given: a standard vocabulary at hand that
fits the text tower (CLIP's BPE from an installed open_clip), else a BPE trained once, on rank
0, on at most ``tokenizer_train_samples`` captions, which the other ranks read back."""

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.data import build_source
from vlp.errors import ConfigError
from vlp.run import model_and_tokenizer
from vlp.tokenizers import train_tokenizer
from vlp.train import TrainConfig
from vlp.train.config import check_config
from vlp.train.distributed import DistEnv
from vlp.vocabularies import CLIP_VOCAB_SIZE, standard_tokenizer

TEXTS = ["A photo of the cat.", "  the RED   cat's photo!!  ", "café 42°C naïve",
         "a small red circle left of a blue square", "it's x'y", "日本語 🐶"]


def _config(data, out, vocab_size: int, **changes) -> TrainConfig:
    tiny = {"embed_dim": 16,
            "vision": {"image_size": 32, "patch_size": 16, "width": 16, "layers": 1, "heads": 2},
            "text": {"vocab_size": vocab_size, "context_length": 16, "width": 16, "layers": 1,
                     "heads": 2}}
    return TrainConfig(model="clip-tiny", model_overrides=tiny, train_data=str(data),
                       output_dir=str(out), max_steps=1, **changes)


def _captions(data, n: int) -> list[str]:
    return [record.text for record, _ in zip(build_source("csv", str(data)), range(n))]


def test_tokenizer_train_samples_bounds_what_the_bpe_sees(synthetic_train_csv, tmp_path):
    data = synthetic_train_csv(40)
    _, full = model_and_tokenizer(_config(data, tmp_path, 4000), tmp_path, DistEnv())
    _, bounded = model_and_tokenizer(_config(data, tmp_path, 4000, tokenizer_train_samples=6),
                                     tmp_path, DistEnv())
    expected = train_tokenizer(_captions(data, 6), vocab_size=4000, context_length=16)
    assert bounded.backend.get_vocab() == expected.backend.get_vocab()
    assert bounded.vocab_size < full.vocab_size  # the other 34 captions hold more words
    with pytest.raises(ConfigError, match="tokenizer_train_samples=0"):
        check_config(_config(data, tmp_path, 4000, tokenizer_train_samples=0))


def _rank(rank: int, init_file: str, data: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # rank 1 is given data it cannot read: only rank 0 reads captions
        cfg = _config(data if rank == 0 else Path(out) / "missing.csv", Path(out) / "run", 500,
                      tokenizer_train_samples=5)
        _, tokenizer = model_and_tokenizer(cfg, Path(out) / "run", DistEnv(rank, 2, rank))
        (Path(out) / f"vocab{rank}.json").write_text(json.dumps(tokenizer.backend.get_vocab()))
    finally:
        dist.destroy_process_group()


def test_rank_0_trains_the_bpe_once_and_the_other_rank_reads_it(synthetic_train_csv, tmp_path):
    data = synthetic_train_csv(40)
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(data), str(tmp_path)), nprocs=2)
    vocabs = [json.loads((tmp_path / f"vocab{r}.json").read_text()) for r in (0, 1)]
    assert vocabs[0] == vocabs[1]
    expected = train_tokenizer(_captions(data, 5), vocab_size=500, context_length=16)
    assert vocabs[0] == expected.backend.get_vocab()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()  # what rank 1 read


def test_a_clip_sized_text_tower_starts_from_clips_bpe(synthetic_train_csv, tmp_path,
                                                       monkeypatch):
    simple = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()
    data = synthetic_train_csv(24)
    model, tokenizer = model_and_tokenizer(_config(data, tmp_path, CLIP_VOCAB_SIZE), tmp_path,
                                           DistEnv())
    assert tokenizer.vocab_size == CLIP_VOCAB_SIZE
    assert [tokenizer.encode(t) for t in TEXTS] == [simple.encode(t) for t in TEXTS]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (49406, 49407)
    assert (model.config.text.bos_id, model.config.text.eos_id) == (49406, 49407)
    # the synthetic world's small towers keep their own vocabulary, trained on its captions
    assert standard_tokenizer(1024, 32) is None
    # without open_clip there is no standard vocabulary at hand: a BPE on the captions
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert standard_tokenizer(CLIP_VOCAB_SIZE, 16) is None
    _, trained = model_and_tokenizer(_config(data, tmp_path, CLIP_VOCAB_SIZE), tmp_path,
                                     DistEnv())
    assert trained.vocab_size < 1000
