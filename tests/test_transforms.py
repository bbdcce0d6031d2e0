"""Image transforms: exact normalisation, eval resize modes, seeded train crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import OPENAI_MEAN, OPENAI_STD, VisionConfig, get_preset
from vlp.data import ImageTransform, image_transform, random_resized_crop_box
from vlp.errors import ConfigError

HALF = (0.5, 0.5, 0.5)


def bands(width: int = 48, height: int = 16) -> Image.Image:
    """Three vertical bands: red | green | blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    array[:, :third, 0] = 255
    array[:, third:2 * third, 1] = 255
    array[:, 2 * third:, 2] = 255
    return Image.fromarray(array)


def gradient(size: int = 40) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    array = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                      np.full((size, size), 128, np.float32)], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def test_normalisation_is_exact_for_solid_colours() -> None:
    transform = ImageTransform(8, HALF, HALF, train=False)
    pixels = transform(Image.new("RGB", (20, 10), (255, 0, 255)))
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0], torch.ones(8, 8)) and torch.equal(pixels[1], -torch.ones(8, 8))
    openai = ImageTransform(4, OPENAI_MEAN, OPENAI_STD, train=False)
    value = openai(Image.new("RGB", (4, 4), (51, 102, 204)))[:, 0, 0]
    expected = [(v / 255 - m) / s for v, m, s in zip((51, 102, 204), OPENAI_MEAN, OPENAI_STD)]
    assert value.tolist() == pytest.approx(expected, abs=1e-5)


def test_eval_shortest_center_crops_and_squash_keeps_everything() -> None:
    image = bands()  # 48 x 16: the center 16 x 16 is all green
    shortest = ImageTransform(16, HALF, HALF, train=False, resize_mode="shortest")(image)
    assert torch.equal(shortest[1], torch.ones(16, 16))
    assert torch.equal(shortest[0], -torch.ones(16, 16))
    squash = ImageTransform(16, HALF, HALF, train=False, resize_mode="squash")(image)
    assert squash[0, 8, 0] > 0.9 and squash[2, 8, 15] > 0.9  # red left, blue right survive
    # shortest side resized: 48x16 -> 24x8, crop 8x8 is still the green band
    small = ImageTransform(8, HALF, HALF, train=False)(image)
    assert small[1, :, 2:6].min() > 0.9


def test_train_crop_is_reproducible_from_the_generator() -> None:
    transform = ImageTransform(16, HALF, HALF, train=True)
    image = gradient()
    first = transform(image, torch.Generator().manual_seed(3))
    again = transform(image, torch.Generator().manual_seed(3))
    other = transform(image, torch.Generator().manual_seed(4))
    assert first.shape == (3, 16, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_crop_box_respects_scale_ratio_and_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, height, width = random_resized_crop_box(300, 200, (0.9, 1.0), (3 / 4, 4 / 3),
                                                           generator)
        assert 0 <= top and top + height <= 200 and 0 <= left and left + width <= 300
        assert 0.88 <= height * width / (300 * 200) <= 1.0
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02


def test_crop_box_falls_back_to_clamped_center_crop() -> None:
    # 100 x 4: no crop of 90% area fits any allowed ratio, so the centred fallback is used
    box = random_resized_crop_box(100, 4, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator())
    top, left, height, width = box
    assert (height, width) == (4, round(4 * 4 / 3)) and top == 0
    assert left == (100 - width) // 2
    assert math.isclose(width / height, 4 / 3, rel_tol=0.1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_inputs_become_three_channels(mode: str) -> None:
    image = Image.new("RGB", (10, 10), (200, 200, 200)).convert(mode)
    pixels = ImageTransform(8, HALF, HALF, train=True)(image, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 8, 8)


def test_image_transform_from_vision_config_model_config_and_errors() -> None:
    config = get_preset("clip-tiny")
    from_config = image_transform(config, train=False)
    from_vision = image_transform(config.vision, train=True)
    assert from_config.image_size == 64 and not from_config.train and from_vision.train
    with pytest.raises(ConfigError, match="resize_mode"):
        image_transform(VisionConfig(resize_mode="stretch"), train=False)
    with pytest.raises(ConfigError, match="interpolation"):
        image_transform(VisionConfig(interpolation="cubic"), train=False)
    with pytest.raises(ConfigError, match="VisionConfig"):
        image_transform("clip-tiny", train=False)


def red_on_the_left(size: int = 64) -> Image.Image:
    """Red fading from the left edge to the right: every crop has more red on its left."""
    array = np.full((size, size, 3), 100, dtype=np.uint8)
    array[:, :, 0] = np.linspace(255, 0, size).astype(np.uint8)[None, :]
    return Image.fromarray(array)


def red_side(pixels: torch.Tensor) -> str:
    """Which half holds more red (the first channel after normalisation with HALF)."""
    half = pixels.shape[-1] // 2
    return "left" if pixels[0, :, :half].mean() > pixels[0, :, half:].mean() else "right"


def preset(augment: str, hflip: bool = False) -> ImageTransform:
    vision = VisionConfig(image_size=32, mean=HALF, std=HALF)
    return image_transform(vision, train=True, augment=augment, hflip=hflip)


@pytest.mark.parametrize("augment", ["clip", "blip", "blip-finetune"])
def test_augment_presets_are_reproducible_from_the_seed(augment) -> None:
    transform = preset(augment)
    image = gradient(64)

    def run(seed: int) -> torch.Tensor:
        return transform(image, torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    import pickle  # loader workers receive the transform pickled

    again = pickle.loads(pickle.dumps(transform))
    assert torch.equal(again(image, torch.Generator().manual_seed(7)), run(7))


def test_default_train_transform_is_the_clip_preset_unchanged() -> None:
    vision = VisionConfig(image_size=32, mean=HALF, std=HALF)
    before = ImageTransform(32, HALF, HALF, train=True)  # today's train transform
    for seed in range(5):
        for transform in (image_transform(vision, train=True), preset("clip")):
            assert torch.equal(transform(gradient(64), torch.Generator().manual_seed(seed)),
                               before(gradient(64), torch.Generator().manual_seed(seed)))


def test_no_flip_unless_asked() -> None:
    image = red_on_the_left()
    for augment in ("clip", "blip", "blip-finetune"):
        sides = {red_side(preset(augment)(image, torch.Generator().manual_seed(seed)))
                 for seed in range(40)}
        assert sides == {"left"}, augment
    flipped = [red_side(preset("clip", hflip=True)(image, torch.Generator().manual_seed(seed)))
               for seed in range(40)]
    assert 5 < flipped.count("right") < 35


def test_blip_preset_crops_wider_and_augments() -> None:
    clip, blip = preset("clip"), preset("blip")
    assert clip.scale == (0.9, 1.0) and clip.rand_augment is None
    assert blip.scale == (0.2, 1.0) and blip.rand_augment == (2, 5)
    assert preset("blip-finetune").scale == (0.5, 1.0)
    # the same crop draws, then RandAugment: some seeds change the image beyond the crop
    crop_only = ImageTransform(32, HALF, HALF, train=True, scale=(0.2, 1.0))
    changed = sum(not torch.equal(blip(gradient(64), torch.Generator().manual_seed(seed)),
                                  crop_only(gradient(64), torch.Generator().manual_seed(seed)))
                  for seed in range(20))
    assert changed >= 5
    evaluation = image_transform(VisionConfig(image_size=32, mean=HALF, std=HALF), train=True,
                                 augment="none")
    assert not evaluation.train
    with pytest.raises(ConfigError, match="augment='flip'"):
        preset("flip")
