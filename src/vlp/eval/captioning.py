"""Captioning metrics as coco-caption reports them (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), and
caption generation / scoring over a caption source.

The scores come from ``pycocoevalcap`` when it is installed (the ``caption`` extra; it needs
Java), else from the pure-Python versions here, which follow coco-caption's definitions closely
enough to agree with it to 1e-6 on the same tokens. METEOR has no pure-Python version here: it
is left out of the results (with a warning) when pycocoevalcap or Java is missing.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from vlp.contract import CAPTION
from vlp.data.images import ImageInput, group_images, image_batches, list_ids
from vlp.data.transforms import image_transform
from vlp.errors import ConfigError, DataError
from vlp.eval.embed import inference, model_device

BLEU_ORDER = 4
CIDER_SIGMA = 6.0  # CIDEr-D's Gaussian length penalty
ROUGE_BETA = 1.2
BACKENDS = ("auto", "vlp", "pycocoevalcap")
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption BLEU's guards against 0/0

# -- tokenisation ----------------------------------------------------------------------------------

# coco-caption runs Stanford's PTBTokenizer (-lowerCase) and then drops these punctuation tokens;
# below is a regex approximation: lowercase, split clitics ("dog's" -> "dog 's", "don't" ->
# "do n't"), keep word-internal "-", "." and ":" (as in "t-shirt", "3.5", "10:30"), drop the rest.
# Brackets become PTB's -lrb- / -rrb- ... tokens, which coco-caption (lowercased) keeps.
_CLITIC_NT = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
_QUOTES = re.compile(r"[\"`]|''")
_INNER = re.compile(r"(?<=\w)([.:\-])(?=\w)")  # protected from the punctuation strip below
_PUNCT = re.compile(r"[.?!,:;\-]")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
             "}": " -rcb- "}
_BRACKET = re.compile(r"[()\[\]{}]")
_SPLIT_SYMBOLS = re.compile(r"([$%])")
_LONE_APOSTROPHE = re.compile(r"(?<!\S)'(?!(?:s|re|ve|ll|d|m|t)\b)|'(?!\S)")


def tokenize_caption(text: str) -> str:
    """A caption as space-separated lowercase PTB-like tokens with punctuation removed."""
    text = _QUOTES.sub(" ", text.replace("\n", " ").lower())
    text = _CLITIC_NT.sub(r"\1 \2", text)
    text = _CLITIC.sub(r"\1 \2", text)
    text = _LONE_APOSTROPHE.sub(" ", text)
    text = _INNER.sub(lambda m: {".": "\0", ":": "\1", "-": "\2"}[m.group(1)], text)
    text = _PUNCT.sub(" ", text)
    text = text.replace("\0", ".").replace("\1", ":").replace("\2", "-")
    text = _BRACKET.sub(lambda m: _BRACKETS[m.group(0)], text)
    text = _SPLIT_SYMBOLS.sub(r" \1 ", text)
    return " ".join(text.split())


# -- pure-Python scores (inputs already tokenised: id -> candidate, id -> references) -------------

def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(words) - n + 1))


def bleu_scores(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str],
                max_n: int = BLEU_ORDER) -> list[float]:
    """Corpus BLEU-1..max_n: clipped n-gram counts summed over the corpus, brevity penalty from
    each candidate's closest reference length (ties: the shorter), as coco-caption."""
    correct, guess = [0] * max_n, [0] * max_n
    test_total = ref_total = 0
    for key, candidate in candidates.items():
        words = candidate.split()
        ref_words = [ref.split() for ref in references[key]]
        max_ref_counts: Counter = Counter()
        for ref in ref_words:
            max_ref_counts |= _ngrams(ref, max_n)  # | keeps the max count of each n-gram
        for ngram, count in _ngrams(words, max_n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(max_n):
            guess[n] += max(0, len(words) - n)
        test_total += len(words)
        ref_total += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (test_total + _TINY) / (ref_total + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1],
                                                                        current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(references: Mapping[Any, Sequence[str]],
                  candidates: Mapping[Any, str], beta: float = ROUGE_BETA) -> float:
    """Mean over images of the LCS F-measure, precision and recall each maxed over the
    references (coco-caption's ROUGE-L)."""
    scores = []
    for key, candidate in candidates.items():
        words = candidate.split()
        refs = [ref.split() for ref in references[key]]
        lcs = [_lcs_length(ref, words) for ref in refs]
        precision = max(n / len(words) for n in lcs) if words else 0.0
        recall = max(n / len(ref) if ref else 0.0 for n, ref in zip(lcs, refs))
        if precision and recall:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def cider_d_score(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str],
                  max_n: int = BLEU_ORDER, sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D: n-gram tf-idf vectors (idf over the references' images), cosine with the
    candidate's counts clipped to the reference's, a Gaussian length penalty, averaged over
    n = 1..4 and the references, x10; averaged over images."""
    keys = list(candidates)
    ref_counts = {key: [_ngrams(r.split(), max_n) for r in references[key]] for key in keys}
    document_frequency: Counter = Counter()
    for counts in ref_counts.values():
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(keys))

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(max_n)]
        norms = [0.0] * max_n
        for ngram, tf in counts.items():
            weight = tf * (log_images - math.log(max(1.0, document_frequency[ngram])))
            vec[len(ngram) - 1][ngram] = weight
            norms[len(ngram) - 1] += weight * weight
        # coco-caption measures the length as the number of bigrams; kept for equal scores
        length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
        return vec, [math.sqrt(v) for v in norms], length

    total = 0.0
    for key in keys:
        vec, norm, length = vectors(_ngrams(candidates[key].split(), max_n))
        score = 0.0
        for counts in ref_counts[key]:
            vec_ref, norm_ref, length_ref = vectors(counts)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0)
                          for g, w in vec[n].items())
                if norm[n] and norm_ref[n]:
                    dot /= norm[n] * norm_ref[n]
                score += dot * penalty
        total += score / max_n / len(ref_counts[key]) * 10.0
    return total / len(keys)


# -- pycocoevalcap ---------------------------------------------------------------------------------

def pycocoevalcap_available() -> bool:
    """True when pycocoevalcap is importable and ``java`` is on PATH (its METEOR and tokenizer
    run in Java)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def _coco_scores(references: dict, candidates: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {key: list(refs) for key, refs in references.items()}
    res = {key: [candidates[key]] for key in gts}
    bleu, _ = Bleu(BLEU_ORDER).compute_score(gts, res, verbose=0)
    metrics = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    metrics["meteor"] = float(Meteor().compute_score(gts, res)[0])
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    return metrics


def _coco_tokenize(texts: dict[Any, list[str]]) -> dict[Any, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {key: [{"caption": t} for t in values] for key, values in texts.items()}
    return PTBTokenizer().tokenize(wrapped)


def caption_metrics(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str], *,
                    backend: str = "auto") -> dict[str, float]:
    """``bleu_1..4``, ``meteor``, ``rouge_l``, ``cider`` (CIDEr-D) of one candidate per image
    against its references (raw text; tokenised here). ``backend``: "pycocoevalcap" (Java
    tokenizer and scorers), "vlp" (pure Python, no METEOR) or "auto" (the first if available).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"caption metrics backend {backend!r}; expected one of {BACKENDS}")
    if not candidates:
        raise DataError("caption metrics: no candidate captions to score")
    missing = [key for key in candidates if not references.get(key)]
    if missing:
        raise DataError(f"caption metrics: no reference captions for image {missing[0]!r}")
    use_coco = backend == "pycocoevalcap" or (backend == "auto" and pycocoevalcap_available())
    if use_coco:
        if not pycocoevalcap_available():
            raise ConfigError("caption metrics backend 'pycocoevalcap' needs `pip install "
                              "vlp[caption]` and java on PATH")
        try:
            refs = _coco_tokenize({k: list(references[k]) for k in candidates})
            cands = {k: v[0] for k, v in _coco_tokenize({k: [c] for k, c in candidates.items()})
                     .items()}
        except OSError:  # its PTBTokenizer writes a temp file inside the (read-only) package
            refs = {k: [tokenize_caption(r) for r in references[k]] for k in candidates}
            cands = {k: tokenize_caption(c) for k, c in candidates.items()}
        return _coco_scores(refs, cands)
    refs = {k: [tokenize_caption(r) for r in references[k]] for k in candidates}
    cands = {k: tokenize_caption(c) for k, c in candidates.items()}
    warnings.warn("METEOR left out of the caption metrics: it needs pycocoevalcap and Java",
                  stacklevel=2)
    metrics = {f"bleu_{n + 1}": b for n, b in enumerate(bleu_scores(refs, cands))}
    metrics["rouge_l"] = rouge_l_score(refs, cands)
    metrics["cider"] = cider_d_score(refs, cands)
    return metrics


# -- generation ------------------------------------------------------------------------------------

class GeneratedCaptions(NamedTuple):
    pairs: list[tuple[str, str]]  # (image id, caption) of every readable image, input order
    indices: list[int]  # position in the input list of each captioned image
    skipped: list[str]  # ids of the images that could not be read
    reasons: list[str]  # why each of ``skipped`` could not be read ("corrupt_image", ...)


def _prompt_ids(tokenizer: Any, prompt: str | None, batch: int) -> torch.Tensor | None:
    if not prompt:
        return None
    # trailing spaces dropped: byte-level BPEs give the space its own token alone, while a
    # caption after the prompt carries it in its first word (as training read it)
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt.rstrip())]
    return torch.tensor(ids, dtype=torch.long).expand(batch, -1)


def generate_captions(model: nn.Module, tokenizer: Any, images: Sequence[ImageInput],
                      ids: Sequence[str] | None = None, *, batch_size: int = 32,
                      max_new_tokens: int = 20, num_beams: int = 3, prompt: str | None = None,
                      num_workers: int = 0, progress: bool = True, fast_decode: bool = False,
                      **generate_kwargs: Any) -> GeneratedCaptions:
    """One caption per image (paths or encoded bytes) with ``model.generate``; images are read
    through `vlp.data.images.image_batches`, so unreadable ones are skipped and listed. With a
    ``prompt``, decoding starts from bos + prompt and the caption is the continuation only (the
    prompt is not repeated). ``fast_decode``: large JPEGs decode at a reduced scale
    (`vlp.data.transforms.ImageTransform.draft_size`)."""
    model.require(CAPTION, "captioning")
    images = list(images)
    ids = [str(i) for i in ids] if ids is not None else list_ids(images)
    if len(ids) != len(images):
        raise ConfigError(f"generate_captions: {len(images)} images but {len(ids)} ids")
    if not images:
        raise DataError("no images to caption")
    loader = image_batches(images, image_transform(model, train=False, fast_decode=fast_decode),
                           batch_size=batch_size,
                           num_workers=num_workers,
                           pin_memory=model_device(model).type == "cuda")
    pairs: list[tuple[str, str]] = []
    kept: list[int] = []
    unreadable: list[int] = []
    reasons: list[str] = []
    with inference(model) as device:
        for batch in tqdm(loader, desc="captions", leave=False, disable=not progress):
            unreadable.extend(batch.unreadable)
            reasons.extend(batch.reasons)
            if batch.pixels is None:
                continue
            prompt_ids = _prompt_ids(tokenizer, prompt, batch.pixels.shape[0])
            tokens = model.generate(batch.pixels.to(device, non_blocking=True),
                                    prompt_ids=None if prompt_ids is None else
                                    prompt_ids.to(device),
                                    max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    **generate_kwargs)
            texts = tokenizer.batch_decode(tokens.cpu())
            for index, text in zip(batch.indices.tolist(), texts):
                pairs.append((ids[index], text.strip()))
                kept.append(index)
    return GeneratedCaptions(pairs, kept, [ids[i] for i in unreadable], reasons)


def caption_eval(model: nn.Module, tokenizer: Any, source: Any, *, batch_size: int = 32,
                 max_new_tokens: int = 20, num_beams: int = 3, prompt: str | None = None,
                 num_workers: int = 0, progress: bool = True, fast_decode: bool = False,
                 backend: str = "auto", **generate_kwargs: Any) -> dict[str, Any]:
    """Caption each unique image of a caption source once (`vlp.data.images.group_images`)
    and score it against all its references: `caption_metrics` keys plus ``num_images``
    (scored), ``num_skipped`` and ``skipped`` (the ids of the images that could not be read).
    ``generate_kwargs`` (min_new_tokens, repetition_penalty, early_stopping, ...) go to the
    model's ``generate``; ``fast_decode``: see `generate_captions`."""
    groups = group_images(source).captioned()
    if not groups.images:
        raise DataError(f"caption eval: {source!r} has no captioned images")
    references = groups.references()
    generated = generate_captions(model, tokenizer, groups.images, groups.ids,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, prompt=prompt, num_workers=num_workers,
                                  progress=progress, fast_decode=fast_decode,
                                  **generate_kwargs)
    if not generated.pairs:
        raise DataError(f"caption eval: none of the {len(groups.images)} images could be read "
                        f"(first: {generated.skipped[0]})")
    candidates = {index: text for index, (_, text) in zip(generated.indices, generated.pairs)}
    metrics: dict[str, Any] = caption_metrics({i: references[i] for i in candidates},
                                              candidates, backend=backend)
    metrics["num_images"] = len(candidates)
    skipped = [name for name, _ in groups.lost] + generated.skipped  # lost shards' samples too
    metrics["num_skipped"] = len(skipped)
    metrics["skipped"] = skipped
    return metrics
