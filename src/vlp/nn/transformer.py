"""Pre-LN transformer blocks and stacks, with optional cross-attention and a KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.contract import ShardUnit
from vlp.errors import ConfigError
from vlp.nn.attention import Attention, KVCache


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016, arXiv 1603.09382): in training each sample's
    residual branch is dropped with probability ``p``, the kept ones scaled by 1 / (1 - p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ConfigError(f"drop_path {p}: expected a probability in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def drop_path_rates(rate: float, layers: int) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to ``rate`` over the stack (as the
    ViT/DeiT recipes BLIP starts from)."""
    return [rate * i / (layers - 1) if layers > 1 else rate for i in range(layers)]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class BlockCache(tuple):
    """Per-block cache: ``(self_attention KVCache | None, cross_attention KVCache | None)``."""

    def __new__(cls, self_kv: KVCache | None = None, cross_kv: KVCache | None = None):
        return super().__new__(cls, (self_kv, cross_kv))

    @property
    def self_kv(self) -> KVCache | None:
        return self[0]

    @property
    def cross_kv(self) -> KVCache | None:
        return self[1]


class Block(nn.Module, ShardUnit):
    """Pre-LN block: ``x += attn(norm1 x)``; ``x += cross_attn(norm_cross x, context)`` when the
    block has a ``context_dim``; ``x += mlp(norm2 x)``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        context_dim: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, dropout=attn_dropout, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = Attention(
                dim, heads, context_dim=context_dim, dropout=attn_dropout, qkv_bias=qkv_bias
            )
        else:
            self.norm_cross = nn.Identity()
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        branch = self.drop(self.ls1(self.attn(self.norm1(x), mask=mask, is_causal=is_causal)))
        x = x + self.drop_path(branch)
        if self.cross_attn is not None:
            branch = self.drop(self.cross_attn(self.norm_cross(x), context, mask=context_mask))
            x = x + self.drop_path(branch)
        x = x + self.drop_path(self.drop(self.ls2(self.mlp(self.norm2(x)))))
        return x

    def forward_cached(
        self,
        x: Tensor,
        cache: BlockCache | None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, BlockCache]:
        cache = cache or BlockCache()
        attn = self.attn.forward_cached(self.norm1(x), cache.self_kv, mask=mask,
                                        is_causal=is_causal)
        x = x + self.ls1(attn.output)
        cross_kv = None
        if self.cross_attn is not None:
            cross = self.cross_attn.forward_cached(
                self.norm_cross(x), cache.cross_kv, context=context, mask=context_mask
            )
            x = x + cross.output
            cross_kv = cross.cache
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, BlockCache(attn.cache, cross_kv)


def run_blocks(stack: nn.Module, x: Tensor, mask: Tensor | None, context: Tensor | None,
               context_mask: Tensor | None) -> Tensor:
    """``x`` through ``stack.blocks`` (each called as ``block(x, mask, causal, context,
    context_mask)``), recomputing activations in backward when ``stack.grad_checkpointing``."""
    recompute = stack.grad_checkpointing and stack.training and torch.is_grad_enabled()
    for block in stack.blocks:
        if recompute:
            x = checkpoint(block, x, mask, stack.causal, context, context_mask,
                           use_reentrant=False)
        else:
            x = block(x, mask, stack.causal, context, context_mask)
    return x


def run_blocks_cached(stack: nn.Module, x: Tensor, caches: list[BlockCache] | None,
                      mask: Tensor | None, context: Tensor | None, context_mask: Tensor | None
                      ) -> tuple[Tensor, list[BlockCache]]:
    """New tokens ``x`` through ``stack.blocks`` after the cached ones; returns the states and
    every block's updated cache."""
    new_caches = []
    for block, cache in zip(stack.blocks, caches or [None] * len(stack.blocks), strict=True):
        x, cache = block.forward_cached(x, cache, mask, stack.causal, context, context_mask)
        new_caches.append(cache)
    return x, new_caches


class Transformer(nn.Module):
    """A stack of ``Block``s; ``causal`` fixes the self-attention pattern of the whole stack."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        *,
        causal: bool = False,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        context_dim: int | None = None,
        dropout: float = 0.0,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps,
                  context_dim=context_dim, dropout=dropout, layer_scale=layer_scale,
                  drop_path=rate)
            for rate in drop_path_rates(drop_path, layers)
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        return run_blocks(self, x, mask, context, context_mask)

    def forward_cached(
        self,
        x: Tensor,
        caches: list[BlockCache] | None,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[BlockCache]]:
        """Run new tokens ``x`` after the cached ones; ``mask`` spans past + new keys."""
        return run_blocks_cached(self, x, caches, mask, context, context_mask)


def init_transformer_(transformer: Transformer, std_scale: float = 1.0) -> None:
    """open_clip's text-tower init, used for every tower: attention in-proj std width^-0.5,
    residual out-projections std width^-0.5 * (2 layers)^-0.5, MLP fc1 std (2 width)^-0.5."""
    blocks = transformer.blocks
    width = blocks[0].norm1.normalized_shape[0]
    attn_std = width**-0.5 * std_scale
    proj_std = width**-0.5 * (2 * len(blocks)) ** -0.5 * std_scale
    fc_std = (2 * width) ** -0.5 * std_scale
    for block in blocks:
        attentions = [block.attn] + ([block.cross_attn] if block.cross_attn is not None else [])
        for attn in attentions:
            for name in ("qkv", "q", "kv"):
                if hasattr(attn, name):
                    nn.init.normal_(getattr(attn, name).weight, std=attn_std)
                    if getattr(attn, name).bias is not None:
                        nn.init.zeros_(getattr(attn, name).bias)
            nn.init.normal_(attn.proj.weight, std=proj_std)
            if attn.proj.bias is not None:
                nn.init.zeros_(attn.proj.bias)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.zeros_(block.mlp.fc1.bias)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.zeros_(block.mlp.fc2.bias)


def layer_groups(tower: nn.Module, blocks: str, embeddings: tuple[str, ...]) -> list[list[str]]:
    """`tower`'s parameter names in layer order: ``[0]`` those under the `embeddings`
    attributes, ``[i]`` those of block ``i - 1`` of the ``ModuleList`` at `blocks`, ``[-1]``
    the rest (final norms, pooling and projection heads): what locking a tower and layer-wise
    learning-rate decay read (`PretrainModel.tower_groups`)."""
    count = len(tower.get_submodule(blocks))
    groups: list[list[str]] = [[] for _ in range(count + 2)]
    for name, _ in tower.named_parameters():
        if name.startswith(blocks + "."):
            groups[int(name[len(blocks) + 1:].split(".")[0]) + 1].append(name)
        elif name.split(".")[0] in embeddings:
            groups[0].append(name)
        else:
            groups[-1].append(name)
    return groups
