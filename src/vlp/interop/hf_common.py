"""What HF transformers' CLIP, BLIP and BLIP-2 formats share: the directory (``config.json`` +
safetensors, sharded or not, + ``preprocessor_config.json``), the config fields every tower
spells the same way, the activation names, and the layouts BLIP and BLIP-2 have in common (the
ViT, the BERT towers of BLIP's ``med.py``, the image processor)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from vlp.config import OPENAI_MEAN, OPENAI_STD, TextConfig, VisionConfig
from vlp.errors import CheckpointError
from vlp.interop.keymap import Fused, Pairs, Tie, linear_pairs
from vlp.interop.skeleton import mlp_ratio, read_json, write_directory
from vlp.store import read_state_dict
from vlp.tokenizers import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
# read in this order; the first present wins (save_pretrained writes the first)
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")

# HF hidden_act name <-> vlp activation name (only exact equivalents)
ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}
ACT_TO_HF = {vlp: hf for hf, vlp in ACT_FROM_HF.items()}


# -- directories ----------------------------------------------------------------------------------

class HfDirectory(NamedTuple):
    path: Path
    config: dict[str, Any]  # config.json
    preprocessor: dict[str, Any] | None  # preprocessor_config.json, None when absent
    where: str  # config.json's path, for errors


def read_hf_directory(path: str | os.PathLike[str]) -> HfDirectory:
    """An HF model directory's config files (weights: `read_hf_weights`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: HF model directory not found")
    preprocessor_path = directory / PREPROCESSOR_FILE
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    return HfDirectory(directory, read_json(directory / CONFIG_FILE), preprocessor,
                       str(directory / CONFIG_FILE))


def read_hf_weights(directory: Path) -> tuple[dict[str, Tensor], str]:
    """State dict of an HF model directory (single file or sharded) and a name for errors."""
    for name in WEIGHTS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(path), str(path)
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: no 'weight_map' object")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(directory / shard))
        return state, str(path)
    raise CheckpointError(f"{directory}: no weights file; expected one of {list(WEIGHTS_FILES)}")


def write_hf_directory(directory: str | os.PathLike[str], hf_config: dict[str, Any],
                       tensors: dict[str, Tensor], preprocessor: dict[str, Any],
                       tokenizer: Tokenizer | None = None,
                       model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")
                       ) -> Path:
    """What ``save_pretrained`` writes (+ the image processor and tokenizer files). Atomic."""
    return write_directory(directory, {CONFIG_FILE: hf_config, WEIGHTS_FILE: tensors,
                                       PREPROCESSOR_FILE: preprocessor}, tokenizer,
                           model_input_names)


# -- configs: HF -> vlp ---------------------------------------------------------------------------

def hf_architecture(hf_config: dict[str, Any], model_type: str, known: tuple[str, ...],
                    where: str, default: tuple[str, ...] = ()) -> str:
    """The one class of ``known`` that an HF config of ``model_type`` declares."""
    architectures = hf_config.get("architectures") or list(default)
    declared = [name for name in architectures if name in known]
    if hf_config.get("model_type") != model_type or len(declared) != 1:
        raise CheckpointError(
            f"{where}: unknown architecture (model_type {hf_config.get('model_type')!r}, "
            f"architectures {architectures}); expected model_type {model_type!r} with one of "
            f"{list(known)}")
    return declared[0]


def hf_section(hf_config: dict[str, Any], key: str, defaults: dict[str, Any],
               *later: str) -> dict[str, Any]:
    """One sub-config: HF's defaults, then ``hf_config[key]``, then each of ``later``."""
    merged = dict(defaults)
    for name in (key, *later):
        merged.update(hf_config.get(name) or {})
    return merged


def activation_from_hf(name: Any, where: str) -> str:
    if name not in ACT_FROM_HF:
        raise CheckpointError(f"{where}: hidden_act {name!r} not supported; expected one of "
                              f"{sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def _tower_fields(section: dict[str, Any], where: str) -> dict[str, Any]:
    width = int(section["hidden_size"])
    return {"width": width, "layers": int(section["num_hidden_layers"]),
            "heads": int(section["num_attention_heads"]),
            "mlp_ratio": mlp_ratio(width, int(section["intermediate_size"]), where),
            "act": activation_from_hf(section["hidden_act"], where),
            "norm_eps": float(section["layer_norm_eps"])}


def vision_fields(vision: dict[str, Any], where: str) -> dict[str, Any]:
    """The `VisionConfig` fields an HF vision config gives (``where``: the section's name)."""
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, list | tuple) or isinstance(patch_size, list | tuple):
        raise CheckpointError(f"{where}: non-square image_size/patch_size not supported")
    return {"image_size": int(image_size), "patch_size": int(patch_size),
            **_tower_fields(vision, where)}


