"""BLIP's image-grounded decoder as a `vlp.generate.StepDecoder`: captions cross-attend to image
tokens, VQA answers to question states; the KV caches grow one token at a time.

The cross-attended context is projected to keys and values once per image, not once per
sequence: when the sequences are consecutive groups of equal size per context row (the beams
of beam search, or one sequence per row), the groups' queries share their row's projections
(`vlp.nn.Attention` groups them), and those projections stay out of the per-sequence state, so
beam search never copies them when it reorders its beams.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlp.nn import BlockCache


class SharedContext:
    """Per-context-row cross-attention keys/values of every layer and their key mask. Not a
    tuple: `vlp.generate.select_rows` passes it through unchanged when beams are reordered."""

    def __init__(self, cross_kv: list, context_mask: Tensor | None) -> None:
        self.cross_kv = cross_kv
        self.context_mask = context_mask


class DecodeState(NamedTuple):
    caches: list[BlockCache]  # self-attention (and per-row cross-attention) caches, batch-first
    context_mask: Tensor | None  # (B, S) keys of the cross-attended context each row may see
    shared: SharedContext | None = None  # cross caches per context row, shared by each group


def group_size(rows: Tensor, context_rows: int) -> int | None:
    """g when ``rows`` is ``[0]*g + [1]*g + ... + [context_rows-1]*g``, else None."""
    if rows.numel() % context_rows:
        return None
    g = rows.numel() // context_rows
    expected = torch.arange(context_rows, device=rows.device).repeat_interleave(g)
    return g if torch.equal(rows, expected) else None


class GroundedDecoder:
    """`vlp.generate.StepDecoder` over BLIP's decoder: sequences cross-attend to row ``rows``
    of ``context`` (image tokens for captions, question states for VQA answers)."""

    def __init__(self, model: nn.Module, context: Tensor,
                 context_mask: Tensor | None = None) -> None:
        self.model = model
        self.context = context  # (B_context, S, D)
        self.context_mask = context_mask  # (B_context, S) or None: every key visible

    def _run(self, input_ids: Tensor, caches, context, context_mask):
        states, caches = self.model.text_decoder.forward_cached(
            input_ids, caches, context=context, context_mask=context_mask)
        return self.model.lm_logits(states[:, -1:])[:, 0], caches

    def prefill(self, input_ids: Tensor, rows: Tensor) -> tuple[Tensor, DecodeState]:
        if group_size(rows, self.context.shape[0]) is None:  # any other row order: copy rows
            context = self.context[rows]
            context_mask = self.context_mask[rows] if self.context_mask is not None else None
            logits, caches = self._run(input_ids, None, context, context_mask)
            return logits, DecodeState(caches, context_mask)
        logits, caches = self._run(input_ids, None, self.context, self.context_mask)
        shared = SharedContext([cache.cross_kv for cache in caches], self.context_mask)
        return logits, DecodeState([BlockCache(cache.self_kv) for cache in caches], None, shared)

    def step(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        if state.shared is None:
            logits, caches = self._run(input_ids, state.caches, None, state.context_mask)
            return logits, DecodeState(caches, state.context_mask)
        shared = state.shared
        caches = [BlockCache(cache.self_kv, cross_kv)
                  for cache, cross_kv in zip(state.caches, shared.cross_kv, strict=True)]
        logits, caches = self._run(input_ids, caches, None, shared.context_mask)
        return logits, DecodeState([BlockCache(cache.self_kv) for cache in caches], None, shared)
