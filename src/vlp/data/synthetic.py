"""The built-in synthetic world: coloured shapes with captions, QA pairs and class labels.

Every image is a pure function of (seed, split, index): a split regenerates byte-identically, and
changing one split's size never changes another split. Some multi-object images come as minimal
pairs ("twins") of the image before them, with two colours or two positions swapped and the same
phrasing, so that reading a caption as a bag of words cannot tell the pair apart.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlp.errors import ConfigError, DataError

COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 80, 225),
    "cyan": (30, 200, 210),
    "green": (40, 170, 60),
    "orange": (245, 125, 25),
    "pink": (245, 110, 180),
    "purple": (145, 55, 195),
    "red": (215, 35, 40),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "cross", "hexagon", "square", "star", "triangle")
# Sorted by colour then shape, so the order equals sorted(imagefolder class dirs) and labels agree.
CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
# Prompts for the class (the main, largest object), phrased as this world's captions are, as
# CLIP's prompts are written per dataset ("a photo of a {}, a type of pet.").
ZEROSHOT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of a large {}.",
    "a large {} and other shapes.",
    "a {} on a plain background.",
]
# Low-chroma tones only: every object colour stays far from every background pixel.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 24),
    "charcoal": (52, 54, 60),
    "slate": (88, 94, 106),
    "grey": (128, 128, 128),
    "silver": (182, 184, 188),
    "white": (242, 242, 240),
    "beige": (222, 210, 184),
    "lavender": (214, 206, 232),
    "mint": (206, 230, 214),
}
GRADIENT_MAX_SHIFT = 28  # largest brightness change across a background gradient
OBJECT_COLOUR_JITTER = 10  # per-channel jitter of an object's colour
FORMATS: tuple[str, ...] = ("csv", "jsonl", "coco", "imagefolder", "wds")
QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "size", "exists")
NOISE_KINDS: tuple[str, ...] = ("mismatched", "shuffled", "wrong_colour")

_COLOUR_NAMES = list(COLOURS)
_OBJECT_COUNT_PROBS = (0.2, 0.45, 0.35)  # images with 1, 2, 3 objects
_TWIN_PROB = 0.35  # chance that an image is the minimal-pair twin of a multi-object predecessor
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled with LANCZOS for anti-aliasing
_MARGIN = 0.03  # fraction of the image kept free at each border
_NUMBER_WORDS = ("zero", "one", "two", "three")
_MAX_CAPTION_TOKENS = 26  # fits a 32-token context with bos, eos and room to spare
_SLOT_POSITIONS = {
    ("row", 2): ("left", "right"),
    ("row", 3): ("left", "center", "right"),
    ("column", 2): ("top", "bottom"),
    ("column", 3): ("top", "center", "bottom"),
}
_SINGLE_ANCHORS = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
# Slot {0} is the leftmost / topmost object. Templates name every object with colour and shape.
_PAIR_TEMPLATES = {
    "row": (
        "{0} left of {1}", "{0} to the left of {1}", "{0} on the left and {1} on the right",
        "{0} with {1} to its right", "{1} right of {0}", "{1} to the right of {0}",
        "{1} on the right and {0} on the left", "{1} with {0} to its left",
    ),
    "column": (
        "{0} above {1}", "{0} at the top and {1} at the bottom", "{0} with {1} below it",
        "{0} at the top, {1} below it", "{1} below {0}", "{1} under {0}",
        "{1} at the bottom and {0} at the top", "{1} with {0} above it",
    ),
}
_TRIPLE_TEMPLATES = {
    "row": (
        "{0}, {1} and {2} from left to right", "from left to right: {0}, {1}, {2}",
        "{0} on the left, {1} in the middle and {2} on the right",
        "{1} between {0} on the left and {2} on the right", "{2}, {1} and {0} from right to left",
        "{2} on the right, {1} in the middle and {0} on the left",
        "{1} in the middle with {0} to its left and {2} to its right",
    ),
    "column": (
        "{0}, {1} and {2} from top to bottom", "from top to bottom: {0}, {1}, {2}",
        "{0} at the top, {1} in the middle and {2} at the bottom",
        "{1} between {0} above and {2} below", "{2}, {1} and {0} from bottom to top",
        "{2} at the bottom, {1} in the middle and {0} at the top",
        "{0} above {1}, which is above {2}",
    ),
}
_SINGLE_TEMPLATES = (
    "{0} {p}", "{0} {p} of the image", "{0} {p} of the picture", "{0} placed {p}",
    "one {bare} {p}", "just {0} {p}",
)
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "{count} shapes: ")
_SUFFIXES = ("", "", " on a {bg} background", " against a {bg} background")
_SINGLE_SUFFIXES = (" on a {bg} background", " against a {bg} background", " on {bg}")
_SUBJECT_CAPTION_PROB = 0.5  # chance per later caption of a multi-object image
_MAX_SUBJECT_CAPTIONS = 2
_SUBJECT_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
_SUBJECT_TAILS = (" and {n} smaller {shapes}", " with {n} small {shapes}", " among small shapes",
                  " and other shapes", "")
_CaptionFacts = tuple[tuple[bool, ...], bool]  # which slots' sizes a caption states; background?


@dataclass
class SynthItem:
    """One generated image and everything known about it; objects[0] is the labelled object."""

    image: Image.Image
    captions: list[str]
    label: int  # index into CLASS_NAMES of the main (largest) object
    class_name: str
    objects: list[dict[str, Any]]  # colour, shape, size, position, x, y, radius, bbox (pixels)
    qa: list[dict[str, str]]  # {"question", "answer", "type"}
    noisy: list[dict[str, Any] | None]  # per caption: None, or {"kind", "original", ...}
    background: str
    twin: dict[str, Any] | None = None  # {"of": index, "kind": "colour_swap"|"position_swap"}


@dataclass
class _Scene:
    """What an image shows, without pixel jitter; slots run left to right or top to bottom."""

    arrangement: str  # "single", "row" or "column"
    slots: list[tuple[str, str, str]]  # (colour, shape, size)
    main: int  # slot of the largest object
    position: str  # where a single object sits; "" for rows and columns
    background: str
    caption_seed: int
    twin: dict[str, Any] | None = None

    def positions(self) -> tuple[str, ...]:
        if self.arrangement == "single":
            return (self.position,)
        return _SLOT_POSITIONS[(self.arrangement, len(self.slots))]


@dataclass
class _Drawn:
    scene: _Scene
    image: Image.Image | None  # replaced by `jpeg` once written to disk
    objects: list[dict[str, Any]]
    captions: list[str]
    facts: list[_CaptionFacts | None] = field(default_factory=list)  # None: subject-only
    jpeg: bytes = b""


# ---------------------------------------------------------------------------------------------
# scenes


def _sample_scene(rng: np.random.Generator, previous: _Scene | None, previous_index: int) -> _Scene:
    twin_roll = rng.random()
    if (
        previous is not None
        and previous.twin is None
        and len(previous.slots) >= 2
        and twin_roll < _TWIN_PROB
    ):
        return _twin_scene(rng, previous, previous_index)
    n_objects = int(rng.choice(3, p=_OBJECT_COUNT_PROBS)) + 1
    colours = [_COLOUR_NAMES[i] for i in rng.choice(len(COLOURS), size=n_objects, replace=False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n_objects, replace=False)]
    main = int(rng.integers(n_objects))
    if n_objects == 1:
        arrangement, position = "single", str(rng.choice(list(_SINGLE_ANCHORS)))
        sizes = ["large" if rng.random() < 0.5 else "small"]
    else:
        arrangement, position = ("row" if rng.random() < 0.5 else "column"), ""
        sizes = ["large" if slot == main else "small" for slot in range(n_objects)]
    return _Scene(
        arrangement=arrangement,
        slots=list(zip(colours, shapes, sizes, strict=True)),
        main=main,
        position=position,
        background=str(rng.choice(list(BACKGROUNDS))),
        caption_seed=int(rng.integers(2**62)),
    )


def _twin_scene(rng: np.random.Generator, source: _Scene, source_index: int) -> _Scene:
    """Swap two objects' colours, or two objects' places; phrasing and background stay the same."""
    first, second = (int(i) for i in rng.choice(len(source.slots), size=2, replace=False))
    slots = list(source.slots)
    main = source.main
    if rng.random() < 0.5:
        kind = "colour_swap"
        (c1, s1, z1), (c2, s2, z2) = slots[first], slots[second]
        slots[first], slots[second] = (c2, s1, z1), (c1, s2, z2)
    else:
        kind = "position_swap"
        slots[first], slots[second] = slots[second], slots[first]
        main = {first: second, second: first}.get(main, main)
    return _Scene(
        arrangement=source.arrangement,
        slots=slots,
        main=main,
        position=source.position,
        background=source.background,
        caption_seed=source.caption_seed,
        twin={"of": source_index, "kind": kind},
    )


# ---------------------------------------------------------------------------------------------
# drawing


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


# ---------------------------------------------------------------------------------------------
# language


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _one_caption(
    scene: _Scene, rng: np.random.Generator, allow_subject: bool = True
) -> tuple[str, _CaptionFacts | None]:
    """One caption plus which sizes and whether the background it states (for ambiguity checks).

    Every random choice is made before looking at colours or shapes, so a twin scene with the
    same caption seed gets the same phrasing with its swapped words.
    """
    n_objects = len(scene.slots)
    subject_draw = rng.random()  # drawn for every caption so phrasings stay seed-stable
    if n_objects > 1 and allow_subject and subject_draw < _SUBJECT_CAPTION_PROB:
        return _subject_caption(scene, rng), None
    if n_objects == 1:
        template = _SINGLE_TEMPLATES[int(rng.integers(len(_SINGLE_TEMPLATES)))]
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES) - 1))]
        suffix = _SINGLE_SUFFIXES[int(rng.integers(len(_SINGLE_SUFFIXES)))]
        sizes_said = (True,)
    else:
        templates = (_PAIR_TEMPLATES if n_objects == 2 else _TRIPLE_TEMPLATES)[scene.arrangement]
        template = templates[int(rng.integers(len(templates)))]
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        suffix = _SUFFIXES[int(rng.integers(len(_SUFFIXES)))]
        sizes_said = tuple(bool(v) for v in rng.random(n_objects) < 0.5)
    if template.startswith("from"):
        prefix = ""
    bare = [
        f"{size} {colour} {shape}" if said else f"{colour} {shape}"
        for (colour, shape, size), said in zip(scene.slots, sizes_said, strict=True)
    ]
    body = template.format(
        *[_with_article(b) for b in bare], bare=bare[0], p=_POSITION_PHRASES.get(scene.position, "")
    )
    if _token_estimate(body + suffix) > _MAX_CAPTION_TOKENS:  # keep every object within context
        suffix = ""
    if _token_estimate(prefix + body + suffix) > _MAX_CAPTION_TOKENS:
        prefix = ""
    text = prefix.format(count=_NUMBER_WORDS[n_objects]) + body + suffix.format(bg=scene.background)
    return text, (sizes_said, bool(suffix))


def _subject_caption(scene: _Scene, rng: np.random.Generator) -> str:
    """An alt-text-like caption naming only the main (large) object and how many others there
    are, as web captions often name just their subject."""
    colour, shape, _ = scene.slots[scene.main]
    others = len(scene.slots) - 1
    tail = _SUBJECT_TAILS[int(rng.integers(len(_SUBJECT_TAILS)))]
    prefix = _SUBJECT_PREFIXES[int(rng.integers(len(_SUBJECT_PREFIXES)))]
    noun = "shape" if others == 1 else "shapes"
    return prefix + f"a large {colour} {shape}" + tail.format(n=_NUMBER_WORDS[others], shapes=noun)


def _token_estimate(text: str) -> int:
    """Words plus punctuation: what a BPE trained on these captions spends on them."""
    return len(text.split()) + text.count(",") + text.count(":")


def _captions(
    scene: _Scene, n_captions: int
) -> tuple[list[str], list[_CaptionFacts | None]]:
    """`n_captions` distinct captions (fewer only if the phrasings run out)."""
    rng = np.random.default_rng(scene.caption_seed)
    captions: list[str] = []
    facts: list[_CaptionFacts | None] = []
    for _ in range(20 * n_captions):
        # the first caption always describes every object: it is the held-out retrieval text
        # and at most two name only the subject
        allow_subject = bool(captions) and facts.count(None) < _MAX_SUBJECT_CAPTIONS
        text, text_facts = _one_caption(scene, rng, allow_subject=allow_subject)
        if text not in captions:
            captions.append(text)
            facts.append(text_facts)
            if len(captions) == n_captions:
                break
    return captions, facts


def _questions(scene: _Scene) -> list[dict[str, str]]:
    """Colour, shape, position and size of every object, the count, and one yes and one no."""
    qa: list[dict[str, str]] = []
    positions = scene.positions()
    order = [scene.main] + [s for s in range(len(scene.slots)) if s != scene.main]
    for slot in order:  # colours and shapes are unique within an image, so each is well defined
        colour, shape, size = scene.slots[slot]
        qa += [
            {"question": f"what colour is the {shape}?", "answer": colour, "type": "colour"},
            {"question": f"what shape is the {colour} object?", "answer": shape, "type": "shape"},
            {"question": f"where is the {colour} {shape}?", "answer": positions[slot],
             "type": "position"},
            {"question": f"is the {colour} {shape} small or large?", "answer": size,
             "type": "size"},
        ]
    qa.append({"question": "how many shapes are there?",
               "answer": _NUMBER_WORDS[len(scene.slots)], "type": "count"})
    colour, shape, _ = scene.slots[scene.main]
    qa.append({"question": f"is there a {colour} {shape}?", "answer": "yes", "type": "exists"})
    present = {(c, s) for c, s, _ in scene.slots}
    if len(scene.slots) >= 2:  # a swapped binding is the hard "no"
        other_colour = scene.slots[(scene.main + 1) % len(scene.slots)][0]
        absent = (other_colour, shape)
    else:
        rng = np.random.default_rng([scene.caption_seed, 1])
        candidates = [(c, s) for c in _COLOUR_NAMES for s in SHAPES if (c, s) not in present]
        absent = candidates[int(rng.integers(len(candidates)))]
    qa.append({"question": f"is there {_with_article(' '.join(absent))}?", "answer": "no",
               "type": "exists"})
    return qa


# ---------------------------------------------------------------------------------------------
# generation


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _check_arguments(
    split: str, n_images: int, seed: int, image_size: int, captions_per_image: int,
    noisy_fraction: float,
) -> None:
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split must be a non-empty string, got {split!r}")
    for name, value, low in (("n_images", n_images, 0), ("seed", seed, 0),
                             ("image_size", image_size, 16), ("captions_per_image",
                                                              captions_per_image, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= noisy_fraction < 1.0:
        raise ConfigError(f"noisy_fraction must be in [0, 1), got {noisy_fraction!r}")


def _iter_drawn(
    split: str, n_images: int, seed: int, image_size: int, captions_per_image: int
) -> Iterator[_Drawn]:
    key = _split_key(split)
    previous: _Scene | None = None
    for index in range(n_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, key], spawn_key=(0, index)))
        scene = _sample_scene(rng, previous, index - 1)
        image, objects = _render(rng, scene, image_size)
        captions, facts = _captions(scene, captions_per_image)
        yield _Drawn(scene, image, objects, captions, facts)
        previous = scene


def _corrupt(
    captions: list[list[str]], scenes: list[_Scene], fraction: float, seed: int, split: str
) -> tuple[list[list[str]], list[list[dict[str, Any] | None]]]:
    """Replace round(fraction * total) captions by noise, recording kind and original text."""
    noisy: list[list[dict[str, Any] | None]] = [[None] * len(c) for c in captions]
    flat = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
    n_noisy = round(fraction * len(flat))
    if n_noisy == 0:
        return captions, noisy
    rng = np.random.default_rng(np.random.SeedSequence([seed, _split_key(split)], spawn_key=(1,)))
    result = [list(c) for c in captions]
    for position in sorted(int(p) for p in rng.choice(len(flat), size=n_noisy, replace=False)):
        i, j = flat[position]
        original = captions[i][j]
        kind = str(rng.choice(NOISE_KINDS, p=[0.5, 0.25, 0.25]))
        if kind == "mismatched" and len(captions) < 2:
            kind = "shuffled"
        record: dict[str, Any] = {"kind": kind, "original": original}
        if kind == "mismatched":
            for _ in range(20):
                other = int(rng.integers(len(captions) - 1))
                other += other >= i
                text = captions[other][int(rng.integers(len(captions[other])))]
                if text not in captions[i]:
                    break
            record["source_index"] = other
        elif kind == "shuffled":
            words = original.split()
            for _ in range(20):
                text = " ".join(words[k] for k in rng.permutation(len(words)))
                if text != original:
                    break
        else:
            present = {c for c, _, _ in scenes[i].slots}
            said = [m for m in re.finditer(r"\b(" + "|".join(_COLOUR_NAMES) + r")\b", original)]
            match = said[int(rng.integers(len(said)))]
            absent = [c for c in _COLOUR_NAMES if c not in present]
            wrong = absent[int(rng.integers(len(absent)))]
            text = original[: match.start()] + wrong + original[match.end():]
            record["replaced"] = {"from": match.group(0), "to": wrong}
        result[i][j] = text
        noisy[i][j] = record
    return result, noisy


def generate(
    split: str,
    n_images: int,
    seed: int,
    image_size: int = 64,
    captions_per_image: int = 5,
    noisy_fraction: float = 0.0,
) -> list[SynthItem]:
    """The first `n_images` images of a split; a longer run of the same split extends a shorter one
    (except which captions `noisy_fraction` picks)."""
    _check_arguments(split, n_images, seed, image_size, captions_per_image, noisy_fraction)
    drawn = list(_iter_drawn(split, n_images, seed, image_size, captions_per_image))
    scenes = [d.scene for d in drawn]
    captions, noisy = _corrupt([d.captions for d in drawn], scenes, noisy_fraction, seed, split)
    items = []
    for index, d in enumerate(drawn):
        colour, shape, _ = d.scene.slots[d.scene.main]
        class_name = f"{colour} {shape}"
        items.append(SynthItem(
            image=d.image, captions=captions[index], label=CLASS_NAMES.index(class_name),
            class_name=class_name, objects=d.objects, qa=_questions(d.scene),
            noisy=noisy[index], background=d.scene.background, twin=d.scene.twin,
        ))
    return items


# ---------------------------------------------------------------------------------------------
# dataset statistics


def duplicate_caption_share(captions: Sequence[Sequence[str]]) -> float:
    """Share of captions that exactly equal a caption of another image (no model can rank those)."""
    owners: dict[str, set[int]] = defaultdict(set)
    for index, image_captions in enumerate(captions):
        for text in image_captions:
            owners[text].add(index)
    total = sum(len(c) for c in captions)
    duplicated = sum(len(owners[t]) > 1 for image_captions in captions for t in image_captions)
    return duplicated / total if total else 0.0


def _ambiguous_caption_share(drawn: Sequence[_Drawn]) -> float:
    """Share of captions that are also a true, complete description of another image."""
    by_layout: dict[tuple, list[int]] = defaultdict(list)
    for index, d in enumerate(drawn):
        s = d.scene
        by_layout[(s.arrangement, s.position, tuple((c, h) for c, h, _ in s.slots))].append(index)
    ambiguous = total = 0
    for index, d in enumerate(drawn):
        s = d.scene
        others = [
            drawn[j].scene for j in by_layout[(s.arrangement, s.position,
                                               tuple((c, h) for c, h, _ in s.slots))]
            if j != index
        ]
        for facts in d.facts:
            if facts is None:  # a subject-only caption is partial by design
                continue
            sizes_said, background_said = facts
            total += 1
            ambiguous += any(
                all(not said or o.slots[k][2] == s.slots[k][2] for k, said in enumerate(sizes_said))
                and (not background_said or o.background == s.background)
                for o in others
            )
    return ambiguous / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# writing


def _prepare_out_dir(out: Path) -> None:
    """Create `out`, or clear a previous synthetic dataset there; refuse any other non-empty dir."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; expected a dataset directory")
    if out.is_dir() and any(out.iterdir()):
        meta_path = out / "meta.json"
        try:
            previous = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("generator") != "vlp.data.synthetic":
            raise DataError(f"{out}: directory is not empty and holds no vlp synthetic dataset "
                            "(meta.json); expected an empty or new directory")
        for name in ("images", "imagefolder", "wds", "coco"):
            shutil.rmtree(out / name, ignore_errors=True)
        for path in out.glob("*.csv"):
            path.unlink()
        for path in out.glob("*.jsonl"):
            path.unlink()
        meta_path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 946684800, 0o644  # fixed: byte-identical
    tar.addfile(info, io.BytesIO(payload))


