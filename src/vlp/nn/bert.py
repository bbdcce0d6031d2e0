"""Post-LN (BERT, arXiv 1810.04805) text transformer with optional cross-attention and a KV cache.

Each block normalises after the residual add, ``x = norm1(x + attn(x))``, then with a context
``x = norm_cross(x + cross_attn(x, context))``, then ``x = norm2(x + mlp(x))``. Embeddings are
token + learned position, followed by a LayerNorm. The same tower runs bidirectionally (an
encoder) or causally (a decoder); BLIP builds one of each and shares modules between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import TextConfig
from vlp.errors import ConfigError
from vlp.nn.attention import Attention
from vlp.nn.transformer import (
    BlockCache,
    Mlp,
    layer_groups,
    make_activation,
    run_blocks,
    run_blocks_cached,
)


class PostNormBlock(nn.Module):
    """One BERT layer; ``cross_attn`` exists when the block has a ``context_dim`` and runs only
    when a context is given (BLIP's unimodal text encoder skips it)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-12,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if context_dim is not None:
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
        else:
            self.cross_attn = None
            self.norm_cross = nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)

    def _check_context(self, context: Tensor | None) -> None:
        if context is not None and self.cross_attn is None:
            raise ValueError("this block has no cross-attention; build it with a context_dim")

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        self._check_context(context)
        x = self.norm1(x + self.drop(self.attn(x, mask=mask, is_causal=is_causal)))
        if context is not None:
            x = self.norm_cross(x + self.drop(self.cross_attn(x, context, mask=context_mask)))
        return self.norm2(x + self.mlp(x))

    def forward_cached(
        self,
        x: Tensor,
        cache: BlockCache | None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, BlockCache]:
        """As ``forward`` for new tokens after the cached ones; the context is projected on the
        first call and its keys/values reused from ``cache`` afterwards."""
        self._check_context(context)
        cache = cache or BlockCache()
        attended = self.attn.forward_cached(x, cache.self_kv, mask=mask, is_causal=is_causal)
        x = self.norm1(x + attended.output)
        cross_kv = None
        if context is not None or cache.cross_kv is not None:
            cross = self.cross_attn.forward_cached(x, cache.cross_kv, context=context,
                                                   mask=context_mask)
            x = self.norm_cross(x + cross.output)
            cross_kv = cross.cache
        return self.norm2(x + self.mlp(x)), BlockCache(attended.cache, cross_kv)


def bert_init_(root: nn.Module) -> None:
    """BERT's init of every Linear (weights ~ N(0, 0.02), zero biases) and LayerNorm (1, 0)
    under ``root``; embeddings and other parameters are the caller's."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def key_mask(valid: Tensor | None) -> Tensor | None:
    """``(B, S)`` key validity (True / 1 = attend) -> SDPA mask ``(B, 1, 1, S)``."""
    return None if valid is None else valid.bool()[:, None, None, :]


class BertTextTransformer(nn.Module):
    """Token + position embeddings, embedding LayerNorm, ``PostNormBlock``s; no final norm
    (post-LN blocks end normalised). ``causal`` fixes the self-attention pattern."""

    def __init__(self, config: TextConfig, context_dim: int | None, causal: bool) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.grad_checkpointing = False
        width = config.width
        self.token_embed = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_id)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, width))
        self.embed_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(width, config.heads, mlp_ratio=config.mlp_ratio, act=config.act,
                          norm_eps=config.norm_eps, context_dim=context_dim,
                          dropout=config.dropout)
            for _ in range(config.layers)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's init: every weight matrix, embedding and position std 0.02, biases 0,
        LayerNorms 1/0, the padding embedding 0."""
        bert_init_(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        with torch.no_grad():
            self.token_embed.weight[self.config.pad_id].zero_()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def layer_groups(self) -> list[list[str]]:
        """Parameter names: token and position embeddings and their norm; each layer; nothing
        after the last layer (post-LN layers end normalised)."""
        return layer_groups(self, "blocks", ("token_embed", "pos_embed", "embed_norm"))

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Normalised token + position embeddings of ids placed at positions ``start...``."""
        end = start + input_ids.shape[1]
        if end > self.config.context_length:
            raise ConfigError(f"text of {end} tokens exceeds context_length "
                              f"{self.config.context_length}")
        dtype = self.token_embed.weight.dtype
        x = self.token_embed(input_ids) + self.pos_embed[start:end].to(dtype)
        return self.drop(self.embed_norm(x))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, L) -> (B, L, width)``. ``attention_mask`` (B, L), True / 1 = real token
        (default: ids other than pad_id); ``context`` (B, S, context_dim) is cross-attended by
        every block when given, its keys limited by ``context_mask`` (B, S)."""
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_id
        x = self.embed(input_ids)
        mask, context_mask = key_mask(attention_mask), key_mask(context_mask)
        return run_blocks(self, x, mask, context, context_mask)

    def forward_cached(
        self,
        input_ids: Tensor,
        caches: list[BlockCache] | None,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[BlockCache]]:
        """States of new tokens after the cached ones (incremental decoding). ``attention_mask``
        (B, past + new) covers every key; the context is needed on the first call only."""
        start = 0 if caches is None else caches[0].self_kv.key.shape[2]
        x = self.embed(input_ids, start)
        mask, context_mask = key_mask(attention_mask), key_mask(context_mask)
        return run_blocks_cached(self, x, caches, mask, context, context_mask)


class LMPredictionHead(nn.Module):
    """BERT's prediction head: dense + activation + LayerNorm, then logits against a (tied)
    token-embedding matrix plus an output-only bias."""

    def __init__(self, width: int, vocab_size: int, act: str = "gelu",
                 norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = make_activation(act)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, states: Tensor, embedding: Tensor) -> Tensor:
        """``(B, T, width)`` states and the ``(vocab, width)`` embedding -> ``(B, T, vocab)``."""
        return F.linear(self.norm(self.act(self.dense(states))), embedding, self.bias)


# BLIP's encoder/decoder sharing (Table 3): "all_but_sa", and the ablations "all" and "none"
SHARES = ("all_but_sa", "all", "none")
# per decoder block: the encoder modules it reuses under each sharing mode; BLIP ties every
# weight whose path lacks "/attention", so self-attention and its post-LN stay separate
SHARED_BLOCK_MODULES = {
    "all_but_sa": ("cross_attn", "norm_cross", "mlp", "norm2"),
    "all": ("attn", "norm1", "cross_attn", "norm_cross", "mlp", "norm2"),
    "none": (),
}


def share_text_towers_(decoder: BertTextTransformer, encoder: BertTextTransformer,
                       share: str) -> None:
    """Make ``decoder`` reuse ``encoder``'s modules as ``share`` says (embeddings too unless
    "none"); shared parameters are one tensor, so they train as one."""
    if share not in SHARES:
        raise ConfigError(f"blip.share {share!r}; expected one of {list(SHARES)}")
    if share == "none":
        return
    decoder.token_embed = encoder.token_embed
    decoder.pos_embed = encoder.pos_embed
    decoder.embed_norm = encoder.embed_norm
    for decoder_block, encoder_block in zip(decoder.blocks, encoder.blocks, strict=True):
        for name in SHARED_BLOCK_MODULES[share]:
            setattr(decoder_block, name, getattr(encoder_block, name))
