"""HF transformers BLIP <-> vlp BLIP: ``BlipForImageTextRetrieval``,
``BlipForConditionalGeneration`` and ``BlipForQuestionAnswering`` directories (config.json +
safetensors), read and written without importing transformers.

Which vlp parts each HF class holds (the config switches the importer sets):

- Retrieval: ``text_encoder`` + ``retrieval_heads`` (vision_proj, text_proj, itm_head); HF has
  no ITC temperature, so vlp's ``temp`` keeps its init value and is not exported.
- Every import has ``queue_size=0``: no momentum encoders or queue (HF keeps none).
- ConditionalGeneration: ``text_decoder`` (+ the LM head) only.
- QuestionAnswering: ``text_encoder`` + ``text_decoder`` with ``share="none"`` and
  ``vqa_layout=True`` (fine-tuned BLIP unties them).

Reference behaviour and how vlp matches it:

- ``replace_first_token=False``: HF's forwards take the ids as given (no ``[ENC]``/``[DEC]``
  substitution, transformers #25629); generation still starts from ``[DEC]`` (HF bos).
- ``mask_question_padding="never"``: HF's cross-attention never receives its
  ``encoder_attention_mask`` (``BlipTextAttention`` does not pass it on), so the answer decoder
  attends to question padding states too.
- Masks: HF adds ``(1 - m) * -10000``; vlp uses bool masks. In fp32 exp(-10000) is exactly 0
  and a row with no visible key attends everywhere in both, so no switch is needed.
- ``post_layernorm`` applied twice to the pooled CLS: only ``BlipVisionModel.pooler_output``
  sees it and none of the three classes reads it (they use ``last_hidden_state``), so no switch.
- Vision: no pre-norm, patch conv with bias, fused ``qkv`` as vlp's; eps from the config (HF
  1e-5, BLIP 1e-6). ``class_embedding`` (1, 1, D) and ``position_embedding`` (1, N+1, D) are
  vlp's ``class_token`` (D,) and ``pos_embed`` (N+1, D).
- Text: separate query/key/value (cross: key/value) are fused into vlp's ``qkv`` / ``kv``; the
  LM decoder weight is tied to the word embeddings (checkpoints that still store
  ``cls.predictions.decoder.weight``/``.bias`` must hold the tied values).
- ``[ENC]`` is not in HF's config: BLIP's vocabulary puts it last (30523 of 30524).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlp.config import BlipConfig, TextConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf_common import (
    BLIP_VISION_PADDED,
    DECODER,
    activation_problems,
    bert_tower_pairs,
    blip_image_processor,
    blip_lm_head,
    blip_preprocessing,
    blip_vision_pairs,
    hf_architecture,
    hf_section,
    hf_text_section,
    hf_vision_section,
    read_hf_directory,
    read_hf_weights,
    text_fields,
    vision_fields,
    write_hf_directory,
)
from vlp.interop.keymap import Fused, KeyMap, Pairs, Tie, export_from, linear_pairs
from vlp.interop.skeleton import ImportedModel, attach_tokenizer, family_model, import_model
from vlp.models import build_model
from vlp.models.blip import BLIP
from vlp.tokenizers import Tokenizer

BERT_CLS_ID = 101  # TextConfig.bos_id when the directory carries no tokenizer
# architecture -> (text_encoder, text_decoder, retrieval_heads)
ARCHITECTURES: dict[str, tuple[bool, bool, bool]] = {
    "BlipForImageTextRetrieval": (True, False, True),
    "BlipForConditionalGeneration": (False, True, False),
    "BlipForQuestionAnswering": (True, True, False),
}
VLP_ONLY = ("temp",)  # vlp parameters HF has no place for: kept at init on import, not exported

# HF BLIP config defaults (transformers 4.57 BlipTextConfig / BlipVisionConfig)
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 512, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "bos_token_id": 30522, "pad_token_id": 0, "sep_token_id": 102, "label_smoothing": 0.0,
}
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 384, "patch_size": 16, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


# -- key map --------------------------------------------------------------------------------------

def hf_blip_key_map(config: BlipConfig) -> KeyMap:
    """vlp BLIP <-> HF BLIP task-model state-dict names for ``config`` (``temp`` excluded)."""
    pairs: Pairs = blip_vision_pairs("visual.", config.vision.layers)
    pairs += linear_pairs("visual.norm", "vision_model.post_layernorm")
    fused: Fused = []
    ties: tuple[Tie, ...] = ()
    ignored = {"vision_model.embeddings.position_ids"}
    layers = config.text.layers
    if config.text_encoder:
        tower_pairs, tower_fused = bert_tower_pairs("text_encoder.", "text_encoder.", layers)
        pairs, fused = pairs + tower_pairs, fused + tower_fused
        ignored.add("text_encoder.embeddings.position_ids")
    if config.text_decoder:
        tower_pairs, tower_fused = bert_tower_pairs("text_decoder.", DECODER, layers)
        head_pairs, ties = blip_lm_head()
        pairs, fused = pairs + tower_pairs + head_pairs, fused + tower_fused
        ignored.add(f"{DECODER}embeddings.position_ids")
    if config.retrieval_heads:
        for name in ("vision_proj", "text_proj", "itm_head"):
            pairs += linear_pairs(name, name)
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), ignored=frozenset(ignored),
                  padded=BLIP_VISION_PADDED,
                  tied=ties, write_tied=False,  # save_pretrained leaves the tied copies out
                  vlp_only=frozenset(VLP_ONLY if config.retrieval_heads else ()))


def export_hf_state(model: BLIP) -> dict[str, Tensor]:
    """HF state dict of ``model`` (tied LM decoder left out, as save_pretrained writes it)."""
    return export_from(hf_blip_key_map(model.config), model)


# -- configs --------------------------------------------------------------------------------------

def blip_config_from_hf(hf_config: dict[str, Any], where: str = "config.json",
                        preprocessor: dict[str, Any] | None = None,
                        tokenizer: Tokenizer | None = None) -> BlipConfig:
    """vlp `BlipConfig` for an HF BLIP task model's ``config.json``."""
    architecture = hf_architecture(hf_config, "blip", tuple(sorted(ARCHITECTURES)), where)
    has_encoder, has_decoder, has_heads = ARCHITECTURES[architecture]
    text = hf_section(hf_config, "text_config", HF_TEXT_DEFAULTS)
    vision = hf_section(hf_config, "vision_config", HF_VISION_DEFAULTS)
    vision_settings = vision_fields(vision, f"{where}: vision_config")
    vqa = architecture == "BlipForQuestionAnswering"
    if vqa and vision["hidden_size"] != text["hidden_size"]:
        raise CheckpointError(f"{where}: BlipForQuestionAnswering needs vision and text "
                              f"hidden_size equal, got {vision['hidden_size']} and "
                              f"{text['hidden_size']}")
    dec_id, vocab = int(text["bos_token_id"]), int(text["vocab_size"])
    enc_id = vocab - 1 if vocab - 1 != dec_id else vocab - 2
    return BlipConfig(
        embed_dim=int(hf_config.get("image_text_hidden_size", 256)),
        vision=VisionConfig(**vision_settings, pre_norm=False, patch_bias=True, pool="cls",
                            **blip_preprocessing(preprocessor)),
        text=TextConfig(
            **text_fields(text, f"{where}: text_config"), causal=False, pool="first",
            pad_id=int(text["pad_token_id"]), eos_id=int(text["sep_token_id"]),
            bos_id=tokenizer.bos_id if tokenizer is not None else BERT_CLS_ID,
            dropout=float(text["hidden_dropout_prob"]),
        ),
        dec_id=dec_id, enc_id=enc_id, share="none", queue_size=0, text_encoder=has_encoder,
        text_decoder=has_decoder, retrieval_heads=has_heads,
        label_smoothing=float(text["label_smoothing"]), replace_first_token=False,
        mask_question_padding="never", vqa_layout=vqa,
    )


