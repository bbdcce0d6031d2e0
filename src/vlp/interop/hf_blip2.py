"""HF transformers BLIP-2 <-> vlp BLIP-2: ``Blip2ForConditionalGeneration`` (OPT, T5 or any
LLM HF builds from its ``text_config``) and ``Blip2ForImageTextRetrieval`` directories, read and
written without transformers' BLIP-2 classes (the LLM is built with its Auto classes).

Which vlp parts each HF class holds (the config switches the importer sets):

- ConditionalGeneration: the query side of the Q-Former (``text_parts=False``), the projection
  and the LLM, built from the inline ``llm_config`` (HF's ``text_config``) so the vlp
  checkpoint stores its weights; ``llm`` is "causal" or "seq2seq" by
  ``use_decoder_only_language_model``.
- Retrieval: the Q-Former with its text side and the ITC/ITM heads (``lm_head=False``: HF keeps
  no ITG head; ``temp`` is vlp's alone, HF's ITC is the raw cosine).

Reference layout and how vlp matches it:

- Layer-norm placement: HF's ``vision_model.post_layernorm`` is LAVIS's ``ln_vision`` (trainable,
  applied to the frozen features), so it maps to vlp's ``ln_vision`` and the vlp ViT keeps all
  HF layers (``vision_layer=-1``, no final norm); ``qformer.layernorm`` is the LayerNorm over
  [queries; text embeddings] (vlp ``qformer.embed_norm``).
- qkv bias without k bias: LAVIS's EVA ViT has only q and v biases; HF stores one fused
  ``qkv.bias`` holding zeros in the k third (a trainable slot in HF), which is exactly vlp's
  fused bias, so every value maps as it is.
- The Q-Former's separate query/key/value (cross: key/value from the image) are fused into
  vlp's ``qkv`` / ``kv``; ``*_query`` FFNs are vlp's ``mlp_query``/``norm2_query``.
- HF's forward needs ``num_query_tokens`` ``<image>`` ids before the text
  (``hf_image_token_index``); vlp prepends the visual prompts itself and takes only the text.
- Masks: HF adds ``(1 - m) * -10000``; vlp uses bool masks (exact in fp32, as for BLIP).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlp import factory
from vlp.config import Blip2Config, TextConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf_common import (
    BLIP_VISION_PADDED,
    CONFIG_FILE,
    activation_problems,
    bert_attention,
    bert_ffn,
    bert_tower_pairs,
    blip_image_processor,
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
from vlp.interop.skeleton import ImportedModel, family_model, import_model, read_json
from vlp.models.blip2 import BLIP2
from vlp.models.frozen import VitFeatures
from vlp.nn.qformer import load_bert_

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")
# HF config defaults (transformers 4.57 Blip2QFormerConfig / Blip2VisionConfig)
HF_QFORMER_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "position_embedding_type": "absolute", "cross_attention_frequency": 2,
    "use_qformer_text_input": False,
}
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
    "layer_norm_eps": 1e-6, "qkv_bias": True,
}
LLM_PREFIX = "language_model."


# -- key map --------------------------------------------------------------------------------------

def _qformer_pairs(config: Blip2Config) -> tuple[Pairs, Fused]:
    pairs = [("qformer.query_tokens", "query_tokens")]
    pairs += linear_pairs("qformer.embed_norm", "qformer.layernorm")
    if config.text_parts:
        pairs += [("qformer.token_embed.weight", "embeddings.word_embeddings.weight"),
                  ("qformer.pos_embed", "embeddings.position_embeddings.weight")]
    fused: Fused = []
    for i in range(config.text.layers):
        o, t = f"qformer.blocks.{i}.", f"qformer.encoder.layer.{i}."
        cross = i % config.cross_attention_freq == 0
        attention_pairs, attention_fused = bert_attention(o, t, "attention", cross)
        pairs += attention_pairs + bert_ffn(o, t, "_query")
        if config.text_parts:
            pairs += bert_ffn(o, t)
        fused += attention_fused
    return pairs, fused


def llm_aliases(llm: nn.Module) -> dict[str, str]:
    """Tied LLM parameter names -> the first name of the same tensor (HF saves only that)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in llm.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def hf_blip2_key_map(model: BLIP2) -> KeyMap:
    """vlp BLIP-2 <-> HF BLIP-2 state-dict names for every tensor of ``model``. HF's
    ``vision_model.post_layernorm`` is vlp's ``ln_vision`` (the ViT itself has no final norm)."""
    config = model.config
    pairs, fused = _qformer_pairs(config)
    pairs += blip_vision_pairs("visual.tower.", len(model.visual.tower.transformer.blocks))
    pairs += linear_pairs("ln_vision", "vision_model.post_layernorm")
    vlp_only = {"temp"} if config.retrieval_heads else set()
    if config.lm_head:
        vlp_only |= {name for name in model.state_dict() if name.startswith("lm_head.")}
    if config.retrieval_heads:
        for ours, theirs in (("vision_proj", "vision_projection"),
                             ("text_proj", "text_projection"), ("itm_head", "itm_head")):
            pairs += linear_pairs(ours, theirs)
    ties: list[Tie] = []
    if model.llm is not None:
        pairs += linear_pairs("llm_proj", "language_projection")
        aliases = llm_aliases(model.llm)
        pairs += [(f"llm.{name}", LLM_PREFIX + name) for name in model.llm.state_dict()
                  if name not in aliases]
        # save_pretrained leaves the tied copies out; vlp loads them with their owner
        vlp_only |= {f"llm.{alias}" for alias in aliases}
        ties += [Tie(LLM_PREFIX + alias, LLM_PREFIX + owner, "the LLM ties them to one tensor")
                 for alias, owner in aliases.items()]
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), vlp_only=frozenset(vlp_only),
                  padded=(*BLIP_VISION_PADDED, ("query_tokens", 3)), tied=tuple(ties),
                  write_tied=False, ignored=frozenset({"embeddings.position_ids"}))


