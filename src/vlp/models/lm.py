"""A decoder-only language model with GPT-2's architecture, trained on text alone.

It exists so that a text model vlp needs (BLIP-2's frozen LLM) is trained by the normal trainer
from a text corpus (source kind "text") and written by `vlp convert --to hf` as a transformers
``GPT2LMHeadModel`` directory, which BLIP-2 then loads by reference (``llm_path``). The blocks
are vlp's causal text tower (`vlp.nn.TextTransformer`); the LM head is the token embedding
matrix, as GPT-2 ties them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vlp.config import LMConfig
from vlp.contract import TEXT, PretrainModel, tower_names
from vlp.errors import ConfigError
from vlp.losses import IGNORE_INDEX, caption_nll
from vlp.models.registry import register
from vlp.nn import TextTransformer


def document_labels(input_ids: Tensor, pad_id: int) -> Tensor:
    """Next-token targets ``(B, L - 1)`` of right-padded rows: every token after the first up
    to each row's last non-pad token (eos included), IGNORE_INDEX after it."""
    real = input_ids != pad_id
    through_last = real.flip(1).cumsum(1).flip(1) > 0
    return input_ids[:, 1:].masked_fill(~through_last[:, 1:], IGNORE_INDEX)


class CausalLM(PretrainModel):
    batch_kinds = frozenset({TEXT})

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not config.text.causal:
            raise ConfigError("lm: text.causal must be True (a decoder-only language model)")
        self.config = config
        self.text = TextTransformer(config.text, output_dim=None)

    def no_weight_decay(self) -> set[str]:
        # GPT-2 / nanoGPT decay every matrix, the position and token embeddings included
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.transformer.grad_checkpointing = enable

    def tower_groups(self) -> dict[str, list[list[str]]]:
        return {"text": tower_names(self, "text")}

    def logits(self, input_ids: Tensor) -> Tensor:
        """``(B, L, vocab)`` next-token logits; position t predicts token t + 1."""
        states = self.text.forward_features(input_ids)
        return states @ self.text.token_embed.weight.T

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        input_ids = batch["input_ids"]
        logits = self.logits(input_ids)
        labels = document_labels(input_ids, self.config.text.pad_id)
        nll, tokens = caption_nll(logits[:, :-1], labels, self.config.label_smoothing)
        return {"lm_nll": nll, "lm_tokens": tokens}

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict[str, Any]:
        nll, tokens = features["lm_nll"], features["lm_tokens"]
        loss = nll.sum() / tokens.sum().clamp(min=1)
        return {"loss": loss, "losses": {"lm": loss.detach()}}


@register("lm")
def build_lm(config: LMConfig) -> CausalLM:
    return CausalLM(config)
