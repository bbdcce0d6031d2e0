"""Text transformer towers: token + learned position embeddings, causal or bidirectional, and
the CLS-appended causal tower of CoCa."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.config import TextConfig
from vlp.errors import ConfigError
from vlp.nn.attention import causal_mask
from vlp.nn.pooling import pool_argmax, pool_eos, pool_mean
from vlp.nn.transformer import BlockCache, Transformer, init_transformer_, layer_groups


class TextTransformer(nn.Module):
    """``forward_features -> pool -> forward_head`` over token ids ``(B, L)``."""

    def __init__(self, config: TextConfig, output_dim: int | None, proj_bias: bool = False):
        super().__init__()
        if config.padding not in ("eos", "none"):
            raise ConfigError(f"text.padding {config.padding!r}; expected 'eos' or 'none'")
        self.config = config
        width = config.width
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.layers, config.heads, causal=config.causal,
                                       mlp_ratio=config.mlp_ratio, act=config.act,
                                       norm_eps=config.norm_eps, dropout=config.dropout,
                                       drop_path=config.drop_path)
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

    def layer_groups(self) -> list[list[str]]:
        """Parameter names: token and position embeddings; each block; final norm and head."""
        return layer_groups(self, "transformer.blocks", ("token_embed", "pos_embed"))

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
            if attention_mask is None and self.config.padding == "eos":
                attention_mask = self.padding_mask(input_ids)
            if attention_mask is not None:
                mask = attention_mask.bool()[:, None, None, :]
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
        if self.config.pool == "last":
            return tokens[:, -1]
        raise ConfigError(f"text.pool {self.config.pool!r}; expected eos, argmax, mean, first or "
                          "last")

    def forward_head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        return pooled if pre_logits else self.head(pooled)

    def trim_padding(self, input_ids: Tensor,
                     attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Drop trailing columns that are padding in every row. Pooled outputs are unchanged
        (padding never reaches real tokens) and short captions cost less; skipped under
        ``torch.compile`` to keep shapes static."""
        if torch.compiler.is_compiling():
            return input_ids, attention_mask
        real = attention_mask.bool() if attention_mask is not None else self.padding_mask(input_ids)
        columns = real.any(dim=0).nonzero()
        length = int(columns.max()) + 1 if columns.numel() else input_ids.shape[1]
        if length == input_ids.shape[1]:
            return input_ids, attention_mask
        mask = attention_mask[:, :length] if attention_mask is not None else None
        return input_ids[:, :length], mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.config.padding == "eos" and self.config.pool != "last":
            input_ids, attention_mask = self.trim_padding(input_ids, attention_mask)
        tokens = self.forward_features(input_ids, attention_mask)
        return self.forward_head(self.pool(tokens, input_ids))


def appended_cls_mask(real: Tensor) -> Tensor:
    """SDPA mask ``(B, 1, L+1, L+1)`` for a text of ``L`` tokens with a CLS appended (CoCa):
    causal for every row, and the CLS row sees only real tokens (``real`` (B, L), True = not
    padding) and itself, so its embedding does not depend on how much padding follows."""
    B, L = real.shape
    causal = causal_mask(L + 1, L + 1, real.device)  # (L+1, L+1)
    keys = torch.cat([real.bool(), real.new_ones(B, 1, dtype=torch.bool)], dim=1)  # (B, L+1)
    is_cls_row = torch.arange(L + 1, device=real.device) == L  # (L+1,)
    rows = ~is_cls_row[None, :, None] | keys[:, None, :]  # (B, L+1, L+1)
    return (causal[None] & rows)[:, None]


class ClsTextTransformer(nn.Module):
    """Causal text tower with a learned CLS token appended after the text (CoCa, arXiv
    2205.01917 §3.2): token states feed a decoder, the CLS state is the text embedding.

    ``context_length`` counts text tokens; the CLS always sits at the one position after them,
    so with `appended_cls_mask` its state does not depend on how much padding the text carries
    (open_clip places it right after the text, the same for texts padded to the context). The
    final norm is applied to the CLS state only (token states go on to the decoder
    unnormalised)."""

    def __init__(self, config: TextConfig, output_dim: int, proj_bias: bool = False) -> None:
        super().__init__()
        if not config.causal:
            raise ConfigError("a CLS-appended text tower is causal; set text.causal=True")
        self.config = config
        width = config.width
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length + 1, width))
        self.cls_token = nn.Parameter(torch.empty(width))
        self.transformer = Transformer(width, config.layers, config.heads, causal=True,
                                       mlp_ratio=config.mlp_ratio, act=config.act,
                                       norm_eps=config.norm_eps, dropout=config.dropout,
                                       drop_path=config.drop_path)
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.head = nn.Linear(width, output_dim, bias=proj_bias)
        self.init_weights()

    def init_weights(self) -> None:
        # open_clip's TextTransformer stds: tokens 0.02, positions and CLS 0.01, head width^-0.5
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.cls_token, std=0.01)
        init_transformer_(self.transformer)
        nn.init.normal_(self.head.weight, std=self.config.width**-0.5)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def layer_groups(self) -> list[list[str]]:
        """Parameter names: token and position embeddings and the appended CLS token; each
        block; final norm and head."""
        return layer_groups(self, "transformer.blocks", ("token_embed", "pos_embed", "cls_token"))

    def real_tokens(self, input_ids: Tensor) -> Tensor:
        """True for real tokens: everything up to and including the first eos."""
        is_eos = (input_ids == self.config.eos_id).int()
        return (is_eos.cumsum(dim=1) - is_eos) == 0

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings of ``input_ids`` placed at positions ``start...``."""
        end = start + input_ids.shape[1]
        if end > self.config.context_length:
            raise ConfigError(f"text of {end} tokens exceeds context_length "
                              f"{self.config.context_length}")
        dtype = self.token_embed.weight.dtype
        return self.token_embed(input_ids) + self.pos_embed[start:end].to(dtype)

    def forward_features(self, input_ids: Tensor, mask: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
        """``(B, L)`` -> token states ``(B, L, width)`` and CLS state ``(B, width)``, both
        before the final norm. ``mask`` (B, 1, L+1, L+1) replaces `appended_cls_mask`."""
        B, L = input_ids.shape
        x = self.embed(input_ids)
        cls = (self.cls_token + self.pos_embed[-1]).to(x.dtype).expand(B, 1, -1)
        x = torch.cat([x, cls], dim=1)  # (B, L+1, width)
        if mask is None:
            mask = appended_cls_mask(self.real_tokens(input_ids))
        x = self.transformer(x, mask=mask)
        return x[:, :-1], x[:, -1]

    def forward_cached(self, input_ids: Tensor, caches: list[BlockCache] | None,
                       mask: Tensor | None = None) -> tuple[Tensor, list[BlockCache]]:
        """Token states of new tokens after the cached ones (no CLS): incremental decoding."""
        start = 0 if caches is None else caches[0].self_kv.key.shape[2]
        return self.transformer.forward_cached(self.embed(input_ids, start), caches, mask=mask)

    def forward_head(self, cls_state: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.norm(cls_state)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, L) -> (B, output_dim)`` text embedding (unnormalised)."""
        return self.forward_head(self.forward_features(input_ids, mask)[1])
