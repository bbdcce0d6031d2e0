"""Original BLIP (salesforce/BLIP) / LAVIS ``blip_*`` checkpoints <-> vlp BLIP.

A checkpoint is a ``.pth`` file holding ``{'model': state_dict, 'optimizer', 'config', 'epoch'}``
or a bare state dict (read with ``weights_only=True``), or a ``.safetensors`` state dict. LAVIS
loads BLIP's files as they are, so one layout covers both. Key map (``{w,b}``: weight and bias;
``i``: a block; ``E``: embed_dim, ``Q``: queue size):

=================================================  =============================================
original                                           vlp
=================================================  =============================================
V.cls_token (1, 1, D) / V.pos_embed (1, 1+N, D)    v.class_token (D,) / v.pos_embed (1+N, D)
V.patch_embed.proj.{w,b} / V.norm.{w,b}            v.patch_embed.{w,b} / v.norm.{w,b}
V.blocks.i.X.{w,b}, X in norm1, attn.qkv,          v.transformer.blocks.i.X.{w,b}
  attn.proj, norm2, mlp.fc1, mlp.fc2
T.embeddings.word_embeddings.weight                t.token_embed.weight
T.embeddings.position_embeddings.weight            t.pos_embed
T.embeddings.LayerNorm.{w,b}                       t.embed_norm.{w,b}
T.encoder.layer.i.attention.self.{query,key,value} t.blocks.i.attn.qkv (concatenated, dim 0)
T.encoder.layer.i.attention.output.dense           t.blocks.i.attn.proj
T.encoder.layer.i.attention.output.LayerNorm       t.blocks.i.norm1
T.encoder.layer.i.crossattention.self.query        t.blocks.i.cross_attn.q
T.encoder.layer.i.crossattention.self.{key,value}  t.blocks.i.cross_attn.kv (concatenated)
T.encoder.layer.i.crossattention.output.dense      t.blocks.i.cross_attn.proj
T.encoder.layer.i.crossattention.output.LayerNorm  t.blocks.i.norm_cross
T.encoder.layer.i.intermediate.dense               t.blocks.i.mlp.fc1
T.encoder.layer.i.output.dense / .LayerNorm        t.blocks.i.mlp.fc2 / t.blocks.i.norm2
P.transform.dense / P.transform.LayerNorm / P.bias lm_head.dense / lm_head.norm / lm_head.bias
P.decoder.weight / P.decoder.bias                  tied to the decoder's word embeddings / P.bias
vision_proj, text_proj, itm_head, temp ()          the same names
vision_proj_m, text_proj_m                         momentum_encoders.{vision_proj, text_proj}
image_queue, text_queue (E, Q)                     queue.image, queue.text (Q, E)
queue_ptr (1,) int64                               queue.ptr () int64
=================================================  =============================================

(V, v) = (visual_encoder, visual) and (visual_encoder_m, momentum_encoders.visual); (T, t) =
(text_encoder, text_encoder), (text_decoder.bert, text_decoder) and (text_encoder_m,
momentum_encoders.text_encoder); P = text_decoder.cls.predictions. Dropped on import:
``*.embeddings.position_ids`` (rebuilt), retrieval fine-tuning's ``idx_queue``/``ptr_queue``
(vlp keeps no image-id queue), and the momentum encoders + queue when the target config has
``queue_size=0`` (a warning says so). Pretraining files tie the towers "all but
self-attention", so the shared weights appear under both ``text_encoder.`` and
``text_decoder.bert.``: every copy must be equal, and vlp loads them into one tensor.

The config comes from the file: widths, layers, MLP sizes, patch and image size, vocabulary,
context length, which parts exist, the queue size and the sharing (the decoder's word embeddings
equal the encoder's: tied "all but SA", or "all" if layer 0's self-attention is equal too; else
"none"). Attention heads and token ids cannot be read from shapes: they come from ``config`` (a
vlp preset name, config JSON or `BlipConfig`), by default ``blip-vit-b-16`` / ``blip-vit-l-16``
by vision width. BLIP's behaviour is set on top: ``replace_first_token=True``,
``mask_question_padding="teacher_forcing"``, label smoothing 0.1, ViT LN eps 1e-6, BERT 1e-12,
squash resize (BLIP's eval transform). A LAVIS file without ``*_m`` weights (LAVIS drops
frozen parameters) gets momentum encoders copied from the imported ones, as BLIP initialises
them; without queues, a fresh random queue.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from vlp.config import BlipConfig, get_preset, list_presets, load_config
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf_common import DECODER, bert_tower_pairs, blip_lm_head
from vlp.interop.keymap import Fused, KeyMap, Pairs, export_from, linear_pairs
from vlp.interop.skeleton import ImportedModel, family_model, import_model, mlp_ratio
from vlp.models.blip import BLIP
from vlp.nn.momentum import ema_update_
from vlp.nn.vision import resize_pos_embed
from vlp.store import atomic_write, read_state_dict, write_safetensors

logger = logging.getLogger(__name__)

VISION, TEXT = "visual_encoder.", "text_encoder."
VISION_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# vlp momentum module -> original prefix (towers) or module name (projections)
MOMENTUM = {"visual": "visual_encoder_m.", "text_encoder": "text_encoder_m.",
            "vision_proj": "vision_proj_m", "text_proj": "text_proj_m"}
QUEUE = {"queue.image": "image_queue", "queue.text": "text_queue", "queue.ptr": "queue_ptr"}
DROPPED = ("idx_queue", "ptr_queue")  # retrieval fine-tuning's image-id queue
# tensors the file stores with leading singleton dims: ViT class token and positions, queue pointer
PADDED = ((f"{VISION}cls_token", 3), (f"{VISION}pos_embed", 3),
          (f"{MOMENTUM['visual']}cls_token", 3), (f"{MOMENTUM['visual']}pos_embed", 3),
          (QUEUE["queue.ptr"], 1))
PRESET_BY_VISION_WIDTH = {768: "blip-vit-b-16", 1024: "blip-vit-l-16"}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


# -- key map --------------------------------------------------------------------------------------

def _vision_pairs(ours: str, theirs: str, layers: int) -> Pairs:
    pairs = [(f"{ours}class_token", f"{theirs}cls_token"),
             (f"{ours}pos_embed", f"{theirs}pos_embed")]
    pairs += linear_pairs(f"{ours}patch_embed", f"{theirs}patch_embed.proj")
    for i in range(layers):
        for part in VISION_BLOCK_PARTS:
            pairs += linear_pairs(f"{ours}transformer.blocks.{i}.{part}",
                                  f"{theirs}blocks.{i}.{part}")
    return pairs + linear_pairs(f"{ours}norm", f"{theirs}norm")


def _momentum_map(config: BlipConfig) -> tuple[Pairs, Fused]:
    pairs = _vision_pairs("momentum_encoders.visual.", MOMENTUM["visual"], config.vision.layers)
    tower, fused = bert_tower_pairs("momentum_encoders.text_encoder.", MOMENTUM["text_encoder"],
                                    config.text.layers)
    pairs += tower
    for name in ("vision_proj", "text_proj"):
        pairs += linear_pairs(f"momentum_encoders.{name}", MOMENTUM[name])
    return pairs, fused


def lavis_blip_key_map(config: BlipConfig, momentum: bool = True, queue: bool = True) -> KeyMap:
    """vlp BLIP <-> original BLIP names for ``config``. ``momentum`` / ``queue`` False: the file
    lacks them, so vlp keeps its own (``vlp_only``)."""
    pairs, fused, ties = _vision_pairs("visual.", VISION, config.vision.layers), [], ()
    ignored = set(DROPPED)
    towers = [("text_encoder.", TEXT, config.text_encoder),
              ("text_decoder.", DECODER, config.text_decoder)]
    for ours, theirs, present in towers:
        if present:
            tower_pairs, tower_fused = bert_tower_pairs(ours, theirs, config.text.layers)
            pairs, fused = pairs + tower_pairs, fused + tower_fused
            ignored.add(f"{theirs}embeddings.position_ids")
    if config.text_decoder:
        head_pairs, ties = blip_lm_head()  # BLIP's files store the tied copies too
        pairs += head_pairs
    vlp_only = set()
    if config.retrieval_heads:
        for name in ("vision_proj", "text_proj", "itm_head"):
            pairs += linear_pairs(name, name)
        pairs.append(("temp", "temp"))
    if config.retrieval_heads and config.queue_size > 0:
        vlp_only.add("queue.batches")  # vlp's alpha-ramp counter
        momentum_pairs, momentum_fused = _momentum_map(config)
        if momentum:
            pairs, fused = pairs + momentum_pairs, fused + momentum_fused
            ignored.add(f"{MOMENTUM['text_encoder']}embeddings.position_ids")
        else:
            vlp_only |= {name for name, _ in momentum_pairs + momentum_fused}
        if queue:
            pairs += list(QUEUE.items())
        else:
            vlp_only |= set(QUEUE)
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), padded=PADDED, tied=ties,
                  transposed=frozenset({QUEUE["queue.image"], QUEUE["queue.text"]}),
                  scalars=frozenset({"temp", QUEUE["queue.ptr"]}),
                  integers=frozenset({QUEUE["queue.ptr"]}), ignored=frozenset(ignored),
                  vlp_only=frozenset(vlp_only))


# -- config from the file -------------------------------------------------------------------------

def _shape(state: dict[str, Tensor], key: str, ndim: int, source: str, what: str
           ) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} (it gives the {what})")
    tensor = state[key]
    if not isinstance(tensor, Tensor) or tensor.ndim != ndim:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise CheckpointError(f"{source}: key {key!r} has shape {shape}, expected {ndim} dims")
    return tuple(tensor.shape)


def _count_layers(state: dict[str, Tensor], pattern: str, source: str) -> int:
    layers = 0
    while pattern.format(layers) in state:
        layers += 1
    if layers == 0:
        raise CheckpointError(f"{source}: missing key {pattern.format(0)!r} (no layers found)")
    return layers


def _equal(state: dict[str, Tensor], a: str, b: str) -> bool:
    return (a in state and b in state and state[a].shape == state[b].shape
            and torch.equal(state[a], state[b]))


def detect_share(state: dict[str, Tensor]) -> str:
    """The towers' sharing as the file stores it (see the module docstring)."""
    embeddings = "embeddings.word_embeddings.weight"
    if not _equal(state, TEXT + embeddings, DECODER + embeddings):
        return "none"
    query = "encoder.layer.0.attention.self.query.weight"
    return "all" if _equal(state, TEXT + query, DECODER + query) else "all_but_sa"


