"""Text transformer tower: token + learned position embeddings, causal or bidirectional."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.config import TextConfig
from vlp.errors import ConfigError
from vlp.nn.pooling import pool_argmax, pool_eos, pool_mean
from vlp.nn.transformer import Transformer, init_transformer_


class TextTransformer(nn.Module):
    """``forward_features -> pool -> forward_head`` over token ids ``(B, L)``."""

    def __init__(self, config: TextConfig, output_dim: int | None, proj_bias: bool = False):
        super().__init__()
        self.config = config
        width = config.width
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.layers, config.heads, causal=config.causal,
                                       mlp_ratio=config.mlp_ratio, act=config.act,
                                       norm_eps=config.norm_eps, dropout=config.dropout)
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.head = (nn.Linear(width, output_dim, bias=proj_bias) if output_dim is not None
                     else nn.Identity())
        self.init_weights()

    def init_weights(self) -> None:
        width = self.config.width
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_transformer_(self.transformer)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=width**-0.5)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def padding_mask(self, input_ids: Tensor) -> Tensor:
        """True for real tokens: everything up to and including the first eos."""
        is_eos = (input_ids == self.config.eos_id).int()
        return (is_eos.cumsum(dim=1) - is_eos) == 0

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, L) -> (B, L, width)`` after the final norm. A causal tower ignores padding
        (tokens never see later positions) unless ``mask_padding`` is set and an
        ``attention_mask`` is given (left padding); a bidirectional one masks it out."""
        B, L = input_ids.shape
        if L > self.config.context_length:
            raise ConfigError(f"text of {L} tokens exceeds context_length "
                              f"{self.config.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:L].to(self.token_embed.weight.dtype)
        mask = None
        if not self.config.causal:
            if attention_mask is None:
                attention_mask = self.padding_mask(input_ids)
            keep = attention_mask.bool()
            mask = keep[:, None, None, :]
        elif self.config.mask_padding and attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L), merged with causal
        x = self.transformer(x, mask=mask)
        return self.norm(x)

    def pool(self, tokens: Tensor, input_ids: Tensor) -> Tensor:
        if self.config.pool == "eos":
            return pool_eos(tokens, input_ids, self.config.eos_id, self.config.eos_fallback)
        if self.config.pool == "argmax":
            return pool_argmax(tokens, input_ids)
        if self.config.pool == "mean":
            return pool_mean(tokens, self.padding_mask(input_ids))
        if self.config.pool == "first":
            return tokens[:, 0]
        raise ConfigError(f"text.pool {self.config.pool!r}; expected eos, argmax, mean or first")

    def forward_head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        return pooled if pre_logits else self.head(pooled)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        tokens = self.forward_features(input_ids, attention_mask)
        return self.forward_head(self.pool(tokens, input_ids))
