"""BLIP's image-grounded decoder as a `vlp.generate.StepDecoder`: captions cross-attend to image
tokens, VQA answers to question states; the KV caches grow one token at a time.

The cross-attended context is projected to keys and values once per image, not once per
sequence: when the sequences are consecutive groups of equal size per context row (the beams
of beam search, or one sequence per row), the groups' queries share their row's projections
(`vlp.nn.Attention` groups them), and those projections stay out of the per-sequence state
(`vlp.generate.Shared`), so beam search never copies them when it reorders its beams.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from vlp.generate import Shared, group_size
from vlp.nn import BlockCache


class DecodeState(NamedTuple):
    caches: list[BlockCache]  # self-attention (and per-row cross-attention) caches, batch-first
    context_mask: Tensor | None  # (B, S) keys of the cross-attended context each row may see
    shared: Shared | None = None  # (cross caches, context mask) per context row


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
        shared = Shared(([cache.cross_kv for cache in caches], self.context_mask))
        return logits, DecodeState([BlockCache(cache.self_kv) for cache in caches], None, shared)

    def step(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        if state.shared is None:
            logits, caches = self._run(input_ids, state.caches, None, state.context_mask)
            return logits, DecodeState(caches, state.context_mask)
        cross, context_mask = state.shared.value
        caches = [BlockCache(cache.self_kv, cross_kv)
                  for cache, cross_kv in zip(state.caches, cross, strict=True)]
        logits, caches = self._run(input_ids, caches, None, context_mask)
        return logits, DecodeState([BlockCache(cache.self_kv) for cache in caches], None,
                                   state.shared)