def base_config(config: BlipConfig | str | os.PathLike[str] | None, vision_width: int,
                source: str) -> BlipConfig:
    """``config`` as a `BlipConfig` (preset name, config JSON path or config); by default the
    BLIP preset of ``vision_width``."""
    if config is None:
        if vision_width not in PRESET_BY_VISION_WIDTH:
            raise ConfigError(
                f"{source}: vision width {vision_width} matches no BLIP preset "
                f"({PRESET_BY_VISION_WIDTH}); give config= (a preset name or a vlp config JSON) "
                "for the attention heads and token ids")
        config = PRESET_BY_VISION_WIDTH[vision_width]
    if isinstance(config, str | os.PathLike):
        if Path(config).is_file():
            config = load_config(config)
        elif str(config) in list_presets():
            config = get_preset(str(config))
        else:
            raise ConfigError(f"config {str(config)!r} is neither a file nor a preset; "
                              f"expected a vlp config JSON or one of {list_presets()}")
    if not isinstance(config, BlipConfig):
        raise ConfigError(f"config is a {type(config).__name__}, expected a BLIP config")
    return copy.deepcopy(config)


def _check_heads(width: int, heads: int, tower: str, source: str) -> None:
    if width % heads:
        raise ConfigError(f"{source}: {tower} width {width} is not divisible by the config's "
                          f"{heads} heads; give config= with this model's heads")