def _architecture_of(config: BlipConfig) -> str:
    parts = (config.text_encoder, config.text_decoder, config.retrieval_heads)
    for name, needed in ARCHITECTURES.items():
        if parts == needed:
            return name
    raise ConfigError(
        f"no HF BLIP class holds text_encoder={parts[0]}, text_decoder={parts[1]}, "
        f"retrieval_heads={parts[2]}; expected one of {ARCHITECTURES} as (text_encoder, "
        "text_decoder, retrieval_heads)")


def hf_config_from_blip(config: BlipConfig) -> dict[str, Any]:
    """HF ``config.json`` for a vlp BLIP; ConfigError where HF cannot express the model."""
    architecture = _architecture_of(config)
    vision, text = config.vision, config.text
    problems = []
    if config.text_encoder and config.text_decoder and config.share != "none":
        problems.append(f"share={config.share!r} (HF's encoder and decoder are untied)")
    if vision.pre_norm or not vision.patch_bias or vision.pool != "cls":
        problems.append("a vision tower other than BLIP's (pre_norm=False, patch_bias=True, "
                        "pool='cls')")
    if architecture == "BlipForQuestionAnswering" and vision.width != text.width:
        problems.append(f"vision width {vision.width} != text width {text.width} (HF's answer "
                        f"decoder cross-attends with the vision width)")
    problems += activation_problems(vision, text)
    if problems:
        raise ConfigError(f"this vlp BLIP cannot be written as HF {architecture}: "
                          f"{'; '.join(problems)}")
    return {
        "architectures": [architecture],
        "model_type": "blip",
        "image_text_hidden_size": config.embed_dim,
        "label_smoothing": config.label_smoothing,
        "torch_dtype": "float32",
        "text_config": hf_text_section(
            text, "blip_text_model", encoder_hidden_size=vision.width,
            hidden_dropout_prob=text.dropout, attention_probs_dropout_prob=text.dropout,
            bos_token_id=config.dec_id, pad_token_id=text.pad_id, sep_token_id=text.eos_id,
            label_smoothing=config.label_smoothing, is_decoder=True),
        "vision_config": hf_vision_section(vision, "blip_vision_model"),
    }


