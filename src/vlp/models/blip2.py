"""BLIP-2 (Li et al. 2023, arXiv 2301.12597): a Q-Former between a frozen image encoder and a
frozen LLM.

The paper's idea, in this file: only the Q-Former (its learned queries read the frozen
encoder's second-to-last layer) and a projection train. Stage 1 (§3.2) trains the Q-Former
with three objectives whose difference is only the self-attention mask (`vlp.nn.qformer`):
ITC (max over query-text similarities), ITG (text generation grounded on the queries, which
never see the text) and ITM (hard negatives, the mean of the per-query logits). Stage 2
(§3.3, `blip2_llm`) prepends the projected query outputs to a frozen LLM as soft prompts.

Checkpoints hold the trained weights plus references: a frozen part loaded from a path
(``vision_path``, ``llm_path``) is left out of ``state_dict()`` and reloaded from the path
when the config is built; a frozen part built from the config alone is saved with the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import Blip2Config
from vlp.contract import CAPTION, EMBED, ITM, VQA, PretrainModel, partial_grad
from vlp.errors import CheckpointError, ConfigError
from vlp.losses import (
    IGNORE_INDEX,
    caption_nll,
    itm_nll,
    query_contrastive_loss,
    sample_hard_negatives,
)
from vlp.models import blip2_llm
from vlp.models.frozen import FrozenImageEncoder, build_image_encoder, build_llm
from vlp.models.registry import register
from vlp.nn.bert import LMPredictionHead
from vlp.nn.qformer import QFormer
from vlp.store.tensors import WRAPPER_PREFIXES, load_weights, read_safetensors


def _without_wrappers(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


class BLIP2(PretrainModel):
    # ITM negatives are drawn from each micro-batch's own similarities
    accumulates_features = False

    def __init__(self, config: Blip2Config, visual: FrozenImageEncoder, qformer: QFormer,
                 llm: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        width, dim = config.text.width, config.embed_dim
        self.visual = visual
        self.ln_vision = nn.LayerNorm(visual.width) if config.ln_vision else nn.Identity()
        self.qformer = qformer
        if config.retrieval_heads:
            self.vision_proj = nn.Linear(width, dim)
            self.text_proj = nn.Linear(width, dim)
            self.itm_head = nn.Linear(width, 2)
            self.temp = nn.Parameter(torch.tensor(float(config.init_temp)))
            for head in (self.vision_proj, self.text_proj, self.itm_head):
                nn.init.normal_(head.weight, std=0.02)  # BERT's init
                nn.init.zeros_(head.bias)
        else:
            self.vision_proj = self.text_proj = self.itm_head = self.temp = None
        self.lm_head = (LMPredictionHead(width, config.text.vocab_size, config.text.act,
                                         config.text.norm_eps) if config.lm_head else None)
        self.llm = llm
        if llm is not None:
            self.llm_proj = nn.Linear(width, llm.get_input_embeddings().weight.shape[1])
        else:
            self.llm_proj = None
        self.save_references = True  # False: state_dict() holds the frozen parts too (export)
        self.register_state_dict_post_hook(_drop_referenced_parts)
        self.register_load_state_dict_post_hook(_forgive_referenced_parts)

    # -- frozen parts --------------------------------------------------------------------------

    def referenced_parts(self) -> tuple[str, ...]:
        """Submodules saved as a path in the config rather than as weights."""
        parts = []
        if not self.save_references:
            return ()
        if self.config.vision_path is not None:
            parts.append("visual")
        if self.llm is not None and self.config.llm_path is not None:
            parts.append("llm")
        return tuple(parts)

    def frozen_parts(self) -> list[nn.Module]:
        return [part for part in (self.visual, self.llm) if part is not None]

    def train(self, mode: bool = True) -> BLIP2:
        """As nn.Module's, but the frozen encoder and LLM stay in eval mode (no dropout)."""
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    # -- starting a run ------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer) -> None:
        """Stage 2: batches hold the LLM's text, so its tokenizer must fit the LLM's embedding
        rows and end texts with the LLM's eos (which marks where each text stops)."""
        if self.llm is None:
            return
        rows = self.llm.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ConfigError(f"blip2 stage 2: the tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the LLM's embedding has {rows} rows; pass the LLM's "
                              "tokenizer (blip2.llm_tokenizer, or a tokenizer beside llm_path)")
        eos = self.llm.config.eos_token_id
        if isinstance(eos, int) and tokenizer.eos_id != eos:
            raise ConfigError(f"blip2 stage 2: the tokenizer's eos id {tokenizer.eos_id} is not "
                              f"the LLM's eos_token_id {eos}")

    def init_from(self, path) -> None:
        """Weights of a saved BLIP-2 (``model.safetensors``): the same stage loads strictly; a
        stage-1 file starts a stage-2 model's Q-Former and ``ln_vision`` (§3.3: stage 2 begins
        from the stage-1 Q-Former), its text parts and heads dropped, ``llm_proj`` left new."""
        tensors = read_safetensors(path)
        if self.llm is None or any(name.startswith("llm_proj.") for name in tensors):
            load_weights(self, path)
            return
        state = self.state_dict()
        fresh = ("llm_proj.", "llm.")  # new in stage 2 (an inline LLM is saved with it)
        missing = [k for k in state if k not in tensors and not k.startswith(fresh)]
        wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in state.items()
                 if k in tensors and tensors[k].shape != v.shape]
        if missing or wrong:
            raise CheckpointError(f"{path}: cannot start this stage-2 BLIP-2 from it; missing "
                                  f"{missing[:5]}, shapes differ {wrong[:5]}")
        self.load_state_dict({k: v for k, v in tensors.items() if k in state}, strict=False)

    def no_weight_decay(self) -> set[str]:
        names = {f"qformer.{n}" for n in self.qformer.no_weight_decay()}
        return names | ({"temp"} if self.temp is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ConfigError("blip2: gradient checkpointing is not implemented for the "
                              "Q-Former (the frozen parts keep no activations for backward)")

    def tasks(self) -> frozenset[str]:
        tasks = {EMBED, ITM} if self.itm_head is not None else set()
        return frozenset(tasks | ({CAPTION, VQA} if self.llm is not None else set()))

    def _require(self, part: str, what: str) -> None:
        if getattr(self, part) is None:
            fields = {"itm_head": "retrieval_heads", "lm_head": "lm_head", "llm": "llm"}
            raise ConfigError(f"{what} needs the {part.replace('_', ' ')}, which this BLIP-2 "
                              f"lacks (config.{fields.get(part, part)})")

    # -- the queries ---------------------------------------------------------------------------

    def image_features(self, pixels: Tensor) -> Tensor:
        """``(B, N, vision width)``: the frozen encoder's features through ``ln_vision``, fp32."""
        return self.ln_vision(self.visual(pixels).float())

    def query_states(self, pixels: Tensor) -> Tensor:
        """``(B, Q, width)``: the Q-Former's query outputs for ``pixels``."""
        return self.qformer.query_states(self.image_features(pixels))[0]

    # -- stage 1: retrieval ---------------------------------------------------------------------

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """``(B, Q, embed_dim)``: one ITC embedding per query (BLIP-2 keeps them all)."""
        self._require("itm_head", "encode_image")
        embedding = self.vision_proj(self.query_states(pixels))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        """``(B, embed_dim)`` from the first text state of the Q-Former's text-only pass."""
        self._require("itm_head", "encode_text")
        states = self.qformer(None, input_ids, attention_mask, kind="unimodal").text_states
        embedding = self.text_proj(states[:, 0])
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def itc_similarity(self, pixels: Tensor, input_ids: Tensor,
                       attention_mask: Tensor | None = None) -> Tensor:
        """``(B_images, B_texts)``: the highest query-text cosine, without temperature."""
        return self.similarity(self.encode_image(pixels),
                               self.encode_text(input_ids, attention_mask))

    def similarity(self, images: Tensor, texts: Tensor) -> Tensor:
        """``(N, Q, D)`` query embeddings and ``(M, D)`` text embeddings -> ``(N, M)``: each
        pair scores its best query (the paper's ITC)."""
        return torch.einsum("iqd,td->itq", images, texts).amax(dim=-1)

    def itm_logits_from_features(self, image: Tensor, input_ids: Tensor,
                                 attention_mask: Tensor | None = None) -> Tensor:
        """``(B, 2)``: the ITM head on every query output (all tokens see all), averaged."""
        self._require("itm_head", "itm_logits")
        queries = self.qformer(image, input_ids, attention_mask, kind="bidirectional")
        return self.itm_head(queries.query_states).mean(dim=1)

    def itm_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-query ITC embeddings, and the frozen encoder's features the Q-Former reads."""
        self._require("itm_head", "itm_image")
        features = self.image_features(pixels)
        queries = self.qformer.query_states(features)[0]
        return F.normalize(self.vision_proj(queries), dim=-1), features

    def itm_match(self, features: Tensor, input_ids: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
        return self.itm_logits_from_features(features, input_ids, attention_mask)[:, 1]

    def itm_logits(self, pixels: Tensor, input_ids: Tensor,
                   attention_mask: Tensor | None = None) -> Tensor:
        """``(B, 2)`` match logits of image i with text i (index 1 = match)."""
        return self.itm_logits_from_features(self.image_features(pixels), input_ids,
                                             attention_mask)

    # -- stage 1: image-grounded text generation -------------------------------------------------

    def itg_logits(self, pixels: Tensor, input_ids: Tensor,
                   attention_mask: Tensor | None = None) -> Tensor:
        """``(B, T, vocab)`` next-token logits of the text (first token -> ``[DEC]``) under the
        multimodal causal mask."""
        self._require("lm_head", "ITG")
        if attention_mask is None:
            attention_mask = input_ids != self.config.text.pad_id
        _, caches = self.qformer.query_states(self.image_features(pixels))
        return self._itg_logits(caches, input_ids, attention_mask)

    def _itg_logits(self, query_caches: list, input_ids: Tensor,
                    attention_mask: Tensor) -> Tensor:
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.config.dec_id
        states = self.qformer.text_after_queries(input_ids, attention_mask, query_caches)
        return self.lm_head(states, self.qformer.token_embed.weight)

    # -- stage 2: the LLM ---------------------------------------------------------------------

    def llm_prompts(self, pixels: Tensor) -> Tensor:
        """``(B, Q, LLM width)``: the projected query outputs, the LLM's soft visual prompts."""
        self._require("llm", "the stage-2 LLM")
        return self.llm_proj(self.query_states(pixels))

    def llm_logits(self, pixels: Tensor, input_ids: Tensor,
                   attention_mask: Tensor | None = None,
                   decoder_labels: Tensor | None = None) -> Tensor:
        """Decoder-only: ``(B, T, vocab)`` logits at the text positions. Encoder-decoder: the
        encoder reads [prompts; input_ids], the decoder ``decoder_labels``; ``(B, L, vocab)``."""
        prompts = self.llm_prompts(pixels)
        if self.config.llm == "causal":
            return blip2_llm.causal_text_logits(self.llm, prompts, input_ids, attention_mask)
        if decoder_labels is None:
            raise ConfigError("an encoder-decoder LLM needs decoder_labels")
        return blip2_llm.seq2seq_logits(self.llm, prompts, input_ids, attention_mask,
                                        decoder_labels)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompt_ids: Tensor | None = None,
                 prompt_mask: Tensor | None = None, max_new_tokens: int = 30,
                 **kwargs) -> Tensor:
        """Zero-shot instructed generation through the LLM's ``generate``: new token ids
        ``(B, T)`` after [visual prompts; ``prompt_ids``] (default: the LLM's bos for
        decoder-only LLMs, nothing for encoder-decoder ones). ``kwargs``: num_beams,
        length_penalty, min_new_tokens, ... (LAVIS captions: beams 5, max 30, min 8)."""
        self._require("llm", "generate")
        was_training = self.training
        self.eval()
        try:
            return blip2_llm.generate_from_prompts(self.llm, self.llm_prompts(pixels),
                                                   prompt_ids, prompt_mask,
                                                   max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def answer(self, pixels: Tensor, prompt_ids: Tensor, prompt_mask: Tensor | None = None,
               max_new_tokens: int = 10, num_beams: int = 5, length_penalty: float = -1.0,
               **kwargs) -> Tensor:
        """Zero-shot VQA: ``prompt_ids`` tokenise `VQA_PROMPT` filled with each question
        (left-padded for decoder-only LLMs); the paper's beams 5, length penalty -1."""
        return self.generate(pixels, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, length_penalty=length_penalty, **kwargs)

    # -- training -------------------------------------------------------------------------------

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 1: ITC embeddings, the summed ITM CE of each pair's three rows and the ITG token
        NLL sum and count; a batch's ``image_id`` keeps other captions of a row's image out of
        its ITC negatives and ITM draws (LAVIS with ``image_id``). Stage 2: the LLM's token NLL
        sum and count."""
        if self.llm is not None:
            return self._stage2_features(batch)
        for part, what in (("itm_head", "ITC/ITM"), ("lm_head", "ITG")):
            self._require(part, f"stage-1 pretraining ({what})")
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = input_ids != self.config.text.pad_id
        attention_mask = attention_mask.bool()
        image = self.image_features(batch["pixels"])
        query_states, query_caches = self.qformer.query_states(image)
        image_queries = F.normalize(self.vision_proj(query_states), dim=-1)  # (B, Q, D)
        text_states = self.qformer(None, input_ids, attention_mask, kind="unimodal").text_states
        text = F.normalize(self.text_proj(text_states[:, 0]), dim=-1)  # (B, D)
        out = {"image_queries": image_queries, "text": text}
        if batch.get("image_id") is not None:
            out["image_id"] = batch["image_id"].long()
        out["itm_nll"] = self._itm_features(image, input_ids, attention_mask, image_queries, text,
                                            out.get("image_id"))
        logits = self._itg_logits(query_caches, input_ids, attention_mask)
        labels = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:], IGNORE_INDEX)
        out["lm_nll"], out["lm_tokens"] = caption_nll(logits[:, :-1], labels,
                                                      self.config.label_smoothing)
        return out

    def _itm_features(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                      image_queries: Tensor, text: Tensor,
                      image_ids: Tensor | None = None) -> Tensor:
        """Per pair, the summed ITM CE of the pair, its text with a hard-negative image and its
        image with a hard-negative text ``(B,)``; negatives drawn by ITC similarity (§3.2),
        distributed among every rank's pairs (image features gathered with their gradient, as
        LAVIS)."""
        batch = input_ids.shape[0]
        pool = (image, input_ids, attention_mask, image_queries, text)
        if image_ids is not None:
            pool += (image_ids,)
        offset = 0
        if self.exchange is not None:
            pool, offset = self.exchange.gather(*pool)
        all_image, all_ids, all_masks, all_queries, all_text = pool[:5]
        if all_ids.shape[0] < 2:
            raise ConfigError("BLIP-2's ITM objective needs batches of at least 2 pairs")
        with torch.no_grad():
            i2t = self.similarity(image_queries, all_text) / self.temp  # (B, N)
            t2i = (self.similarity(all_queries, text) / self.temp).T if self.exchange \
                is not None else None  # one process: i2t.T
        image_per_text, text_per_image = sample_hard_negatives(
            i2t, t2i, offset=offset, image_ids=image_ids,
            candidate_ids=pool[5] if image_ids is not None else None)
        images = torch.cat([image, all_image[image_per_text], image])
        ids = torch.cat([input_ids, input_ids, all_ids[text_per_image]])
        masks = torch.cat([attention_mask, attention_mask, all_masks[text_per_image]])
        logits = self.itm_logits_from_features(images, ids, masks)  # (3B, 2)
        return itm_nll(logits[:batch], logits[batch:]).view(3, batch).sum(dim=0)

    def _stage2_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Decoder-only: ``input_ids`` (+ ``attention_mask``, ``prompt_lengths``: tokens kept
        out of the loss) in the LLM's vocabulary. Encoder-decoder: ``input_ids`` as the encoder
        text and ``target_ids`` as the decoder targets, or, without ``target_ids``, each text
        split at random into the two (prefix LM)."""
        input_ids = batch["input_ids"]
        llm_config = self.llm.config
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:  # vlp loader rows: bos, text, eos, padding
            attention_mask = blip2_llm.mask_through_eos(input_ids, llm_config.eos_token_id)
        prompts = self.llm_prompts(batch["pixels"])
        smoothing = self.config.llm_label_smoothing
        if self.config.llm == "causal":
            nll, tokens = blip2_llm.causal_lm_nll(self.llm, prompts, input_ids, attention_mask,
                                                  batch.get("prompt_lengths"), smoothing)
        else:
            if "target_ids" in batch:
                labels = batch["target_ids"].masked_fill(
                    ~batch.get("target_mask", batch["target_ids"] != llm_config.pad_token_id
                               ).bool(), IGNORE_INDEX)
            else:
                input_ids, attention_mask, labels = blip2_llm.prefix_lm_split(
                    input_ids, attention_mask, llm_config.eos_token_id, llm_config.pad_token_id)
            nll, tokens = blip2_llm.seq2seq_lm_nll(self.llm, prompts, input_ids, attention_mask,
                                                   labels, smoothing)
        return {"llm_nll": nll, "llm_tokens": tokens}

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict:
        """Stage 1: ``itc + itm + itg`` (equal weights, LAVIS); stage 2: the LLM's LM loss."""
        if "llm_nll" in features:
            lm = features["llm_nll"].sum() / features["llm_tokens"].sum().clamp(min=1)
            return {"loss": lm, "losses": {"lm": lm.detach()}}
        scale = partial_grad(1.0 / self.temp, share)
        itc = query_contrastive_loss(features["image_queries"], features["text"], scale,
                                     label_smoothing=self.config.itc_label_smoothing,
                                     exchange=self.exchange,
                                     image_ids=features.get("image_id")).loss
        itm = features["itm_nll"].sum() / (3 * features["itm_nll"].shape[0])
        itg = features["lm_nll"].sum() / features["lm_tokens"].sum().clamp(min=1)
        return {"loss": itc + itm + itg,
                "losses": {"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach()},
                "temp": self.temp.detach()}


def _drop_referenced_parts(module: BLIP2, state: dict, prefix: str, _metadata) -> None:
    for part in module.referenced_parts():
        for key in [k for k in state if k.startswith(f"{prefix}{part}.")]:
            del state[key]


def _forgive_referenced_parts(module: BLIP2, incompatible) -> None:
    parts = tuple(f"{part}." for part in module.referenced_parts())
    if parts:
        kept = [k for k in incompatible.missing_keys
                if not _without_wrappers(k).startswith(parts)]
        incompatible.missing_keys[:] = kept


@register("blip2")
def build_blip2(config: Blip2Config) -> BLIP2:
    """BLIP-2 from its config: the frozen encoder (and LLM) built or loaded from their
    references, a random-init Q-Former."""
    text = config.text
    if not config.text_parts and (config.retrieval_heads or config.lm_head):
        raise ConfigError("blip2: retrieval_heads and lm_head read text, so they need "
                          "text_parts=True")
    if config.text_parts and not 0 <= config.dec_id < text.vocab_size:
        raise ConfigError(f"blip2.dec_id {config.dec_id} is outside the Q-Former vocabulary of "
                          f"{text.vocab_size}")
    if config.init_temp <= 0:
        raise ConfigError(f"blip2.init_temp must be > 0, got {config.init_temp}")
    visual = build_image_encoder(config)
    qformer = QFormer(text, config.num_queries, visual.width, config.cross_attention_freq,
                      text=config.text_parts)
    return BLIP2(config, visual, qformer, build_llm(config))