def blip_config_from_lavis(state: dict[str, Tensor], base: BlipConfig, source: str,
                           image_size: int | None = None) -> BlipConfig:
    """A vlp `BlipConfig` for an original BLIP state dict: shapes and parts from ``state``,
    heads and token ids from ``base``, BLIP's reference switches; ``image_size`` resamples."""
    config = copy.deepcopy(base)
    width, channels, patch, patch_w = _shape(state, VISION + "patch_embed.proj.weight", 4,
                                             source, "vision width and patch size")
    tokens = _shape(state, VISION + "pos_embed", 3, source, "image size")[1]
    grid = math.isqrt(tokens - 1)
    if channels != 3 or patch != patch_w or grid * grid != tokens - 1:
        raise CheckpointError(f"{source}: {channels}-channel {patch}x{patch_w} patches with "
                              f"{tokens} positions; expected RGB square patches and 1 + g*g "
                              "positions")
    vision = config.vision
    vision.width, vision.patch_size, vision.image_size = width, patch, grid * patch
    vision.layers = _count_layers(state, VISION + "blocks.{}.attn.qkv.weight", source)
    hidden = _shape(state, VISION + "blocks.0.mlp.fc1.weight", 2, source, "vision MLP size")[0]
    vision.mlp_ratio = mlp_ratio(width, hidden, f"{source}: visual_encoder")
    vision.act, vision.norm_eps, vision.pre_norm, vision.patch_bias = "gelu", 1e-6, False, True
    vision.pool, vision.resize_mode, vision.interpolation = "cls", "squash", "bicubic"
    vision.pos_embed_antialias = False  # BLIP's interpolate_pos_embed: plain bicubic
    _check_heads(width, vision.heads, "vision", source)

    config.text_encoder = TEXT + "embeddings.word_embeddings.weight" in state
    config.text_decoder = DECODER + "embeddings.word_embeddings.weight" in state
    if not (config.text_encoder or config.text_decoder):
        raise CheckpointError(f"{source}: no text tower; expected keys under {TEXT!r} and/or "
                              f"{DECODER!r}")
    tower = TEXT if config.text_encoder else DECODER
    text = config.text
    text.vocab_size, text.width = _shape(state, tower + "embeddings.word_embeddings.weight", 2,
                                         source, "vocabulary and text width")
    text.context_length = _shape(state, tower + "embeddings.position_embeddings.weight", 2,
                                 source, "context length")[0]
    text.layers = _count_layers(state, tower + "encoder.layer.{}.attention.self.query.weight",
                                source)
    hidden = _shape(state, tower + "encoder.layer.0.intermediate.dense.weight", 2, source,
                    "text MLP size")[0]
    text.mlp_ratio = mlp_ratio(text.width, hidden, f"{source}: {tower}")
    text.act, text.norm_eps, text.causal, text.pool = "gelu", 1e-12, False, "first"
    _check_heads(text.width, text.heads, "text", source)

    config.retrieval_heads = "itm_head.weight" in state
    if config.retrieval_heads:
        config.embed_dim = _shape(state, "vision_proj.weight", 2, source, "embed_dim")[0]
    if not config.retrieval_heads or config.queue_size == 0:
        config.queue_size = 0
    elif QUEUE["queue.image"] in state:
        config.queue_size = _shape(state, QUEUE["queue.image"], 2, source, "queue size")[1]
    if config.text_encoder and config.text_decoder:
        config.share = detect_share(state)
    config.label_smoothing, config.replace_first_token = 0.1, True
    config.mask_question_padding = "teacher_forcing"
    if image_size is not None:
        if image_size % patch:
            raise ConfigError(f"image size {image_size} is not a multiple of patch size {patch}")
        vision.image_size = image_size
    return config


