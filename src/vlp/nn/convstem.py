"""Image patches after a convolutional stem (ViT "hybrid", arXiv 2010.11929 §3.1; SimVLM arXiv
2108.10904 §3.2), then a patch projection to the transformer width, plus learned 2-D positions
(one row and one column table, summed). Two stems:

- ``"light"``: ``blocks`` basic residual blocks, each halving the resolution (stride
  ``2**blocks``); about 1.2M parameters at SimVLM-Base's 64/128/256 channels.
- ``"resnet50"`` / ``"resnet101"``: a real ResNet's root (7x7/2 convolution, 3x3/2 max pool) and
  its first ``blocks`` stages of bottleneck blocks (3, 4, 6 blocks / 3, 4, 23; widths 64, 128,
  256 expanded 4x; stride ``2**(blocks + 1)``, 16 after three stages), what the paper names: 8.5M
  parameters (ResNet-50) or 27.5M (ResNet-101) for three stages at width 64, 1024 channels out.

The patch grid is always ``image_size // patch_size``: the stem covers ``stride`` pixels per
output cell and the projection the rest (``patch_size / stride``), so the stem changes the
features, never the token count. GroupNorm, as BiT's ResNets in ViT-hybrid, so a sample's
tokens never depend on the rest of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.errors import ConfigError
from vlp.nn.transformer import DropPath, drop_path_rates


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


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016; the stride on the 3x3 convolution, ResNet v1.5):
    ``relu(norm3(conv3(relu(norm2(conv2(relu(norm1(conv1 x))))))) + shortcut x)``, 1x1 down to
    ``width``, 3x3, 1x1 up to ``4 * width``; a 1x1 projection shortcut where the shape changes.
    ``norm3`` starts at zero, so each block starts as its shortcut (Goyal et al. 2017)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, groups: int = 32,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        out = width * self.expansion
        if width % min(groups, width):
            raise ConfigError(f"conv stem: {width} channels do not split into {groups} "
                              "GroupNorm groups")
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm1 = _group_norm(width, groups)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _group_norm(width, groups)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.norm3 = _group_norm(out, groups)
        self.shortcut = self.shortcut_norm = None
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Conv2d(in_channels, out, 1, stride=stride, bias=False)
            self.shortcut_norm = _group_norm(out, groups)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.drop_path(self.norm3(self.conv3(x))) + residual)


# blocks per stage of the ResNets whose first stages a "resnet*" stem takes
RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STEMS = ("light", *RESNET_DEPTHS)


def _resnet_stages(name: str, stages: int, width: int, groups: int,
                   drop_path: float) -> tuple[nn.Sequential, int]:
    """The root and first ``stages`` stages of ResNet ``name`` and their output channels; the
    blocks' drop-path rates rise linearly to ``drop_path``."""
    rates = iter(drop_path_rates(drop_path, sum(RESNET_DEPTHS[name][:stages])))
    root = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                         _group_norm(width, groups), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1))
    layers: list[nn.Module] = [root]
    channels = width
    for index, depth in enumerate(RESNET_DEPTHS[name][:stages]):
        stage_width = width * 2**index
        blocks = []
        for block in range(depth):
            stride = 2 if index > 0 and block == 0 else 1
            blocks.append(Bottleneck(channels, stage_width, stride, groups, next(rates)))
            channels = stage_width * Bottleneck.expansion
        layers.append(nn.Sequential(*blocks))
    return nn.Sequential(*layers), channels


class ConvPatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, grid * grid, width)``: conv stages, patch projection, 2-D positions.
    ``blocks=0`` is a plain ViT patch embedding (light stem); for a ResNet stem ``blocks`` is
    the number of stages (1 to 4), ``channels`` the first stage's bottleneck width and
    ``drop_path`` the stochastic depth of its last block (SimVLM fine-tunes with 0.1 on the conv
    stage and the encoder)."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, blocks: int = 3,
                 channels: int = 64, groups: int | None = None, stem: str = "light",
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"conv stem {stem!r}; expected one of {list(STEMS)}")
        if blocks < 0:
            raise ConfigError(f"conv stem blocks must be >= 0, got {blocks}")
        if stem != "light" and not 1 <= blocks <= 4:
            raise ConfigError(f"conv stem {stem!r} takes 1 to 4 ResNet stages (conv_blocks), "
                              f"got {blocks}")
        stride = 2**blocks if stem == "light" else 2**(blocks + 1)
        if patch_size % stride:
            raise ConfigError(f"patch_size {patch_size} is not a multiple of the conv stem's "
                              f"stride {stride} ({stem}, conv_blocks {blocks}); lower "
                              "conv_blocks or raise patch_size")
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size "
                              f"{patch_size}")
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.stem, self.stride = stem, stride
        if stem == "light":
            widths = [channels * 2**i for i in range(blocks)]
            self.stages = nn.Sequential(*(ResidualConvBlock(c_in, c_out, groups or 8)
                                          for c_in, c_out in zip([3, *widths], widths)))
            out = widths[-1] if widths else 3
        else:
            self.stages, out = _resnet_stages(stem, blocks, channels, groups or 32, drop_path)
        kernel = patch_size // stride
        self.proj = nn.Conv2d(out, width, kernel, stride=kernel)
        self.pos_rows = nn.Parameter(torch.empty(self.grid, width))
        self.pos_cols = nn.Parameter(torch.empty(self.grid, width))
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.stages.modules():
            if isinstance(module, nn.Conv2d):  # He init for ReLU networks (ResNet)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.stages.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm3.weight)
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
