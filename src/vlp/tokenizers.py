"""Text tokenizers: train a byte-level BPE on captions, or load any HF ``tokenizer.json`` directory.

`Tokenizer` wraps a HF fast tokenizer (`tokenizers.Tokenizer`) and owns the one rule every text
tower relies on: a row is ``[bos] + tokens + [eos] + [pad] * n`` of exactly ``context_length``
ids, and when the text is too long the tokens are cut so that eos stays the last position.
Files are saved in the HF layout (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``), so `transformers` and `tokenizers` can read them too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from vlp.errors import ConfigError, DataError
from vlp.store.files import atomic_write_text, read_json_object

DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context, used when a tokenizer directory names none
MAX_SANE_CONTEXT_LENGTH = 1_000_000  # transformers writes int(1e30) for "no limit"
BYTE_ALPHABET_SIZE = 256  # a byte-level BPE always holds every byte as a token

# Names tried, in order, when a tokenizer directory does not say which tokens are special.
SPECIAL_TOKEN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "bos_token": ("<bos>", "<|startoftext|>", "<s>", "[CLS]", "<start_of_text>"),
    "eos_token": ("<eos>", "<|endoftext|>", "</s>", "[SEP]", "<end_of_text>"),
    "pad_token": ("<pad>", "[PAD]"),
}

# CLIP's BPE (OpenAI CLIP, open_clip's SimpleTokenizer, HF CLIPTokenizer): words are English
# contractions, runs of letters, single digits, or runs of other non-space characters; the last
# symbol of every word carries an end-of-word suffix.
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_END_OF_WORD = "</w>"

TokenIds = Sequence[int] | torch.Tensor


class Tokenizer:
    """A HF fast tokenizer plus vlp's special-token and fixed-length rules; pickle-able."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        context_length: int,
        bos_token: str,
        eos_token: str,
        pad_token: str,
    ) -> None:
        _check_context_length(context_length)
        ids = {}
        for role, token in (("bos_token", bos_token), ("eos_token", eos_token),
                            ("pad_token", pad_token)):
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ConfigError(f"{role} {token!r} is not in the tokenizer vocabulary")
            ids[role] = token_id
        # Padding and truncation are ours to apply (see __call__); a loaded tokenizer.json may set
        # either, and would otherwise pad or cut before we place eos.
        backend.no_padding()
        backend.no_truncation()
        # Caption text is plain text: a literal "<eos>" in a caption must not become the eos id,
        # which would end the sequence early for EOS pooling. Not serialised by HF, so set here.
        backend.encode_special_tokens = True
        self._backend = backend
        self._context_length = context_length
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._bos_id = ids["bos_token"]
        self._eos_id = ids["eos_token"]
        self._pad_id = ids["pad_token"]

    # -- properties -------------------------------------------------------------------------
    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (model vocabulary must be at least this)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_token(self) -> str:
        return self._tokens["bos_token"]

    @property
    def eos_token(self) -> str:
        return self._tokens["eos_token"]

    @property
    def pad_token(self) -> str:
        return self._tokens["pad_token"]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"bos={self.bos_token!r}:{self.bos_id}, eos={self.eos_token!r}:{self.eos_id}, "
            f"pad={self.pad_token!r}:{self.pad_id})"
        )

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without bos/eos/pad."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (HF encodes them in parallel), without specials."""
        # add_special_tokens=False: a loaded post-processor (CLIP's adds bos/eos) must not run,
        # or __call__ would add them twice.
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """LongTensor [B, L]: bos + tokens + eos, right-padded; too-long texts keep eos last."""
        if isinstance(texts, str):
            texts = [texts]
        length = self._context_length if context_length is None else context_length
        _check_context_length(length)
        max_tokens = length - 2  # room left after bos and eos
        rows = []
        for token_ids in self.encode_batch(texts):
            row = [self._bos_id, *token_ids[:max_tokens], self._eos_id]
            rows.append(row + [self._pad_id] * (length - len(row)))
        if not rows:
            return torch.empty(0, length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def pack(self, documents: Sequence[Sequence[str]], context_length: int | None = None
             ) -> torch.Tensor:
        """LongTensor [B, L]: each document's segments as bos + tokens + eos, one after another,
        right-padded; a too-long document is cut and keeps eos last. A one-segment document
        gives the row `__call__` gives its text."""
        length = self._context_length if context_length is None else context_length
        _check_context_length(length)
        segments = [text for document in documents for text in document]
        encoded = iter(self.encode_batch(segments))
        rows = []
        for document in documents:
            row = [token for _ in document
                   for token in (self._bos_id, *next(encoded), self._eos_id)]
            if len(row) > length:
                row = row[:length - 1] + [self._eos_id]
            rows.append(row + [self._pad_id] * (length - len(row)))
        if not rows:
            return torch.empty(0, length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        """Text of one id row; by default starts after bos, stops at the first eos, drops pads."""
        return self._backend.decode(self._strip(ids, skip_special_tokens),
                                    skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: torch.Tensor | Sequence[TokenIds], skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` for each row of a [B, L] tensor or a list of id sequences."""
        rows = [self._strip(row, skip_special_tokens) for row in sequences]
        return self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def _strip(self, ids: TokenIds, skip_special_tokens: bool) -> list[int]:
        token_ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if not skip_special_tokens:
            return token_ids
        # Drop a leading bos before looking for eos: some vocabularies use one token for both.
        if token_ids and token_ids[0] == self._bos_id:
            token_ids = token_ids[1:]
        if self._eos_id in token_ids:
            token_ids = token_ids[: token_ids.index(self._eos_id)]
        specials = {self._bos_id, self._pad_id}
        return [i for i in token_ids if i not in specials]

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str],
             model_input_names: Sequence[str] = ("input_ids", "attention_mask")) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout).
        ``model_input_names``: what transformers' tokenizer gives a model read from these files
        (SigLIP takes no attention mask: its padding is attended, as it was trained).

        Each file is written to a temporary name and renamed into place, so a crash never
        leaves a half-written file behind.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special_tokens_map = dict(self._tokens)
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_tokens_map,
            "model_max_length": self._context_length,
            "clean_up_tokenization_spaces": False,
            # what the model reads (vlp's and transformers' CLIP, BLIP, GPT-2: ids and mask, no
            # token_type_ids, which transformers' fast tokenizers would otherwise add and
            # pipelines pass on)
            "model_input_names": list(model_input_names),
        }
        atomic_write_text(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", _to_json(tokenizer_config))
        atomic_write_text(directory / "special_tokens_map.json", _to_json(special_tokens_map))

    def __getstate__(self) -> dict[str, Any]:
        # HF's JSON form rather than its native pickle: explicit, and stable across versions.
        return {
            "backend_json": self._backend.to_str(),
            "context_length": self._context_length,
            **self._tokens,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        backend = HFTokenizer.from_str(state.pop("backend_json"))
        self.__init__(backend, **state)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    context_length: int,
    pad_token: str = "<pad>",
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    lowercase: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; pad, eos, bos get ids 0, 1, 2 (as in vlp presets).

    The vocabulary may come out smaller than `vocab_size` on a small corpus (no merge left to
    learn); it never comes out larger.
    """
    # Order pad, eos, bos: eos must not get id 2, which HF transformers' CLIPModel reads as the
    # legacy "pool by argmax" switch (so a model using eos 2 could not be exported to HF).
    specials = [pad_token, eos_token, bos_token]
    min_vocab_size = len(specials) + BYTE_ALPHABET_SIZE
    if vocab_size < min_vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: expected at least "
            f"{min_vocab_size} (256 bytes + 3 special tokens)"
        )
    if len(set(specials)) != len(specials):
        raise ConfigError(f"pad, bos and eos tokens must differ, got {specials}")
    _check_context_length(context_length)

    backend = HFTokenizer(models.BPE())
    steps = [normalizers.NFC(), normalizers.Lowercase()] if lowercase else [normalizers.NFC()]
    backend.normalizer = normalizers.Sequence(steps)
    # add_prefix_space=False keeps decode(encode(text)) == normalised text exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = _Counted(texts)
    backend.train_from_iterator(counter, trainer=trainer)
    if counter.count == 0:
        raise DataError("train_tokenizer got no texts: expected a non-empty corpus of captions")
    _add_template_post_processor(backend, bos_token, eos_token)  # vlp encodes without it
    return Tokenizer(backend, context_length=context_length, bos_token=bos_token,
                     eos_token=eos_token, pad_token=pad_token)


def clip_bpe_backend(vocab_file: str | os.PathLike[str],
                     merges_file: str | os.PathLike[str]) -> HFTokenizer:
    """CLIP's byte-level BPE from a ``vocab.json`` + ``merges.txt`` pair, as a HF tokenizer.

    Gives the ids of open_clip's ``SimpleTokenizer`` and HF ``CLIPTokenizer`` built from the
    same files (whitespace collapsed, lowercased; ftfy/HTML fixes of open_clip not applied).
    """
    vocab_file, merges_file = Path(vocab_file), Path(merges_file)
    vocab = _read_json_object(vocab_file)
    if not vocab or not all(isinstance(i, int) for i in vocab.values()):
        raise DataError(f"{vocab_file}: expected a JSON object of token -> id")
    if not merges_file.is_file():
        raise DataError(f"{merges_file}: merges file does not exist")
    merges = []
    for number, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2 or "".join(pair) not in vocab:
            raise DataError(f"{merges_file}:{number}: expected two symbols whose join is in "
                            f"{vocab_file.name}, got {line!r}")
        merges.append((pair[0], pair[1]))
    unk = next((t for t in SPECIAL_TOKEN_CANDIDATES["eos_token"] if t in vocab), None)
    try:
        backend = HFTokenizer(models.BPE(vocab, merges, end_of_word_suffix=CLIP_END_OF_WORD,
                                         unk_token=unk, fuse_unk=False))
    except Exception as error:  # HF raises a bare Exception for inconsistent vocab/merges
        raise DataError(f"{vocab_file} + {merges_file}: not a consistent BPE ({error})") from error
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # bytes back to text, then each end-of-word marker becomes the space it stood for
    backend.decoder = decoders.Sequence([decoders.ByteLevel(),
                                         decoders.Replace(CLIP_END_OF_WORD, " "),
                                         decoders.Strip(" ", 0, 1)])
    specials = [t for role in ("bos_token", "eos_token")
                for t in SPECIAL_TOKEN_CANDIDATES[role] if t in vocab]
    backend.add_special_tokens(specials)
    return backend


def clip_bpe_tokenizer(
    vocab_file: str | os.PathLike[str],
    merges_file: str | os.PathLike[str],
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Tokenizer:
    """`Tokenizer` over `clip_bpe_backend`; specials default to the known CLIP names found in
    the vocabulary, pad to eos (open_clip pads with id 0: pass that token as ``pad_token``)."""
    backend = clip_bpe_backend(vocab_file, merges_file)
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    for role in tokens:
        if tokens[role] is None:
            tokens[role] = next((t for t in SPECIAL_TOKEN_CANDIDATES[role]
                                 if backend.token_to_id(t) is not None), None)
        if tokens[role] is None:
            raise DataError(f"{vocab_file}: cannot tell the {role}: none of "
                            f"{', '.join(SPECIAL_TOKEN_CANDIDATES[role])} is in the vocabulary")
    _add_template_post_processor(backend, tokens["bos_token"], tokens["eos_token"])
    return Tokenizer(backend, context_length=context_length,
                     pad_token=pad_token or tokens["eos_token"], **tokens)


def _add_template_post_processor(backend: HFTokenizer, bos_token: str, eos_token: str) -> None:
    # For readers of tokenizer.json outside vlp (transformers, open_clip's HFTokenizer):
    # encode(text) there adds bos/eos like our __call__ does.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A {eos_token}",
        pair=f"{bos_token} $A {eos_token} $B:1 {eos_token}:1",
        special_tokens=[(bos_token, backend.token_to_id(bos_token)),
                        (eos_token, backend.token_to_id(eos_token))],
    )


def load_tokenizer(
    path: str | os.PathLike[str], context_length: int | None = None
) -> Tokenizer:
    """Load a directory holding tokenizer.json (HF layout) or a tokenizer.json file itself; a
    directory with only ``vocab.json`` + ``merges.txt`` is read as CLIP's BPE.

    Special tokens come from tokenizer_config.json, then special_tokens_map.json (beside
    tokenizer.json), then the first known name found in the vocabulary; pad falls back to eos.
    Context length: the argument, else a sane ``model_max_length``, else 77.
    """
    path = Path(path)
    clip_pair = False
    if path.is_dir():
        tokenizer_file = path / "tokenizer.json"
        clip_pair = (not tokenizer_file.is_file() and (path / "vocab.json").is_file()
                     and (path / "merges.txt").is_file())
        if not tokenizer_file.is_file() and not clip_pair:
            raise DataError(f"{path}: no tokenizer.json in this directory (expected HF layout) "
                            "and no vocab.json + merges.txt pair (CLIP BPE)")
    elif path.is_file():
        tokenizer_file = path
    else:
        raise DataError(f"{path}: tokenizer path does not exist")
    directory = tokenizer_file.parent

    if clip_pair:
        backend = clip_bpe_backend(directory / "vocab.json", directory / "merges.txt")
        tokenizer_file = directory / "vocab.json"  # named in the errors below
    else:
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # HF raises a bare Exception for malformed files
            raise DataError(
                f"{tokenizer_file}: not a readable tokenizer.json ({error})") from error

    tokenizer_config = _read_json_object(directory / "tokenizer_config.json")
    special_tokens_map = _read_json_object(directory / "special_tokens_map.json")
    tokens = {
        role: _resolve_special_token(role, backend, tokenizer_config, special_tokens_map,
                                     tokenizer_file)
        for role in SPECIAL_TOKEN_CANDIDATES
    }
    if tokens["pad_token"] is None:
        tokens["pad_token"] = tokens["eos_token"]  # CLIP, GPT-2: pad with eos
    for role in ("bos_token", "eos_token"):
        if tokens[role] is None:
            tried = ", ".join(SPECIAL_TOKEN_CANDIDATES[role])
            raise DataError(
                f"{tokenizer_file}: cannot tell the {role}: tokenizer_config.json and "
                f"special_tokens_map.json do not name it and none of {tried} is in the vocabulary"
            )

    if context_length is None:
        context_length = _sane_max_length(tokenizer_config.get("model_max_length"))
    if clip_pair:
        _add_template_post_processor(backend, tokens["bos_token"], tokens["eos_token"])
    return Tokenizer(backend, context_length=context_length, **tokens)


# -- helpers ------------------------------------------------------------------------------------


def _resolve_special_token(
    role: str,
    backend: HFTokenizer,
    tokenizer_config: dict[str, Any],
    special_tokens_map: dict[str, Any],
    tokenizer_file: Path,
) -> str | None:
    """The token string for `role`, checked to be in the vocabulary; None when none is known."""
    for source_name, source in (("tokenizer_config.json", tokenizer_config),
                                ("special_tokens_map.json", special_tokens_map)):
        token = _token_content(source.get(role))
        if token is None:
            continue
        if backend.token_to_id(token) is None:
            raise DataError(
                f"{tokenizer_file.parent / source_name}: {role} {token!r} is not in the "
                f"vocabulary of {tokenizer_file}"
            )
        return token
    for candidate in SPECIAL_TOKEN_CANDIDATES[role]:
        if backend.token_to_id(candidate) is not None:
            return candidate
    return None


def _token_content(value: Any) -> str | None:
    """A special-token entry as HF writes it: a string or a dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _sane_max_length(value: Any) -> int:
    if isinstance(value, int | float) and 2 <= value < MAX_SANE_CONTEXT_LENGTH:
        return int(value)
    return DEFAULT_CONTEXT_LENGTH


def _check_context_length(context_length: int) -> None:
    if not isinstance(context_length, int) or context_length < 2:
        raise ConfigError(
            f"context_length={context_length!r}: expected an int >= 2 (room for bos and eos)"
        )


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent."""
    return read_json_object(path, DataError) if path.is_file() else {}


def _to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


class _Counted:
    """Iterate over texts once while counting them (the corpus may be a generator)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.count += 1
            yield text
