"""Q-Former (BLIP-2, arXiv 2301.12597 §3.1): learned queries and text in one post-LN BERT.

Queries and text share every self-attention layer; only the queries cross-attend to the image
(every ``cross_attention_freq``-th layer, from layer 0) and they have a feed-forward network of
their own. Who sees whom is the attention mask alone (Fig. 2 right), built by `qformer_mask`:

- ``"unimodal"`` (ITC): queries see queries, text sees text;
- ``"multimodal_causal"`` (ITG): text sees every query and the text before it, queries never
  see text;
- ``"bidirectional"`` (ITM): everyone sees everyone.

Queries have no position embeddings; one LayerNorm (+ dropout) covers [queries; word + pos].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlp.config import TextConfig
from vlp.contract import ShardUnit
from vlp.errors import ConfigError
from vlp.nn.attention import Attention, KVCache, causal_mask
from vlp.nn.bert import bert_init_
from vlp.nn.transformer import Mlp

MASK_KINDS = ("unimodal", "multimodal_causal", "bidirectional")


def qformer_mask(kind: str, num_queries: int, text_mask: Tensor | None,
                 text_len: int | None = None) -> Tensor:
    """Bool self-attention mask ``(B|1, 1, Q + T, Q + T)`` (True = attend) over [queries; text]
    for one of `MASK_KINDS`; ``text_mask`` (B, T) hides padding keys (None: no padding)."""
    if kind not in MASK_KINDS:
        raise ConfigError(f"Q-Former mask {kind!r}; expected one of {list(MASK_KINDS)}")
    if text_mask is not None:
        text_len = text_mask.shape[1]
    if text_len is None:
        raise ValueError("qformer_mask needs text_mask or text_len")
    device = text_mask.device if text_mask is not None else None
    size = num_queries + text_len
    is_query = torch.arange(size, device=device) < num_queries
    if kind == "bidirectional":
        mask = torch.ones(size, size, dtype=torch.bool, device=device)
    elif kind == "unimodal":
        mask = is_query[:, None] == is_query[None, :]
    else:
        text_causal = causal_mask(size, size, device)  # text rows: earlier text (and queries)
        mask = torch.where(is_query[:, None], is_query[None, :], text_causal | is_query[None, :])
    mask = mask[None, None]  # (1, 1, Q+T, Q+T)
    if text_mask is not None:
        keys = torch.cat([text_mask.new_ones(text_mask.shape[0], num_queries), text_mask], dim=1)
        mask = mask & keys.bool()[:, None, None, :]
    return mask


class QFormerOutput(NamedTuple):
    query_states: Tensor  # (B, Q, width)
    text_states: Tensor | None  # (B, T, width), None without text


class QFormerLayer(nn.Module, ShardUnit):
    """One Q-Former layer. Self-attention over the whole sequence; then, on the query
    positions only, cross-attention (when the layer has it) and the query FFN; the text
    positions get the text FFN."""

    def __init__(self, config: TextConfig, context_dim: int | None, text_ffn: bool) -> None:
        super().__init__()
        width, eps, dropout = config.width, config.norm_eps, config.dropout
        hidden = int(width * config.mlp_ratio)
        self.attn = Attention(width, config.heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        if context_dim is not None:
            self.cross_attn = Attention(width, config.heads, context_dim=context_dim,
                                        dropout=dropout)
            self.norm_cross = nn.LayerNorm(width, eps=eps)
        else:
            self.cross_attn = None
            self.norm_cross = nn.Identity()
        self.mlp_query = Mlp(width, hidden, act=config.act, dropout=dropout)
        self.norm2_query = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, hidden, act=config.act, dropout=dropout) if text_ffn else None
        self.norm2 = nn.LayerNorm(width, eps=eps) if text_ffn else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, num_queries: int, mask: Tensor | None,
                image: Tensor | None, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """``x`` (B, T, width) holds ``num_queries`` queries first, then text; ``past`` holds
        keys/values of earlier positions (the queries, for ITG) that ``mask`` also covers.
        Returns the new states and the self-attention keys/values including ``x``'s."""
        attended = self.attn.forward_cached(x, past, mask=mask)
        x = self.norm1(x + self.drop(attended.output))
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries:
            if self.cross_attn is not None:
                if image is None:
                    raise ValueError("a Q-Former layer with cross-attention needs the image")
                queries = self.norm_cross(queries + self.drop(self.cross_attn(queries, image)))
            queries = self.norm2_query(queries + self.mlp_query(queries))
        if text.shape[1]:
            if self.mlp is None:
                raise ConfigError("this Q-Former has no text FFNs (text_parts=False); it reads "
                                  "queries only")
            text = self.norm2(text + self.mlp(text))
        return torch.cat([queries, text], dim=1), attended.cache


