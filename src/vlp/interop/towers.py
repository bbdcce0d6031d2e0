"""One tower of a fresh model from another checkpoint: the papers' initialisations, as
`vlp train --init-vision DIR` / `--init-text DIR` run them.

- Vision (`init_vision_`): the ViT of CLIP, CoCa, BLIP (BLIP: "initialized from ViT pre-trained
  on ImageNet", DeiT's weights) or BLIP-2's frozen vlp ViT, from a transformers directory
  (``ViTModel`` / ``ViTForImageClassification``, which holds the non-distilled DeiT checkpoints
  too; ``CLIPVisionModel`` / ``CLIPModel``; ``BlipVisionModel`` / BLIP), an open_clip directory
  (``open_clip_config.json`` + weights: its ``visual``) or a vlp model directory (its ViT).
- Text (`init_text_`): BLIP's text encoder and decoder (their shared and separate parts alike)
  and its LM head, or BLIP-2's Q-Former (self-attention and both FFNs, as LAVIS's
  ``init_Qformer``), from a transformers BERT directory (``BertModel``, ``BertForMaskedLM``,
  ...) or a vlp BLIP directory; cross-attention and the queries keep their random init.

The key maps are the converters' (`hf`, `hf_common`, `open_clip_common`); every key and shape is
checked before a tensor is copied, so a mismatch is one `CheckpointError` naming the key and
both shapes and leaves the model untouched. Each call returns a report of the tensors loaded
and those left fresh, in the model's own names.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlp import factory
from vlp.config import ClipConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf import hf_key_map
from vlp.interop.hf_blip2 import bert_state_from_hf
from vlp.interop.hf_common import (
    BLIP_VISION_PADDED,
    CONFIG_FILE,
    activation_from_hf,
    blip_vision_pairs,
    read_hf_weights,
)
from vlp.interop.keymap import KeyMap, Pairs, import_into, linear_pairs
from vlp.interop.open_clip_common import CONFIG_FILE as OPEN_CLIP_CONFIG
from vlp.interop.open_clip_common import activation, norm_eps, read_open_clip_files, vit_pairs
from vlp.interop.skeleton import read_json
from vlp.models.blip import BLIP
from vlp.models.blip2 import BLIP2
from vlp.nn.qformer import load_bert_
from vlp.nn.vision import VisionTransformer
from vlp.store import read_state_dict

# parts of a vlp ViT a tower checkpoint may lack: the projection and attention-pool heads (not
# the tower), the patch bias (zero-initialised: a bias-free patch embedding, as CLIP's)
OPTIONAL_VISION = ("head.", "map_head.", "patch_embed.bias")
# HF vision model types and where their tower's keys start in each class's state dict
HF_VISION_TYPES = {"vit": ("", "vit."), "clip_vision_model": ("vision_model.",),
                   "clip": ("vision_model.",), "blip_vision_model": ("",),
                   "blip": ("vision_model.",)}
ROWS_AT_MOST = ("token_embed.weight", "lm_head.bias")  # a checkpoint's vocabulary may be smaller
ROWS_AT_LEAST = ("pos_embed",)  # and its positions more (the first context_length are read)


def _relative(pairs: Pairs, ours: str, theirs: str) -> Pairs:
    """``pairs`` under the prefixes ``ours`` / ``theirs``, with both prefixes taken off."""
    return [(o[len(ours):], t[len(theirs):]) for o, t in pairs
            if o.startswith(ours) and t.startswith(theirs)]


def _hf_vit_map(layers: int) -> KeyMap:
    """transformers ``ViTModel`` (below its ``vit.`` prefix in the task classes) <-> a vlp ViT."""
    pairs = [("class_token", "embeddings.cls_token"),
             ("pos_embed", "embeddings.position_embeddings"),
             *linear_pairs("patch_embed", "embeddings.patch_embeddings.projection"),
             *linear_pairs("norm", "layernorm")]
    fused = []
    for i in range(layers):
        o, t = f"transformer.blocks.{i}.", f"encoder.layer.{i}."
        for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                     ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")):
            pairs += linear_pairs(o + a, t + b)
        fused += [(f"{o}attn.qkv.{p}", tuple(f"{t}attention.attention.{x}.{p}"
                                             for x in ("query", "key", "value")))
                  for p in ("weight", "bias")]
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused),
                  padded=(("embeddings.cls_token", 3), ("embeddings.position_embeddings", 3)),
                  # ViTModel's tanh pooler and MIM mask token: no part of the features
                  ignored=frozenset({"embeddings.mask_token", "pooler.dense.weight",
                                     "pooler.dense.bias"}))


def _hf_vision_map(model_type: str, vision: VisionConfig) -> KeyMap:
    if model_type == "vit":
        return _hf_vit_map(vision.layers)
    if model_type.startswith("clip"):
        full = hf_key_map(ClipConfig(vision=vision))
        return KeyMap(pairs=tuple(_relative(list(full.pairs), "visual.", "vision_model.")),
                      fused=tuple((o[len("visual."):], tuple(r[len("vision_model."):]
                                                             for r in refs))
                                  for o, refs in full.fused if o.startswith("visual.")),
                      ignored=frozenset({"embeddings.position_ids"}))
    pairs = blip_vision_pairs("", vision.layers) + linear_pairs("norm",
                                                                "vision_model.post_layernorm")
    return KeyMap(pairs=tuple(_relative(pairs, "", "vision_model.")),
                  padded=tuple((name[len("vision_model."):], n) for name, n in BLIP_VISION_PADDED))


def _tower_keys(state: dict[str, Tensor], prefixes: tuple[str, ...], anchor: str,
                source: str) -> dict[str, Tensor]:
    """The keys below the first of ``prefixes`` that holds ``anchor``, prefix taken off."""
    for prefix in prefixes:
        if prefix + anchor in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    raise CheckpointError(f"{source}: no {anchor!r} under any of {list(prefixes)}; not the "
                          "vision model its config.json names")


def _read_vision(path: Path, vision: VisionConfig) -> tuple[KeyMap, dict[str, Tensor], str,
                                                            dict[str, Any]]:
    """(key map, tower state, source name, the source's act / norm_eps) of a vision checkpoint
    directory, keyed as the map expects."""
    if (path / OPEN_CLIP_CONFIG).is_file():
        files = read_open_clip_files(path, None, "vision_cfg", "CLIP")
        where = f"{files.config_path}: vision_cfg"
        pairs = vit_pairs(vision) + linear_pairs("visual.norm", "visual.ln_post")
        state = {k[len("visual."):]: v for k, v in read_state_dict(files.weights_path).items()
                 if k.startswith("visual.") and k != "visual.proj"}
        found = {"act": activation(files.model_cfg),
                 "norm_eps": norm_eps(files.model_cfg["vision_cfg"], where)}
        return (KeyMap(pairs=tuple(_relative(pairs, "visual.", "visual."))), state,
                str(files.weights_path), found)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no config.json or {OPEN_CLIP_CONFIG}; expected a vlp, "
                              "transformers or open_clip model directory")
    config = read_json(path / CONFIG_FILE)
    if "family" in config:  # a vlp model directory
        tower = _vision_tower(factory.load(path), str(path))[0]
        return (KeyMap(pairs=tuple((n, n) for n in tower.state_dict())), tower.state_dict(),
                str(path), {"act": tower.config.act, "norm_eps": tower.config.norm_eps})
    model_type = config.get("model_type")
    if model_type == "deit":
        raise CheckpointError(f"{path / CONFIG_FILE}: a distilled DeiT (model_type 'deit') has "
                              "a distillation token vlp's ViT lacks; use a non-distilled DeiT "
                              "or ViT (model_type 'vit', e.g. facebook/deit-base-patch16-224)")
    if model_type not in HF_VISION_TYPES:
        raise CheckpointError(f"{path / CONFIG_FILE}: model_type {model_type!r} is not a vision "
                              f"tower vlp reads; expected one of {sorted(HF_VISION_TYPES)}")
    section = config.get("vision_config", config) if model_type in ("clip", "blip") else config
    keymap = _hf_vision_map(model_type, vision)
    state, source = read_hf_weights(path)
    anchor = next(ref for vlp_name, ref in keymap.pairs if vlp_name == "pos_embed")
    state = _tower_keys(state, HF_VISION_TYPES[model_type], anchor, source)
    found = {"act": activation_from_hf(section.get("hidden_act", "gelu"), str(path)),
             "norm_eps": float(section.get("layer_norm_eps", 1e-12 if model_type == "vit"
                                           else 1e-5))}
    return keymap, state, source, found


def _vision_tower(model: nn.Module, where: str) -> tuple[VisionTransformer, str]:
    """The ViT a vision checkpoint initialises and its name in the model."""
    if isinstance(model, BLIP2):
        if model.config.vision_format != "vlp" or model.config.vision_path is not None:
            raise ConfigError(f"{where}: this BLIP-2 reads its frozen image encoder from "
                              "blip2.vision_path; set vision_format/vision_path instead")
        return model.visual.tower, "visual.tower."
    tower = getattr(model, "visual", None)
    if not isinstance(tower, VisionTransformer):
        raise ConfigError(f"{where}: a {type(model).__name__} has no ViT image tower to "
                          "initialise; families with one: clip, coca, blip, blip2")
    return tower, "visual."


def _sync_momentum(model: nn.Module, *towers: str) -> None:
    """BLIP's momentum encoders start as copies of the towers just loaded (as its own init)."""
    momentum = model.momentum_encoders if isinstance(model, BLIP) else None
    for name in towers:
        if momentum is not None and name in momentum:
            momentum[name].load_state_dict(getattr(model, name).state_dict())


def init_vision_(model: nn.Module, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the vision checkpoint directory ``source`` into ``model``'s ViT; returns
    ``{"tower", "source", "loaded", "fresh", "notes"}`` (names in the model)."""
    path = Path(source)
    tower, prefix = _vision_tower(model, "--init-vision")
    keymap, state, where, found = _read_vision(path, tower.config)
    own = tower.state_dict()
    notes = []
    if isinstance(model, BLIP2):  # its ViT is cut after the blocks it reads (as LAVIS's)
        unused = {ref for name, ref in keymap.pairs if name not in own}
        unused |= {ref for name, refs in keymap.fused if name not in own for ref in refs}
        state = {k: v for k, v in state.items() if k not in unused}
        if unused:
            notes.append(f"{len(unused)} checkpoint tensors past the blocks BLIP-2 reads "
                         "(vision_layer) are not used")
    keymap = dataclasses.replace(
        keymap, pairs=tuple(p for p in keymap.pairs if p[0] in own),
        fused=tuple(f for f in keymap.fused if f[0] in own))
    covered = set(keymap.vlp_names())
    fresh = [name for name in own if name not in covered]
    needed = [name for name in fresh if not name.startswith(OPTIONAL_VISION)]
    if needed:
        raise CheckpointError(f"{where}: no tensor for the vision tower's {needed[0]!r} "
                              f"(shape {tuple(own[needed[0]].shape)}); the checkpoint's ViT "
                              "lacks a part this model's vision config has")
    if found["act"] != tower.config.act:
        raise ConfigError(f"{where}: the checkpoint's ViT uses {found['act']}, this model's "
                          f"vision.act is {tower.config.act!r}; pass --model-overrides "
                          f"'{{\"vision\": {{\"act\": \"{found['act']}\"}}}}'")
    import_into(dataclasses.replace(keymap, vlp_only=frozenset(fresh)), state, tower, where)
    _sync_momentum(model, "visual")
    if abs(found["norm_eps"] - tower.config.norm_eps) > 1e-15:
        notes.append(f"LayerNorm eps {found['norm_eps']:g} in the checkpoint, "
                     f"{tower.config.norm_eps:g} in this model (vision.norm_eps)")
    return {"tower": "vision", "source": str(path), "loaded": sorted(prefix + n for n in covered),
            "fresh": sorted(prefix + n for n in fresh), "notes": notes}


# -- text ---------------------------------------------------------------------------------------

def _read_bert(path: Path) -> tuple[dict[str, Tensor], str]:
    """A BERT in vlp's `BertTextTransformer` layout (+ ``lm_head.*`` when the file has BERT's
    MLM head) from an HF BERT directory or a vlp BLIP directory."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a transformers BERT or a vlp "
                              "BLIP model directory")
    if "family" not in read_json(config_file):
        return bert_state_from_hf(path), str(path)
    model = factory.load(path)
    if not isinstance(model, BLIP) or model.text_encoder is None:
        raise CheckpointError(f"{path}: a vlp {type(model).__name__}; --init-text reads a BLIP "
                              "with a text encoder (or a transformers BERT)")
    state = dict(model.text_encoder.state_dict())
    if model.lm_head is not None:
        state.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()})
    return state, str(path)