def text_fields(text: dict[str, Any], where: str) -> dict[str, Any]:
    """The `TextConfig` fields an HF text (or Q-Former) config gives."""
    return {"vocab_size": int(text["vocab_size"]),
            "context_length": int(text["max_position_embeddings"]), **_tower_fields(text, where)}


def blip_preprocessing(preprocessor: dict[str, Any] | None) -> dict[str, Any]:
    """`VisionConfig` fields from a ``BlipImageProcessor`` config: resize both sides, no crop."""
    preprocessor = preprocessor or {}
    return {"mean": tuple(float(x) for x in preprocessor.get("image_mean", OPENAI_MEAN)),
            "std": tuple(float(x) for x in preprocessor.get("image_std", OPENAI_STD)),
            "resize_mode": "squash", "interpolation": "bicubic"}


# -- configs: vlp -> HF ---------------------------------------------------------------------------

def activation_problems(*towers: VisionConfig | TextConfig) -> list[str]:
    return [f"act={tower.act!r}" for tower in towers if tower.act not in ACT_TO_HF]


def _hf_tower(tower: VisionConfig | TextConfig) -> dict[str, Any]:
    return {"hidden_size": tower.width, "intermediate_size": int(tower.width * tower.mlp_ratio),
            "num_hidden_layers": tower.layers, "num_attention_heads": tower.heads,
            "hidden_act": ACT_TO_HF[tower.act], "layer_norm_eps": tower.norm_eps}


def hf_vision_section(vision: VisionConfig, model_type: str, **extra: Any) -> dict[str, Any]:
    """An HF ``vision_config`` for ``vision``; ``extra`` adds or overrides fields."""
    return {"model_type": model_type, **_hf_tower(vision), "image_size": vision.image_size,
            "patch_size": vision.patch_size, **extra}


