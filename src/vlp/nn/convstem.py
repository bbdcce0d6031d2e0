"""Image patches after a convolutional stem (ViT "hybrid", arXiv 2010.11929 §3.1; SimVLM arXiv
2108.10904 §3.2): a few ResNet-style stages, each halving the resolution, then a patch projection
to the transformer width, plus learned 2-D positions (one row and one column table, summed).

The patch grid is always ``image_size // patch_size``: the stages cover ``2**blocks`` pixels per
output cell and the projection the rest (``patch_size / 2**blocks``), so the number of conv
blocks changes the features, never the token count. GroupNorm, as BiT's ResNets in ViT-hybrid,
so a sample's tokens never depend on the rest of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.errors import ConfigError


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResidualConvBlock(nn.Module):
    """ResNet basic block at stride 2 (He et al. 2016): ``relu(norm2(conv2(relu(norm1(conv1 x))))
    + shortcut_norm(shortcut x))``, the shortcut a strided 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8) -> None:
        super().__init__()
        if out_channels % min(groups, out_channels):
            raise ConfigError(f"conv stem: {out_channels} channels do not split into "
                              f"{groups} GroupNorm groups")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm1 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, groups)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_norm = _group_norm(out_channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.shortcut_norm(self.shortcut(x))
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return F.relu(x + residual)


class ConvPatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, grid * grid, width)``: conv stages, patch projection, 2-D positions.
    ``blocks=0`` is a plain ViT patch embedding."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, blocks: int = 3,
                 channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        if blocks < 0:
            raise ConfigError(f"conv stem blocks must be >= 0, got {blocks}")
        stride = 2**blocks
        if patch_size % stride:
            raise ConfigError(f"patch_size {patch_size} is not a multiple of the conv stem's "
                              f"stride 2**{blocks} = {stride}; lower conv_blocks or raise "
                              "patch_size")
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size "
                              f"{patch_size}")
        self.image_size = image_size
        self.grid = image_size // patch_size
        widths = [channels * 2**i for i in range(blocks)]
        self.stages = nn.Sequential(*(ResidualConvBlock(c_in, c_out, groups) for c_in, c_out
                                      in zip([3, *widths], widths)))
        kernel = patch_size // stride
        self.proj = nn.Conv2d(widths[-1] if widths else 3, width, kernel, stride=kernel)
        self.pos_rows = nn.Parameter(torch.empty(self.grid, width))
        self.pos_cols = nn.Parameter(torch.empty(self.grid, width))
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.stages.modules():
            if isinstance(module, nn.Conv2d):  # He init for ReLU networks (ResNet)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        width = self.proj.out_channels
        nn.init.normal_(self.proj.weight, std=(self.proj.weight[0].numel()) ** -0.5)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.pos_rows, std=width**-0.5 / 2)  # the sum has std width^-0.5
        nn.init.normal_(self.pos_cols, std=width**-0.5 / 2)

    def no_weight_decay(self) -> set[str]:
        return {"pos_rows", "pos_cols"}

    def positions(self) -> Tensor:
        """``(grid * grid, width)``: row ``r``, column ``c`` at index ``r * grid + c``."""
        grid = self.pos_rows[:, None, :] + self.pos_cols[None, :, :]  # (g, g, width)
        return grid.flatten(0, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ConfigError(f"expected images of shape (B, 3, {size}, {size}), got "
                              f"{tuple(pixels.shape)}")
        features = self.proj(self.stages(pixels))  # (B, width, g, g)
        tokens = features.flatten(2).transpose(1, 2)  # (B, g*g, width), row-major
        return tokens + self.positions().to(tokens.dtype)
