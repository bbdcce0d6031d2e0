"""Named presets: each registered name returns a fresh model config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlp.config.schema import (
    Blip2Config,
    BlipConfig,
    ClipConfig,
    CocaConfig,
    LMConfig,
    SimvlmConfig,
    TextConfig,
    VisionConfig,
)
from vlp.errors import ConfigError

PRESETS: dict[str, Callable[[], Any]] = {}


def register_preset(name: str) -> Callable:
    def decorator(fn: Callable[[], Any]) -> Callable[[], Any]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is registered twice")
        PRESETS[name] = fn
        return fn

    return decorator


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Any:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return PRESETS[name]()


@register_preset("clip-tiny")
def _clip_tiny() -> ClipConfig:
    # 1.8M params: 64 px images in 16 px patches (a 4x4 grid: ~3x the samples/s of 8 px patches
    # on CPU, and shapes are learnt sooner per second), BPE vocab 1024 trained on the captions
    return ClipConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=4,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        text=TextConfig(vocab_size=1024, context_length=32, width=128, layers=4, heads=4,
                        pad_id=0, bos_id=2, eos_id=1),  # the ids train_tokenizer assigns
    )


def _clip_openclip_shape(patch: int, vision_width: int, vision_layers: int, vision_heads: int,
                         embed_dim: int, text_width: int, text_heads: int) -> ClipConfig:
    return ClipConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=224, patch_size=patch, width=vision_width,
                            layers=vision_layers, heads=vision_heads),
        text=TextConfig(vocab_size=49408, context_length=77, width=text_width, layers=12,
                        heads=text_heads, pad_id=0, bos_id=49406, eos_id=49407),
    )


@register_preset("clip-vit-b-32")
def _clip_vit_b_32() -> ClipConfig:  # 151.3M params, open_clip ViT-B-32
    return _clip_openclip_shape(32, 768, 12, 12, 512, 512, 8)


@register_preset("clip-vit-b-16")
def _clip_vit_b_16() -> ClipConfig:  # 149.6M params, open_clip ViT-B-16
    return _clip_openclip_shape(16, 768, 12, 12, 512, 512, 8)


@register_preset("clip-vit-l-14")
def _clip_vit_l_14() -> ClipConfig:  # 427.6M params, open_clip ViT-L-14
    return _clip_openclip_shape(14, 1024, 24, 16, 768, 768, 12)


@register_preset("siglip-tiny")
def _siglip_tiny() -> ClipConfig:  # clip-tiny trained with the pairwise sigmoid loss
    config = _clip_tiny()
    config.loss = "siglip"
    config.init_logit_scale = 2.302585  # ln(10)
    config.init_logit_bias = -10.0
    return config


@register_preset("coca-tiny")
def _coca_tiny() -> CocaConfig:
    # CPU-sized CoCa beside clip-tiny: 64 px, patch 8, width 128, vocab 1024, 32 text tokens;
    # the text layers split in half between the unimodal and the multimodal decoder (paper)
    tiny = _clip_tiny()
    tiny.vision.pool = "none"
    tiny.text.layers = 2
    return CocaConfig(embed_dim=128, vision=tiny.vision, text=tiny.text, decoder_layers=2,
                      decoder_heads=4, caption_queries=32, pooler_heads=4)


@register_preset("coca-vit-b-32")
def _coca_vit_b_32() -> CocaConfig:  # 253.56M params, open_clip coca_ViT-B-32
    return CocaConfig(
        embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                            pool="none"),
        text=TextConfig(vocab_size=49408, context_length=76, width=512, layers=12, heads=8,
                        pad_id=0, bos_id=49406, eos_id=49407),
        decoder_layers=12, decoder_heads=8, pooler="shared", caption_queries=256,
        pooler_heads=8,
    )


@register_preset("blip-tiny")
def _blip_tiny() -> BlipConfig:
    # CPU-sized BLIP beside clip-tiny: 64 px in 16 px patches, width 128, 4+4 layers; the text
    # vocab is train_tokenizer's 1024 ids plus [DEC] 1024 and [ENC] 1025
    tiny = _clip_tiny()
    tiny.vision.pre_norm, tiny.vision.patch_bias, tiny.vision.norm_eps = False, True, 1e-6
    text = TextConfig(vocab_size=1026, context_length=32, width=128, layers=4, heads=4,
                      act="gelu", norm_eps=1e-12, causal=False, pool="first",
                      pad_id=0, bos_id=2, eos_id=1)
    return BlipConfig(embed_dim=128, vision=tiny.vision, text=text, dec_id=1024, enc_id=1025,
                      queue_size=1024)


def _blip_shape(width: int, layers: int, heads: int) -> BlipConfig:
    return BlipConfig(vision=VisionConfig(image_size=224, patch_size=16, width=width,
                                          layers=layers, heads=heads, norm_eps=1e-6,
                                          pre_norm=False, patch_bias=True))


@register_preset("blip-vit-b-16")
def _blip_vit_b_16() -> BlipConfig:  # 252.4M params ("all": 224.1M, "none": 361.3M; Table 3)
    return _blip_shape(768, 12, 12)


@register_preset("blip-vit-l-16")
def _blip_vit_l_16() -> BlipConfig:  # 474.7M params: ViT-L/16 image encoder, BERT-base text
    return _blip_shape(1024, 24, 16)


@register_preset("blip2-tiny")
def _blip2_tiny() -> Blip2Config:
    # CPU-sized stage 1 beside blip-tiny: a 64 px vlp ViT (3 of 4 blocks used), 8 queries, a
    # 2-layer Q-Former of width 128; the text vocab is train_tokenizer's 1024 ids + [DEC] 1024
    tiny = _clip_tiny()
    tiny.vision.pre_norm, tiny.vision.patch_bias, tiny.vision.norm_eps = False, True, 1e-6
    tiny.vision.pool = "none"
    text = TextConfig(vocab_size=1025, context_length=32, width=128, layers=2, heads=4,
                      act="gelu", norm_eps=1e-12, causal=False, pool="first",
                      pad_id=0, bos_id=2, eos_id=1)
    return Blip2Config(embed_dim=128, num_queries=8, text=text, dec_id=1024, vision=tiny.vision)


def _blip2_llm_shape(llm: str, llm_path: str) -> Blip2Config:
    # stage 2 with the paper's Q-Former (BERT-base, 32 queries, cross-attention every 2nd
    # layer) over EVA ViT-g/14 (39 of 40 layers); only the query side of the Q-Former is kept
    return Blip2Config(text_parts=False, retrieval_heads=False, lm_head=False, llm=llm,
                       llm_path=llm_path, vision_dtype="float16", llm_dtype="float16")


@register_preset("blip2-opt-2.7b")
def _blip2_opt_2_7b() -> Blip2Config:  # 107.1M trainable (Q-Former 105.2M + projection)
    return _blip2_llm_shape("causal", "facebook/opt-2.7b")


@register_preset("blip2-flan-t5-xl")
def _blip2_flan_t5_xl() -> Blip2Config:  # 106.7M trainable (Q-Former 105.2M + projection)
    return _blip2_llm_shape("seq2seq", "google/flan-t5-xl")


@register_preset("blip2-qformer")
def _blip2_qformer() -> Blip2Config:  # stage 1: 186.7M trainable, 985.9M frozen ViT-g
    return Blip2Config()


@register_preset("simvlm-tiny")
def _simvlm_tiny() -> SimvlmConfig:
    # CPU-sized SimVLM beside coca-tiny: 64 px through 3 conv blocks (16/32/64 channels) into a
    # 4x4 patch grid, width 128, 4 encoder + 2 decoder layers, train_tokenizer's 1024 ids
    tiny = _clip_tiny()
    tiny.vision.pool = "none"
    text = TextConfig(vocab_size=1024, context_length=64, width=128, layers=2, heads=4,
                      pad_id=0, bos_id=2, eos_id=1)
    return SimvlmConfig(vision=tiny.vision, text=text, conv_blocks=3, conv_width=16)


@register_preset("simvlm-base")
def _simvlm_base() -> SimvlmConfig:
    # the paper's Base shape: ViT-Base-sized 12-layer encoder and 12-layer decoder (768 wide,
    # 12 heads, MLP 3072), 224 px in 16 px patches after the first three stages of ResNet-50
    # (8.5M parameters, 1024 channels at stride 16, projected 1x1 to 768), 32k vocab
    return SimvlmConfig(stem="resnet50")


@register_preset("gpt2")
def _gpt2() -> LMConfig:  # 124.4M parameters, GPT-2 small's shape
    return LMConfig()


@register_preset("gpt2-tiny")
def _gpt2_tiny() -> LMConfig:
    # 0.7M parameters: the frozen LLM of the BLIP-2 demo (a BPE of 1024 ids on its texts)
    return LMConfig(text=TextConfig(vocab_size=1024, context_length=128, width=128, layers=3,
                                    heads=4, act="gelu_tanh", causal=True, dropout=0.1,
                                    pad_id=0, bos_id=2, eos_id=1))