def _write_split(
    out: Path, split: str, drawn: list[_Drawn], captions: list[list[str]],
    noisy: list[list[dict[str, Any] | None]], formats: Sequence[str], image_size: int,
    shard_size: int, seed: int,
) -> dict[str, Any]:
    """Every caption file of one split; rows are caption-major (all first captions, then all second
    captions, ...), so consecutive rows never repeat an image until the images run out."""
    image_paths = [f"images/{split}/{i:06d}.jpg" for i in range(len(drawn))]
    labels = [CLASS_NAMES.index("{} {}".format(*d.scene.slots[d.scene.main][:2])) for d in drawn]
    pairs = [(i, j) for j in range(max(len(c) for c in captions))
             for i in range(len(captions)) if j < len(captions[i])]
    files: dict[str, Any] = {}
    if "csv" in formats:
        with (out / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filepath", "caption"])
            writer.writerows([image_paths[i], captions[i][j]] for i, j in pairs)
        files["csv"] = f"{split}.csv"
    if "jsonl" in formats:
        _write_jsonl(out / f"{split}.jsonl",
                     [{"image": image_paths[i], "caption": captions[i][j]} for i, j in pairs])
        files["jsonl"] = f"{split}.jsonl"
    if "coco" in formats:
        (out / "coco").mkdir(exist_ok=True)
        coco = {
            "info": {"description": f"vlp synthetic shapes, split {split}, seed {seed}"},
            "images": [{"id": i, "file_name": f"{i:06d}.jpg", "width": image_size,
                        "height": image_size} for i in range(len(drawn))],
            "annotations": [{"id": k, "image_id": i, "caption": captions[i][j]}
                            for k, (i, j) in enumerate(pairs)],
        }
        (out / "coco" / f"captions_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
        files["coco"] = f"coco/captions_{split}.json"
    if "imagefolder" in formats:
        root = out / "imagefolder" / split
        for i, label in enumerate(labels):
            class_dir = root / CLASS_NAMES[label].replace(" ", "_")
            class_dir.mkdir(parents=True, exist_ok=True)
            _link_or_copy(out / image_paths[i], class_dir / f"{i:06d}.jpg")
        files["imagefolder"] = f"imagefolder/{split}"
    if "wds" in formats:
        shard_dir = out / "wds" / split
        shard_dir.mkdir(parents=True, exist_ok=True)
        shards = []
        for shard, start in enumerate(range(0, len(pairs), shard_size)):
            name = f"shard-{shard:06d}.tar"
            with tarfile.open(shard_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key_index in range(start, min(start + shard_size, len(pairs))):
                    i, j = pairs[key_index]
                    key = f"{key_index:09d}"
                    sample = {"key": key, "caption": captions[i][j], "label": labels[i],
                              "class_name": CLASS_NAMES[labels[i]], "image": image_paths[i],
                              "image_index": i, "caption_index": j,
                              "noisy": noisy[i][j]["kind"] if noisy[i][j] else None,
                              "objects": drawn[i].objects}
                    _add_tar_member(tar, f"{key}.jpg", drawn[i].jpeg)
                    _add_tar_member(tar, f"{key}.txt", captions[i][j].encode("utf-8"))
                    _add_tar_member(tar, f"{key}.json", json.dumps(sample).encode("utf-8"))
            shards.append(f"wds/{split}/{name}")
        files["wds"] = shards
    qa_rows = []
    for i, d in enumerate(drawn):
        qa_rows += [{"image": image_paths[i], **row} for row in _questions(d.scene)]
    _write_jsonl(out / f"{split}_qa.jsonl", qa_rows)
    files["qa"] = f"{split}_qa.jsonl"
    noisy_rows = [{"image": image_paths[i], "caption": captions[i][j], **noisy[i][j]}
                  for i, j in pairs if noisy[i][j]]
    if noisy_rows:
        _write_jsonl(out / f"{split}_noisy.jsonl", noisy_rows)
        files["noisy"] = f"{split}_noisy.jsonl"
    return files


def write_dataset(
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = FORMATS,
    n_train: int = 5000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: int = 5,
    noisy_fraction: float = 0.0,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the train/val/test splits in every requested format and return what meta.json holds.

    Images are encoded once under images/{split}; imagefolder hard-links them and wds reuses their
    bytes. The test split has one caption per image; noise only ever touches the train split.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or isinstance(formats, str):
        raise ConfigError(f"formats: unknown {unknown or formats!r}; expected some of {FORMATS}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        per_image = 1 if split == "test" else captions_per_image
        _check_arguments(split, n, seed, image_size, per_image, noisy_fraction)
    out = Path(out_dir)
    _prepare_out_dir(out)
    meta: dict[str, Any] = {
        "generator": "vlp.data.synthetic",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "formats": list(formats),
        "counts": {},
        "captions_per_image": {},
        "duplicate_caption_share": {},
        "ambiguous_caption_share": {},
        "twin_share": {},
        "classes_present": {},
        "class_names": CLASS_NAMES,
        "zeroshot_templates": ZEROSHOT_TEMPLATES,
        "colours": _COLOUR_NAMES,
        "shapes": list(SHAPES),
        "backgrounds": list(BACKGROUNDS),
        "qa_types": list(QA_TYPES),
        "noisy": {"fraction": noisy_fraction, "splits": ["train"] if noisy_fraction else [],
                  "captions": 0, "kinds": {}},
        "files": {},
    }
    bar = tqdm(total=sum(sizes.values()), desc="vlp synth", unit="img", disable=not progress)
    try:
        for split, n_images in sizes.items():
            if n_images == 0:
                meta["counts"][split] = {"images": 0, "captions": 0}
                continue
            per_image = 1 if split == "test" else captions_per_image
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            drawn = []
            for index, d in enumerate(_iter_drawn(split, n_images, seed, image_size, per_image)):
                encoded = io.BytesIO()
                d.image.save(encoded, format="JPEG", quality=95, subsampling=0)
                d.jpeg, d.image = encoded.getvalue(), None
                (out / "images" / split / f"{index:06d}.jpg").write_bytes(d.jpeg)
                drawn.append(d)
                bar.update()
            fraction = noisy_fraction if split == "train" else 0.0
            captions, noisy = _corrupt([d.captions for d in drawn], [d.scene for d in drawn],
                                       fraction, seed, split)
            meta["files"][split] = _write_split(out, split, drawn, captions, noisy, formats,
                                                image_size, shard_size, seed)
            kinds = Counter(r["kind"] for row in noisy for r in row if r)
            meta["counts"][split] = {"images": n_images, "captions": sum(map(len, captions))}
            meta["captions_per_image"][split] = per_image
            meta["duplicate_caption_share"][split] = round(duplicate_caption_share(captions), 6)
            meta["ambiguous_caption_share"][split] = round(_ambiguous_caption_share(drawn), 6)
            meta["twin_share"][split] = round(sum(d.scene.twin is not None for d in drawn)
                                              / n_images, 6)
            meta["classes_present"][split] = len({d.scene.slots[d.scene.main][:2] for d in drawn})
            if kinds:
                meta["noisy"]["captions"] = sum(kinds.values())
                meta["noisy"]["kinds"] = dict(sorted(kinds.items()))
    finally:
        bar.close()
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
