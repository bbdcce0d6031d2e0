"""HF transformers BLIP <-> vlp BLIP: ``BlipForImageTextRetrieval``,
``BlipForConditionalGeneration`` and ``BlipForQuestionAnswering`` directories (config.json +
safetensors), read and written without importing transformers.

Which vlp parts each HF class holds (the config switches the importer sets):

- Retrieval: ``text_encoder`` + ``retrieval_heads`` (vision_proj, text_proj, itm_head); HF has
  no ITC temperature, so vlp's ``temp`` keeps its init value and is not exported.
- Every import has ``queue_size=0``: no momentum encoders or queue (HF keeps none).
- ConditionalGeneration: ``text_decoder`` (+ the LM head) only.
- QuestionAnswering: ``text_encoder`` + ``text_decoder`` with ``share="none"`` (fine-tuned BLIP
  unties them).

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

import torch
from torch import Tensor, nn

from vlp.config import OPENAI_MEAN, OPENAI_STD, BlipConfig, TextConfig, VisionConfig
from vlp.contract import unwrap_model
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf import (
    ACT_TO_HF,
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    activation_from_hf,
    read_hf_weights,
)
from vlp.interop.keymap import (
    ImportedModel,
    KeyMap,
    attach_tokenizer,
    export_from,
    import_into,
    mlp_ratio,
    read_json,
    refuse_foreign_directory,
    save_tensors,
)
from vlp.models import build_model
from vlp.models.blip import BLIP
from vlp.store import atomic_directory, write_json
from vlp.tokenizers import Tokenizer

BERT_CLS_ID = 101  # TextConfig.bos_id when the directory carries no tokenizer
# architecture -> (text_encoder, text_decoder, retrieval_heads)
ARCHITECTURES: dict[str, tuple[bool, bool, bool]] = {
    "BlipForImageTextRetrieval": (True, False, True),
    "BlipForConditionalGeneration": (False, True, False),
    "BlipForQuestionAnswering": (True, True, False),
}
# vlp tensors HF stores as 3-d, with leading singleton dims
RESHAPED = {"visual.class_token": "vision_model.embeddings.class_embedding",
            "visual.pos_embed": "vision_model.embeddings.position_embedding"}
VLP_ONLY = ("temp",)  # vlp parameters HF has no place for: kept at init on import, not exported
LM_PREFIX = "text_decoder.cls.predictions."

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

def linear_pairs(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def _vision_pairs(layers: int) -> list[tuple[str, str]]:
    pairs = [*RESHAPED.items()]
    pairs += linear_pairs("visual.patch_embed", "vision_model.embeddings.patch_embedding")
    pairs += linear_pairs("visual.norm", "vision_model.post_layernorm")
    for i in range(layers):
        ours, theirs = f"visual.transformer.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                     ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            pairs += linear_pairs(ours + a, theirs + b)
    return pairs


def bert_tower_pairs(ours: str, theirs: str, layers: int
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...]]]]:
    """A BERT tower (BLIP's ``med.py`` layout, which HF keeps): ``{theirs}embeddings`` /
    ``{theirs}encoder.layer.i`` <-> vlp ``{ours}``; separate q/k/v fused into vlp's qkv/kv."""
    pairs = [(f"{ours}token_embed.weight", f"{theirs}embeddings.word_embeddings.weight"),
             (f"{ours}pos_embed", f"{theirs}embeddings.position_embeddings.weight")]
    pairs += linear_pairs(f"{ours}embed_norm", f"{theirs}embeddings.LayerNorm")
    fused = []
    for i in range(layers):
        o, t = f"{ours}blocks.{i}.", f"{theirs}encoder.layer.{i}."
        for a, b in (("attn.proj", "attention.output.dense"),
                     ("norm1", "attention.output.LayerNorm"),
                     ("cross_attn.q", "crossattention.self.query"),
                     ("cross_attn.proj", "crossattention.output.dense"),
                     ("norm_cross", "crossattention.output.LayerNorm"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
                     ("norm2", "output.LayerNorm")):
            pairs += linear_pairs(o + a, t + b)
        for p in ("weight", "bias"):
            fused.append((f"{o}attn.qkv.{p}",
                          tuple(f"{t}attention.self.{x}.{p}" for x in ("query", "key", "value"))))
            fused.append((f"{o}cross_attn.kv.{p}",
                          tuple(f"{t}crossattention.self.{x}.{p}" for x in ("key", "value"))))
    return pairs, fused


def hf_blip_key_map(config: BlipConfig) -> KeyMap:
    """vlp BLIP <-> HF BLIP task-model state-dict names for ``config`` (``temp`` excluded)."""
    pairs, fused = _vision_pairs(config.vision.layers), []
    ignored = {"vision_model.embeddings.position_ids"}
    layers = config.text.layers
    if config.text_encoder:
        tower_pairs, tower_fused = bert_tower_pairs("text_encoder.", "text_encoder.", layers)
        pairs, fused = pairs + tower_pairs, fused + tower_fused
        ignored.add("text_encoder.embeddings.position_ids")
    if config.text_decoder:
        tower_pairs, tower_fused = bert_tower_pairs("text_decoder.", "text_decoder.bert.", layers)
        pairs, fused = pairs + tower_pairs, fused + tower_fused
        pairs += linear_pairs("lm_head.dense", LM_PREFIX + "transform.dense")
        pairs += linear_pairs("lm_head.norm", LM_PREFIX + "transform.LayerNorm")
        pairs.append(("lm_head.bias", LM_PREFIX + "bias"))
        ignored.add("text_decoder.bert.embeddings.position_ids")
    if config.retrieval_heads:
        for name in ("vision_proj", "text_proj", "itm_head"):
            pairs += linear_pairs(name, name)
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), ignored=frozenset(ignored),
                  vlp_only=frozenset(VLP_ONLY if config.retrieval_heads else ()))