def _fits(name: str, have: tuple[int, ...], need: tuple[int, ...]) -> bool:
    if name.endswith(ROWS_AT_MOST):
        return have[1:] == need[1:] and have[0] <= need[0]
    if name.endswith(ROWS_AT_LEAST):
        return have[1:] == need[1:] and have[0] >= need[0]
    return have == need


def _copy_plan(state: dict[str, Tensor], targets: dict[str, tuple[str, nn.Module]],
               where: str) -> list[tuple[Tensor, Tensor, str]]:
    """(parameter, value, model name) for every checkpoint tensor a target module holds; every
    shape checked before anything is copied."""
    plan = []
    for prefix, module in targets.values():
        own = module.state_dict(keep_vars=True)
        for name, value in state.items():
            key = name[len("lm_head."):] if prefix == "lm_head." else name
            if (prefix == "lm_head.") != name.startswith("lm_head.") or key not in own:
                continue
            param = own[key]
            if not _fits(name, tuple(value.shape), tuple(param.shape)):
                raise CheckpointError(f"{where}: {name!r} has shape {tuple(value.shape)}, this "
                                      f"model's {prefix}{key} needs {tuple(param.shape)}")
            plan.append((param, value, prefix + key))
    return plan


def init_text_(model: nn.Module, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the BERT directory ``source`` into BLIP's text towers and LM head or BLIP-2's
    Q-Former; returns ``{"tower", "source", "loaded", "fresh", "notes"}``."""
    path = Path(source)
    if not isinstance(model, BLIP | BLIP2):
        raise ConfigError(f"--init-text: a {type(model).__name__} has no BERT-style text tower; "
                          "families with one: blip (text encoder/decoder), blip2 (Q-Former)")
    state, where = _read_bert(path)
    if isinstance(model, BLIP2):
        loaded = {f"qformer.{n}" for n in load_bert_(model.qformer, state)}
        own = [f"qformer.{n}" for n in model.qformer.state_dict()]
    else:
        targets = {name: (f"{name}.", getattr(model, name)) for name in
                   ("text_encoder", "text_decoder", "lm_head") if getattr(model, name) is not None}
        plan = _copy_plan(state, targets, where)
        with torch.no_grad():
            for param, value, _ in plan:
                rows = min(value.shape[0], param.shape[0])  # vocab / positions (checked)
                param[:rows].copy_(value[:rows])
        loaded = {name for _, _, name in plan}
        own = [f"{prefix}{n}" for prefix, module in targets.values() for n in module.state_dict()]
        _sync_momentum(model, "text_encoder")
    notes = []
    vocab = state["token_embed.weight"].shape[0]
    if vocab < model.config.text.vocab_size:
        notes.append(f"token_embed rows {vocab}..{model.config.text.vocab_size - 1} (tokens "
                     "the checkpoint lacks, e.g. [DEC]/[ENC]) keep their random init")
    return {"tower": "text", "source": str(path), "loaded": sorted(loaded),
            "fresh": sorted(set(own) - loaded), "notes": notes}
