import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from vlp.errors import ConfigError
from vlp.generate import (
    filter_top_k,
    filter_top_p,
    generate,
    penalise_repeats,
    select_rows,
)
from vlp.nn import BlockCache, KVCache
from vlp.nn.decoder import CrossDecoder

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class BigramDecoder:
    """Next-token distribution depends only on the last token: a table worked out by hand."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 5) -> None:
        self.logits = torch.full((vocab, vocab), -1e9)
        for prev, nxt in table.items():
            for token, p in nxt.items():
                self.logits[prev, token] = math.log(p)
        self.calls = {"prefill": 0, "step": 0}

    def prefill(self, input_ids, rows):
        self.calls["prefill"] += 1
        return self.logits[input_ids[:, -1]], {"last": input_ids[:, -1]}

    def step(self, input_ids, state):
        self.calls["step"] += 1
        assert state["last"].shape[0] == input_ids.shape[0]
        return self.logits[input_ids[:, -1]], {"last": input_ids[:, -1]}


# from BOS: A .5, B .4, EOS .1; A repeats itself (.4) and rarely ends (.25); B ends (.9)
TABLE = {
    BOS: {A: 0.5, B: 0.4, EOS: 0.1},
    A: {A: 0.4, B: 0.35, EOS: 0.25},
    B: {EOS: 0.9, A: 0.06, B: 0.04},
    EOS: {PAD: 1.0},
    PAD: {PAD: 1.0},
}


def _bos(batch=1):
    return torch.full((batch, 1), BOS)


def test_greedy_follows_the_most_likely_token_to_the_length_limit():
    out = generate(BigramDecoder(TABLE), _bos(), eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    assert out.tolist() == [[A, A, A, A]]


def test_beam_search_finds_the_more_likely_sequence_greedy_misses():
    # "B EOS" has p = .4 * .9 = .36; the best sequence through A, "A EOS", only .125
    decoder = BigramDecoder(TABLE)
    out = generate(decoder, _bos(), eos_id=EOS, pad_id=PAD, max_new_tokens=6, num_beams=2,
                   length_penalty=0.0)
    assert out.tolist() == [[B, EOS]]
    assert decoder.calls["prefill"] == 1


def test_length_penalty_trades_probability_for_length():
    short = generate(BigramDecoder(TABLE), _bos(), eos_id=EOS, pad_id=PAD, max_new_tokens=6,
                     num_beams=3, length_penalty=0.0, early_stopping=False)
    assert short.tolist() == [[B, EOS]]
    # with length ** 3 the score of "A A A A A EOS" (p = .5 * .4^4 * .25) beats "B EOS":
    # log(.0032) / 6^3 = -0.0266 > log(.36) / 2^3 = -0.1277
    long = generate(BigramDecoder(TABLE), _bos(), eos_id=EOS, pad_id=PAD, max_new_tokens=6,
                    num_beams=3, length_penalty=3.0, early_stopping=False)
    assert long.shape[1] == 6 and long[0, -1].item() == EOS


def test_min_new_tokens_blocks_eos_and_rows_finish_independently():
    table = {**TABLE, BOS: {B: 0.6, A: 0.4}, A: {EOS: 0.6, A: 0.4}}
    prompts = torch.tensor([[BOS], [A]])
    out = generate(BigramDecoder(table), prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=5)
    assert out.tolist() == [[B, EOS], [EOS, PAD]]  # row 1 ended first, then padded
    out = generate(BigramDecoder(table), prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=5,
                   min_new_tokens=2)
    assert out.tolist() == [[B, A, EOS], [A, A, EOS]]


def test_repetition_penalty_steers_away_from_seen_tokens():
    # A's logit log(.4) < 0 is multiplied by 2 -> below B's log(.35) once A has been seen
    out = generate(BigramDecoder(TABLE), _bos(), eos_id=EOS, pad_id=PAD, max_new_tokens=2,
                   repetition_penalty=2.0)
    assert out.tolist() == [[A, B]]


def test_penalty_and_filters_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    got = penalise_repeats(logits, torch.tensor([[0, 1]]), 2.0)
    assert got.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, True, True, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(filter_top_p(probs.log(), 0.75))  # .5 + .3 reaches .75
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_top_p(probs.log(), 1e-6))  # never empty
    assert kept.tolist() == [[True, False, False, False]]


class _State(NamedTuple):
    caches: list
    last: torch.Tensor
    step: int


def test_select_rows_keeps_structure():
    kv = KVCache(torch.arange(3.0)[:, None], torch.arange(3.0)[:, None] + 10)
    state = _State([BlockCache(kv, None)], torch.tensor([5, 6, 7]), 4)
    picked = select_rows(state, torch.tensor([2, 2, 0]))
    assert isinstance(picked, _State) and isinstance(picked.caches[0], BlockCache)
    assert isinstance(picked.caches[0].self_kv, KVCache) and picked.caches[0].cross_kv is None
    assert picked.caches[0].self_kv.value.flatten().tolist() == [12.0, 12.0, 10.0]
    assert picked.last.tolist() == [7, 7, 5] and picked.step == 4


def test_bad_arguments_raise_config_error():
    decoder = BigramDecoder(TABLE)
    for kwargs in ({"max_new_tokens": 0}, {"num_beams": 2, "do_sample": True},
                   {"do_sample": True, "temperature": 0.0}, {"top_p": 1.5},
                   {"min_new_tokens": 9, "max_new_tokens": 3}):
        with pytest.raises(ConfigError):
            generate(decoder, _bos(), eos_id=EOS, pad_id=PAD, **kwargs)
    with pytest.raises(ConfigError, match="prompt_ids"):
        generate(decoder, torch.tensor([BOS]), eos_id=EOS, pad_id=PAD)


# -- a real KV-cached decoder: token + position embeddings -> CrossDecoder over a context ------


class TinyCaptioner(nn.Module):
    """Random decoder conditioned on per-row context tokens, its logits sharpened so that rows
    finish at different steps (1, 2 and 8 tokens under greedy)."""

    def __init__(self, vocab=40, width=32, context_dim=24, logit_scale=3.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(32, width) * 0.1)
        self.decoder = CrossDecoder(width, 2, 4, context_dim)
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.head.weight.mul_(logit_scale)
        self.context = torch.randn(3, 5, context_dim)

    def prefill(self, input_ids, rows):
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        states, caches = self.decoder.forward_cached(x, None, context=self.context[rows])
        return self.head(states[:, -1]), caches

    def step(self, input_ids, caches):
        start = caches[0].self_kv.key.shape[2]
        x = self.embed(input_ids) + self.pos[start : start + 1]
        states, caches = self.decoder.forward_cached(x, caches)
        return self.head(states[:, -1]), caches


@pytest.fixture
def captioner():
    torch.manual_seed(0)
    return TinyCaptioner().eval()


def _prompts():
    return torch.tensor([[BOS, 7], [BOS, 9], [BOS, 11]])


@pytest.mark.parametrize("kwargs", [
    {},
    {"min_new_tokens": 3, "repetition_penalty": 1.3},
    {"num_beams": 3},
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": False},
    {"num_beams": 2, "length_penalty": 2.0, "repetition_penalty": 1.2, "min_new_tokens": 2},
])
def test_cache_gives_the_same_tokens_as_recomputing(captioner, kwargs):
    cached = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD, max_new_tokens=12, **kwargs)
    full = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD, max_new_tokens=12,
                    use_cache=False, **kwargs)
    assert torch.equal(cached, full)


def test_rows_finish_at_different_steps_and_pad_after_eos(captioner):
    out = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD, max_new_tokens=12)
    lengths = []
    for row in out.tolist():
        n = row.index(EOS) + 1 if EOS in row else len(row)
        assert all(t == PAD for t in row[n:])
        lengths.append(n)
    assert len(set(lengths)) > 1  # the fixture decodes rows of different lengths


@pytest.mark.parametrize("max_new_tokens", [1, 4, 12])
def test_one_beam_equals_greedy(captioner, max_new_tokens):
    greedy = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD,
                      max_new_tokens=max_new_tokens)
    for early_stopping in (True, False):
        beam = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD,
                        max_new_tokens=max_new_tokens, num_beams=1,
                        early_stopping=early_stopping)
        assert torch.equal(beam, greedy)


def test_cross_attention_is_projected_once_and_self_cache_grows(captioner):
    kv_calls = []
    captioner.decoder.cross_blocks[0].attn.kv.register_forward_hook(
        lambda *args: kv_calls.append(1))
    logits, caches = captioner.prefill(_prompts(), torch.arange(3))
    for n in range(3):
        logits, caches = captioner.step(logits.argmax(-1, keepdim=True), caches)
        assert caches[0].self_kv.key.shape[2] == 2 + n + 1
    assert len(kv_calls) == 1
    assert caches[1].cross_kv.key.shape[2] == 5  # context length, computed at prefill


def test_sampling_is_deterministic_under_a_seed_and_filters_work(captioner):
    def sample(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD, max_new_tokens=10,
                        do_sample=True, generator=generator, **kwargs)

    assert torch.equal(sample(1, temperature=1.5), sample(1, temperature=1.5))
    assert any(not torch.equal(sample(1, temperature=1.5), sample(s, temperature=1.5))
               for s in range(2, 6))
    greedy = generate(captioner, _prompts(), eos_id=EOS, pad_id=PAD, max_new_tokens=10)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-4), greedy)
    # top-k draws only among the k best first tokens
    first = torch.stack([sample(s, top_k=2)[:, 0] for s in range(8)], dim=1)  # (3, 8)
    best2 = captioner.prefill(_prompts(), torch.arange(3))[0].topk(2).indices
    assert all(set(first[r].tolist()) <= set(best2[r].tolist()) for r in range(3))
