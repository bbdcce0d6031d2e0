"""Pooling of token sequences into one vector: CLS, EOS, argmax, mean, attentional pooler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.errors import ConfigError
from vlp.nn.attention import Attention
from vlp.nn.transformer import Mlp


def pool_cls(tokens: Tensor) -> Tensor:
    """First token, ``(B, T, D) -> (B, D)``."""
    return tokens[:, 0]


def pool_mean(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens (``mask`` True = real), ``(B, T, D) -> (B, D)``."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def eos_positions(input_ids: Tensor, eos_id: int, fallback: str = "last") -> Tensor:
    """Position of the first ``eos_id`` in each row; rows without one use their last position,
    or index 0 with ``fallback="first"`` (what HF CLIP and open_clip's "eos" pool do)."""
    if fallback not in ("last", "first"):
        raise ConfigError(f"eos fallback {fallback!r}; expected 'last' or 'first'")
    is_eos = input_ids == eos_id
    first = is_eos.int().argmax(dim=1)
    if fallback == "first":
        return first
    last = torch.full_like(first, input_ids.shape[1] - 1)
    return torch.where(is_eos.any(dim=1), first, last)


def pool_eos(tokens: Tensor, input_ids: Tensor, eos_id: int, fallback: str = "last") -> Tensor:
    """Token at the first ``eos_id`` of each row, ``(B, T, D) -> (B, D)``."""
    index = eos_positions(input_ids, eos_id, fallback)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index]


def pool_argmax(tokens: Tensor, input_ids: Tensor) -> Tensor:
    """Token at the highest id of each row (OpenAI CLIP: the end-of-text id is the largest)."""
    index = input_ids.argmax(dim=-1)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index]


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries cross-attend to the tokens (CoCa, arXiv 2205.01917 §3.2)."""

    def __init__(self, dim: int, context_dim: int, n_queries: int, heads: int,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, dim))
        self.norm_k = nn.LayerNorm(context_dim, eps=norm_eps)
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, context_dim=context_dim)
        nn.init.normal_(self.query, std=dim**-0.5)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, T, context_dim) -> (B, n_queries, dim)``; ``mask`` (B, T) True = real token."""
        context = self.norm_k(tokens)
        query = self.norm_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        return self.attn(query, context, mask=attn_mask)


class MapHead(nn.Module):
    """Multihead attention pooling (SigLIP's vision head): one learned probe attends to every
    token, then a residual MLP reads the normed result; ``(B, T, D) -> (B, D)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, dim))
        self.attn = Attention(dim, heads, context_dim=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        nn.init.normal_(self.probe, std=dim**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        probe = self.probe.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        x = self.attn(probe, tokens)
        return (x + self.mlp(self.norm(x)))[:, 0]
