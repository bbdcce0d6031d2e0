"""A causal text decoder that cross-attends to a context (e.g. image tokens), with a KV cache.

Each layer is a causal self-attention `Block` followed by a `CrossBlock` (cross-attention with its
own MLP): the multimodal decoder of CoCa as open_clip and CoCa-pytorch build it. During
incremental decoding the self-attention caches grow by one token per step, while the
cross-attention keys/values are projected from the context once and reused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.contract import ShardUnit
from vlp.nn.attention import Attention, KVCache
from vlp.nn.transformer import Block, BlockCache, Mlp


class CrossBlock(nn.Module, ShardUnit):
    """Pre-LN cross-attention block: ``x += attn(norm1 x, norm_context(context))``;
    ``x += mlp(norm2 x)``. The context is normalised here because it comes from another tower."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(dim, heads, context_dim=context_dim, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """``x`` (B, T, dim), ``context`` (B, S, context_dim); ``context_mask`` True = attend."""
        x = x + self.drop(self.attn(self.norm1(x), self.norm_context(context), mask=context_mask))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward_cached(
        self,
        x: Tensor,
        cache: KVCache | None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """As ``forward``; the context is projected only when ``cache`` is None."""
        context = self.norm_context(context) if cache is None and context is not None else None
        attended = self.attn.forward_cached(self.norm1(x), cache, context=context,
                                            mask=context_mask)
        x = x + attended.output
        return x + self.mlp(self.norm2(x)), attended.cache


class CrossDecoder(nn.Module):
    """``layers`` x (causal self-attention block, cross-attention block), then a final norm."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        context_dim: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps, dropout=dropout)
            for _ in range(layers)
        )
        self.cross_blocks = nn.ModuleList(
            CrossBlock(dim, heads, context_dim, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps,
                       dropout=dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's text-tower stds (`init_transformer_`): in-projections width^-0.5, residual
        out-projections width^-0.5 (2 layers)^-0.5, MLP fc1 (2 width)^-0.5; biases zero."""
        width = self.norm.normalized_shape[0]
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * len(self.blocks)) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in [*self.blocks, *self.cross_blocks]:
            attn = block.attn
            for linear in (getattr(attn, name, None) for name in ("qkv", "q", "kv")):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=attn_std)
                    nn.init.zeros_(linear.bias)
            for linear, std in ((attn.proj, proj_std), (block.mlp.fc1, fc_std),
                                (block.mlp.fc2, proj_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, T, dim) -> (B, T, dim)`` after the final norm. ``mask`` (bool, True = attend) is
        merged with causality; ``context_mask`` masks context keys."""
        for block, cross in zip(self.blocks, self.cross_blocks, strict=True):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, True, use_reentrant=False)
                x = checkpoint(cross, x, context, context_mask, use_reentrant=False)
            else:
                x = block(x, mask, True)
                x = cross(x, context, context_mask)
        return self.norm(x)

    def forward_cached(
        self,
        x: Tensor,
        caches: list[BlockCache] | None,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[BlockCache]]:
        """New tokens ``x`` after the cached ones -> (their normed states, grown caches). The
        first call (``caches`` None) needs ``context``; later calls reuse its projections."""
        caches = caches or [BlockCache()] * len(self.blocks)
        new_caches = []
        for block, cross, cache in zip(self.blocks, self.cross_blocks, caches, strict=True):
            x, self_cache = block.forward_cached(x, BlockCache(cache.self_kv), mask,
                                                 is_causal=True)
            x, cross_kv = cross.forward_cached(x, cache.cross_kv, context, context_mask)
            new_caches.append(BlockCache(self_cache.self_kv, cross_kv))
        return self.norm(x), new_caches
