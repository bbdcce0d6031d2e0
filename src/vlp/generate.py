"""One generation engine for every decoder in vlp: greedy, sampling and beam search.

A decoder takes part through two methods (the `StepDecoder` protocol)::

    logits, state = decoder.prefill(input_ids, rows)  # (B, L) tokens -> next-token logits (B, V)
    logits, state = decoder.step(next_ids, state)     # (B, 1) tokens -> (B, V); caches grow

``state`` is any nest of tuples, lists and dicts whose tensors are batch-first (per-layer KV
caches, say); beam search reorders it with `select_rows`. ``rows`` (B,) tells which row of the
decoder's conditioning (its image tokens) each sequence reads, so the beams of one image share
it. ``use_cache=False`` calls ``prefill`` on the whole sequence at every step instead of
``step``: slower, and the same tokens, which is how the cache is tested.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from vlp.errors import ConfigError


class StepDecoder(Protocol):
    def prefill(self, input_ids: Tensor, rows: Tensor) -> tuple[Tensor, Any]:
        """Run ``input_ids`` (B, L) for conditioning rows ``rows`` (B,); return the logits of the
        token after each sequence (B, V) and the state to continue from."""
        ...

    def step(self, input_ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Run one new token per sequence (B, 1) after ``state``; same return as ``prefill``."""
        ...


def select_rows(state: Any, index: Tensor) -> Any:
    """``state`` with every tensor replaced by its rows ``index`` (dim 0), structure kept."""
    if isinstance(state, Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, dict):
        return {key: select_rows(value, index) for key, value in state.items()}
    if isinstance(state, list):
        return [select_rows(value, index) for value in state]
    if isinstance(state, tuple):  # NamedTuples and tuple subclasses are rebuilt as themselves
        values = [select_rows(value, index) for value in state]
        return type(state)(*values) if type(state) is not tuple else tuple(values)
    return state  # None, numbers, strings: not per-row


class Shared:
    """Decoder state that is per conditioning row, not per sequence (the cross-attention keys
    and values of an image, which its beams share). Not a tuple: `select_rows` passes it
    through unchanged when beams are reordered, so it is never copied per beam."""

    def __init__(self, value: Any) -> None:
        self.value = value


def group_size(rows: Tensor, context_rows: int) -> int | None:
    """g when ``rows`` is ``[0]*g + [1]*g + ... + [context_rows-1]*g`` (one sequence per row,
    or the beams of each row in turn), else None."""
    if context_rows < 1 or rows.numel() % context_rows:
        return None
    g = rows.numel() // context_rows
    expected = torch.arange(context_rows, device=rows.device).repeat_interleave(g)
    return g if torch.equal(rows, expected) else None


# -- logit processing ------------------------------------------------------------------------------

