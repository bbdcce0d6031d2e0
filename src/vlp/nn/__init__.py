"""Building blocks that know nothing about any model family."""

from vlp.nn.attention import (
    Attention,
    AttentionOutput,
    KVCache,
    causal_mask,
    merge_masks,
    prefix_mask,
)
from vlp.nn.bert import BertTextTransformer, LMPredictionHead, PostNormBlock
from vlp.nn.momentum import FeatureQueue, ema_update_, momentum_copy
from vlp.nn.pooling import AttentionalPooler, pool_argmax, pool_cls, pool_eos, pool_mean
from vlp.nn.text import TextTransformer
from vlp.nn.transformer import Block, BlockCache, Mlp, QuickGELU, Transformer
from vlp.nn.vision import PatchDropout, VisionTransformer, resize_pos_embed

__all__ = [
    "Attention", "AttentionOutput", "AttentionalPooler", "BertTextTransformer", "Block",
    "BlockCache", "FeatureQueue", "KVCache", "LMPredictionHead", "Mlp", "PatchDropout",
    "PostNormBlock", "QuickGELU", "TextTransformer", "Transformer", "VisionTransformer",
    "causal_mask", "ema_update_", "merge_masks", "momentum_copy", "pool_argmax", "pool_cls",
    "pool_eos", "pool_mean", "prefix_mask", "resize_pos_embed",
]
