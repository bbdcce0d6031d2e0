"""Model configs as dataclasses and their JSON round trip.

A config is pure data: it is saved as ``config.json`` beside every checkpoint, so a
checkpoint directory is enough to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlp.errors import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# the largest sizes a config may declare: well above any released model, far below what would
# exhaust memory before the first tensor is made
MAX_IMAGE_SIZE = 16384
MAX_WIDTH = 1 << 15
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_MLP_RATIO = 64
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 16
MAX_QUERIES = 4096
MAX_QUEUE = 1 << 24


def bounded(default: Any, low: float, high: float) -> Any:
    """A numeric config field and its range [low, high], declared beside it; reading a config
    from JSON (or overrides) refuses a value outside it, naming the field."""
    return field(default=default, metadata={"bounds": (low, high)})


@dataclass
class VisionConfig:
    image_size: int = bounded(224, 1, MAX_IMAGE_SIZE)
    patch_size: int = bounded(32, 1, MAX_IMAGE_SIZE)
    width: int = bounded(768, 1, MAX_WIDTH)
    layers: int = bounded(12, 1, MAX_LAYERS)
    heads: int = bounded(12, 1, MAX_HEADS)
    mlp_ratio: float = bounded(4.0, 0, MAX_MLP_RATIO)
    act: str = "gelu"  # "gelu" or "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP)
    norm_eps: float = bounded(1e-5, 0, 1)
    pre_norm: bool = True  # LayerNorm on the embedded tokens before the blocks (open_clip ln_pre)
    class_token: bool = True  # a learned token before the patches (SigLIP has none)
    # "cls", "mean", "map" (a learned probe attends to the tokens, then a residual MLP: SigLIP's
    # attention pooling head) or "none"
    pool: str = "cls"
    patch_dropout: float = bounded(0.0, 0, 1)  # FLIP: fraction of patch tokens dropped in training
    dropout: float = bounded(0.0, 0, 1)
    # stochastic depth: the last block's drop-path rate, 0 at the first (BLIP's VQA ViT and
    # SimVLM fine-tuning: 0.1)
    drop_path: float = bounded(0.0, 0, 1)
    mean: tuple[float, float, float] = OPENAI_MEAN  # image normalisation of the preprocessing
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"  # eval resize: "shortest" side then center crop, or "squash"
    interpolation: str = "bicubic"
    pos_embed_antialias: bool = False  # antialiased bicubic when resizing positions (open_clip)
    patch_bias: bool = False  # the patch-embedding conv has a bias (BLIP / timm ViTs)


@dataclass
class TextConfig:
    vocab_size: int = bounded(49408, 1, MAX_VOCAB)
    context_length: int = bounded(77, 1, MAX_CONTEXT)
    width: int = bounded(512, 1, MAX_WIDTH)
    layers: int = bounded(12, 1, MAX_LAYERS)
    heads: int = bounded(8, 1, MAX_HEADS)
    mlp_ratio: float = bounded(4.0, 0, MAX_MLP_RATIO)
    act: str = "gelu"
    norm_eps: float = bounded(1e-5, 0, 1)
    causal: bool = True  # causal self-attention (CLIP text tower) or bidirectional
    # "eos": first eos_id token; "argmax": highest token id (open_clip); "first"; "mean"; "last":
    # the last position, padding included (SigLIP pads to the context and pools there)
    pool: str = "eos"
    # how a bidirectional tower without an attention_mask finds padding: "eos" (everything after
    # the first eos) or "none" (every position is attended: SigLIP)
    padding: str = "eos"
    eos_fallback: str = "last"  # "eos" pool of a row without eos: "last" or "first" (HF CLIP)
    mask_padding: bool = False  # causal tower also masks attention_mask==0 keys (HF CLIP)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    dropout: float = bounded(0.0, 0, 1)
    # stochastic depth of pre-LN text blocks (last block's rate)
    drop_path: float = bounded(0.0, 0, 1)


VQA_PROMPT = "Question: {} Short answer:"  # BLIP-2 zero-shot VQA (paper; LAVIS, OPT and FlanT5)


class ModelConfig:
    """What every family's config declares beyond its fields (the model contract's config side,
    read by data/ and train/ before a model exists)."""

    family: str
    # answers are tokenised as the question's continuation (`vlp.data.qa.answer_texts`)
    answer_continues_question: ClassVar[bool] = False

    def batch_text(self) -> tuple[str | None, int] | None:
        """(tokenizer directory, context length) when the model's batches carry text for
        another model than its own text tower (BLIP-2 stage 2: the LLM's); None otherwise."""
        return None

    def question_text(self, question: str) -> str:
        """The text the model's ``answer`` reads for a question (BLIP-2: the VQA prompt)."""
        return question

    def for_train_kind(self, train_kind: str) -> ModelConfig:
        """The config to fine-tune a pretrained model of this config on data of `train_kind`
        (BLIP on "qa": its VQA layout); the same config for most families and kinds."""
        return self

    def left_padded_prompts(self) -> bool:
        """Whether ``answer`` reads its questions as generation prompts of a decoder-only LM:
        bos + text without eos, left-padded with a mask (BLIP-2 on OPT/GPT-style LLMs); else
        the tokenizer's own rows (bos + text + eos, right-padded)."""
        return False


@dataclass
class ClipConfig(ModelConfig):
    family: str = "clip"
    embed_dim: int = bounded(512, 1, MAX_WIDTH)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid)
    init_logit_scale: float = 2.6592  # ln(1/0.07); SigLIP uses ln(10)
    init_logit_bias: float | None = None  # SigLIP: -10
    max_logit_scale: float = math.log(100)  # CLIP clips the temperature so logits scale <= 100
    proj_bias: bool = False
    # a linear projection after the vision pooling; False: the pooled vision width is the
    # embedding (SigLIP's attention pooling head), so embed_dim must equal vision.width
    image_proj: bool = True