# -- configs --------------------------------------------------------------------------------------

def _architecture(hf_config: dict[str, Any], where: str) -> str:
    architectures = hf_config.get("architectures") or []
    known = [name for name in architectures if name in ARCHITECTURES]
    if hf_config.get("model_type") != "blip" or len(known) != 1:
        raise CheckpointError(
            f"{where}: unknown architecture (model_type {hf_config.get('model_type')!r}, "
            f"architectures {architectures}); expected model_type 'blip' with one of "
            f"{sorted(ARCHITECTURES)}")
    return known[0]


def blip_config_from_hf(hf_config: dict[str, Any], where: str = CONFIG_FILE,
                        preprocessor: dict[str, Any] | None = None,
                        tokenizer: Tokenizer | None = None) -> BlipConfig:
    """vlp `BlipConfig` for an HF BLIP task model's ``config.json``."""
    architecture = _architecture(hf_config, where)
    has_encoder, has_decoder, has_heads = ARCHITECTURES[architecture]
    text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vision = {**HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, list | tuple) or isinstance(patch_size, list | tuple):
        raise CheckpointError(f"{where}: non-square image_size/patch_size not supported")
    vqa = architecture == "BlipForQuestionAnswering"
    if vqa and vision["hidden_size"] != text["hidden_size"]:
        raise CheckpointError(f"{where}: BlipForQuestionAnswering needs vision and text "
                              f"hidden_size equal, got {vision['hidden_size']} and "
                              f"{text['hidden_size']}")
    preprocessor = preprocessor or {}
    dec_id, vocab = int(text["bos_token_id"]), int(text["vocab_size"])
    enc_id = vocab - 1 if vocab - 1 != dec_id else vocab - 2
    return BlipConfig(
        embed_dim=int(hf_config.get("image_text_hidden_size", 256)),
        vision=VisionConfig(
            image_size=image_size, patch_size=patch_size, width=vision["hidden_size"],
            layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
            mlp_ratio=mlp_ratio(vision["hidden_size"], vision["intermediate_size"],
                                 f"{where}: vision_config"),
            act=activation_from_hf(vision["hidden_act"], f"{where}: vision_config"),
            norm_eps=float(vision["layer_norm_eps"]), pre_norm=False, patch_bias=True,
            pool="cls",
            mean=tuple(float(x) for x in preprocessor.get("image_mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in preprocessor.get("image_std", OPENAI_STD)),
            resize_mode="squash", interpolation="bicubic",  # BlipImageProcessor: no crop
        ),
        text=TextConfig(
            vocab_size=vocab, context_length=int(text["max_position_embeddings"]),
            width=text["hidden_size"], layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            mlp_ratio=mlp_ratio(text["hidden_size"], text["intermediate_size"],
                                 f"{where}: text_config"),
            act=activation_from_hf(text["hidden_act"], f"{where}: text_config"),
            norm_eps=float(text["layer_norm_eps"]), causal=False, pool="first",
            pad_id=int(text["pad_token_id"]), eos_id=int(text["sep_token_id"]),
            bos_id=tokenizer.bos_id if tokenizer is not None else BERT_CLS_ID,
            dropout=float(text["hidden_dropout_prob"]),
        ),
        dec_id=dec_id, enc_id=enc_id, share="none", queue_size=0, text_encoder=has_encoder,
        text_decoder=has_decoder, retrieval_heads=has_heads,
        label_smoothing=float(text["label_smoothing"]), replace_first_token=False,
        mask_question_padding="never",
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
    for tower in (vision, text):
        if tower.act not in ACT_TO_HF:
            problems.append(f"act={tower.act!r}")
    if problems:
        raise ConfigError(f"this vlp BLIP cannot be written as HF {architecture}: "
                          f"{'; '.join(problems)}")
    return {
        "architectures": [architecture],
        "model_type": "blip",
        "image_text_hidden_size": config.embed_dim,
        "label_smoothing": config.label_smoothing,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": text.vocab_size,
            "hidden_size": text.width, "encoder_hidden_size": vision.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length, "hidden_act": ACT_TO_HF[text.act],
            "layer_norm_eps": text.norm_eps, "hidden_dropout_prob": text.dropout,
            "attention_probs_dropout_prob": text.dropout, "bos_token_id": config.dec_id,
            "pad_token_id": text.pad_id, "sep_token_id": text.eos_id,
            "label_smoothing": config.label_smoothing, "is_decoder": True,
        },
        "vision_config": {
            "model_type": "blip_vision_model", "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads,
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_act": ACT_TO_HF[vision.act], "layer_norm_eps": vision.norm_eps,
        },
    }


def hf_blip_preprocessor_config(vision: VisionConfig) -> dict[str, Any]:
    """``BlipImageProcessor`` config: resize both sides to image_size (bicubic), normalise."""
    return {
        "image_processor_type": "BlipImageProcessor", "do_resize": True,
        "size": {"height": vision.image_size, "width": vision.image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(vision.mean), "image_std": list(vision.std), "do_convert_rgb": True,
    }


# -- state dicts ----------------------------------------------------------------------------------

def _hf_shape(shape: torch.Size) -> tuple[int, ...]:
    return (1,) * (3 - len(shape)) + tuple(shape)


def _from_hf_state(state: dict[str, Tensor], model: BLIP, source: str) -> dict[str, Tensor]:
    """HF tensors in the form the key map expects: singleton dims dropped, tied LM aliases
    checked and dropped."""
    state = dict(state)
    vlp_state = model.state_dict()
    for ours, theirs in RESHAPED.items():
        if theirs in state:
            wanted = _hf_shape(vlp_state[ours].shape)
            if tuple(state[theirs].shape) != wanted:
                raise CheckpointError(f"{source}: key {theirs!r} has shape "
                                      f"{tuple(state[theirs].shape)}, expected {wanted}")
            state[theirs] = state[theirs].reshape(vlp_state[ours].shape)
    if model.config.text_decoder:
        tied = {LM_PREFIX + "decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
                LM_PREFIX + "decoder.bias": LM_PREFIX + "bias"}
        for alias, source_key in tied.items():
            if alias not in state:
                continue
            value = state.pop(alias)
            if source_key in state and not torch.equal(value, state[source_key]):
                raise CheckpointError(f"{source}: {alias!r} differs from {source_key!r}; "
                                      "vlp BLIP ties the LM decoder to the word embeddings")
    return state


def export_hf_state(model: BLIP) -> dict[str, Tensor]:
    """HF state dict of ``model`` (tied LM decoder left out, as save_pretrained writes it)."""
    state = export_from(hf_blip_key_map(model.config), model)
    for theirs in RESHAPED.values():
        state[theirs] = state[theirs].reshape(_hf_shape(state[theirs].shape)).contiguous()
    return state


# -- directories ----------------------------------------------------------------------------------

def load_hf_blip(path: str | os.PathLike[str], *, image_size: int | None = None
                 ) -> ImportedModel:
    """A vlp BLIP from an HF BLIP task-model directory, with its tokenizer (None if absent);
    ``image_size`` resamples the position grid as HF's ``interpolate_pos_encoding`` does."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: HF model directory not found")
    hf_config = read_json(directory / CONFIG_FILE)
    preprocessor_path = directory / PREPROCESSOR_FILE
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    tokenizer = attach_tokenizer(directory, int(text["max_position_embeddings"]),
                                 int(text["vocab_size"]))
    config = blip_config_from_hf(hf_config, str(directory / CONFIG_FILE), preprocessor,
                                 tokenizer)
    state, source = read_hf_weights(directory)
    model = build_model(config)
    import_into(hf_blip_key_map(config), _from_hf_state(state, model, source), model, source)
    if image_size is not None and image_size != config.vision.image_size:
        model.visual.set_image_size(image_size)
    return ImportedModel(model.eval(), tokenizer)


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

    model = unwrap_model(model)
    if not isinstance(model, BLIP):
        raise ConfigError(f"{type(model).__name__} cannot be exported as HF BLIP; expected a "
                          "vlp BLIP model")
    if architecture is not None:
        model = blip_parts(model, architecture)
    hf_config = hf_config_from_blip(model.config)
    tensors = export_hf_state(model)
    directory = Path(directory)
    refuse_foreign_directory(directory, CONFIG_FILE)
    with atomic_directory(directory) as staging:
        write_json(staging / CONFIG_FILE, hf_config)
        save_tensors(tensors, staging / WEIGHTS_FILE)
        write_json(staging / PREPROCESSOR_FILE, hf_blip_preprocessor_config(model.config.vision))
        if tokenizer is not None:
            tokenizer.save(staging)
    return directory
