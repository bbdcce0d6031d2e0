"""What the synthetic world holds and says: its vocabulary, scenes, captions, questions and noise.

A scene is a few coloured shapes in a row, a column or alone, on a named background. Some
multi-object scenes are minimal pairs ("twins") of the scene before them, with two colours or two
positions swapped and the same phrasing, so that reading a caption as a bag of words cannot tell
the pair apart. Pixels are drawn by `vlp.data.synthetic_render`; `vlp.data.synthetic` generates
splits and writes them to disk.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "size", "exists")
NOISE_KINDS: tuple[str, ...] = ("mismatched", "shuffled", "wrong_colour")

_COLOUR_NAMES = list(COLOURS)
_OBJECT_COUNT_PROBS = (0.2, 0.45, 0.35)  # images with 1, 2, 3 objects
_TWIN_PROB = 0.35  # chance that an image is the minimal-pair twin of a multi-object predecessor
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
# caption noise


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


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


def _ambiguous_caption_share(
    scenes: Sequence[_Scene], caption_facts: Sequence[Sequence[_CaptionFacts | None]]
) -> float:
    """Share of captions that are also a true, complete description of another image.

    ``caption_facts[i]`` holds what each caption of ``scenes[i]`` states (see `_one_caption`).
    """
    by_layout: dict[tuple, list[int]] = defaultdict(list)
    for index, s in enumerate(scenes):
        by_layout[(s.arrangement, s.position, tuple((c, h) for c, h, _ in s.slots))].append(index)
    ambiguous = total = 0
    for index, s in enumerate(scenes):
        others = [
            scenes[j] for j in by_layout[(s.arrangement, s.position,
                                          tuple((c, h) for c, h, _ in s.slots))]
            if j != index
        ]
        for facts in caption_facts[index]:
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