@dataclass
class CocaConfig(ModelConfig):
    """CoCa (arXiv 2205.01917): contrastive + captioning over a ViT, a unimodal text decoder
    with an appended CLS and a multimodal decoder cross-attending to pooled image tokens."""

    family: str = "coca"
    # contrastive embedding size, also the width of the pooled image tokens
    embed_dim: int = bounded(512, 1, MAX_WIDTH)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(pool="none"))
    # unimodal text decoder; context_length counts text tokens, the appended CLS takes one more
    text: TextConfig = field(default_factory=lambda: TextConfig(context_length=76))
    # multimodal decoder, as wide as the text tower
    decoder_layers: int = bounded(12, 1, MAX_LAYERS)
    decoder_heads: int = bounded(8, 1, MAX_HEADS)
    # "separate": a 1-query contrastive pooler + a caption_queries pooler (paper); "shared": one
    # caption_queries pooler, query 0 -> contrastive, the rest -> decoder (open_clip)
    pooler: str = "separate"
    caption_queries: int = bounded(256, 1, MAX_QUERIES)
    pooler_heads: int = bounded(8, 1, MAX_HEADS)
    tie_lm_head: bool = False  # LM head reuses the token embedding matrix
    caption_weight: float = 2.0  # lambda_Cap of the paper
    contrastive_weight: float = 1.0  # lambda_Con of the paper
    label_smoothing: float = 0.0  # caption cross-entropy
    init_logit_scale: float = 2.6592  # ln(1/0.07)
    max_logit_scale: float = math.log(100)
    # "cls": only the appended CLS ignores padding (after the first eos); open_clip quirks for
    # parity: "pad_id" masks keys equal to pad_id in every row, "pad_id_legacy" (open_clip's
    # default) shifts that key validity right by one position
    text_mask: str = "cls"


