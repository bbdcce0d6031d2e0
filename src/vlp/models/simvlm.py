"""SimVLM (Wang et al. 2022, arXiv 2108.10904): a vision-language model pretrained with one
objective, PrefixLM, on weakly aligned image-text pairs and on text-only documents.

The paper's idea, in this file: the image enters as patches after a convolutional stem
(`ConvPatchEmbed`); a bidirectional encoder reads [image tokens; text prefix] and a causal
decoder, cross-attending to it, predicts the rest of the text (§3.1). In training each text is
cut at a random point (possibly before its first word): the words before the cut join the image
in the encoder and the loss covers only the words after it. Text-only rows (``text_ids``) are
the same with no image. Zero-shot use is the same call with a chosen prefix: "a picture of" for
captions, the question for VQA. ``decoder_only`` (the paper's ablation) runs [prefix; targets]
through one stack of the same blocks under a prefix mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlp.config import SimvlmConfig
from vlp.contract import CAPTION, IMAGE_TEXT, QA, TEXT_ONLY, VQA, PretrainModel
from vlp.errors import ConfigError
from vlp.generate import generate as generate_tokens
from vlp.generate import new_token_budget
from vlp.losses import IGNORE_INDEX, caption_nll
from vlp.models.registry import register
from vlp.nn.attention import prefix_target_mask
from vlp.nn.convstem import ConvPatchEmbed
from vlp.nn.transformer import BlockCache, Transformer, init_transformer_

PREFIX_MODES = ("random", "none")


class PrefixLMInputs(NamedTuple):
    """One PrefixLM example per row; the prefix goes to the encoder, the targets are decoded."""

    prefix_ids: Tensor  # (B, P) bos + the prefix words, pad_id after each row's prefix
    prefix_valid: Tensor  # (B, P) True on bos and the prefix words
    decoder_ids: Tensor  # (B, T) bos + targets[:-1], pad_id after
    labels: Tensor  # (B, T) the target words + eos, IGNORE_INDEX after


class Prefix(NamedTuple):
    """What the decoder reads: encoder states (encoder-decoder) or the embedded prefix
    (decoder-only), over [image tokens; text prefix]."""

    states: Tensor  # (B, N + P, width)
    valid: Tensor  # (B, N + P) True on image tokens and real prefix tokens


class DecodeState(NamedTuple):
    caches: list[BlockCache]  # decoder stack caches (decoder-only: prefix keys first)
    key_valid: Tensor  # (B, keys) encoder keys (cross-attention) or every cached key
    prefix_len: int  # decoder-only: cached positions that belong to the prefix, else 0


def text_words(input_ids: Tensor, bos_id: int, eos_id: int, pad_id: int,
               what: str = "input_ids") -> tuple[Tensor, Tensor]:
    """The words of tokenised texts (rows ``bos w1..wn eos pad...``): ``(B, W)`` ids after bos,
    and ``n`` (B,) per row, counted up to the first eos or pad."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 1 or input_ids.is_floating_point():
        raise ConfigError(f"{what} must be integer token ids (B, L), got {input_ids.dtype} "
                          f"{tuple(input_ids.shape)}")
    if not bool((input_ids[:, 0] == bos_id).all()):
        raise ConfigError(f"{what}: every row must start with bos (id {bos_id}), as the "
                          f"tokenizer writes them; got first ids {input_ids[:, 0].tolist()}")
    words = input_ids[:, 1:]
    if words.shape[1] == 0:
        words = input_ids.new_full((input_ids.shape[0], 1), pad_id)
    ends = (words == eos_id) | (words == pad_id)
    lengths = torch.where(ends.any(1), ends.int().argmax(1), words.shape[1])
    return words, lengths


