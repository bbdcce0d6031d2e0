"""Vision Transformer tower: patch embedding, class token, learned positions, pooling, head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import VisionConfig
from vlp.errors import ConfigError
from vlp.nn.pooling import MapHead, pool_cls, pool_mean
from vlp.nn.transformer import Transformer, init_transformer_, layer_groups


def resize_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1,
                     antialias: bool = False) -> Tensor:
    """Bicubically resample learned positions ``(prefix + g*g, D)`` to a ``new_grid`` square;
    ``antialias`` switches to torch's antialiased kernel (open_clip's choice, also upsampling)."""
    prefix, grid = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[0])
    if old_grid * old_grid != grid.shape[0]:
        raise ConfigError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic",
                         align_corners=False, antialias=antialias).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim)
    return torch.cat([prefix, grid], dim=0)


class PatchDropout(nn.Module):
    """FLIP (arXiv 2212.00794): keep a random subset of patch tokens in training; prefix kept."""

    def __init__(self, prob: float, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ConfigError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, D = patches.shape
        keep = max(1, int(N * (1.0 - self.prob)))
        index = torch.rand(B, N, device=x.device).topk(keep, dim=-1).indices  # (B, keep)
        patches = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, D))
        return torch.cat([prefix, patches], dim=1)


class VisionTransformer(nn.Module):
    """ViT (arXiv 2010.11929) as CLIP uses it: ``forward_features -> pool -> forward_head``."""

    def __init__(self, config: VisionConfig, output_dim: int | None, proj_bias: bool = False):
        super().__init__()
        self.config = config
        if config.image_size % config.patch_size:
            raise ConfigError(
                f"vision.image_size {config.image_size} is not a multiple of "
                f"vision.patch_size {config.patch_size}"
            )
        if config.pool not in ("cls", "mean", "map", "none"):
            raise ConfigError(f"vision.pool {config.pool!r}; expected cls, mean, map or none")
        if config.pool == "cls" and not config.class_token:
            raise ConfigError("vision.pool 'cls' needs vision.class_token")
        width = config.width
        self.grid = config.image_size // config.patch_size
        self.prefix = 1 if config.class_token else 0  # tokens before the patches
        self.patch_embed = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.class_token = nn.Parameter(torch.empty(width)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.empty(self.prefix + self.grid * self.grid, width))
        self.patch_dropout = PatchDropout(config.patch_dropout, self.prefix)
        self.norm_pre = (nn.LayerNorm(width, eps=config.norm_eps) if config.pre_norm
                         else nn.Identity())
        self.transformer = Transformer(width, config.layers, config.heads, causal=False,
                                       mlp_ratio=config.mlp_ratio, act=config.act,
                                       norm_eps=config.norm_eps, dropout=config.dropout,
                                       drop_path=config.drop_path)
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.map_head = (MapHead(width, config.heads, config.mlp_ratio, config.act,
                                 config.norm_eps) if config.pool == "map" else None)
        self.head = (nn.Linear(width, output_dim, bias=proj_bias) if output_dim is not None
                     else nn.Identity())
        self.init_weights()

    def init_weights(self) -> None:
        width = self.config.width
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=width**-0.5)
        nn.init.normal_(self.pos_embed, std=width**-0.5)
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        init_transformer_(self.transformer)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=width**-0.5)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed"}
        if self.class_token is not None:
            names.add("class_token")
        if self.map_head is not None:
            names.add("map_head.probe")
        return names

    def layer_groups(self) -> list[list[str]]:
        """Parameter names: the patch embedding, class token, positions and pre-norm; each
        block; the final norm, pooling head and projection (`layer_groups`)."""
        return layer_groups(self, "transformer.blocks",
                            ("patch_embed", "class_token", "pos_embed", "norm_pre"))

    def set_image_size(self, image_size: int) -> None:
        """Serve another input size by interpolating the learned positions."""
        if image_size % self.config.patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of patch size "
                              f"{self.config.patch_size}")
        grid = image_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resize_pos_embed(
                self.pos_embed.data, grid, self.prefix,
                antialias=self.config.pos_embed_antialias))
        self.grid = grid
        self.config.image_size = image_size

    def forward_features(self, pixels: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, prefix + patches, width)`` after the final norm (prefix: the
        class token, when the config has one)."""
        expected = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (expected, expected):
            raise ConfigError(
                f"expected images of shape (B, 3, {expected}, {expected}), got "
                f"{tuple(pixels.shape)}; resize them or call set_image_size()"
            )
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, g*g, width)
        if self.class_token is not None:
            cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        x = self.patch_dropout(x)
        x = self.norm_pre(x)
        x = self.transformer(x)
        return self.norm(x)

    def pool(self, tokens: Tensor) -> Tensor:
        if self.config.pool == "cls":
            return pool_cls(tokens)
        if self.config.pool == "mean":
            return pool_mean(tokens[:, self.prefix:])
        if self.map_head is not None:
            return self.map_head(tokens)
        raise ConfigError(f"vision.pool {self.config.pool!r} gives no single vector")

    def forward_head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        return pooled if pre_logits else self.head(pooled)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.forward_head(self.pool(self.forward_features(pixels)))