@dataclass
class BlipConfig(ModelConfig):
    """BLIP (arXiv 2201.12086): a ViT and one BERT-style text transformer run in three modes,
    unimodal encoder (ITC), image-grounded encoder (ITM) and image-grounded decoder (LM)."""

    family: str = "blip"
    embed_dim: int = bounded(256, 1, MAX_WIDTH)  # ITC projection size
    # BLIP's ViT: no pre-norm, final LN, patch conv with bias; eps 1e-6 (HF BLIP: 1e-5)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=16, norm_eps=1e-6, pre_norm=False, patch_bias=True))
    # bert-base-uncased + [DEC] + [ENC]; post-LN; context_length = max positions; bos = [CLS];
    # hidden and attention dropout 0.1 (BLIP's med_config / bert-base)
    text: TextConfig = field(default_factory=lambda: TextConfig(
        vocab_size=30524, context_length=512, width=768, layers=12, heads=12, act="gelu",
        norm_eps=1e-12, causal=False, pool="first", pad_id=0, bos_id=101, eos_id=102,
        dropout=0.1))
    dec_id: int = 30522  # [DEC]: first token of the image-grounded decoder (LM)
    enc_id: int = 30523  # [ENC]: first token of the image-grounded encoder (ITM)
    # encoder/decoder parameter sharing: "all_but_sa" (paper: separate self-attention only),
    # "all" or "none"
    share: str = "all_but_sa"
    text_encoder: bool = True  # bidirectional text transformer (ITC, ITM, VQA question)
    text_decoder: bool = True  # causal text transformer + LM head (captions, VQA answers)
    retrieval_heads: bool = True  # vision_proj, text_proj, itm_head and the ITC temperature
    # ITC feature queue; 0: no momentum encoders or queue (plain in-batch ITC, as imported)
    queue_size: int = bounded(57600, 0, MAX_QUEUE)
    momentum: float = 0.995  # EMA of the momentum encoders
    alpha: float = 0.4  # weight of the momentum soft targets in ITC
    # alpha ramps linearly from 0 over these optimizer steps; None: the run's first epoch (as
    # BLIP's fine-tuning; its pretraining ramps over two epochs); 0: no ramp
    alpha_warmup_steps: int | None = None
    lm_prompt_tokens: int = 0  # caption tokens after [DEC] left out of the LM loss (a prompt)
    init_temp: float = 0.07
    min_temp: float = 0.001
    max_temp: float = 0.5
    label_smoothing: float = 0.1  # LM cross-entropy
    # pretraining terms computed in training: any of "itc", "itm", "lm" (CapFilt fine-tunes a
    # filter on ITC + ITM and a captioner on LM alone)
    objectives: tuple[str, ...] = ("itc", "itm", "lm")
    # reference quirks (set by vlp.interop.hf_blip): replace the first text token with
    # [ENC]/[DEC] for ITM / LM / VQA (paper); HF's forwards take the ids as given
    replace_first_token: bool = True
    # where the answer decoder's cross-attention hides question padding: "always" (vlp),
    # "teacher_forcing" (BLIP: not in answer generation), "never" (HF ignores the mask)
    mask_question_padding: str = "always"
    # BLIP's VQA model (BLIP_VQA, HF BlipForQuestionAnswering): separate question encoder and
    # answer decoder (share "none"), the decoder cross-attending to question states (text
    # width); fine-tuning a pretrained BLIP on VQA rows switches to it (`for_train_kind`)
    vqa_layout: bool = False

    def for_train_kind(self, train_kind: str) -> BlipConfig:
        if train_kind != "qa" or self.vqa_layout:
            return self
        return dataclasses.replace(self, vqa_layout=True, share="none", retrieval_heads=False,
                                   queue_size=0, objectives=("lm",))


