"""Photo-like test images: large JPEGs with the content real photos have (used by
tests/test_fast_decode.py and tests/test_serve.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def photo_jpeg(seed: int, size: tuple[int, int] = (1024, 768)) -> bytes:
    """A photo-like JPEG: smooth shading, sensor-like noise and a few sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([np.sin(x / (23 + 7 * c) + seed) * np.cos(y / 31 - c) * 70 + 120
                       + y / 12 for c in range(3)], -1)
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        left, top = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((left, top, left + 180, top + 140), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
