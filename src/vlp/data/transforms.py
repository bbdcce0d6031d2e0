"""Image preprocessing: PIL image -> normalised float tensor [3, H, W].

Training augmentation draws every random number from an explicit `torch.Generator`, so the
loader can seed it per sample and an augmentation is reproducible (and resumable) bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vlp.config import VisionConfig
from vlp.errors import ConfigError

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_MODES = ("shortest", "squash")
# RandomResizedCrop range used for CLIP pretraining (open_clip's default scale, Inception ratio).
TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
# training augmentation presets: (crop scale, RandAugment (ops, magnitude) or None); "none"
# trains on the evaluation preprocessing
AUGMENTS: dict[str, tuple[tuple[float, float], tuple[int, int] | None] | None] = {
    "clip": (TRAIN_CROP_SCALE, None),  # open_clip's default: crop only
    "blip": ((0.2, 1.0), (2, 5)),  # BLIP's pretraining
    "blip-finetune": ((0.5, 1.0), (2, 5)),  # BLIP's retrieval and captioning fine-tuning
    "none": None,
}
# RandAugment's operations as BLIP (and ALBEF) draw them: none changes hue or saturation, since
# captions name colours; geometric ones fill with grey
RAND_AUGMENT_OPS = ("identity", "autocontrast", "brightness", "sharpness", "equalize",
                    "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
FILL = [128, 128, 128]


def rand_augment(image: Image.Image, ops: int, magnitude: int,
                 generator: torch.Generator | None) -> Image.Image:
    """`ops` operations drawn with replacement from `RAND_AUGMENT_OPS`, each applied with
    probability 1/2 at `magnitude` of 10 (BLIP's RandomAugment(2, 5)): shear up to 0.3,
    translation up to 10 px of a 224 px image, rotation up to 30 degrees (each of random
    sign), brightness and sharpness factor ``0.1 + 1.8 * magnitude / 10``. Every draw comes
    from `generator`."""
    level = magnitude / 10
    for _ in range(ops):
        pick, skip, sign = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        name = RAND_AUGMENT_OPS[min(int(pick * len(RAND_AUGMENT_OPS)), len(RAND_AUGMENT_OPS) - 1)]
        if skip < 0.5:
            continue
        signed = level if sign < 0.5 else -level
        bilinear = InterpolationMode.BILINEAR
        if name == "autocontrast":
            image = TF.autocontrast(image)
        elif name == "equalize":
            image = TF.equalize(image)
        elif name in ("brightness", "sharpness"):
            adjust = TF.adjust_brightness if name == "brightness" else TF.adjust_sharpness
            image = adjust(image, 0.1 + 1.8 * level)
        elif name.startswith("shear"):
            degrees = math.degrees(math.atan(0.3 * signed))
            image = TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                              shear=[degrees, 0.0] if name == "shear_x" else [0.0, degrees],
                              interpolation=bilinear, fill=FILL)
        elif name.startswith("translate"):
            shift = round(10 * signed * image.size[0 if name == "translate_x" else 1] / 224)
            image = TF.affine(image, angle=0.0, scale=1.0, shear=[0.0, 0.0],
                              translate=[shift, 0] if name == "translate_x" else [0, shift],
                              interpolation=bilinear, fill=FILL)
        elif name == "rotate":
            image = TF.rotate(image, 30 * signed, interpolation=bilinear, fill=FILL)
    return image


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a crop covering `scale` of the area.

    The aspect ratio is log-uniform in `ratio`; after 10 failed tries (crop larger than the
    image), falls back to the largest centred crop with its aspect ratio clamped into `ratio`.
    """
    area = width * height
    log_ratio_low, log_ratio_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * draws[1])
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
            return top, left, crop_height, crop_width
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def resize_center_crop(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize the shortest side to ``size`` (antialiased), then the centred ``size`` square:
    torchvision's ``resize`` + ``center_crop`` (same output sizes and crop offsets), computed
    only for the kept square (PIL resamples the source box that maps onto it, with the same
    filter positions up to rounding: pixels within a few levels of 255), so no pixels are
    resampled only to be cropped away."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    long_out = int(size * long / short)  # torchvision's output size of the long side
    out_w, out_h = (size, long_out) if width <= height else (long_out, size)
    if out_w < size or out_h < size:  # cannot happen for shortest-side resizes; be safe
        return TF.center_crop(TF.resize(image, [size], interpolation=INTERPOLATIONS[
            interpolation], antialias=True), [size, size])
    top, left = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
    scale_x, scale_y = width / out_w, height / out_h
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    return image.resize((size, size), PIL_RESAMPLE[interpolation], box=box)


class ImageTransform:
    """Callable ``(PIL image, generator=None) -> FloatTensor[3, size, size]``; pickle-able.
    ``fast_decode``: see `draft_size`.

    Train: random resized crop (parameters from `generator`) to ``size``, then with `hflip` a
    horizontal flip half the time, and with `rand_augment` ``(ops, magnitude)``
    `rand_augment`; no flip by default, since captions name left and right. Eval: resize the
    shortest side and center crop ("shortest"), or resize both sides ("squash"). Both then
    normalise with `mean` / `std` (pixel values scaled to [0, 1] first).
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: bool,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        scale: tuple[float, float] = TRAIN_CROP_SCALE,
        ratio: tuple[float, float] = TRAIN_CROP_RATIO,
        hflip: bool = False,
        rand_augment: tuple[int, int] | None = None,
        fast_decode: bool = False,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"vision.resize_mode={resize_mode!r}; expected one of "
                              f"{list(RESIZE_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"vision.interpolation={interpolation!r}; expected one of "
                              f"{sorted(INTERPOLATIONS)}")
        if image_size <= 0:
            raise ConfigError(f"vision.image_size={image_size}; expected a positive integer")
        self.image_size = image_size
        self.train = train
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.rand_augment = tuple(rand_augment) if rand_augment is not None else None
        self.fast_decode = fast_decode
        std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the uint8 pixels
        self._pixel_scale = 1.0 / (255.0 * std_tensor)
        self._pixel_shift = -mean_tensor / std_tensor

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = [self.image_size, self.image_size]
        mode = INTERPOLATIONS[self.interpolation]
        if self.train:
            width, height = image.size
            top, left, crop_height, crop_width = random_resized_crop_box(
                width, height, self.scale, self.ratio, generator)
            image = TF.resized_crop(image, top, left, crop_height, crop_width, size,
                                    interpolation=mode, antialias=True)
            if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
                image = TF.horizontal_flip(image)
            if self.rand_augment is not None:
                image = rand_augment(image, *self.rand_augment, generator)
        elif self.resize_mode == "squash":
            image = TF.resize(image, size, interpolation=mode, antialias=True)
        elif min(image.size) == self.image_size:
            image = TF.center_crop(image, size)
        elif self.fast_decode and self.interpolation != "nearest":
            image = resize_center_crop(image, self.image_size, self.interpolation)
        else:
            image = TF.resize(image, [self.image_size], interpolation=mode, antialias=True)
            image = TF.center_crop(image, size)
        pixels = TF.pil_to_tensor(image).float()
        return pixels.mul_(self._pixel_scale).add_(self._pixel_shift)

    @property
    def draft_size(self) -> int | None:
        """The size a JPEG may be decoded at (DCT-scaled by 1/2, 1/4 or 1/8 while its shortest
        side stays at least this), or None: only with ``fast_decode``, never in training.

        ``fast_decode`` (eval only) trades exactness for speed twice: the reduced JPEG decode,
        and resampling only the centre square (`resize_center_crop`). On web-sized photos
        (500x375 .. 1600x1200, 224 px) pixels then differ from the exact path by 0.5-1.0
        levels of 255 on average, up to ~17 at sharp edges (benchmarks/inference.py
        measures it)."""
        return self.image_size if self.fast_decode and not self.train else None

    def __repr__(self) -> str:
        kind = (f"train, crop {self.scale[0]:g}-{self.scale[1]:g}"
                + (", hflip" if self.hflip else "")
                + (f", RandAugment{self.rand_augment}" if self.rand_augment else "")
                if self.train else f"eval, {self.resize_mode}")
        return f"ImageTransform({self.image_size}px, {kind}, {self.interpolation})"


def _vision_config(config: Any) -> VisionConfig:
    for candidate in (config, getattr(config, "vision", None),
                      getattr(getattr(config, "config", None), "vision", None)):
        if isinstance(candidate, VisionConfig):
            return candidate
    raise ConfigError(f"image_transform needs a VisionConfig, a model config with .vision, or a "
                      f"model with .config.vision; got {type(config).__name__}")


def image_transform(config: Any, train: bool, augment: str = "clip",
                    hflip: bool = False, fast_decode: bool = False) -> ImageTransform:
    """The preprocessing a model expects, from its VisionConfig (or its config, or the model);
    for training, the `augment` preset of `AUGMENTS` (with `hflip`: random horizontal flips).
    ``fast_decode``: eval only, let large JPEGs decode at a reduced scale (faster, pixels
    differ slightly: see `ImageTransform.draft_size`)."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment={augment!r}; expected one of {list(AUGMENTS)}")
    vision = _vision_config(config)
    preset = AUGMENTS[augment] if train else None
    scale, randaug = preset if preset is not None else (TRAIN_CROP_SCALE, None)
    return ImageTransform(
        image_size=vision.image_size,
        mean=tuple(vision.mean),
        std=tuple(vision.std),
        train=preset is not None,
        resize_mode=vision.resize_mode,
        interpolation=vision.interpolation,
        scale=scale,
        hflip=hflip and preset is not None,
        rand_augment=randaug,
        fast_decode=fast_decode,
    )