@dataclass
class Blip2Config(ModelConfig):
    """BLIP-2 (arXiv 2301.12597): a frozen image encoder, a Q-Former (learned queries + a
    BERT-style transformer) and, in stage 2, a frozen LLM fed the projected query outputs."""

    family: str = "blip2"
    embed_dim: int = bounded(256, 1, MAX_WIDTH)  # ITC projection size
    num_queries: int = bounded(32, 1, MAX_QUERIES)
    # queries cross-attend to the image in layers 0, k, 2k, ...
    cross_attention_freq: int = bounded(2, 1, MAX_LAYERS)
    # the Q-Former: bert-base-uncased + [DEC] (30522); post-LN; dropout 0.1 (LAVIS, HF)
    text: TextConfig = field(default_factory=lambda: TextConfig(
        vocab_size=30523, context_length=512, width=768, layers=12, heads=12, act="gelu",
        norm_eps=1e-12, causal=False, pool="first", pad_id=0, bos_id=101, eos_id=102,
        dropout=0.1))
    dec_id: int = 30522  # [DEC]: replaces the first text token for ITG (LAVIS)
    # Q-Former parts: text embeddings + text FFNs (stage 1, retrieval), ITC/ITM heads, LM head
    text_parts: bool = True
    retrieval_heads: bool = True
    lm_head: bool = True
    # frozen image encoder: "vlp" (a vlp ViT: built from `vision`, or the `.visual` of the vlp
    # model directory at vision_path), "hf" (a transformers vision model directory) or
    # "open_clip" (vision_path = "model_name" or "model_name:pretrained"). With a path, only
    # the reference is saved and `vision` gives the preprocessing (size, mean, std).
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=14, width=1408, layers=40, heads=16, mlp_ratio=6144 / 1408,
        norm_eps=1e-6, pre_norm=False, patch_bias=True, pool="none"))  # EVA ViT-g/14 shape
    vision_format: str = "vlp"
    vision_path: str | None = None
    vision_layer: int = -2  # hidden state used: -2 = second-to-last layer's output (paper)
    vision_dtype: str = "float32"  # storage of the frozen encoder: float32, bfloat16, float16
    ln_vision: bool = True  # a trainable LayerNorm on the frozen features (LAVIS ln_vision)
    # frozen LLM of stage 2: "none" (stage 1), "causal" (decoder-only, AutoModelForCausalLM)
    # or "seq2seq" (encoder-decoder, AutoModelForSeq2SeqLM); loaded from llm_path (an HF
    # directory, saved by reference) or built from the inline HF config llm_config (saved)
    llm: str = "none"
    llm_path: str | None = None
    llm_config: dict | None = None
    llm_dtype: str = "float32"
    # stage-2 batches hold the LLM's text, not the Q-Former's: tokenised by llm_tokenizer (a
    # tokenizer directory; None: llm_path's) to at most llm_context_length tokens (LAVIS
    # max_txt_len); `text` stays the Q-Former's
    llm_tokenizer: str | None = None
    llm_context_length: int = bounded(32, 1, MAX_CONTEXT)
    init_temp: float = 0.07  # ITC temperature, learnable and unclamped (LAVIS)
    itc_label_smoothing: float = 0.1
    label_smoothing: float = 0.1  # ITG cross-entropy
    llm_label_smoothing: float = 0.0  # stage-2 LM cross-entropy
    # HF Blip2 (set by vlp.interop.hf_blip2): the LLM id of "<image>" placeholders that HF
    # replaces with the visual prompts; vlp prepends the prompts and never reads it
    hf_image_token_index: int | None = None

    def batch_text(self) -> tuple[str | None, int] | None:
        """Stage 2: (tokenizer directory, context length) of the LLM text that batches carry;
        None in stage 1, whose batches are tokenised for the Q-Former (`text`)."""
        if self.llm == "none":
            return None
        return self.llm_tokenizer or self.llm_path, self.llm_context_length

    def question_text(self, question: str) -> str:
        return VQA_PROMPT.format(question) if self.llm != "none" else question

    def left_padded_prompts(self) -> bool:
        return self.llm == "causal"


@dataclass
class SimvlmConfig(ModelConfig):
    """SimVLM (arXiv 2108.10904): one bidirectional encoder over [image patches; text prefix]
    and a causal text decoder cross-attending to it, trained with PrefixLM alone.

    ``vision`` shapes the image input and the encoder (width, heads, mlp_ratio, act, norm_eps,
    dropout; ``layers`` = encoder depth); ``text`` holds the vocabulary, ids and
    ``context_length`` (the longest prefix, and the longest decoded text), ``layers`` = decoder
    depth; its width and heads must equal vision's (one residual stream)."""

    family: str = "simvlm"
    # PrefixLM learns an answer as the rest of the question's text, so answers are tokenised as
    # that continuation (`vlp.data.qa.answer_texts`); BLIP's answer decoder reads a text of its own
    answer_continues_question: ClassVar[bool] = True
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=16, width=768, layers=12, heads=12, pool="none"))
    text: TextConfig = field(default_factory=lambda: TextConfig(
        vocab_size=32000, context_length=64, width=768, layers=12, heads=12))
    # the conv stage before the patch projection (`vlp.nn.convstem`): "light" (basic residual
    # blocks, each halving the resolution: 1.2M parameters at width 64, 3 blocks), "resnet50" or
    # "resnet101" (a ResNet's 7x7 root, max pool and first `conv_blocks` stages of bottleneck
    # blocks, the paper's conv stage: 8.5M / 27.5M parameters at width 64, 3 stages, stride 16)
    stem: str = "light"
    # light: residual blocks (0: plain ViT patches); resnet*: ResNet stages, 1 to 4
    conv_blocks: int = bounded(3, 0, 16)
    # channels of the first block (light) or bottleneck width of the first stage (resnet*),
    # doubled by each further one
    conv_width: int = bounded(64, 1, MAX_WIDTH)
    # ablation (§4.4): one stack of vision.layers + text.layers blocks, prefix-masked, instead
    # of encoder + decoder
    decoder_only: bool = False
    # text prefix in training: "random" (PrefixLM: the first 0..n tokens of each text go to the
    # encoder; the cut falls between tokens),
    # "none" (image alone; the whole text is the target: captioning fine-tuning)
    prefix: str = "random"
    tie_lm_head: bool = True  # LM head reuses the token embedding matrix (T5's shared vocab)
    label_smoothing: float = 0.0