# -- directories ----------------------------------------------------------------------------------

def load_hf_blip(path: str | os.PathLike[str], *, image_size: int | None = None
                 ) -> ImportedModel:
    """A vlp BLIP from an HF BLIP task-model directory, with its tokenizer (None if absent);
    ``image_size`` resamples the position grid as HF's ``interpolate_pos_encoding`` does."""
    hf = read_hf_directory(path)
    text = hf_section(hf.config, "text_config", HF_TEXT_DEFAULTS)
    tokenizer = attach_tokenizer(hf.path, int(text["max_position_embeddings"]),
                                 int(text["vocab_size"]))
    config = blip_config_from_hf(hf.config, hf.where, hf.preprocessor, tokenizer)
    state, source = read_hf_weights(hf.path)
    model = import_model(config, state, source, hf_blip_key_map(config),
                         image_size=image_size)
    return ImportedModel(model, tokenizer)


def blip_parts(model: BLIP, architecture: str) -> BLIP:
    """The parts of ``model`` one HF class holds (e.g. the captioner of a pretrained BLIP), as a
    new BLIP without momentum encoders; towers kept together are untied (HF shares nothing)."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"HF BLIP architecture {architecture!r}; expected one of "
                          f"{sorted(ARCHITECTURES)}")
    config = copy.deepcopy(model.config)
    config.text_encoder, config.text_decoder, config.retrieval_heads = ARCHITECTURES[architecture]
    missing = [part for part in ("text_encoder", "text_decoder", "retrieval_heads")
               if getattr(config, part) and not getattr(model.config, part)]
    if missing:
        raise ConfigError(f"{architecture} needs {missing}, which this BLIP lacks")
    config.queue_size = 0
    if config.text_encoder and config.text_decoder:
        config.share = "none"
    config.vqa_layout = architecture == "BlipForQuestionAnswering"
    part = build_model(config)
    source = model.state_dict()  # shared tensors appear under every name, so untying is a copy
    part.load_state_dict({name: source[name] for name in part.state_dict()})
    return part.eval()


def save_hf_blip(model: nn.Module, directory: str | os.PathLike[str],
                 tokenizer: Tokenizer | None = None, architecture: str | None = None) -> Path:
    """Write a directory the matching ``transformers`` BLIP class loads with from_pretrained:
    config.json, model.safetensors, preprocessor_config.json (+ tokenizer files). Atomic.
    ``architecture`` (an HF class name) writes only the parts that class holds.
    HF takes ids as given: a model with ``replace_first_token=True`` matches it on ids that
    already start with ``[ENC]`` (ITM, VQA question) or ``[DEC]`` (captions, answers)."""
    model = family_model(model, BLIP, "HF BLIP")
    if architecture is not None:
        model = blip_parts(model, architecture)
    hf_config = hf_config_from_blip(model.config)
    return write_hf_directory(directory, hf_config, export_hf_state(model),
                              blip_image_processor(model.config.vision), tokenizer)