class QFormer(nn.Module):
    """Learned queries + a BERT-style transformer whose queries read frozen image features.

    ``text=False`` keeps only what the queries use (BLIP-2 stage 2): no word/position
    embeddings, no text FFNs."""

    def __init__(self, config: TextConfig, num_queries: int, image_dim: int,
                 cross_attention_freq: int = 2, text: bool = True) -> None:
        super().__init__()
        if num_queries < 1 or cross_attention_freq < 1:
            raise ConfigError(f"Q-Former needs num_queries >= 1 and cross_attention_freq >= 1, "
                              f"got {num_queries} and {cross_attention_freq}")
        self.config = config
        self.num_queries = num_queries
        self.has_text = text
        width = config.width
        self.query_tokens = nn.Parameter(torch.empty(num_queries, width))
        if text:
            self.token_embed = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_id)
            self.pos_embed = nn.Parameter(torch.empty(config.context_length, width))
        else:
            self.token_embed = None
            self.pos_embed = None
        self.embed_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            QFormerLayer(config, image_dim if i % cross_attention_freq == 0 else None, text)
            for i in range(config.layers))
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's init (std 0.02 matrices and embeddings, zero biases, unit LayerNorms) and
        the queries ~ N(0, 0.02) (LAVIS ``query_tokens``)."""
        bert_init_(self)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.has_text:
            nn.init.normal_(self.token_embed.weight, std=0.02)
            nn.init.normal_(self.pos_embed, std=0.02)
            with torch.no_grad():
                self.token_embed.weight[self.config.pad_id].zero_()

    def no_weight_decay(self) -> set[str]:
        return {"query_tokens"} | ({"pos_embed"} if self.has_text else set())

    def embed(self, batch: int, input_ids: Tensor | None, queries: bool = True,
              start: int = 0) -> Tensor:
        """Normalised [queries; word + position embeddings], text at positions ``start...``."""
        parts = []
        if queries:
            parts.append(self.query_tokens.expand(batch, -1, -1))
        if input_ids is not None:
            if not self.has_text:
                raise ConfigError("this Q-Former has no text embeddings (text_parts=False)")
            end = start + input_ids.shape[1]
            if end > self.config.context_length:
                raise ConfigError(f"text of {end} tokens exceeds the Q-Former's context_length "
                                  f"{self.config.context_length}")
            dtype = self.token_embed.weight.dtype
            parts.append(self.token_embed(input_ids) + self.pos_embed[start:end].to(dtype))
        return self.drop(self.embed_norm(torch.cat(parts, dim=1)))

    def run(self, x: Tensor, num_queries: int, mask: Tensor | None, image: Tensor | None,
            past: list[KVCache] | None = None) -> tuple[Tensor, list[KVCache]]:
        """Embedded ``x`` through every layer; returns the states and each layer's keys/values."""
        caches = []
        for block, cache in zip(self.blocks, past or [None] * len(self.blocks), strict=True):
            x, cache = block(x, num_queries, mask, image, cache)
            caches.append(cache)
        return x, caches

    def forward(self, image: Tensor | None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, kind: str = "bidirectional"
                ) -> QFormerOutput:
        """Queries (reading ``image`` (B, N, image_dim)) and/or text ``input_ids`` (B, T) under
        mask ``kind``; ``image=None`` runs the text alone (the ITC text encoder)."""
        queries = image is not None
        batch = image.shape[0] if queries else input_ids.shape[0]
        num_queries = self.num_queries if queries else 0
        mask = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = input_ids != self.config.pad_id
            mask = qformer_mask(kind, num_queries, attention_mask.bool())
        x, _ = self.run(self.embed(batch, input_ids, queries), num_queries, mask, image)
        text_states = x[:, num_queries:] if input_ids is not None else None
        return QFormerOutput(x[:, :num_queries], text_states)

    def query_states(self, image: Tensor) -> tuple[Tensor, list[KVCache]]:
        """Queries alone over ``image``: states (B, Q, width) and each layer's query
        keys/values, which ITG text attends to without recomputing the queries."""
        return self.run(self.embed(image.shape[0], None), self.num_queries, None, image)

    def text_after_queries(self, input_ids: Tensor, attention_mask: Tensor,
                           query_caches: list[KVCache]) -> Tensor:
        """ITG text states (B, T, width): text sees every query (through their cached
        keys/values) and the text before it — the text rows of the multimodal causal mask."""
        num_queries = query_caches[0].key.shape[2]
        mask = qformer_mask("multimodal_causal", num_queries, attention_mask.bool())
        x = self.embed(input_ids.shape[0], input_ids, queries=False)
        states, _ = self.run(x, 0, mask[:, :, num_queries:], None, query_caches)
        return states


@torch.no_grad()
def load_bert_(qformer: QFormer, state: dict[str, Tensor]) -> list[str]:
    """Initialise ``qformer`` from a BERT in vlp's `BertTextTransformer` layout (BLIP-2 §3.1):
    embeddings (the rows both vocabularies have), self-attention and the FFN, copied into both
    the text and the query FFN; cross-attention and the queries keep their random init.
    Returns the Q-Former names set; raises ConfigError on a width or depth mismatch."""
    target = qformer.state_dict(keep_vars=True)
    copies: dict[str, str] = {"embed_norm.weight": "embed_norm.weight",
                              "embed_norm.bias": "embed_norm.bias"}
    if qformer.has_text:
        copies.update({"token_embed.weight": "token_embed.weight", "pos_embed": "pos_embed"})
    depth = sum(1 for key in state if key.endswith(".norm1.weight"))
    if depth < len(qformer.blocks):
        raise ConfigError(f"BERT has {depth} layers, the Q-Former {len(qformer.blocks)}")
    for i in range(len(qformer.blocks)):
        for ours, theirs in (("attn", "attn"), ("norm1", "norm1"), ("mlp_query", "mlp"),
                             ("norm2_query", "norm2"), ("mlp", "mlp"), ("norm2", "norm2")):
            for key in target:
                if key.startswith(f"blocks.{i}.{ours}."):
                    copies[key] = f"blocks.{i}.{theirs}." + key.split(".", 3)[3]
    for ours, theirs in copies.items():
        source, param = state[theirs], target[ours]
        if source.shape[1:] != param.shape[1:] or (source.ndim == 1
                                                   and source.shape != param.shape):
            raise ConfigError(f"BERT {theirs} has shape {tuple(source.shape)}, the Q-Former's "
                              f"{ours} {tuple(param.shape)}")
        rows = min(source.shape[0], param.shape[0])  # vocab/positions may differ ([DEC])
        param[:rows].copy_(source[:rows])
    return sorted(copies)