@dataclass
class LMConfig(ModelConfig):
    """A decoder-only language model with GPT-2's architecture (pre-LN blocks, learned
    positions, tanh GELU, a final norm, the LM head tied to the token embeddings), trained on
    text alone (source kind "text") by the normal trainer; `vlp convert --to hf` writes it as a
    transformers ``GPT2LMHeadModel``, e.g. as BLIP-2's frozen LLM (``llm_path``)."""

    family: str = "lm"
    # GPT-2 small: 124M parameters; ``dropout`` is GPT-2's residual dropout
    text: TextConfig = field(default_factory=lambda: TextConfig(
        vocab_size=50257, context_length=1024, width=768, layers=12, heads=12, act="gelu_tanh",
        causal=True, dropout=0.1))
    label_smoothing: float = 0.0


CONFIG_CLASSES: dict[str, type] = {"clip": ClipConfig, "coca": CocaConfig, "blip": BlipConfig,
                                   "blip2": Blip2Config, "simvlm": SimvlmConfig, "lm": LMConfig}
_NESTED: dict[str, type] = {"vision": VisionConfig, "text": TextConfig}


def config_to_dict(config: Any) -> dict:
    """Plain JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def check_fields(cls: type, data: dict, where: str) -> None:
    """Refuse keys of ``data`` that are not fields of the dataclass ``cls``, naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")


def _from_dict(cls: type, data: dict, where: str) -> Any:
    check_fields(cls, data, where)
    kwargs = {}
    hints = typing.get_type_hints(cls)
    bounds = {f.name: f.metadata["bounds"] for f in dataclasses.fields(cls)
              if "bounds" in f.metadata}
    for key, value in data.items():
        if key in _NESTED and isinstance(value, dict):
            value = _from_dict(_NESTED[key], value, f"{where}.{key}")
        else:
            _check_type(value, hints.get(key), f"{where}.{key}")
            if key in bounds and not bounds[key][0] <= value <= bounds[key][1]:
                kind = "an integer" if isinstance(value, int) else "a number"
                raise ConfigError(f"{where}.{key}={value!r}: expected {kind} in "
                                  f"[{bounds[key][0]}, {bounds[key][1]}]")
            if isinstance(value, list):
                value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


_SIMPLE = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _check_type(value: Any, hint: Any, where: str) -> None:
    """ConfigError unless `value` (from JSON) fits a simple field annotation (int, float, str,
    bool, their Optional forms, tuples); other annotations are left to the config's checks."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                     types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return
    simple = [o for o in options if o in _SIMPLE]
    sequences = [o for o in options if typing.get_origin(o) is tuple or o is tuple]
    if len(simple) + len(sequences) < len([o for o in options if o is not type(None)]):
        return  # a type this check does not know
    if sequences and isinstance(value, list | tuple):
        return
    for kind in simple:
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            return
        if kind is str and isinstance(value, str):
            return
    expected = " or ".join([_SIMPLE[k] for k in simple] + ["a list"] * bool(sequences))
    raise ConfigError(f"{where}={value!r}: expected {expected}")


def config_from_dict(data: dict, where: str = "config") -> Any:
    """Rebuild a config from ``config_to_dict`` output; the ``family`` field picks the class."""
    family = data.get("family")
    if not isinstance(family, str) or family not in CONFIG_CLASSES:
        raise ConfigError(
            f"{where}: unknown model family {family!r}; expected one of {sorted(CONFIG_CLASSES)}"
        )
    return _from_dict(CONFIG_CLASSES[family], data, where)


MAX_CONFIG_BYTES = 16 << 20


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config file holds at most "
                          f"{MAX_CONFIG_BYTES}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(data, where=str(path))
