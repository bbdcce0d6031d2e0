"""A text-only corpus about the synthetic world, for pretraining beside its image-text pairs
(SimVLM mixes a text corpus into PrefixLM pretraining).

Each line describes a scene that is never rendered, then asks one of its questions and answers
it: ``"<caption>. <question> <answer>"``; optionally a share of the questions is also written
alone, ``"<question> <answer>"``, so a question opening the text (as it does after an image,
with no description before it) is a form the corpus shows too. Scenes come from their own split
of the world, so no line is about a train, val or test image; what the lines teach is the
language of questions and how an answer follows from a described scene. A model that has also
learnt to read scenes from pixels (image-text pairs) can then answer a question about an image
it sees in place of the description: zero-shot VQA."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlp.data.synthetic_world import _captions, _questions, _sample_scene, _split_key
from vlp.errors import ConfigError

TEXT_SPLIT = "text"  # the world's split the corpus scenes are drawn from
CAPTIONS_PER_SCENE = 5


def corpus_lines(n_scenes: int, seed: int = 0, bare_share: float = 0.0) -> list[str]:
    """Every question of ``n_scenes`` unrendered scenes, each after a caption naming every
    object of its scene (captions naming only the main object are not used); each question is
    also written alone, right after, with probability ``bare_share``."""
    if not isinstance(n_scenes, int) or isinstance(n_scenes, bool) or n_scenes < 1:
        raise ConfigError(f"n_scenes must be an integer >= 1, got {n_scenes!r}")
    if not 0.0 <= bare_share <= 1.0:
        raise ConfigError(f"bare_share must be in [0, 1], got {bare_share!r}")
    key = _split_key(TEXT_SPLIT)
    lines: list[str] = []
    previous = None
    for index in range(n_scenes):
        rng = np.random.default_rng(np.random.SeedSequence([seed, key], spawn_key=(0, index)))
        scene = _sample_scene(rng, previous, index - 1)
        captions, facts = _captions(scene, CAPTIONS_PER_SCENE)
        full = [caption for caption, fact in zip(captions, facts) if fact is not None]
        # its own stream, so the described lines do not depend on bare_share
        bare = np.random.default_rng(np.random.SeedSequence([seed, key], spawn_key=(1, index)))
        for number, qa in enumerate(_questions(scene)):
            lines.append(f"{full[number % len(full)]}. {qa['question']} {qa['answer']}")
            if bare.random() < bare_share:
                lines.append(f"{qa['question']} {qa['answer']}")
        previous = scene
    return lines


def write_text_corpus(path: str | os.PathLike[str], n_scenes: int, seed: int = 0,
                      progress: bool = False, bare_share: float = 0.0) -> int:
    """Write `corpus_lines` to ``path`` (one text per line); returns the number of lines."""
    lines = corpus_lines(n_scenes, seed, bare_share)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line in tqdm(lines, desc="vlp text corpus", unit="line", disable=not progress):
            f.write(line + "\n")
    return len(lines)
