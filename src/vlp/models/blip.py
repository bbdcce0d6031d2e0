"""BLIP (Li et al. 2022, arXiv 2201.12086): a multimodal mixture of encoder-decoder.

The paper's idea, in this file: one ViT and one BERT-style text transformer that runs in three
modes (§3.1) — a unimodal encoder whose ``[CLS]`` state gives the ITC embedding, an
image-grounded encoder (cross-attention to the image, ``[ENC]`` first) whose first state feeds
the ITM head, and an image-grounded decoder (causal, ``[DEC]`` first) with an LM head. Encoder
and decoder share every parameter except self-attention (Table 3, "all_but_sa"); "all" and
"none" are the paper's ablations. VQA (§5.3, `vlp.models.blip_vqa`) encodes the question with
the image-grounded encoder and decodes the answer cross-attending to the question states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import BlipConfig
from vlp.contract import (
    CAPTION,
    EMBED,
    IMAGE_TEXT,
    ITM,
    QA,
    VQA,
    PretrainModel,
    partial_grad,
    tower_names,
)
from vlp.errors import ConfigError
from vlp.generate import generate as generate_tokens
from vlp.generate import new_token_budget
from vlp.losses import (
    IGNORE_INDEX,
    caption_nll,
    clip_loss,
    distilled_contrastive_loss,
    itm_nll,
    sample_hard_negatives,
)
from vlp.models.blip_decode import GroundedDecoder
from vlp.models.blip_vqa import BlipVQA, load_vqa_start
from vlp.models.registry import register
from vlp.nn import VisionTransformer
from vlp.nn.bert import (
    SHARES,
    BertTextTransformer,
    LMPredictionHead,
    PostNormBlock,
    share_text_towers_,
)
from vlp.nn.momentum import FeatureQueue, ema_update_, momentum_copy

OBJECTIVES = ("itc", "itm", "lm")
QUESTION_MASKS = ("always", "teacher_forcing", "never")
class BLIP(BlipVQA, PretrainModel):
    # each training forward updates the momentum encoders and the queue (as BLIP does)
    accumulates_features = False
    # batches of "question_ids" + "answer_ids" (data kind "qa") train the VQA answer decoder
    batch_kinds = frozenset({IMAGE_TEXT, QA})

    def __init__(self, config: BlipConfig, visual: VisionTransformer,
                 text_encoder: BertTextTransformer | None,
                 text_decoder: BertTextTransformer | None) -> None:
        super().__init__()
        self.config = config
        text_width, vision_width = config.text.width, config.vision.width
        self.visual = visual
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        self.lm_head = (LMPredictionHead(text_width, config.text.vocab_size, config.text.act,
                                         config.text.norm_eps)
                        if text_decoder is not None else None)
        if config.retrieval_heads:
            self.vision_proj = nn.Linear(vision_width, config.embed_dim)
            self.text_proj = nn.Linear(text_width, config.embed_dim)
            self.itm_head = nn.Linear(text_width, 2)
            self.temp = nn.Parameter(torch.tensor(float(config.init_temp)))
            for head in (self.vision_proj, self.text_proj, self.itm_head):
                nn.init.normal_(head.weight, std=0.02)  # BERT's init, as BLIP's heads get
                nn.init.zeros_(head.bias)
        else:
            self.vision_proj = self.text_proj = self.itm_head = None
            self.temp = None
        # ITC momentum distillation (§3.2): EMA copies of the unimodal encoders, feature queues
        self.momentum_encoders = self.queue = None
        if config.retrieval_heads and config.queue_size > 0:
            self.momentum_encoders = nn.ModuleDict({
                name: momentum_copy(getattr(self, name))
                for name in ("visual", "vision_proj", "text_encoder", "text_proj")})
            self.queue = FeatureQueue(config.queue_size, config.embed_dim)

    def no_weight_decay(self) -> set[str]:
        names = {"temp"} | {f"visual.{n}" for n in self.visual.no_weight_decay()}
        for tower in ("text_encoder", "text_decoder"):
            if getattr(self, tower) is not None:
                names |= {f"{tower}.{n}" for n in getattr(self, tower).no_weight_decay()}
        return names

    def tower_groups(self) -> dict[str, list[list[str]]]:
        """The ViT and the text encoder, each with its projection (momentum copies: by EMA)."""
        return {name: tower_names(self, tower, (head,)) for name, tower, head in (
            ("image", "visual", "vision_proj"), ("text", "text_encoder", "text_proj"))
            if getattr(self, tower) is not None}

    def shard_units(self) -> list[nn.Module]:
        """The ViT blocks, and with separate text towers (``share="none"``) every BERT layer;
        towers that share modules stay whole in the root unit, since a module two layers use
        cannot belong to two FSDP units."""
        units = super().shard_units()
        if self.config.share == "none":
            units += [m for m in self.modules() if isinstance(m, PostNormBlock)]
        return units

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        for tower in (self.text_encoder, self.text_decoder):
            if tower is not None:
                tower.grad_checkpointing = enable

    # -- parts ----------------------------------------------------------------------------------

    def tasks(self) -> frozenset[str]:
        tasks = set()
        if self.itm_head is not None and self.text_encoder is not None:
            tasks |= {EMBED, ITM}
        if self.text_decoder is not None:
            if not self.config.vqa_layout or self.config.vision.width == self.config.text.width:
                tasks.add(CAPTION)
            if self.text_encoder is not None:
                tasks.add(VQA)
        return frozenset(tasks)

    def _require(self, part: str, what: str) -> None:
        if getattr(self, part) is None:
            field = "retrieval_heads" if part == "itm_head" else part
            raise ConfigError(f"{what} needs the {part.replace('_', ' ')}, which this BLIP "
                              f"lacks (config.{field}=False)")

    def _first_token(self, input_ids: Tensor, token_id: int, always: bool = False) -> Tensor:
        """``input_ids`` with position 0 set to ``token_id`` ([ENC]/[DEC]) when the config says
        so (paper) or ``always`` (training); unchanged otherwise (HF's forwards)."""
        if not (always or self.config.replace_first_token):
            return input_ids
        input_ids = input_ids.clone()
        input_ids[:, 0] = token_id
        return input_ids

    def scale(self) -> Tensor:
        """ITC logit multiplier 1 / temp. The temperature is kept within [min_temp, max_temp]
        in place, without gradient, after each optimizer step (`after_optimizer_step`; BLIP
        clamps it so before each forward), never inside the loss."""
        self._require("itm_head", "the ITC temperature")
        return 1.0 / self.temp

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.temp is not None:
            self.temp.clamp_(self.config.min_temp, self.config.max_temp)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 1 + patches, vision width)`` after the ViT's final norm."""
        return self.visual.forward_features(pixels)

    def lm_logits(self, decoder_states: Tensor) -> Tensor:
        """Decoder states ``(B, T, width)`` -> next-token logits ``(B, T, vocab)``."""
        return self.lm_head(decoder_states, self.text_decoder.token_embed.weight)

    # -- ITC: unimodal encoders -----------------------------------------------------------------

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """``(B, 3, H, W) -> (B, embed_dim)`` from the class token, L2-normalised unless
        ``normalize=False``."""
        self._require("itm_head", "encode_image")
        embedding = self.vision_proj(self.image_tokens(pixels)[:, 0])
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        """``(B, L) -> (B, embed_dim)`` from the ``[CLS]`` state of the unimodal encoder;
        ``attention_mask`` defaults to ids other than pad_id."""
        self._require("text_encoder", "encode_text")
        self._require("itm_head", "encode_text")
        states = self.text_encoder(input_ids, attention_mask)
        embedding = self.text_proj(states[:, 0])
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def itc_similarity(self, pixels: Tensor, input_ids: Tensor,
                       attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarities ``(B_images, B_texts)``, without temperature (the ITC score of
        BLIP's retrieval, §3.4 of REFERENCE_NOTES)."""
        return self.encode_image(pixels) @ self.encode_text(input_ids, attention_mask).T

    # -- ITM: image-grounded encoder ------------------------------------------------------------

    def grounded_text_states(self, image_tokens: Tensor, input_ids: Tensor,
                             attention_mask: Tensor | None = None,
                             always_enc: bool = False) -> Tensor:
        """Image-grounded encoder states ``(B, L, width)``; the first token becomes ``[ENC]``."""
        self._require("text_encoder", "the image-grounded encoder")
        input_ids = self._first_token(input_ids, self.config.enc_id, always_enc)
        return self.text_encoder(input_ids, attention_mask, context=image_tokens)

    def itm_logits(self, pixels: Tensor, input_ids: Tensor,
                   attention_mask: Tensor | None = None) -> Tensor:
        """``(B, 2)`` match logits of image i with text i (index 1 = match)."""
        return self.itm_logits_from_tokens(self.image_tokens(pixels), input_ids, attention_mask)

    def itm_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """ITC embeddings from the class token, and the image tokens ITM cross-attends to."""
        self._require("itm_head", "itm_image")
        tokens = self.image_tokens(pixels)
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1), tokens

    def itm_match(self, features: Tensor, input_ids: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
        return self.itm_logits_from_tokens(features, input_ids, attention_mask)[:, 1]

    def itm_logits_from_tokens(self, image_tokens: Tensor, input_ids: Tensor,
                               attention_mask: Tensor | None = None) -> Tensor:
        """`itm_logits` from precomputed `image_tokens` (retrieval re-ranking reuses them)."""
        self._require("itm_head", "itm_logits")
        states = self.grounded_text_states(image_tokens, input_ids, attention_mask)
        return self.itm_head(states[:, 0])

    # -- LM: image-grounded decoder -------------------------------------------------------------

    def decoder_logits(self, context: Tensor, input_ids: Tensor,
                       attention_mask: Tensor | None = None,
                       context_mask: Tensor | None = None) -> Tensor:
        """``(B, L, vocab)`` next-token logits of the causal decoder over ``input_ids`` (first
        token -> ``[DEC]``), cross-attending to ``context`` (B, S, D)."""
        self._require("text_decoder", "the image-grounded decoder")
        states = self.text_decoder(self._first_token(input_ids, self.config.dec_id),
                                   attention_mask, context=context, context_mask=context_mask)
        return self.lm_logits(states)

    def caption_logits(self, pixels: Tensor, input_ids: Tensor,
                       attention_mask: Tensor | None = None) -> Tensor:
        """``(B, L, vocab)``: at each position, the logits of the next caption token."""
        self._reads_images("caption_logits")
        return self.decoder_logits(self.image_tokens(pixels), input_ids, attention_mask)

    def _generate(self, context: Tensor, context_mask: Tensor | None, prompt_ids: Tensor,
                  max_new_tokens: int | None, kwargs: dict) -> Tensor:
        text = self.config.text
        prompt_ids = prompt_ids.clone()
        prompt_ids[:, 0] = self.config.dec_id  # generation always starts with [DEC]
        max_new_tokens = new_token_budget(max_new_tokens, text.context_length,
                                          prompt_ids.shape[1])
        was_training = self.training
        self.eval()
        try:
            decoder = GroundedDecoder(self, context, context_mask)
            return generate_tokens(decoder, prompt_ids, eos_id=text.eos_id, pad_id=text.pad_id,
                                   max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompt_ids: Tensor | None = None,
                 max_new_tokens: int | None = None, **kwargs) -> Tensor:
        """Captions of ``pixels`` as token ids ``(B, T)``: the tokens after the prompt, each row
        ending with eos ([SEP]) then pad_id. ``prompt_ids`` (B, L) is a tokenised prompt such as
        "a picture of " without its trailing eos; its first token is replaced by ``[DEC]``
        (default: ``[DEC]`` alone). ``kwargs`` go to `vlp.generate.generate`."""
        self._require("text_decoder", "generate")
        self._reads_images("generate")
        if prompt_ids is None:
            prompt_ids = torch.full((pixels.shape[0], 1), self.config.dec_id, dtype=torch.long,
                                    device=pixels.device)
        return self._generate(self.image_tokens(pixels), None, prompt_ids, max_new_tokens,
                              kwargs)

    # -- VQA: `vlp.models.blip_vqa.BlipVQA` -----------------------------------------------------

    def init_from(self, path) -> None:
        """Strict, except that a VQA-layout BLIP starts from a pretrained one as BLIP does
        (`vlp.models.blip_vqa.load_vqa_start`)."""
        if self.config.vqa_layout:
            load_vqa_start(self, path)
        else:
            super().init_from(path)

    # -- pretraining: ITC + ITM + LM (§3.2) ---------------------------------------------------

    _progress: tuple[int, int] | None = None  # (step, steps per epoch): `begin_step`
    _prompt_tokens: int | None = None  # this run's caption prompt: `mask_caption_prompt`

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        self._progress = (step, steps_per_epoch)

    def mask_caption_prompt(self, prompt_tokens: int) -> None:
        self._prompt_tokens = prompt_tokens

    def alpha(self) -> float:
        """Distillation weight ``alpha * min(1, step / warmup)``: ``step`` is the run's update
        count (the trainer's `begin_step`; outside it, the queue's enqueues), ``warmup`` is
        ``alpha_warmup_steps``, by default (None) the run's first epoch, 0 for no ramp."""
        step, epoch_steps = self._progress or (int(getattr(self.queue, "batches", 0)), 0)
        warmup = self.config.alpha_warmup_steps
        warmup = epoch_steps if warmup is None else warmup  # outside the trainer: no ramp
        return self.config.alpha * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    @torch.no_grad()
    def _momentum_features(self, pixels: Tensor, input_ids: Tensor,
                           attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        encoders = self.momentum_encoders
        if self.training:
            for name, twin in encoders.items():
                ema_update_(twin, getattr(self, name), self.config.momentum)
        image = encoders["vision_proj"](encoders["visual"].forward_features(pixels)[:, 0])
        text = encoders["text_proj"](encoders["text_encoder"](input_ids, attention_mask)[:, 0])
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def _itm_features(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor,
                      image: Tensor, text: Tensor, image_partner: Tensor,
                      text_partner: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """Per pair, the summed ITM CE of the pair (match), its text with a hard-negative image
        and its image with a hard-negative text (mismatches): ``(B,)``. Negatives follow the
        ITC similarity of ``image`` to the candidate texts' ``text_partner`` and of ``text`` to
        the candidate images' ``image_partner``; distributed, the candidates are every rank's
        pairs (image tokens gathered with their gradient, as BLIP's retrieval fine-tuning).
        With ``image_ids`` no candidate of a row's own image is drawn (weight 0)."""
        batch = input_ids.shape[0]
        pool = (image_tokens, input_ids, attention_mask, image_partner, text_partner)
        if image_ids is not None:
            pool += (image_ids,)
        offset = 0
        if self.exchange is not None:
            pool, offset = self.exchange.gather(*pool)
        if pool[1].shape[0] < 2:
            raise ConfigError("BLIP's ITM objective needs batches of at least 2 pairs")
        all_tokens, all_ids, all_mask, all_image, all_text = pool[:5]
        with torch.no_grad():
            scale = self.scale()
            image_per_text, text_per_image = sample_hard_negatives(
                scale * image @ all_text.T, scale * text @ all_image.T, offset=offset,
                image_ids=image_ids, candidate_ids=pool[5] if image_ids is not None else None)
        tokens = torch.cat([image_tokens, all_tokens[image_per_text], image_tokens])
        ids = torch.cat([input_ids, input_ids, all_ids[text_per_image]])
        mask = torch.cat([attention_mask, attention_mask, all_mask[text_per_image]])
        states = self.grounded_text_states(tokens, ids, mask, always_enc=True)
        logits = self.itm_head(states[:, 0])  # (3B, 2): matches, then the two negative sets
        return itm_nll(logits[:batch], logits[batch:]).view(3, batch).sum(dim=0)

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per pair: ITC embeddings (student and momentum), the summed ITM CE of its three
        rows, and the LM token NLL sum and count (so accumulated batches average exactly).
        A batch's ``image_id`` (B,) (rows of one image share it, `vlp.data`) keeps the other
        captions of a row's image out of its ITC negatives and ITM draws; without it every
        row is its own image."""
        if "question_ids" in batch:
            return self._vqa_features(batch)
        objectives = self.config.objectives
        for part, what, terms in (("itm_head", "ITC/ITM", ("itc", "itm")),
                                  ("text_decoder", "LM", ("lm",))):
            if any(term in objectives for term in terms):
                self._require(part, f"pretraining ({what})")
        pixels, input_ids = batch["pixels"], batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = input_ids != self.config.text.pad_id
        attention_mask = attention_mask.bool()
        image_tokens = self.image_tokens(pixels)
        out: dict[str, Tensor] = {}
        if "itc" in objectives or "itm" in objectives:  # ITM draws negatives by ITC similarity
            image = F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)
            text = F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)[:, 0]),
                               dim=-1)
            out.update(image=image, text=text)
            image_ids = batch.get("image_id")
            if image_ids is not None:
                out["image_id"] = image_ids.long()
            image_partner, text_partner = image.detach(), text.detach()
            if self.momentum_encoders is not None:
                out["image_m"], out["text_m"] = self._momentum_features(pixels, input_ids,
                                                                        attention_mask)
                # BLIP pretraining draws negatives from student x momentum similarities
                image_partner, text_partner = out["image_m"], out["text_m"]
            if "itm" in objectives:
                out["itm_nll"] = self._itm_features(image_tokens, input_ids, attention_mask,
                                                    image.detach(), text.detach(),
                                                    image_partner, text_partner,
                                                    out.get("image_id"))
        if "lm" in objectives:
            self._reads_images("the LM objective")
            decoder_ids = self._first_token(input_ids, self.config.dec_id, always=True)
            states = self.text_decoder(decoder_ids, attention_mask, context=image_tokens)
            labels = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:], IGNORE_INDEX)
            prompt = (self._prompt_tokens if self._prompt_tokens is not None
                      else self.config.lm_prompt_tokens)
            labels[:, :prompt] = IGNORE_INDEX  # a prompt's tokens carry no loss (BLIP)
            out["lm_nll"], out["lm_tokens"] = caption_nll(self.lm_logits(states[:, :-1]),
                                                          labels, self.config.label_smoothing)
        return out

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict:
        """``itc + itm + lm`` (equal weights, paper; the terms in ``config.objectives``); in
        training the momentum features of the batch then join the queue. VQA features give
        the answer LM loss alone."""
        if "vqa_nll" in features:
            return self.vqa_loss(features)
        objectives = self.config.objectives
        losses: dict[str, Tensor] = {}
        if "itc" in objectives:
            scale = partial_grad(self.scale(), share)
            image, text, ids = features["image"], features["text"], features.get("image_id")
            if self.queue is None:
                itc = clip_loss(image, text, scale, exchange=self.exchange, image_ids=ids).loss
            else:
                image_m, text_m = features["image_m"], features["text_m"]
                bank_ids = None if ids is None else torch.cat([ids, self.queue.get_ids()])
                itc = distilled_contrastive_loss(
                    image, text, torch.cat([image_m, self.queue.get("image")]),
                    torch.cat([text_m, self.queue.get("text")]), scale, self.alpha(),
                    image_ids=ids, bank_ids=bank_ids).loss
                if self.training:
                    if self.exchange is not None:  # every rank's momentum features join
                        gathered, _ = self.exchange.gather(
                            image_m, text_m, *(() if ids is None else (ids,)))
                        image_m, text_m = gathered[:2]
                        ids = gathered[2] if ids is not None else None
                    self.queue.enqueue(image=image_m, text=text_m, ids=ids)
            losses["itc"] = itc
        if "itm" in objectives:
            losses["itm"] = features["itm_nll"].sum() / (3 * features["itm_nll"].shape[0])
        if "lm" in objectives:
            losses["lm"] = features["lm_nll"].sum() / features["lm_tokens"].sum().clamp(min=1)
        result = {"loss": sum(losses.values()),
                  "losses": {name: value.detach() for name, value in losses.items()}}
        if self.temp is not None:
            result["temp"] = (1.0 / self.scale()).detach()
        return result


@register("blip")
def build_blip(config: BlipConfig) -> BLIP:
    """Random-init BLIP from its config: the ViT, the text towers (shared per ``share``)."""
    text = config.text
    if config.share not in SHARES:
        raise ConfigError(f"blip.share {config.share!r}; expected one of {list(SHARES)}")
    if config.mask_question_padding not in QUESTION_MASKS:
        raise ConfigError(f"blip.mask_question_padding {config.mask_question_padding!r}; "
                          f"expected one of {list(QUESTION_MASKS)}")
    if not (config.text_encoder or config.text_decoder):
        raise ConfigError("blip: set text_encoder and/or text_decoder; a BLIP needs a text tower")
    objectives = tuple(config.objectives)
    if not objectives or len(set(objectives)) != len(objectives) \
            or not set(objectives) <= set(OBJECTIVES):
        raise ConfigError(f"blip.objectives {list(objectives)}: expected distinct names among "
                          f"{list(OBJECTIVES)}, at least one")
    if config.vqa_layout and (config.share != "none" or not config.text_encoder):
        raise ConfigError(f"blip.vqa_layout needs share='none' and text_encoder=True (separate "
                          f"question encoder and answer decoder), got share={config.share!r}")
    if config.retrieval_heads and not config.text_encoder:
        raise ConfigError("blip.retrieval_heads needs text_encoder=True")
    for name in ("dec_id", "enc_id"):
        if not 0 <= getattr(config, name) < text.vocab_size:
            raise ConfigError(f"blip.{name} {getattr(config, name)} is outside the text "
                              f"vocabulary of {text.vocab_size}")
    if config.alpha_warmup_steps is not None and config.alpha_warmup_steps < 0:
        raise ConfigError(f"blip.alpha_warmup_steps {config.alpha_warmup_steps}: expected None "
                          "(the run's first epoch), 0 (no ramp) or a number of steps")
    if not 0 < config.min_temp <= config.init_temp <= config.max_temp:
        raise ConfigError(f"blip temperatures need 0 < min_temp <= init_temp <= max_temp, got "
                          f"{config.min_temp}, {config.init_temp}, {config.max_temp}")
    visual = VisionTransformer(config.vision, output_dim=None)
    context_dim = config.vision.width
    encoder = (BertTextTransformer(text, context_dim, causal=False)
               if config.text_encoder else None)
    # the VQA layout's answer decoder cross-attends to question states (text width)
    decoder = (BertTextTransformer(text, text.width if config.vqa_layout else context_dim,
                                   causal=True)
               if config.text_decoder else None)
    if encoder is not None and decoder is not None:
        share_text_towers_(decoder, encoder, config.share)
    return BLIP(config, visual, encoder, decoder)