# -- state dicts ----------------------------------------------------------------------------------

def _prepare(state: dict[str, Tensor], config: BlipConfig, source: str) -> dict[str, Tensor]:
    """The file's tensors with the position grids resampled to the config's (the momentum
    encoder's must have the main one's shape) and unused momentum/queue tensors dropped."""
    state = dict(state)
    grid = config.vision.image_size // config.vision.patch_size
    stored = tuple(state[VISION + "pos_embed"].shape)
    for key in (VISION + "pos_embed", MOMENTUM["visual"] + "pos_embed"):
        if key not in state:
            continue
        tensor = state[key]
        if tuple(tensor.shape) != stored:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {stored}")
        state[key] = resize_pos_embed(tensor[0], grid)[None]
    unused = [k for k in DROPPED if k in state]
    if config.queue_size == 0:
        prefixes = (*MOMENTUM.values(), *QUEUE.values())
        unused += [k for k in state if k.startswith(prefixes)]
    if unused:
        modules = sorted({name.split(".")[0] for name in unused})
        logger.warning("%s: left out %d tensors vlp does not use here (%s)", source, len(unused),
                       ", ".join(modules))
    return {k: v for k, v in state.items() if k not in unused}


def export_lavis_state(model: BLIP) -> dict[str, Tensor]:
    """The original-layout state dict of ``model`` (tied copies written under every name)."""
    config = model.config
    problems = []
    vision = config.vision
    if vision.pre_norm or not vision.patch_bias or vision.pool != "cls":
        problems.append("a vision tower other than BLIP's (pre_norm=False, patch_bias=True, "
                        "pool='cls')")
    if {vision.act, config.text.act} != {"gelu"}:
        problems.append(f"activations {vision.act!r}/{config.text.act!r} (BLIP: 'gelu')")
    if problems:
        raise ConfigError(f"this vlp BLIP cannot be written in BLIP's layout: "
                          f"{'; '.join(problems)}")
    return export_from(lavis_blip_key_map(config), model)