def penalise_repeats(logits: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (arXiv 1909.05858): the logits of tokens already in ``seqs``
    are divided by ``penalty`` when positive, multiplied when negative."""
    seen = logits.gather(1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest logits of each row, -inf elsewhere."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (arXiv 1904.09751): keep the fewest most likely tokens whose
    probability mass reaches ``p`` (always at least the most likely one). Computed from the
    least likely token up, a token being dropped while the mass up to it is at most ``1 - p``
    (transformers' arithmetic, so both cut at the same token where the mass is a near tie)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_up_to <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _process(logits: Tensor, seqs: Tensor, n_new: int, *, eos_id: int, min_new_tokens: int,
             repetition_penalty: float) -> Tensor:
    """Score changes every strategy shares: repetition penalty, no eos before min_new_tokens.
    Greedy and sampling apply them to the raw logits, beam search to the log-probabilities
    (normalise first, then process, as transformers' beam search that BLIP, LAVIS and BLIP-2
    decode with), which ranks differently once a penalty is set."""
    if repetition_penalty != 1.0:
        logits = penalise_repeats(logits, seqs, repetition_penalty)
    if n_new < min_new_tokens:
        logits = logits.index_fill(1, torch.tensor([eos_id], device=logits.device), float("-inf"))
    return logits


# -- the engine ------------------------------------------------------------------------------------

@torch.no_grad()
def generate(
    decoder: StepDecoder,
    prompt_ids: Tensor,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """New tokens ``(B, T)`` after each prompt row of ``prompt_ids`` (B, L): each row ends with
    its eos (kept) and is padded with ``pad_id`` after it; T <= ``max_new_tokens``.

    ``num_beams > 1``: beam search scoring finished hypotheses by sum(log p) / length **
    ``length_penalty``; a row ends when no running beam can beat its ``num_beams`` finished
    ones (transformers' heuristic and default, which BLIP and LAVIS use), or with
    ``early_stopping`` as soon as it has them. ``do_sample``: sampling from
    softmax(logits / temperature) after top-k and top-p filtering, one ``torch.multinomial``
    draw per step with ``generator`` (default: torch's global one). Otherwise greedy. Scores
    are processed in transformers' order (repetition penalty, minimum length, temperature,
    top-k, top-p), so the same seed samples the same tokens as its ``generate``. The
    repetition penalty counts prompt tokens too.
    """
    _check_arguments(prompt_ids, max_new_tokens, min_new_tokens, num_beams, do_sample,
                     temperature, top_k, top_p, repetition_penalty)
    shared = dict(eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                  min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                  use_cache=use_cache)
    if num_beams > 1:
        return _beam_search(decoder, prompt_ids, num_beams=num_beams,
                            length_penalty=length_penalty, early_stopping=early_stopping,
                            **shared)
    return _greedy_or_sample(decoder, prompt_ids, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=generator, **shared)


def new_token_budget(max_new_tokens: int | None, context_length: int, used: int = 0) -> int:
    """The number of tokens to generate: `max_new_tokens` (default: all the room left), checked
    to fit the `context_length - used` positions a prompt of `used` tokens leaves."""
    room = context_length - used
    if max_new_tokens is None:
        return room
    if not 1 <= max_new_tokens <= room:
        prompt = f"prompt of {used} tokens leaves room for" if used else "expected"
        raise ConfigError(f"max_new_tokens={max_new_tokens}: {prompt} 1..{room} "
                          f"(text.context_length {context_length})")
    return max_new_tokens


def _check_arguments(prompt_ids: Tensor, max_new_tokens: int, min_new_tokens: int,
                     num_beams: int, do_sample: bool, temperature: float, top_k: int | None,
                     top_p: float | None, repetition_penalty: float) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or prompt_ids.is_floating_point():
        raise ConfigError(f"prompt_ids must be integer token ids (B, L) with L >= 1, got "
                          f"{prompt_ids.dtype} {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                          f"got {min_new_tokens}")
    if num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ConfigError("beam search with do_sample is not supported; pick one")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _greedy_or_sample(decoder: StepDecoder, prompt_ids: Tensor, *, eos_id: int, pad_id: int,
                      max_new_tokens: int, min_new_tokens: int, repetition_penalty: float,
                      use_cache: bool, do_sample: bool, temperature: float, top_k: int | None,
                      top_p: float | None, generator: torch.Generator | None) -> Tensor:
    B, prompt_len = prompt_ids.shape
    rows = torch.arange(B, device=prompt_ids.device)
    logits, state = decoder.prefill(prompt_ids, rows)
    seqs = prompt_ids
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    for n_new in range(max_new_tokens):
        logits = _process(logits.float(), seqs, n_new, eos_id=eos_id,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        if do_sample:
            logits = logits / temperature
            if top_k is not None:
                logits = filter_top_k(logits, top_k)
            if top_p is not None:
                logits = filter_top_p(logits, top_p)
            probs = logits.softmax(dim=-1)
            if generator is not None and generator.device != probs.device:
                probs = probs.to(generator.device)  # draw where the generator lives
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            next_ids = next_ids.to(prompt_ids.device)
        else:
            next_ids = logits.argmax(dim=-1)
        next_ids = next_ids.masked_fill(finished, pad_id)  # finished rows only pad
        seqs = torch.cat([seqs, next_ids[:, None]], dim=1)
        finished |= next_ids == eos_id
        if finished.all() or n_new == max_new_tokens - 1:
            break
        if use_cache:
            logits, state = decoder.step(next_ids[:, None], state)
        else:
            logits, _ = decoder.prefill(seqs, rows)
    return seqs[:, prompt_len:]


class _Hypotheses:
    """The ``num_beams`` best finished sequences of one batch row, by length-penalised score."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.kept: list[tuple[float, Tensor]] = []

    def score(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / length**self.length_penalty

    def add(self, tokens: Tensor, sum_logprobs: float) -> None:
        self.kept.append((self.score(sum_logprobs, tokens.shape[0]), tokens))
        self.kept.sort(key=lambda kept: kept[0], reverse=True)
        del self.kept[self.num_beams:]

    def is_done(self, best_running: float, length: int, early_stopping: bool) -> bool:
        if len(self.kept) < self.num_beams:
            return False
        if early_stopping:
            return True
        return self.kept[-1][0] >= self.score(best_running, length)

    def best(self) -> Tensor:
        return self.kept[0][1]


def _beam_search(decoder: StepDecoder, prompt_ids: Tensor, *, eos_id: int, pad_id: int,
                 max_new_tokens: int, min_new_tokens: int, repetition_penalty: float,
                 use_cache: bool, num_beams: int, length_penalty: float,
                 early_stopping: bool) -> Tensor:
    B, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    rows = torch.arange(B, device=device).repeat_interleave(num_beams)  # (B * beams,)
    seqs = prompt_ids[rows]
    logits, state = decoder.prefill(seqs, rows)
    # all beams start as the prompt: only beam 0 may expand at the first step
    beam_scores = torch.zeros(B, num_beams, device=device)
    beam_scores[:, 1:] = float("-inf")
    beam_scores = beam_scores.view(-1)
    hypotheses = [_Hypotheses(num_beams, length_penalty) for _ in range(B)]
    done = [False] * B
    for n_new in range(max_new_tokens):
        logprobs = _process(logits.float().log_softmax(dim=-1), seqs, n_new, eos_id=eos_id,
                            min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        vocab = logprobs.shape[-1]
        candidates = (beam_scores[:, None] + logprobs).view(B, num_beams * vocab)
        top_scores, top_index = candidates.topk(2 * num_beams, dim=1)  # enough to refill beams
        next_scores = torch.full((B, num_beams), float("-inf"), device=device)
        next_tokens = torch.full((B, num_beams), pad_id, dtype=torch.long, device=device)
        next_rows = torch.arange(B * num_beams, device=device).view(B, num_beams)
        for b in range(B):
            if done[b]:
                continue  # finished rows carry pads on their unchanged beams
            filled = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(),
                                                      top_index[b].tolist())):
                beam, token = divmod(index, vocab)
                row = b * num_beams + beam
                if token == eos_id:
                    if rank < num_beams:  # an eos ranked below the kept beams cannot win
                        tokens = torch.cat([seqs[row, prompt_len:], seqs.new_tensor([eos_id])])
                        hypotheses[b].add(tokens, score)
                    continue
                next_scores[b, filled], next_tokens[b, filled] = score, token
                next_rows[b, filled] = row
                filled += 1
                if filled == num_beams:
                    break
            # the best beam still running (not an eos just finished) bounds what can improve
            done[b] = hypotheses[b].is_done(next_scores[b, 0].item(), n_new + 1, early_stopping)
        if all(done):
            break
        next_rows = next_rows.view(-1)
        seqs = torch.cat([seqs[next_rows], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)
        if n_new == max_new_tokens - 1:
            break
        if use_cache:
            logits, state = decoder.step(next_tokens.view(-1, 1), select_rows(state, next_rows))
        else:
            logits, _ = decoder.prefill(seqs, rows)
    for b in range(B):  # rows still running at the length limit: their beams are candidates
        if not done[b]:
            for beam in range(num_beams):
                row = b * num_beams + beam
                if math.isfinite(beam_scores[row].item()):
                    hypotheses[b].add(seqs[row, prompt_len:], beam_scores[row].item())
    best = [h.best() for h in hypotheses]
    out = torch.full((B, max(t.shape[0] for t in best)), pad_id, dtype=torch.long, device=device)
    for b, tokens in enumerate(best):
        out[b, : tokens.shape[0]] = tokens
    return out