def prefix_lm_inputs(prefix_words: Tensor, prefix_lengths: Tensor, target_words: Tensor,
                     target_lengths: Tensor, *, bos_id: int, eos_id: int,
                     pad_id: int) -> PrefixLMInputs:
    """Rows of ``prefix_lengths`` prefix words and ``target_lengths`` target words (each left-
    aligned in its tensor) as encoder prefix ``bos + words`` and decoder input/labels."""
    B, device = prefix_words.shape[0], prefix_words.device
    P = int(prefix_lengths.max()) + 1 if B else 1
    cols = torch.arange(P, device=device)
    prefix_valid = cols[None] <= prefix_lengths[:, None]
    source = (cols - 1).clamp(0, prefix_words.shape[1] - 1).expand(B, -1)
    prefix_ids = torch.where(cols[None] == 0, bos_id, prefix_words.gather(1, source))
    prefix_ids = prefix_ids.masked_fill(~prefix_valid, pad_id)
    T = int(target_lengths.max()) + 1 if B else 1  # + eos
    cols = torch.arange(T, device=device)
    source = cols.clamp(max=target_words.shape[1] - 1).expand(B, -1)
    targets = torch.where(cols[None] == target_lengths[:, None], eos_id,
                          target_words.gather(1, source))
    target_valid = cols[None] <= target_lengths[:, None]
    decoder_ids = torch.cat([torch.full_like(targets[:, :1], bos_id),
                             targets.masked_fill(~target_valid, pad_id)[:, :-1]], dim=1)
    return PrefixLMInputs(prefix_ids, prefix_valid, decoder_ids,
                          targets.masked_fill(~target_valid, IGNORE_INDEX))


def split_at(words: Tensor, lengths: Tensor, cut: Tensor, *, bos_id: int, eos_id: int,
             pad_id: int) -> PrefixLMInputs:
    """PrefixLM example of each text cut after ``cut`` (B,) of its ``lengths`` words."""
    shift = (cut[:, None] + torch.arange(words.shape[1], device=words.device)[None])
    suffix = words.gather(1, shift.clamp(max=words.shape[1] - 1))
    return prefix_lm_inputs(words, cut, suffix, lengths - cut, bos_id=bos_id, eos_id=eos_id,
                            pad_id=pad_id)


def most_common_answers(batch: dict[str, Tensor]) -> Tensor:
    """One answer row per question: of a multi-answer VQA batch (``answer_count`` rows per
    question, weighted by ``answer_weight``) the most common answer, the first among equals;
    SimVLM fine-tunes on it (the weighted every-answer loss is BLIP's)."""
    answer_ids, counts = batch["answer_ids"], batch.get("answer_count")
    if counts is None:
        return answer_ids
    weights = batch["answer_weight"].tolist()
    rows, start = [], 0
    for count in counts.tolist():
        shares = weights[start:start + count]
        rows.append(start + shares.index(max(shares)))
        start += count
    return answer_ids[rows]