# -- files ----------------------------------------------------------------------------------------

def load_lavis_blip(path: str | os.PathLike[str], *,
                    config: BlipConfig | str | os.PathLike[str] | None = None,
                    image_size: int | None = None) -> ImportedModel:
    """A vlp BLIP from an original BLIP / LAVIS checkpoint file (no tokenizer: BLIP's is
    ``bert-base-uncased`` + ``[DEC]``/``[ENC]``). ``config``: heads and token ids (see the module
    docstring); ``image_size``: resample the position grid as BLIP's interpolate_pos_embed."""
    source = str(path)
    state = read_state_dict(path)
    width = _shape(state, VISION + "patch_embed.proj.weight", 4, source, "vision width")[0]
    blip_config = blip_config_from_lavis(state, base_config(config, width, source), source,
                                         image_size)
    state = _prepare(state, blip_config, source)
    momentum = MOMENTUM["visual"] + "cls_token" in state
    queue = QUEUE["queue.image"] in state
    key_map = lavis_blip_key_map(blip_config, momentum, queue)
    model = import_model(blip_config, state, source, key_map)
    if model.momentum_encoders is not None and not momentum:
        logger.warning("%s: no momentum weights (*_m); copied from the model as BLIP "
                       "initialises them", source)
        for name, twin in model.momentum_encoders.items():
            ema_update_(twin, getattr(model, name), 0.0)  # BLIP's copy_params
    if model.momentum_encoders is not None and not queue:
        logger.warning("%s: no image_queue/text_queue; the queue starts random", source)
    return ImportedModel(model, None)


def save_lavis_blip(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``{'model': state_dict}`` in BLIP's layout to a ``.pth``/``.pt``/``.bin`` file (what
    BLIP's and LAVIS's ``load_checkpoint`` read), or the bare state dict to ``.safetensors``."""
    model = family_model(model, BLIP, "BLIP's layout")
    path = Path(path)
    if path.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise ConfigError(f"{path}: BLIP checkpoint file name must end in one of "
                          f"{[*TORCH_SUFFIXES, '.safetensors']}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; expected a file name")
    state = export_lavis_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda temp: write_safetensors(state, temp, copy=False))
    else:
        atomic_write(path, lambda temp: torch.save({"model": state}, temp))
    return path