@contextmanager
def full_state(model: BLIP2) -> Iterator[BLIP2]:
    """``model.state_dict()`` with the frozen parts it normally saves by reference."""
    saved = model.save_references
    model.save_references = False
    try:
        yield model
    finally:
        model.save_references = saved


def export_hf_state(model: BLIP2) -> dict[str, Tensor]:
    """HF state dict of ``model`` (tied LLM copies left out, as save_pretrained writes it)."""
    with full_state(model):
        return export_from(hf_blip2_key_map(model), model)


# -- configs --------------------------------------------------------------------------------------

def blip2_config_from_hf(hf_config: dict[str, Any], where: str = CONFIG_FILE,
                         preprocessor: dict[str, Any] | None = None) -> Blip2Config:
    """vlp `Blip2Config` for an HF BLIP-2 task model's ``config.json``."""
    architecture = hf_architecture(hf_config, "blip-2", ARCHITECTURES, where)
    retrieval = architecture == "Blip2ForImageTextRetrieval"
    qformer = hf_section(hf_config, "qformer_config", HF_QFORMER_DEFAULTS)
    vision = hf_section(hf_config, "vision_config", HF_VISION_DEFAULTS)
    problems = []
    if not vision["qkv_bias"]:
        problems.append("vision_config.qkv_bias=False")
    if qformer["position_embedding_type"] != "absolute":
        problems.append(f"qformer position_embedding_type {qformer['position_embedding_type']!r}")
    if not retrieval and qformer["use_qformer_text_input"]:
        problems.append("a ConditionalGeneration Q-Former with text FFNs "
                        "(use_qformer_text_input=True)")
    if isinstance(vision["image_size"], list | tuple) or isinstance(vision["patch_size"],
                                                                   list | tuple):
        problems.append("non-square image_size/patch_size")
    if problems:
        raise CheckpointError(f"{where}: not supported: {'; '.join(problems)}")
    text_config = hf_config.get("text_config")
    llm = "none"
    if not retrieval:
        if not isinstance(text_config, dict) or "model_type" not in text_config:
            raise CheckpointError(f"{where}: text_config with a model_type is needed")
        llm = "causal" if hf_config.get("use_decoder_only_language_model", True) else "seq2seq"
    vocab = int(qformer["vocab_size"])
    return Blip2Config(
        embed_dim=int(hf_config.get("image_text_hidden_size", 256)),
        num_queries=int(hf_config.get("num_query_tokens", 32)),
        cross_attention_freq=int(qformer["cross_attention_frequency"]),
        text=TextConfig(
            **text_fields(qformer, f"{where}: qformer_config"), causal=False, pool="first",
            pad_id=int(qformer["pad_token_id"]), bos_id=101, eos_id=102,
            dropout=float(qformer["hidden_dropout_prob"])),
        dec_id=vocab - 1,  # LAVIS appends [DEC] last (30522 of 30523)
        text_parts=retrieval, retrieval_heads=retrieval, lm_head=False,
        vision=VisionConfig(**vision_fields(vision, f"{where}: vision_config"), pre_norm=False,
                            patch_bias=True, pool="none", **blip_preprocessing(preprocessor)),
        vision_layer=-1, ln_vision=True,
        llm=llm, llm_config=dict(text_config) if llm != "none" else None,
        hf_image_token_index=hf_config.get("image_token_index"),
    )


