"""BLIP's image-grounded decoder as a `vlp.generate.StepDecoder`: captions cross-attend to image
tokens, VQA answers to question states; the KV caches grow one token at a time."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from vlp.nn import BlockCache


class DecodeState(NamedTuple):
    caches: list[BlockCache]  # decoder self- and cross-attention caches, batch-first
    context_mask: Tensor | None  # (B, S) keys of the cross-attended context each row may see


class GroundedDecoder:
    """`vlp.generate.StepDecoder` over BLIP's decoder: sequences cross-attend to row ``rows``
    of ``context`` (image tokens for captions, question states for VQA answers)."""

    def __init__(self, model: nn.Module, context: Tensor,
                 context_mask: Tensor | None = None) -> None:
        self.model = model
        self.context = context  # (B_context, S, D)
        self.context_mask = context_mask  # (B_context, S) or None: every key visible

    def _logits(self, input_ids: Tensor, state: DecodeState | None, rows: Tensor | None
                ) -> tuple[Tensor, DecodeState]:
        if state is None:
            context = self.context[rows]
            context_mask = self.context_mask[rows] if self.context_mask is not None else None
            caches = None
        else:
            context, context_mask, caches = None, state.context_mask, state.caches
        states, caches = self.model.text_decoder.forward_cached(
            input_ids, caches, context=context, context_mask=context_mask)
        logits = self.model.lm_logits(states[:, -1:])[:, 0]
        return logits, DecodeState(caches, context_mask)

    def prefill(self, input_ids: Tensor, rows: Tensor) -> tuple[Tensor, DecodeState]:
        return self._logits(input_ids, None, rows)

    def step(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        return self._logits(input_ids, state, None)
