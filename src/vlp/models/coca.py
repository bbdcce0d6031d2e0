"""CoCa (Yu et al. 2022, arXiv 2205.01917): an image encoder and a text decoder trained together
with a contrastive loss on unimodal embeddings and a captioning loss on multimodal states.

The paper's idea, in this file: attentional poolers turn ViT tokens into one contrastive image
embedding and n caption tokens; the text decoder is split in two, a unimodal half (causal, with
a CLS appended after the text whose state is the text embedding) and a multimodal half that
cross-attends to the caption tokens and predicts the next word.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import CocaConfig
from vlp.contract import CAPTION, EMBED, partial_grad
from vlp.errors import ConfigError
from vlp.generate import Shared, group_size, new_token_budget
from vlp.generate import generate as generate_tokens
from vlp.losses import IGNORE_INDEX, caption_nll, clip_loss
from vlp.models.clip import LogitScaled
from vlp.models.registry import register
from vlp.nn import AttentionalPooler, BlockCache, VisionTransformer, causal_mask
from vlp.nn.decoder import CrossDecoder
from vlp.nn.text import ClsTextTransformer, appended_cls_mask

POOLERS = ("separate", "shared")
TEXT_MASKS = ("cls", "pad_id", "pad_id_legacy")


class CocaImageOutput(NamedTuple):
    embedding: Tensor  # (B, embed_dim) contrastive image embedding, not normalised
    tokens: Tensor  # (B, n_caption_tokens, embed_dim) what the multimodal decoder attends to


class CaptionState(NamedTuple):
    """Incremental decoding state: caches of both decoder halves, batch-first."""

    text: list[BlockCache]  # unimodal self-attention caches
    decoder: list[BlockCache]  # multimodal self- and cross-attention caches
    key_valid: Tensor | None  # (B, T) open_clip text masks only: which text keys may be seen
    last_ids: Tensor  # (B, 1) the latest token of each sequence
    shared: Shared | None = None  # decoder cross caches per image, shared by its beams


def pad_id_keys(input_ids: Tensor, pad_id: int, legacy: bool, with_cls: bool) -> Tensor:
    """open_clip's key validity for a CoCa text: keys equal to ``pad_id`` are hidden from every
    row; its legacy mode puts the CLS's validity first, shifting the rest right by one.
    ``(B, L+1)`` with the appended CLS, ``(B, L)`` for the text alone."""
    valid = input_ids != pad_id
    ones = valid.new_ones(valid.shape[0], 1)
    keys = torch.cat([ones, valid] if legacy else [valid, ones], dim=1)
    return keys if with_cls else keys[:, : input_ids.shape[1]]


class CoCa(LogitScaled):
    def __init__(self, config: CocaConfig, visual: VisionTransformer, pooler: AttentionalPooler,
                 contrastive_pooler: AttentionalPooler | None, text: ClsTextTransformer,
                 decoder: CrossDecoder) -> None:
        super().__init__()
        self.config = config
        embed_dim, width = config.embed_dim, config.text.width
        self.visual = visual
        self.pooler = pooler  # caption tokens ("shared": query 0 is the contrastive one)
        self.contrastive_pooler = contrastive_pooler  # "separate": the single contrastive query
        self.pool_norm = nn.LayerNorm(embed_dim, eps=config.vision.norm_eps)
        self.image_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.text = text
        self.decoder = decoder
        self.lm_head = nn.Linear(width, config.text.vocab_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.init_weights()
        if config.tie_lm_head:
            self.lm_head.weight = self.text.token_embed.weight

    def init_weights(self) -> None:
        # heads: std fan_in^-0.5 (open_clip's projections). open_clip leaves its LM head
        # (text_decoder.text_projection) uninitialised; here every parameter is set.
        nn.init.normal_(self.image_proj.weight, std=self.config.embed_dim**-0.5)
        nn.init.normal_(self.lm_head.weight, std=self.config.text.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def tower_heads(self) -> tuple[str, ...]:
        """The attentional poolers and the contrastive projection finish the image tower."""
        heads = ("pooler", "pool_norm", "image_proj")
        return heads + (("contrastive_pooler",) if self.contrastive_pooler is not None else ())

    # -- image side ------------------------------------------------------------------------------

    def forward_image(self, pixels: Tensor) -> CocaImageOutput:
        """ViT tokens -> attentional poolers (paper §3.2) -> contrastive embedding + caption
        tokens."""
        tokens = self.visual.forward_features(pixels)  # (B, 1 + patches, vision width)
        if self.contrastive_pooler is None:
            pooled = self.pool_norm(self.pooler(tokens))  # (B, n_queries, embed_dim)
            contrastive, caption = pooled[:, 0], pooled[:, 1:]
        else:
            contrastive = self.pool_norm(self.contrastive_pooler(tokens))[:, 0]
            caption = self.pool_norm(self.pooler(tokens))
        return CocaImageOutput(self.image_proj(contrastive), caption)

    def tasks(self) -> frozenset[str]:
        return frozenset({EMBED, CAPTION})

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """``(B, 3, H, W) -> (B, embed_dim)``, L2-normalised unless ``normalize=False``."""
        embedding = self.forward_image(pixels).embedding
        return F.normalize(embedding, dim=-1) if normalize else embedding

    # -- text side -------------------------------------------------------------------------------

    def real_tokens(self, input_ids: Tensor) -> Tensor:
        """``(B, L)`` True where a token is text, not padding: up to the first eos, or (open_clip
        masks) every id but pad_id. Padding is hidden from the CLS and from the caption loss."""
        if self.config.text_mask == "cls":
            return self.text.real_tokens(input_ids)
        return input_ids != self.config.text.pad_id

    def text_mask(self, input_ids: Tensor) -> Tensor:
        """Attention mask ``(B, 1, L+1, L+1)`` of the unimodal decoder over text + CLS."""
        if self.config.text_mask == "cls":
            return appended_cls_mask(self.real_tokens(input_ids))
        keys = pad_id_keys(input_ids, self.config.text.pad_id,
                           self.config.text_mask == "pad_id_legacy", with_cls=True)
        L = input_ids.shape[1] + 1
        return (causal_mask(L, L, input_ids.device)[None] & keys[:, None, :])[:, None]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        """``(B, L) -> (B, embed_dim)`` from the appended CLS, L2-normalised unless
        ``normalize=False``. The mask comes from the ids (``config.text_mask``: pad ids or the
        first eos, as open_clip's CoCa), so `attention_mask` is not read."""
        embedding = self.text(input_ids, self.text_mask(input_ids))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    # -- captioning ------------------------------------------------------------------------------

    def caption_logits(self, pixels: Tensor, input_ids: Tensor) -> Tensor:
        """``(B, L, vocab)``: at each position, the logits of the next token (teacher forcing)."""
        image = self.forward_image(pixels)
        text_states, _ = self.text.forward_features(input_ids, self.text_mask(input_ids))
        return self.lm_head(self.decoder(text_states, image.tokens))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Contrastive embeddings and, per caption, the summed token NLL and the token count,
        so the caption CE of an accumulated batch is still the mean over all its tokens."""
        input_ids = batch["input_ids"]
        image = self.forward_image(batch["pixels"])
        text_states, cls_state = self.text.forward_features(input_ids, self.text_mask(input_ids))
        logits = self.lm_head(self.decoder(text_states[:, :-1], image.tokens))  # (B, L-1, V)
        labels = input_ids[:, 1:].masked_fill(~self.real_tokens(input_ids)[:, 1:], IGNORE_INDEX)
        nll, tokens = caption_nll(logits, labels, self.config.label_smoothing)
        return {"image": F.normalize(image.embedding, dim=-1),
                "text": F.normalize(self.text.forward_head(cls_state), dim=-1),
                "caption_nll": nll, "caption_tokens": tokens}

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict:
        """``contrastive_weight * clip_loss + caption_weight * caption CE``."""
        contrastive = clip_loss(features["image"], features["text"],
                                partial_grad(self.scale(), share), exchange=self.exchange).loss
        caption = features["caption_nll"].sum() / features["caption_tokens"].sum().clamp(min=1)
        loss = (self.config.contrastive_weight * contrastive
                + self.config.caption_weight * caption)
        return {"loss": loss,
                "losses": {"contrastive": contrastive.detach(), "caption": caption.detach()},
                "logit_scale": self.scale().detach()}

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompt_ids: Tensor | None = None,
                 max_new_tokens: int | None = None, **kwargs) -> Tensor:
        """Captions of ``pixels`` as token ids ``(B, T)``: the tokens after the prompt (default:
        bos), each row ending with eos, then pad_id. ``kwargs`` go to `vlp.generate.generate`
        (num_beams, do_sample, top_k, top_p, temperature, min_new_tokens, generator, ...).
        Prompt + caption must fit ``text.context_length``."""
        text = self.config.text
        if prompt_ids is None:
            prompt_ids = torch.full((pixels.shape[0], 1), text.bos_id, dtype=torch.long,
                                    device=pixels.device)
        max_new_tokens = new_token_budget(max_new_tokens, text.context_length,
                                          prompt_ids.shape[1])
        was_training = self.training
        self.eval()
        try:
            decoder = CaptionDecoder(self, self.forward_image(pixels).tokens)
            return generate_tokens(decoder, prompt_ids, eos_id=text.eos_id, pad_id=text.pad_id,
                                   max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.train(was_training)


class CaptionDecoder:
    """`vlp.generate.StepDecoder` for captions of one batch of images: both decoder halves run
    incrementally; the CLS is not needed to predict words and is left out."""

    def __init__(self, model: CoCa, image_tokens: Tensor) -> None:
        self.model = model
        self.image_tokens = image_tokens  # (B_images, n, embed_dim)
        config = model.config
        self.pad_id = config.text.pad_id
        self.mask_keys = config.text_mask != "cls"  # open_clip masks: padding hidden from all
        self.legacy = config.text_mask == "pad_id_legacy"

    def _logits(self, text_states: Tensor, decoder_caches: list[BlockCache] | None,
                rows: Tensor | None, shared: Shared | None
                ) -> tuple[Tensor, list[BlockCache], Shared | None]:
        """The image is projected once per image when the sequences come in equal consecutive
        groups per image (greedy, beams): its cross caches then live in ``shared``."""
        context = None
        if rows is not None:
            grouped = group_size(rows, self.image_tokens.shape[0]) is not None
            context = self.image_tokens if grouped else self.image_tokens[rows]
        elif shared is not None:
            decoder_caches = [BlockCache(cache.self_kv, cross)
                              for cache, cross in zip(decoder_caches, shared.value, strict=True)]
        states, decoder_caches = self.model.decoder.forward_cached(text_states, decoder_caches,
                                                                   context=context)
        if rows is not None and grouped:
            shared = Shared([cache.cross_kv for cache in decoder_caches])
        if shared is not None:
            decoder_caches = [BlockCache(cache.self_kv) for cache in decoder_caches]
        return self.model.lm_head(states[:, -1]), decoder_caches, shared

    def prefill(self, input_ids: Tensor, rows: Tensor) -> tuple[Tensor, CaptionState]:
        key_valid = mask = None
        if self.mask_keys:
            key_valid = pad_id_keys(input_ids, self.pad_id, self.legacy, with_cls=False)
            L = input_ids.shape[1]
            mask = (causal_mask(L, L, input_ids.device)[None] & key_valid[:, None, :])[:, None]
        text_states, text_caches = self.model.text.forward_cached(input_ids, None, mask)
        logits, decoder_caches, shared = self._logits(text_states, None, rows, None)
        return logits, CaptionState(text_caches, decoder_caches, key_valid, input_ids[:, -1:],
                                    shared)

    def step(self, input_ids: Tensor, state: CaptionState) -> tuple[Tensor, CaptionState]:
        key_valid = mask = None
        if self.mask_keys:
            pair = torch.cat([state.last_ids, input_ids], dim=1)
            new_key = pad_id_keys(pair, self.pad_id, self.legacy, with_cls=False)[:, 1:]
            key_valid = torch.cat([state.key_valid, new_key], dim=1)  # (B, T + 1)
            mask = key_valid[:, None, None, :]
        text_states, text_caches = self.model.text.forward_cached(input_ids, state.text, mask)
        logits, decoder_caches, shared = self._logits(text_states, state.decoder, None,
                                                      state.shared)
        return logits, CaptionState(text_caches, decoder_caches, key_valid, input_ids, shared)


@register("coca")
def build_coca(config: CocaConfig) -> CoCa:
    """Random-init CoCa from its config (towers, poolers, decoder built here, composed above)."""
    if config.pooler not in POOLERS:
        raise ConfigError(f"coca.pooler {config.pooler!r}; expected one of {list(POOLERS)}")
    if config.text_mask not in TEXT_MASKS:
        raise ConfigError(f"coca.text_mask {config.text_mask!r}; expected one of "
                          f"{list(TEXT_MASKS)}")
    minimum = 2 if config.pooler == "shared" else 1
    if config.caption_queries < minimum:
        raise ConfigError(f"coca.caption_queries must be >= {minimum} with pooler "
                          f"{config.pooler!r}, got {config.caption_queries}")
    if not math.isfinite(config.init_logit_scale):
        raise ConfigError("coca.init_logit_scale must be finite")
    visual = VisionTransformer(config.vision, output_dim=None)
    # the poolers normalise the ViT tokens (their norm_k), so the tower's final norm would be a
    # second, redundant LayerNorm; open_clip has none there either (its ln_post follows the pool)
    visual.norm = nn.Identity()
    width, eps = config.vision.width, config.vision.norm_eps
    pooler = AttentionalPooler(config.embed_dim, width, config.caption_queries,
                               config.pooler_heads, norm_eps=eps)
    contrastive_pooler = (AttentionalPooler(config.embed_dim, width, 1, config.pooler_heads,
                                            norm_eps=eps)
                          if config.pooler == "separate" else None)
    text = ClsTextTransformer(config.text, config.embed_dim)
    t = config.text
    decoder = CrossDecoder(t.width, config.decoder_layers, config.decoder_heads,
                           context_dim=config.embed_dim, mlp_ratio=t.mlp_ratio, act=t.act,
                           norm_eps=t.norm_eps, dropout=t.dropout)
    return CoCa(config, visual, pooler, contrastive_pooler, text, decoder)
