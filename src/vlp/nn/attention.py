"""One multi-head attention module on ``F.scaled_dot_product_attention``.

Mask convention everywhere in vlp: boolean, ``True`` = this query may attend to this key,
broadcastable to ``(B, heads, T_query, T_key)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.errors import ConfigError


class KVCache(NamedTuple):
    """Keys and values already projected, ``(B, heads, T, head_dim)`` each."""

    key: Tensor
    value: Tensor


class AttentionOutput(NamedTuple):
    output: Tensor  # (B, T, dim)
    cache: KVCache  # keys/values including this call's tokens (self) or the context (cross)


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """``(q_len, k_len)`` bool mask: query i sits at position ``k_len - q_len + i`` and sees keys
    at or before it."""
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def prefix_mask(prefix_lengths: Tensor, seq_len: int) -> Tensor:
    """PrefixLM mask ``(B, 1, T, T)``: bidirectional over each row's prefix, causal after it."""
    pos = torch.arange(seq_len, device=prefix_lengths.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    in_prefix = pos[None, :] < prefix_lengths[:, None]  # (B, T) keys inside the prefix
    return (causal[None] | in_prefix[:, None, :])[:, None]


def prefix_target_mask(prefix_valid: Tensor, target_len: int) -> Tensor:
    """PrefixLM mask ``(B, 1, P+T, P+T)`` over ``[prefix (P, padded); targets (T)]`` in one
    stack: every query sees the real prefix keys (``prefix_valid`` (B, P), True = real), target
    queries also see targets up to themselves, prefix queries never see targets."""
    B, P = prefix_valid.shape
    device = prefix_valid.device
    prefix_keys = prefix_valid.bool()[:, None, :].expand(B, P + target_len, P)
    target_keys = torch.cat([torch.zeros(P, target_len, dtype=torch.bool, device=device),
                             causal_mask(target_len, target_len, device)])  # (P+T, T)
    return torch.cat([prefix_keys, target_keys[None].expand(B, -1, -1)], dim=2)[:, None]


def merge_masks(
    padding_mask: Tensor | None = None,
    causal: bool = False,
    q_len: int | None = None,
    k_len: int | None = None,
    extra: Tensor | None = None,
) -> Tensor | None:
    """Combine a key padding mask ``(B, T_key)`` (True = real token), causality and an extra
    bool mask into one SDPA mask ``(B|1, 1|heads, T_q, T_k)``; None when nothing masks."""
    mask = None
    if padding_mask is not None:
        mask = padding_mask[:, None, None, :].bool()
    if causal:
        device = padding_mask.device if padding_mask is not None else None
        if q_len is None or k_len is None:
            raise ValueError("causal masking needs q_len and k_len")
        c = causal_mask(q_len, k_len, device)[None, None]
        mask = c if mask is None else mask & c
    if extra is not None:
        mask = extra.bool() if mask is None else mask & extra.bool()
    return mask


def _no_empty_rows(mask: Tensor) -> Tensor:
    # A query that may attend to nothing (e.g. a left-pad position under a causal mask) would make
    # SDPA return NaN; let it attend everywhere instead — its output is ignored by construction.
    return mask | ~mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Self-attention (fused ``qkv``) or cross-attention (``q`` and ``kv``, context dim may differ).

    ``fused=False`` selects an explicit softmax path, kept so tests can compare it with SDPA.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_norm: bool = False,
        dropout: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by heads {heads}; "
                              "expected a width that is a multiple of heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.is_cross = context_dim is not None
        self.dropout = dropout
        self.fused = fused
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=out_bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        return self.q_norm(q), self.k_norm(k), v

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        out = self._heads(q, k, v, mask, is_causal)
        B, _, T, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def _attend_grouped(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Cross-attention of ``q`` (g * B rows, consecutive groups of g) to keys/values of B
        rows: each group's queries are stacked along the query axis and attend to their row's
        keys once, so the g beams of an image read one copy of its projected tokens."""
        Bq, heads, T, head_dim = q.shape
        Bk = k.shape[0]
        if Bq % Bk:
            raise ValueError(f"{Bq} query rows cannot share the keys of {Bk} rows")
        g = Bq // Bk
        q = q.view(Bk, g, heads, T, head_dim).transpose(1, 2).reshape(Bk, heads, g * T, head_dim)
        out = self._heads(q, k, v, mask, False)  # (Bk, heads, g*T, hs)
        out = out.view(Bk, heads, g, T, head_dim).permute(0, 2, 3, 1, 4)  # (Bk, g, T, nh, hs)
        return self.proj(out.reshape(Bq, T, heads * head_dim))

    def _heads(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Attention per head ``(B, nh, Tq, hs)``, before the output projection."""
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None:
            mask = _no_empty_rows(mask)
        if self.fused:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None
            )
        else:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, nh, Tq, Tk)
            if is_causal and mask is None:
                mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.float().softmax(dim=-1).to(q.dtype)
            attn = F.dropout(attn, dropout_p)
            out = attn @ v  # (B, nh, Tq, Tk) x (B, nh, Tk, hs) -> (B, nh, Tq, hs)
        return out

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """``x`` (B, T, dim); ``context`` (B, S, context_dim) for cross-attention."""
        q, k, v = self._project(x, context)
        if is_causal and mask is not None:
            mask = mask & causal_mask(q.shape[-2], k.shape[-2], q.device)
            is_causal = False
        return self._attend(q, k, v, mask, is_causal)

    def forward_cached(
        self,
        x: Tensor,
        cache: KVCache | None,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> AttentionOutput:
        """Incremental decoding: self-attention appends this call's keys/values to ``cache``;
        cross-attention projects ``context`` once and reuses it while ``cache`` is given.

        ``mask`` covers all keys (past + new); with ``is_causal`` the new queries sit at the end.
        Cross-attention: ``x`` may have g times the rows of the context (or cache), each
        consecutive g rows (the beams of one image) sharing one row of it.
        """
        if self.is_cross:
            if cache is None:
                q, k, v = self._project(x, context)
                cache = KVCache(k, v)
            else:
                q = self.q_norm(self._split_heads(self.q(x)))
            k, v = cache
            if q.shape[0] != k.shape[0]:
                return AttentionOutput(self._attend_grouped(q, k, v, mask), cache)
        else:
            q, k, v = self._project(x, None)
            if cache is not None:
                k = torch.cat([cache.key, k], dim=2)
                v = torch.cat([cache.value, v], dim=2)
            cache = KVCache(k, v)
        if is_causal and (q.shape[-2] > 1 or mask is not None):
            c = causal_mask(q.shape[-2], k.shape[-2], q.device)
            mask = c if mask is None else mask & c
        return AttentionOutput(self._attend(q, k, v, mask, is_causal=False), cache)