def _architecture_of(model: BLIP2) -> str:
    config = model.config
    if config.llm != "none":
        if config.text_parts:
            raise ConfigError("HF Blip2ForConditionalGeneration holds no Q-Former text side; "
                              "this stage-2 BLIP-2 has text_parts=True")
        return "Blip2ForConditionalGeneration"
    if config.text_parts and config.retrieval_heads:
        return "Blip2ForImageTextRetrieval"
    raise ConfigError("no HF BLIP-2 class holds this model: expected a stage-2 model (llm set) "
                      "or one with text_parts and retrieval_heads")


def hf_config_from_blip2(model: BLIP2) -> dict[str, Any]:
    """HF ``config.json`` for a vlp BLIP-2; ConfigError where HF cannot express the model."""
    architecture = _architecture_of(model)
    config, vision, text = model.config, model.config.vision, model.config.text
    problems = []
    if config.vision_format != "vlp" or not isinstance(model.visual, VitFeatures):
        problems.append(f"vision_format {config.vision_format!r} (HF holds a BLIP-2 ViT)")
    elif vision.pre_norm or not vision.patch_bias:
        problems.append("a ViT other than BLIP-2's (pre_norm=False, patch_bias=True)")
    if not config.ln_vision:
        problems.append("ln_vision=False (HF's post_layernorm is always there)")
    problems += activation_problems(vision, text)
    if problems:
        raise ConfigError(f"this vlp BLIP-2 cannot be written as HF {architecture}: "
                          f"{'; '.join(problems)}")
    out: dict[str, Any] = {
        "architectures": [architecture], "model_type": "blip-2",
        "num_query_tokens": config.num_queries, "image_text_hidden_size": config.embed_dim,
        "image_token_index": config.hf_image_token_index, "torch_dtype": "float32",
        "qformer_config": hf_text_section(
            text, "blip_2_qformer", hidden_dropout_prob=text.dropout,
            attention_probs_dropout_prob=text.dropout, pad_token_id=text.pad_id,
            cross_attention_frequency=config.cross_attention_freq,
            encoder_hidden_size=vision.width, use_qformer_text_input=config.text_parts),
        "vision_config": hf_vision_section(
            vision, "blip_2_vision_model", qkv_bias=True,
            num_hidden_layers=len(model.visual.tower.transformer.blocks)),
    }
    if model.llm is not None:
        out["text_config"] = model.llm.config.to_diff_dict()
        out["use_decoder_only_language_model"] = config.llm == "causal"
    return out