def hf_text_section(text: TextConfig, model_type: str, **extra: Any) -> dict[str, Any]:
    """An HF ``text_config`` (or ``qformer_config``) for ``text``; ``extra`` as above."""
    return {"model_type": model_type, **_hf_tower(text), "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length, **extra}


def blip_image_processor(vision: VisionConfig) -> dict[str, Any]:
    """``BlipImageProcessor`` config: resize both sides to image_size (bicubic), normalise."""
    return {
        "image_processor_type": "BlipImageProcessor", "do_resize": True,
        "size": {"height": vision.image_size, "width": vision.image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(vision.mean), "image_std": list(vision.std), "do_convert_rgb": True,
    }


def encoder_layer_pairs(ours: str, theirs: str) -> tuple[Pairs, Fused]:
    """One pre-LN encoder layer of HF CLIP or SigLIP (``theirs``: ``...layers.{i}.``) <-> a vlp
    `Block` (``ours``): q/k/v fused into vlp's ``qkv``."""
    pairs: Pairs = []
    for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                 ("attn.proj", "self_attn.out_proj"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):
        pairs += linear_pairs(ours + a, theirs + b)
    fused = [(f"{ours}attn.qkv.{p}", tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"))
             for p in ("weight", "bias")]
    return pairs, fused



# -- layouts BLIP and BLIP-2 share ----------------------------------------------------------------

# HF stores the ViT's class token (D,) and positions (N+1, D) as 3-d, with leading 1s
BLIP_VISION_PADDED = (("vision_model.embeddings.class_embedding", 3),
                      ("vision_model.embeddings.position_embedding", 3))


def blip_vision_pairs(ours: str, layers: int) -> Pairs:
    """HF BLIP's (and BLIP-2's) ViT ``vision_model.`` <-> vlp's ViT under ``ours``; the final
    ``post_layernorm`` is left to the caller (BLIP's ``norm``, BLIP-2's ``ln_vision``)."""
    pairs = [(f"{ours}class_token", "vision_model.embeddings.class_embedding"),
             (f"{ours}pos_embed", "vision_model.embeddings.position_embedding")]
    pairs += linear_pairs(f"{ours}patch_embed", "vision_model.embeddings.patch_embedding")
    for i in range(layers):
        o, t = f"{ours}transformer.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                     ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            pairs += linear_pairs(o + a, t + b)
    return pairs


def bert_attention(ours: str, theirs: str, inner: str, cross: bool) -> tuple[Pairs, Fused]:
    """One BERT layer's self-attention (and cross-attention): ``{theirs}attention.{inner}.``
    query/key/value fused into vlp's ``qkv`` (cross: key/value into ``kv``)."""
    pairs = linear_pairs(f"{ours}attn.proj", f"{theirs}attention.output.dense")
    pairs += linear_pairs(f"{ours}norm1", f"{theirs}attention.output.LayerNorm")
    fused = [(f"{ours}attn.qkv.{p}", tuple(f"{theirs}attention.{inner}.{x}.{p}"
                                           for x in ("query", "key", "value")))
             for p in ("weight", "bias")]
    if cross:
        t = f"{theirs}crossattention."
        pairs += linear_pairs(f"{ours}cross_attn.q", f"{t}{inner}.query")
        pairs += linear_pairs(f"{ours}cross_attn.proj", f"{t}output.dense")
        pairs += linear_pairs(f"{ours}norm_cross", f"{t}output.LayerNorm")
        fused += [(f"{ours}cross_attn.kv.{p}", (f"{t}{inner}.key.{p}", f"{t}{inner}.value.{p}"))
                  for p in ("weight", "bias")]
    return pairs, fused


def bert_ffn(ours: str, theirs: str, suffix: str = "") -> Pairs:
    """One BERT layer's feed-forward (``suffix`` "_query": the Q-Former's query FFN)."""
    return (linear_pairs(f"{ours}mlp{suffix}.fc1", f"{theirs}intermediate{suffix}.dense")
            + linear_pairs(f"{ours}mlp{suffix}.fc2", f"{theirs}output{suffix}.dense")
            + linear_pairs(f"{ours}norm2{suffix}", f"{theirs}output{suffix}.LayerNorm"))


def bert_tower_pairs(ours: str, theirs: str, layers: int) -> tuple[Pairs, Fused]:
    """A BERT tower (BLIP's ``med.py`` layout, which HF keeps): ``{theirs}embeddings`` /
    ``{theirs}encoder.layer.i`` <-> vlp ``{ours}``; separate q/k/v fused into vlp's qkv/kv."""
    pairs = [(f"{ours}token_embed.weight", f"{theirs}embeddings.word_embeddings.weight"),
             (f"{ours}pos_embed", f"{theirs}embeddings.position_embeddings.weight")]
    pairs += linear_pairs(f"{ours}embed_norm", f"{theirs}embeddings.LayerNorm")
    fused: Fused = []
    for i in range(layers):
        o, t = f"{ours}blocks.{i}.", f"{theirs}encoder.layer.{i}."
        attention_pairs, attention_fused = bert_attention(o, t, "self", cross=True)
        pairs += attention_pairs + bert_ffn(o, t)
        fused += attention_fused
    return pairs, fused


LM_PREFIX = "text_decoder.cls.predictions."  # BLIP's LM head, in HF and in BLIP's own files
DECODER = "text_decoder.bert."  # BLIP's text decoder tower


def blip_lm_head() -> tuple[Pairs, tuple[Tie, ...]]:
    """BLIP's LM head <-> vlp ``lm_head``; its decoder matrix and bias are copies of the word
    embeddings and ``bias`` (tied), which files may store again."""
    pairs = linear_pairs("lm_head.dense", LM_PREFIX + "transform.dense")
    pairs += linear_pairs("lm_head.norm", LM_PREFIX + "transform.LayerNorm")
    pairs.append(("lm_head.bias", LM_PREFIX + "bias"))
    why = "vlp BLIP ties the LM decoder to the word embeddings"
    ties = (Tie(LM_PREFIX + "decoder.weight", DECODER + "embeddings.word_embeddings.weight", why),
            Tie(LM_PREFIX + "decoder.bias", LM_PREFIX + "bias", why))
    return pairs, ties
