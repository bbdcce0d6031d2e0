"""Drawing a synthetic scene: object layout, shapes, background tone or gradient, pixel noise.

Shapes are drawn at 4x and downsampled with LANCZOS for anti-aliasing. Every draw comes from the
generator passed in, so an image is a pure function of its scene and that generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.synthetic_world import _SINGLE_ANCHORS, BACKGROUNDS, COLOURS, _Scene

GRADIENT_MAX_SHIFT = 28  # largest brightness change across a background gradient
OBJECT_COLOUR_JITTER = 10  # per-channel jitter of an object's colour
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled with LANCZOS for anti-aliasing
_MARGIN = 0.03  # fraction of the image kept free at each border


def _layout(rng: np.random.Generator, scene: _Scene) -> list[tuple[float, float, float]]:
    """(x, y, radius) per slot as fractions of the image side; objects never overlap."""
    n_objects = len(scene.slots)
    diameters = []
    for _, _, size in scene.slots:
        if n_objects == 3:
            low, high = (0.34, 0.38) if size == "large" else (0.19, 0.22)
        else:
            low, high = (0.40, 0.46) if size == "large" else (0.20, 0.24)
        diameters.append(float(rng.uniform(low, high)))
    if scene.arrangement == "single":
        radius = diameters[0] / 2
        ax, ay = _SINGLE_ANCHORS[scene.position]
        along, across = rng.uniform(-0.03, 0.03), rng.uniform(-0.1, 0.1)
        if scene.position == "center":
            across *= 0.4
        dx, dy = (along, across) if scene.position in ("left", "right") else (across, along)
        lo, hi = _MARGIN + radius, 1 - _MARGIN - radius
        return [(float(np.clip(ax + dx, lo, hi)), float(np.clip(ay + dy, lo, hi)), radius)]
    free = 1 - 2 * _MARGIN - sum(diameters)
    gap_weights = rng.uniform(0.3, 1.0, size=n_objects + 1)
    gap_weights[1:-1] *= 2  # most free space goes between objects
    gaps = free * gap_weights / gap_weights.sum()
    placed, cursor = [], _MARGIN
    for slot, diameter in enumerate(diameters):
        cursor += gaps[slot]
        along = cursor + diameter / 2
        cursor += diameter
        room = max(0.0, min(0.12, 0.5 - _MARGIN - diameter / 2))
        across = 0.5 + float(rng.uniform(-room, room))
        x, y = (along, across) if scene.arrangement == "row" else (across, along)
        placed.append((x, y, diameter / 2))
    return placed


def _regular_points(
    cx: float, cy: float, radii: Sequence[float], n_points: int
) -> list[tuple[float, float]]:
    """Points at angles starting straight up, alternating through `radii` (stars, polygons)."""
    angles = -np.pi / 2 + np.arange(n_points) * 2 * np.pi / n_points
    return [
        (cx + radii[k % len(radii)] * np.cos(a), cy + radii[k % len(radii)] * np.sin(a))
        for k, a in enumerate(angles)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.86 * r
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        outer = 1.15 * r  # centroid moved down so the bounding box is centred
        draw.polygon(_regular_points(cx, cy + outer / 4, [outer], 3), fill=fill)
    elif shape == "star":
        outer = 1.1 * r
        draw.polygon(_regular_points(cx, cy + 0.1 * r, [outer, 0.42 * outer], 10), fill=fill)
    elif shape == "cross":
        arm, half = 0.95 * r, 0.33 * r
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_points(cx, cy, [r], 6), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _background(rng: np.random.Generator, name: str, image_size: int, side: int) -> Image.Image:
    """A flat tone or a gentle linear gradient of it, made at image size and scaled to `side`."""
    base = np.asarray(BACKGROUNDS[name], dtype=np.float32)
    kind = rng.choice(["flat", "vertical", "horizontal", "diagonal"], p=[0.4, 0.2, 0.2, 0.2])
    shift = float(rng.uniform(12, GRADIENT_MAX_SHIFT)) * (1 if rng.random() < 0.5 else -1)
    if kind == "flat":
        return Image.new("RGB", (side, side), tuple(int(v) for v in base))
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    if kind == "vertical":
        t = np.broadcast_to(ramp[:, None], (image_size, image_size))
    elif kind == "horizontal":
        t = np.broadcast_to(ramp[None, :], (image_size, image_size))
    else:
        t = (ramp[:, None] + ramp[None, :]) / 2
    tone = np.clip(base + shift * t[..., None], 0, 255).round().astype(np.uint8)
    return Image.fromarray(tone, mode="RGB").resize((side, side), Image.Resampling.BILINEAR)


def _render(
    rng: np.random.Generator, scene: _Scene, image_size: int
) -> tuple[Image.Image, list[dict[str, Any]]]:
    placement = _layout(rng, scene)
    side = image_size * _SUPERSAMPLE
    canvas = _background(rng, scene.background, image_size, side)
    draw = ImageDraw.Draw(canvas)
    order = [scene.main] + [s for s in range(len(scene.slots)) if s != scene.main]
    for slot in order:  # main object first
        colour, shape, _ = scene.slots[slot]
        jitter = rng.integers(-OBJECT_COLOUR_JITTER, OBJECT_COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
        x, y, r = placement[slot]
        _draw_shape(draw, shape, x * side, y * side, r * side, fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    sigma = float(rng.uniform(2.0, 4.0))
    noise = rng.normal(0.0, sigma, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)
    positions = scene.positions()
    objects = []
    for slot in order:
        colour, shape, size = scene.slots[slot]
        x, y, r = (float(v) * image_size for v in placement[slot])
        objects.append({
            "colour": colour, "shape": shape, "size": size, "position": positions[slot],
            "x": round(x, 2), "y": round(y, 2), "radius": round(r, 2),
            "bbox": [round(x - r, 2), round(y - r, 2), round(x + r, 2), round(y + r, 2)],
        })
    return Image.fromarray(pixels, mode="RGB"), objects