class SimVLM(PretrainModel):
    # the trainer may add text-only rows to a batch as "text_ids" (TrainConfig.text_data);
    # batches of "question_ids" + "answer_ids" (data kind "qa") train VQA: answer after question
    batch_kinds = frozenset({IMAGE_TEXT, TEXT_ONLY, QA})

    def __init__(self, config: SimvlmConfig, image_embed: ConvPatchEmbed,
                 encoder: Transformer | None, decoder: Transformer) -> None:
        super().__init__()
        self.config = config
        width, text = config.vision.width, config.text
        self.image_embed = image_embed
        self.token_embed = nn.Embedding(text.vocab_size, width)
        self.prefix_pos = nn.Parameter(torch.empty(text.context_length, width))
        self.target_pos = nn.Parameter(torch.empty(text.context_length, width))
        self.encoder = encoder  # None: decoder-only
        eps = config.vision.norm_eps
        self.encoder_norm = nn.LayerNorm(width, eps=eps) if encoder is not None else nn.Identity()
        self.decoder = decoder
        self.decoder_norm = nn.LayerNorm(width, eps=eps)
        self.lm_head = nn.Linear(width, text.vocab_size, bias=False)
        self.init_weights()
        if config.tie_lm_head:
            self.lm_head.weight = self.token_embed.weight

    def init_weights(self) -> None:
        # open_clip's text-tower stds: tokens 0.02, positions 0.01; blocks by init_transformer_
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.prefix_pos, std=0.01)
        nn.init.normal_(self.target_pos, std=0.01)
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                init_transformer_(stack)
        nn.init.normal_(self.lm_head.weight, std=self.config.vision.width**-0.5)

    def tasks(self) -> frozenset[str]:
        return frozenset({CAPTION, VQA})

    def no_weight_decay(self) -> set[str]:
        return {"prefix_pos", "target_pos"} | {f"image_embed.{n}"
                                                for n in self.image_embed.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.grad_checkpointing = enable

    # -- inputs -----------------------------------------------------------------------------

    def _ids(self) -> dict[str, int]:
        text = self.config.text
        return {"bos_id": text.bos_id, "eos_id": text.eos_id, "pad_id": text.pad_id}

    def _positions(self, table: Tensor, start: int, length: int, what: str) -> Tensor:
        if start + length > self.config.text.context_length:
            raise ConfigError(f"{what} of {start + length} tokens exceeds text.context_length "
                              f"{self.config.text.context_length}")
        return table[start:start + length].to(self.token_embed.weight.dtype)

    def sample_cut(self, lengths: Tensor) -> Tensor:
        """Prefix words per row of ``n`` words: uniform over 0..n-1 ("random", PrefixLM: at
        least one word is left to predict, so eos never ends an empty suffix) or 0 ("none")."""
        if self.config.prefix == "none":
            return torch.zeros_like(lengths)
        draw = torch.rand(lengths.shape, device=lengths.device)
        return torch.minimum((draw * lengths).long(), (lengths - 1).clamp(min=0))

    def prefix_inputs(self, input_ids: Tensor, cut: Tensor | None = None) -> PrefixLMInputs:
        """Tokenised texts ``(B, L)`` cut into prefix and targets (``cut`` words each, default
        `sample_cut`)."""
        words, lengths = text_words(input_ids, **self._ids())
        cut = (self.sample_cut(lengths) if cut is None
               else torch.minimum(cut.clamp(min=0), lengths))
        return split_at(words, lengths, cut, **self._ids())

    def question_prefix(self, question_ids: Tensor, what: str = "question_ids"
                        ) -> tuple[Tensor, Tensor]:
        """Encoder prefix ``(bos + words, valid)`` of tokenised questions or prompts (a trailing
        eos and padding are dropped)."""
        words, lengths = text_words(question_ids, **self._ids(), what=what)
        inputs = prefix_lm_inputs(words, lengths, words, torch.zeros_like(lengths), **self._ids())
        return inputs.prefix_ids, inputs.prefix_valid

    # -- encoder and decoder ----------------------------------------------------------------

    def encode(self, pixels: Tensor | None, prefix_ids: Tensor,
               prefix_valid: Tensor | None = None) -> Prefix:
        """[image tokens; text prefix] -> what the decoder reads. ``pixels`` None: text only.
        ``prefix_valid`` defaults to every prefix token."""
        if prefix_valid is None:
            prefix_valid = torch.ones_like(prefix_ids, dtype=torch.bool)
        P = prefix_ids.shape[1]
        text = self.token_embed(prefix_ids) + self._positions(self.prefix_pos, 0, P, "prefix")
        states, valid = text, prefix_valid.bool()
        if pixels is not None:
            if pixels.shape[0] != prefix_ids.shape[0]:
                raise ConfigError(f"{pixels.shape[0]} images for {prefix_ids.shape[0]} text "
                                  "prefixes")
            image = self.image_embed(pixels).to(text.dtype)  # (B, N, width)
            states = torch.cat([image, text], dim=1)
            valid = torch.cat([valid.new_ones(image.shape[:2]), valid], dim=1)
        if self.encoder is not None:
            states = self.encoder_norm(self.encoder(states, mask=valid[:, None, None, :]))
        return Prefix(states, valid)

    def _embed_targets(self, decoder_ids: Tensor, start: int = 0) -> Tensor:
        positions = self._positions(self.target_pos, start, decoder_ids.shape[1], "decoded text")
        return self.token_embed(decoder_ids) + positions

    def decode(self, prefix: Prefix, decoder_ids: Tensor) -> Tensor:
        """Teacher forcing: ``(B, T, vocab)`` logits of each next target token."""
        x = self._embed_targets(decoder_ids)
        if self.encoder is not None:
            states = self.decoder(x, context=prefix.states,
                                  context_mask=prefix.valid[:, None, None, :])
        else:
            mask = prefix_target_mask(prefix.valid, x.shape[1])
            states = self.decoder(torch.cat([prefix.states, x], dim=1), mask=mask)
            states = states[:, prefix.states.shape[1]:]
        return self.lm_head(self.decoder_norm(states))

    def decode_cached(self, decoder_ids: Tensor, prefix: Prefix | None,
                      state: DecodeState | None) -> tuple[Tensor, DecodeState]:
        """New decoder tokens after ``state`` (first call: ``prefix`` and no state) -> logits
        of the token after the last one ``(B, vocab)`` and the grown state."""
        if state is None:
            if self.encoder is not None:
                x = self._embed_targets(decoder_ids)
                states, caches = self.decoder.forward_cached(
                    x, None, context=prefix.states, context_mask=prefix.valid[:, None, None, :])
                state = DecodeState(caches, prefix.valid, 0)
            else:
                x = self._embed_targets(decoder_ids)
                mask = prefix_target_mask(prefix.valid, x.shape[1])
                states, caches = self.decoder.forward_cached(
                    torch.cat([prefix.states, x], dim=1), None, mask=mask)
                key_valid = torch.cat([prefix.valid, prefix.valid.new_ones(x.shape[:2])], 1)
                state = DecodeState(caches, key_valid, prefix.states.shape[1])
        else:
            start = state.caches[0].self_kv.key.shape[2] - state.prefix_len
            x = self._embed_targets(decoder_ids, start)
            if self.encoder is not None:
                states, caches = self.decoder.forward_cached(
                    x, state.caches, context_mask=state.key_valid[:, None, None, :])
                state = DecodeState(caches, state.key_valid, 0)
            else:
                key_valid = torch.cat([state.key_valid, state.key_valid.new_ones(x.shape[:2])],
                                      dim=1)
                states, caches = self.decoder.forward_cached(
                    x, state.caches, mask=key_valid[:, None, None, :])
                state = DecodeState(caches, key_valid, state.prefix_len)
        return self.lm_head(self.decoder_norm(states[:, -1])), state

    def prefix_lm_logits(self, pixels: Tensor | None, inputs: PrefixLMInputs) -> Tensor:
        """``(B, T, vocab)`` next-token logits of the targets given image and text prefix."""
        return self.decode(self.encode(pixels, inputs.prefix_ids, inputs.prefix_valid),
                           inputs.decoder_ids)

    # -- training ---------------------------------------------------------------------------

    def _nll(self, pixels: Tensor | None, inputs: PrefixLMInputs) -> tuple[Tensor, Tensor]:
        logits = self.prefix_lm_logits(pixels, inputs)
        return caption_nll(logits, inputs.labels, self.config.label_smoothing)

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per row, the summed target NLL and its token count, so an accumulated batch still
        averages over all its target tokens; ``text_only`` marks the rows without an image.
        Rows: image-text (``pixels`` + ``input_ids``), or VQA (``pixels`` + ``question_ids``
        + ``answer_ids``: the question is the prefix, the answer the target), plus text-only
        rows (``text_ids``)."""
        parts: list[tuple[Tensor, Tensor, bool]] = []
        if "question_ids" in batch:
            prefix_ids, prefix_valid = self.question_prefix(batch["question_ids"])
            words, lengths = text_words(most_common_answers(batch), **self._ids(),
                                        what="answer_ids")
            inputs = prefix_lm_inputs(prefix_ids[:, 1:], prefix_valid.sum(1) - 1, words,
                                      lengths, **self._ids())
            parts.append((*self._nll(batch["pixels"], inputs), False))
        elif "input_ids" in batch:
            if "pixels" not in batch:
                raise ConfigError("an image-text batch needs 'pixels' with its 'input_ids' "
                                  "(text-only rows go in 'text_ids')")
            parts.append((*self._nll(batch["pixels"], self.prefix_inputs(batch["input_ids"])),
                          False))
        if "text_ids" in batch and batch["text_ids"].shape[0]:
            parts.append((*self._nll(None, self.prefix_inputs(batch["text_ids"])), True))
        if not parts:
            raise ConfigError(f"a SimVLM batch needs 'input_ids' (+ 'pixels'), 'question_ids' "
                              f"+ 'answer_ids' (+ 'pixels') or 'text_ids'; got {sorted(batch)}")
        return {"lm_nll": torch.cat([nll for nll, _, _ in parts]),
                "lm_tokens": torch.cat([tokens for _, tokens, _ in parts]),
                "text_only": torch.cat([torch.full_like(tokens, int(text_only), dtype=torch.bool)
                                        for _, tokens, text_only in parts])}

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict:
        """PrefixLM: mean NLL over every target token of the batch (image-text and text-only
        rows alike); each kind's own mean is logged beside it."""
        nll, tokens, text_only = (features["lm_nll"], features["lm_tokens"],
                                  features["text_only"])
        loss = nll.sum() / tokens.sum().clamp(min=1)
        losses = {"prefix_lm": loss.detach()}
        for name, rows in (("image_text", ~text_only), ("text", text_only)):
            if rows.any() and not rows.all():
                losses[name] = (nll[rows].sum() / tokens[rows].sum().clamp(min=1)).detach()
        return {"loss": loss, "losses": losses}

    # -- zero-shot and fine-tuned use -------------------------------------------------------

    def _generate(self, pixels: Tensor, prefix_ids: Tensor, prefix_valid: Tensor,
                  max_new_tokens: int | None, kwargs: dict) -> Tensor:
        text = self.config.text
        max_new_tokens = new_token_budget(max_new_tokens, text.context_length)
        was_training = self.training
        self.eval()
        try:
            decoder = PrefixDecoder(self, self.encode(pixels, prefix_ids, prefix_valid))
            start = torch.full((pixels.shape[0], 1), text.bos_id, dtype=torch.long,
                               device=pixels.device)
            return generate_tokens(decoder, start, eos_id=text.eos_id, pad_id=text.pad_id,
                                   max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.train(was_training)

    def _prompt(self, pixels: Tensor, prompt_ids: Tensor | None, what: str
                ) -> tuple[Tensor, Tensor]:
        if prompt_ids is None:
            prompt_ids = torch.full((1, 1), self.config.text.bos_id, dtype=torch.long)
        prompt_ids = prompt_ids.to(pixels.device)
        if prompt_ids.ndim == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids.expand(pixels.shape[0], -1)
        return self.question_prefix(prompt_ids, what)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompt_ids: Tensor | None = None,
                 max_new_tokens: int | None = None, **kwargs) -> Tensor:
        """Text continuing ``prompt_ids`` for each image, as token ids ``(B, T)`` ending with
        eos then pad_id. The prompt (B or 1, L), bos + tokens such as "a picture of" (a
        trailing eos and padding are dropped), joins the image in the encoder; the default is
        bos alone (no text prefix). ``kwargs`` go to `vlp.generate.generate`."""
        prefix_ids, prefix_valid = self._prompt(pixels, prompt_ids, "prompt_ids")
        return self._generate(pixels, prefix_ids, prefix_valid, max_new_tokens, kwargs)

    @torch.no_grad()
    def answer(self, pixels: Tensor, question_ids: Tensor, question_mask: Tensor | None = None,
               max_new_tokens: int = 10, **kwargs) -> Tensor:
        """Answers ``(B, T)`` generated after the question (bos + tokens + eos, padded) as the
        text prefix: zero-shot after pretraining, or after VQA fine-tuning. ``question_mask``
        is not needed (padding is found from the ids) and is accepted for the VQA API."""
        prefix_ids, prefix_valid = self._prompt(pixels, question_ids, "question_ids")
        return self._generate(pixels, prefix_ids, prefix_valid, max_new_tokens, kwargs)

    @torch.no_grad()
    def rank_answers(self, pixels: Tensor, question_ids: Tensor, candidate_ids: Tensor,
                     question_mask: Tensor | None = None,
                     candidate_mask: Tensor | None = None) -> Tensor:
        """``(B, C)`` log-likelihood of each candidate answer (bos + tokens + eos, padded)
        decoded after image and question."""
        prefix_ids, prefix_valid = self._prompt(pixels, question_ids, "question_ids")
        prefix = self.encode(pixels, prefix_ids, prefix_valid)
        words, lengths = text_words(candidate_ids.to(pixels.device), **self._ids(),
                                    what="candidate_ids")
        batch, count = pixels.shape[0], words.shape[0]
        targets = prefix_lm_inputs(words, torch.zeros_like(lengths), words, lengths,
                                   **self._ids())
        rows = torch.arange(batch, device=pixels.device).repeat_interleave(count)
        logits = self.decode(Prefix(prefix.states[rows], prefix.valid[rows]),
                             targets.decoder_ids.repeat(batch, 1))
        labels = targets.labels.repeat(batch, 1)
        log_probs = logits.float().log_softmax(-1)
        picked = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (picked * (labels != IGNORE_INDEX)).sum(1).view(batch, count)


class PrefixDecoder:
    """`vlp.generate.StepDecoder` over one encoded batch: sequence ``i`` reads prefix row
    ``rows[i]`` (the beams of one image share it)."""

    def __init__(self, model: SimVLM, prefix: Prefix) -> None:
        self.model = model
        self.prefix = prefix

    def prefill(self, input_ids: Tensor, rows: Tensor) -> tuple[Tensor, DecodeState]:
        prefix = Prefix(self.prefix.states[rows], self.prefix.valid[rows])
        return self.model.decode_cached(input_ids, prefix, None)

    def step(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        return self.model.decode_cached(input_ids, None, state)


@register("simvlm")
def build_simvlm(config: SimvlmConfig) -> SimVLM:
    """Random-init SimVLM from its config: conv stem + patches, encoder and decoder stacks."""
    vision, text = config.vision, config.text
    if config.prefix not in PREFIX_MODES:
        raise ConfigError(f"simvlm.prefix {config.prefix!r}; expected one of "
                          f"{list(PREFIX_MODES)}")
    if (text.width, text.heads) != (vision.width, vision.heads):
        raise ConfigError(f"simvlm: text.width/heads ({text.width}, {text.heads}) must equal "
                          f"vision.width/heads ({vision.width}, {vision.heads}): encoder and "
                          "decoder share one residual width")
    for name in ("pad_id", "bos_id", "eos_id"):
        if not 0 <= getattr(text, name) < text.vocab_size:
            raise ConfigError(f"simvlm: text.{name} {getattr(text, name)} is outside the "
                              f"vocabulary of {text.vocab_size}")
    if len({text.bos_id, text.eos_id}) != 2:
        raise ConfigError("simvlm: text.bos_id and text.eos_id must differ")
    image_embed = ConvPatchEmbed(vision.image_size, vision.patch_size, vision.width,
                                 blocks=config.conv_blocks, channels=config.conv_width,
                                 stem=config.stem, drop_path=vision.drop_path)
    shape = dict(mlp_ratio=vision.mlp_ratio, act=vision.act, norm_eps=vision.norm_eps,
                 dropout=vision.dropout)
    if config.decoder_only:
        encoder = None
        decoder = Transformer(vision.width, vision.layers + text.layers, vision.heads,
                              causal=False, drop_path=vision.drop_path, **shape)
    else:
        encoder = Transformer(vision.width, vision.layers, vision.heads, causal=False,
                              drop_path=vision.drop_path, **shape)
        decoder = Transformer(vision.width, text.layers, vision.heads, causal=True,
                              context_dim=vision.width, drop_path=text.drop_path, **shape)
    return SimVLM(config, image_embed, encoder, decoder)