# -- directories ----------------------------------------------------------------------------------

def load_hf_blip2(path: str | os.PathLike[str]) -> ImportedModel:
    """A vlp BLIP-2 from an HF ``Blip2ForConditionalGeneration`` or
    ``Blip2ForImageTextRetrieval`` directory (tokenizer: None; use the LLM's or BERT's own)."""
    hf = read_hf_directory(path)
    config = blip2_config_from_hf(hf.config, hf.where, hf.preprocessor)
    state, source = read_hf_weights(hf.path)
    return ImportedModel(import_model(config, state, source, hf_blip2_key_map), None)


def save_hf_blip2(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write a directory the matching transformers BLIP-2 class loads with from_pretrained:
    config.json, model.safetensors, preprocessor_config.json. Atomic. Frozen parts saved by
    reference in vlp are written in full (HF keeps every weight in one directory)."""
    model = family_model(model, BLIP2, "HF BLIP-2")
    hf_config = hf_config_from_blip2(model)
    return write_hf_directory(directory, hf_config, export_hf_state(model),
                              blip_image_processor(model.config.vision))


# -- initialising a Q-Former from BERT ------------------------------------------------------------

def bert_state_from_hf(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """An HF BERT directory (BertModel, BertForMaskedLM, ...) as a vlp `BertTextTransformer`
    state dict (the layout `vlp.nn.qformer.load_bert_` reads), plus BERT's MLM head as
    ``lm_head.*`` (BLIP's `LMPredictionHead` names) when the file holds one."""

    directory = Path(path)
    hf_config = read_json(directory / CONFIG_FILE)
    if hf_config.get("model_type") != "bert":
        raise CheckpointError(f"{directory / CONFIG_FILE}: model_type "
                              f"{hf_config.get('model_type')!r}, expected 'bert'")
    state, source = read_hf_weights(directory)
    prefix = "bert." if any(key.startswith("bert.") for key in state) else ""
    pairs, fused = bert_tower_pairs("", prefix, int(hf_config["num_hidden_layers"]))
    out = {ours: state[theirs] for ours, theirs in pairs if theirs in state}
    for ours, refs in fused:
        if all(ref in state for ref in refs):
            out[ours] = torch.cat([state[ref] for ref in refs])
    head = "cls.predictions."
    for ours, theirs in (*linear_pairs("lm_head.dense", f"{head}transform.dense"),
                         *linear_pairs("lm_head.norm", f"{head}transform.LayerNorm"),
                         ("lm_head.bias", f"{head}bias")):
        if theirs in state:
            out[ours] = state[theirs]
    if "token_embed.weight" not in out:
        raise CheckpointError(f"{source}: no BERT word embeddings under '{prefix}embeddings.'")
    return out


def init_qformer_from_bert_(model: BLIP2, source: str | os.PathLike[str]) -> list[str]:
    """Copy BERT weights into ``model``'s Q-Former (BLIP-2 §3.1: "initialized with the
    pre-trained weights of BERT-base, whereas the cross-attention layers are randomly
    initialized"): from a vlp BLIP directory's text encoder or an HF BERT directory. Returns
    the Q-Former tensor names that were set."""

    directory = Path(source)
    if (directory / CONFIG_FILE).is_file() and read_json(
            directory / CONFIG_FILE).get("model_type") == "bert":
        state = bert_state_from_hf(directory)
    else:
        tower = getattr(factory.load(directory), "text_encoder", None)
        if tower is None:
            raise CheckpointError(f"{directory}: neither an HF BERT directory nor a vlp model "
                                  "with a BERT-style text_encoder (BLIP)")
        state = copy.copy(tower.state_dict())
    return load_bert_(model.qformer, state)
