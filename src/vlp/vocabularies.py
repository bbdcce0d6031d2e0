"""Standard pretrained vocabularies found on this machine without the network.

CLIP's byte-level BPE (49,408 tokens: OpenAI CLIP, open_clip, HF ``CLIPTokenizer``) ships as
``bpe_simple_vocab_16e6.txt.gz`` inside the open_clip package. vlp does not depend on open_clip:
when it is installed, its file is located without importing the package and read into the
``vocab.json`` + ``merges.txt`` pair `vlp.tokenizers.clip_bpe_tokenizer` reads; when it is not,
there is no standard vocabulary at hand and a run trains its own BPE.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from vlp.errors import DataError
from vlp.tokenizers import CLIP_END_OF_WORD, Tokenizer, clip_bpe_tokenizer

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's gzipped merges
CLIP_VOCAB_SIZE = 49408  # 512 byte symbols + 48,894 merges + start and end of text
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPEs (GPT-2, CLIP) stand bytes for, in byte
    order: a printable Latin-1 byte stands for itself, each other byte for the next unused
    character from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    # the vocabulary lists the printable bytes first, then the others (CLIP's numbering)
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256)
                                              if b not in printable]


def clip_bpe_file() -> Path | None:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` when open_clip is installed (found, not
    imported), else None."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / CLIP_BPE_FILE
        if path.is_file():
            return path
    return None


def clip_bpe_from_merges(path: str | os.PathLike[str], context_length: int) -> Tokenizer:
    """CLIP's BPE from its gzipped merges file (the layout open_clip ships: a header line, then
    one merge per line, of which CLIP uses the first 48,894), numbered as CLIP numbers it."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a gzipped BPE merges file ({error})") from None
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - len(CLIP_SPECIALS)
    merges = [line.split() for line in lines[1:1 + n_merges]]
    if len(merges) != n_merges or any(len(pair) != 2 for pair in merges):
        raise DataError(f"{path}: expected a header line and {n_merges} merges of two symbols")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + CLIP_END_OF_WORD for s in symbols),
              *("".join(pair) for pair in merges), *CLIP_SPECIALS]
    with tempfile.TemporaryDirectory(prefix="vlp-clip-bpe-") as directory:
        vocab_file, merges_file = Path(directory, "vocab.json"), Path(directory, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("\n".join(" ".join(pair) for pair in merges), encoding="utf-8")
        return clip_bpe_tokenizer(vocab_file, merges_file, context_length=context_length)


def standard_tokenizer(vocab_size: int, context_length: int) -> tuple[Tokenizer, str] | None:
    """A standard vocabulary at hand for a text tower of ``vocab_size`` tokens, with where it
    came from: CLIP's BPE for a 49,408-token tower when open_clip's file is installed; None
    otherwise."""
    if vocab_size != CLIP_VOCAB_SIZE:
        return None
    path = clip_bpe_file()
    if path is None:
        return None
    return clip_bpe_from_merges(path, context_length), f"CLIP's BPE ({path})"
